// tokenizer.json of any bytes: loaded or refused with an error; a loaded tokenizer encodes and
// decodes a fixed text, and decodes every id it has.
#include <string.h>

#include "text/tokenizer.h"
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    Error err;
    Tokenizer *t = tok_load(fuzz_file(data, size, ".json"), &err);
    if (!t) return 0;
    static const char text[] = "Hello, world! 123 \xe4\xbd\xa0\xe5\xa5\xbd  \n\tthe end";
    TokIds ids = {0};
    if (tok_encode(t, text, strlen(text), TOK_ADD_SPECIAL, &ids, &err) == 0) {
        size_t n;
        char *back = tok_decode(t, ids.v, ids.n, 0, &n, &err);
        free(back);
    }
    ids_free(&ids);
    int V = tok_vocab_size(t);
    for (int id = 0; id < V && id < 4096; id++) {
        size_t n;
        char *s = tok_decode(t, &id, 1, 0, &n, &err);
        free(s);
    }
    tok_free(t);
    return 0;
}
