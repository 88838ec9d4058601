// Pre-tokenization: the HuggingFace pre_tokenizer chain (Sequence, Split, ByteLevel) that cuts a
// text into the pieces BPE merges within. Regexes run on PCRE2 (UTF + UCP, JIT when available).
#ifndef DSV3_TEXT_PRETOK_H
#define DSV3_TEXT_PRETOK_H

#include <stddef.h>
#include <stdint.h>

#include "base/error.h"

typedef struct Regex {
    void *code;     // pcre2_code
    void *md;       // pcre2_match_data
    void *mctx;     // pcre2_match_context carrying the JIT stack
    void *jstack;   // pcre2_jit_stack
    int jit;
} Regex;

// Compiles a HuggingFace/JavaScript-flavoured regex. The pattern is rewritten first so that it
// means what it means in JavaScript (the reference): \uXXXX and \u{X..} become code points, and
// the shorthands \s \S \d \D \w \W take their ECMAScript meaning (\s is ECMAScript white space:
// it includes U+FEFF but not U+0085 or U+180E; \d and \w are ASCII). Unicode properties (\p{L},
// \p{N}, ...) come from PCRE2's tables. literal != 0 compiles the text as a plain string.
int regex_compile(Regex *r, const char *pattern, size_t len, int literal, Error *err);
void regex_free(Regex *r);
// The next non-empty match in s[0, n) starting at or after `from` (s must be valid UTF-8; the
// subject is exactly s[0, n), so lookaheads see its end). Returns 1 with [*ms, *me), 0 when there
// is none, -1 with err on a matching failure (resource limits).
int regex_next(Regex *r, const uint8_t *s, size_t n, size_t from, size_t *ms, size_t *me, Error *err);
// Rewrites a pattern as regex_compile does (exposed for the tests); returns a malloc'd string.
char *regex_translate(const char *pattern, size_t len, Error *err);

typedef enum SplitBehavior {
    SPLIT_REMOVED,
    SPLIT_ISOLATED,
    SPLIT_MERGED_WITH_PREVIOUS,
    SPLIT_MERGED_WITH_NEXT,
    SPLIT_CONTIGUOUS,
} SplitBehavior;

typedef enum PreTokKind { PT_SPLIT, PT_BYTELEVEL } PreTokKind;

typedef struct Span {
    uint32_t start, len;
} Span;

typedef struct SpanVec {
    Span *v;
    size_t n, cap;
} SpanVec;

typedef struct PreTokStep {
    PreTokKind kind;
    Regex re;               // Split: its pattern; ByteLevel with use_regex: the GPT-2 pattern
    int has_regex;
    SplitBehavior behavior; // Split
    int invert;             // Split
    int add_prefix_space;   // ByteLevel
    SpanVec scratch;        // this level's pieces while the next level runs
} PreTokStep;

typedef struct PreTokenizer {
    int n;
    PreTokStep *steps;  // applied in order; the ByteLevel step is last
} PreTokenizer;

// Receives each final piece in order: s[0, n), to be read as " " + s when prefix_space is set.
typedef int (*PieceFn)(void *ctx, const uint8_t *s, size_t n, int prefix_space, Error *err);

// Builds the chain from the tokenizer.json "pre_tokenizer" object (a jansson json_t*). `where`
// names the file for errors ("tokenizer.json"). Unsupported types are an error naming them.
int pretok_from_json(PreTokenizer *p, const void *json, const char *where, Error *err);
void pretok_free(PreTokenizer *p);
// Cuts s[0, n) (valid UTF-8) into pieces and calls fn on each.
int pretok_run(PreTokenizer *p, const uint8_t *s, size_t n, PieceFn fn, void *ctx, Error *err);

// The ByteLevel alphabet (GPT-2's): printable Latin-1 bytes stand for themselves, the other 68
// bytes for the code points 256, 257, ... in byte order. A token's text in tokenizer.json is its
// bytes written in this alphabet.
uint32_t bytelevel_char(uint8_t byte);
// The byte a code point stands for, or -1 when it is not in the alphabet.
int bytelevel_byte(uint32_t cp);

// ECMAScript white space (WhiteSpace + LineTerminator), the set \s means and trim() removes.
int js_is_space(uint32_t cp);

#endif
