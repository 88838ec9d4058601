// Any text through the byte-level BPE and the DeepSeek-V3 pre-tokenizer, with the tokenizer.json
// named by $DSV3_FUZZ_TOKENIZER (`make fuzz` trains one): decode(encode(text)) gives the text back
// when it is valid UTF-8.
#include <string.h>

#include "text/tokenizer.h"
#include "text/utf8.h"
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static Tokenizer *t;
    Error err;
    if (!t) {
        const char *path = getenv("DSV3_FUZZ_TOKENIZER");
        if (!path || !(t = tok_load(path, &err))) abort();
    }
    TokIds ids = {0};
    if (tok_encode(t, (const char *)data, size, 0, &ids, &err) != 0) abort();
    size_t n;
    char *back = tok_decode(t, ids.v, ids.n, 0, &n, &err);
    if (!back) abort();
    if (utf8_valid_prefix(data, size) == size && (n != size || memcmp(back, data, size))) abort();
    free(back);
    ids_free(&ids);
    return 0;
}
