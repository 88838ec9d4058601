// A regular expression held to one character at a time: JSON Schema's `pattern` (ECMA-262 syntax,
// matched anywhere in the string unless anchored), compiled to a Thompson NFA over code points.
// After each character of a string the state tells whether the string can still be completed to
// one the pattern matches, and for the next character's code points still open (a multi-byte
// character or an escape partly written) whether any of them keeps it so: a JSON Schema prefix
// refuses a string's byte as soon as no completion could match (text/json_schema.c), so a masked
// answer never walks into a dead end.
//
// Supported: literal characters and escaped punctuation, '.' (anything but a line terminator),
// classes [...] and [^...] with ranges and class escapes, \d \D \w \W \s \S (ECMA-262's: ASCII
// digits, ASCII word characters, its white space), \t \n \r \f \v \xHH \uHHHH, groups (...) and
// (?:...), alternation |, the quantifiers * + ? {n} {n,} {n,m} (a lazy one, with '?', matches the
// same set of strings), ^ and $ (the start and end of the string; no multiline flag). Refused, with
// the reason: backreferences, lookaround, named groups, \b \B, \p{...}, \cX, \0, a pattern past
// PATTERN_MAX_STATES states once repetitions are expanded, or past PATTERN_MAX_BYTES bytes.
// Code point U+0000 and the surrogates are never matched: a JSON string cannot hold them.
#ifndef DSV3_TEXT_PATTERN_H
#define DSV3_TEXT_PATTERN_H

#include <stddef.h>
#include <stdint.h>

#define PATTERN_MAX_STATES 256
#define PATTERN_MAX_BYTES 1000

typedef struct Pattern Pattern;

// Where a string stands against a pattern: a value to copy (the mask copies it per token id).
typedef struct PatternState {
    uint64_t live[PATTERN_MAX_STATES / 64];  // the NFA states the string so far may be in
    uint8_t matched;                        // a match was found: anything may follow
} PatternState;

// Compiles pattern (UTF-8, NUL-terminated); 0 and *out, or -1 with why (n bytes), e.g. "lookaround
// (?= is not supported".
int pattern_compile(Pattern **out, const char *pattern, char *why, size_t n);
void pattern_free(Pattern *r);

// The state of the empty string.
void pattern_start(const Pattern *r, PatternState *st);
// 1 when some code point in [lo, hi] can come next with the string still completable to a match.
int pattern_can_take(const Pattern *r, const PatternState *st, uint32_t lo, uint32_t hi);
// Code point cp comes next: 0, or -1 when no completion of the string can match any more.
int pattern_take(const Pattern *r, PatternState *st, uint32_t cp);
// 1 when the string read so far matches.
int pattern_accepts(const Pattern *r, const PatternState *st);
// 1 when any text may come next (a match was found, or one can begin after anything).
int pattern_unconstrained(const Pattern *r, const PatternState *st);

#endif
