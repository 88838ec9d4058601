// JSON Schema patterns (src/text/pattern.h) on any bytes: an input is a pattern, a NUL, then a
// string. A pattern that compiles is followed through the string's code points: a code point it
// says may come next is taken (and one it says may not is refused), and after every one taken the
// string can still be completed — it matches now, or some code point may come next (the mask's
// promise that a prefix it lets through is never a dead end).
#include <stdlib.h>
#include <string.h>

#include "text/pattern.h"
#include "text/utf8.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *nul = memchr(data, 0, size);
    if (!nul) return 0;
    char why[256];
    Pattern *re = NULL;
    if (pattern_compile(&re, (const char *)data, why, sizeof why)) return 0;
    const uint8_t *s = nul + 1;
    size_t n = size - (size_t)(nul - data) - 1;
    PatternState st;
    pattern_start(re, &st);
    for (size_t i = 0; i < n;) {
        if (!pattern_accepts(re, &st) && !pattern_can_take(re, &st, 1, 0x10FFFF)) abort();  // a dead end
        uint32_t cp;
        i += utf8_decode(s + i, n - i, &cp);
        if (cp == 0 || (cp >= 0xD800 && cp <= 0xDFFF)) break;  // (a JSON string cannot hold them)
        PatternState copy = st;
        int may = pattern_can_take(re, &st, cp, cp), took = pattern_take(re, &copy, cp) == 0;
        if (may != took) abort();
        if (!took) break;
        st = copy;
    }
    pattern_free(re);
    return 0;
}
