// Stop strings at the text level: generated text goes in as it is decoded, and what comes out is
// only text that can no longer turn out to be part of a stop string — the longest end of the text
// that is the start of some stop string is held back until the next piece settles it. When a stop
// string appears, the text before it is released and everything from it on is dropped (the OpenAI
// API leaves the stop string out of the answer). Generation stops at the first stop string to be
// complete: of all occurrences, the one that ends first (on a tie, the one that starts first) —
// so the answer does not depend on how the text was split into pieces.
//
// UTF-8 safe: given complete characters in and stop strings that are valid UTF-8, a held-back
// end begins with the first byte of a character (so does every stop string), so what comes out
// is whole characters too.
#ifndef DSV3_SERVE_STOP_TEXT_H
#define DSV3_SERVE_STOP_TEXT_H

#include <stddef.h>

#include "text/utf8.h"

#define STOP_TEXT_MAX 4

typedef struct StopText {
    const char *stop[STOP_TEXT_MAX];  // not owned; non-empty
    size_t len[STOP_TEXT_MAX];
    int n;
    ByteBuf held;  // text not yet released
    int matched;   // a stop string was found: nothing more comes out
} StopText;

// stops: n (≤ STOP_TEXT_MAX) NUL-terminated strings that outlive s; empty ones are ignored.
void stop_text_init(StopText *s, const char *const *stops, int n);
void stop_text_free(StopText *s);
// Appends text[0, n); the text now settled is appended to out. Returns 1 when a stop string
// matched (now or before), 0 when not, -1 when memory runs out.
int stop_text_push(StopText *s, const char *text, size_t n, ByteBuf *out);
// The end of generation: the held-back text is released into out (nothing after a match).
// Returns 0, or -1 when memory runs out.
int stop_text_finish(StopText *s, ByteBuf *out);
// After a match: the text pushed after the stop string (in the push that completed it), which the
// answer leaves out but a caller splitting text at a marker wants.
const char *stop_text_after(const StopText *s, size_t *n);

#endif
