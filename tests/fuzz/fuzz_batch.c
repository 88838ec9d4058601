// Token-id text of any bytes: as a `--batch-file` (one comma-separated id list per line) and, up
// to the first NUL, as one `--tokens` list. Either parses into ids in range or fails with an
// error; nothing else.
#include <string.h>

#include "fuzz_common.h"
#include "text/token_list.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    Error err;
    int **lines, *lens, n;
    if (token_lists_read(fuzz_file(data, size, ".batch"), &lines, &lens, &n, &err) == 0) {
        for (int i = 0; i < n; i++)
            for (int j = 0; j < lens[i]; j++)
                if (lines[i][j] < 0 || lens[i] < 1) abort();
        token_lists_free(lines, lens, n);
    }
    char *s = malloc(size + 1);
    if (!s) return 0;
    memcpy(s, data, size);
    s[size] = 0;
    int *ids, k;
    if (token_list_parse(s, &ids, &k, &err) == 0) {
        if (k < 1) abort();
        free(ids);
    }
    free(s);
    return 0;
}
