// Whether bytes are the beginning of a JSON object (RFC 8259), fed a few at a time: what constrained
// decoding needs to tell, for every token of the vocabulary, whether the answer may go on with it
// (`response_format: {"type": "json_object"}`). The state is a small value: copy it, feed a
// token's bytes to the copy, keep the copy when they fit.
//
// Accepted: one top-level object, optionally preceded by whitespace, nested at most
// JSON_PREFIX_MAX_DEPTH deep, strings of valid UTF-8 (split anywhere between feeds) with the JSON
// escapes, numbers in JSON's grammar, true / false / null. Refused as well, to keep generation from
// running away: more than JSON_PREFIX_MAX_SPACE whitespace bytes in a row outside strings, and
// anything but that much whitespace after the closing brace; and what a common parser cannot
// hold (jansson, by default, refuses each): the escape \u0000, an integer past int64, an exponent
// past a double's — at most JSON_PREFIX_MAX_INT_DIGITS integer digits and
// JSON_PREFIX_MAX_EXP_DIGITS exponent digits.
#ifndef DSV3_TEXT_JSON_PREFIX_H
#define DSV3_TEXT_JSON_PREFIX_H

#include <stddef.h>
#include <stdint.h>

#define JSON_PREFIX_MAX_DEPTH 32
#define JSON_PREFIX_MAX_SPACE 16
#define JSON_PREFIX_MAX_INT_DIGITS 18
#define JSON_PREFIX_MAX_EXP_DIGITS 2

typedef struct JsonPrefix {
    uint8_t state;                          // what comes next (json_prefix.c)
    uint8_t depth;                          // open containers
    uint8_t in_key;                         // the string being read is an object key
    uint8_t pending;                        // UTF-8 continuation bytes (or \u hex digits) still due
    uint8_t lo, hi;                         // the range the next continuation byte must be in
    uint8_t lit;                            // literal: the index of its next byte; number: digits so far
    uint8_t which;                          // which literal
    uint8_t space;                          // whitespace bytes in a row
    uint8_t low_due;                        // the \u escape being read must be a low surrogate
    uint16_t code;                          // the \u escape's value so far
    uint32_t cp;                            // the string character being read: its bits so far (UTF-8),
                                            // the high surrogate of a pair; once complete, its code point
    uint8_t events;                         // what the last byte did (JSON_EV_*)
    uint8_t stack[JSON_PREFIX_MAX_DEPTH];   // '{' or '[' per open container
} JsonPrefix;

// What one byte did, for a reader that follows the document's structure (text/json_schema.h):
enum {
    JSON_EV_VALUE = 1,     // begins a value: '{', '[', '"', '-', a digit, 't', 'f' or 'n'
    JSON_EV_KEY = 2,       // begins an object key (its opening quote)
    JSON_EV_KEY_END = 4,   // ends the key (its closing quote)
    JSON_EV_END = 8,       // ends a string or literal value (its last byte); a number ends BEFORE the
                           // byte that reports it (the byte then does what else it reports)
    JSON_EV_COMMA = 16,    // a comma between the members or elements of a container
    JSON_EV_CLOSE = 32,    // closes the innermost container ('}' or ']')
    JSON_EV_CHAR = 64,     // completes a character of a string (a key's or a value's): its code point in cp
};

void json_prefix_init(JsonPrefix *p);
// Feeds n bytes; 0 when everything fed so far is the beginning of an object, -1 when not (p is
// then of no further use: feed a copy to try bytes).
int json_prefix_feed(JsonPrefix *p, const char *bytes, size_t n);
// 1 when what was fed is one complete object (possibly after whitespace).
int json_prefix_complete(const JsonPrefix *p);
// 1 inside a string (a key or a value), where whitespace is text, not a separator.
int json_prefix_in_string(const JsonPrefix *p);
// 1 between tokens (not inside a string, number or literal): whitespace then changes nothing but
// the count of whitespace in a row.
int json_prefix_between_tokens(const JsonPrefix *p);
// 1 when the next byte is a string's text (inside a string, not in an escape or a multi-byte
// character): any run of whole characters without '"', '\\' or control characters goes on.
int json_prefix_at_text(const JsonPrefix *p);
// Inside a character of a string (a multi-byte character or an escape begun, not complete): the code
// points it can still become, as up to three ranges [out[i][0], out[i][1]]; their count, 0 when
// not inside one. Exact: each code point in them has a completion the grammar accepts.
int json_prefix_char_range(const JsonPrefix *p, uint32_t out[3][2]);
// One byte: what it did (JSON_EV_* flags, 0 for a byte inside a token or whitespace), or -1 when
// the document can no longer be the beginning of an object (as json_prefix_feed).
int json_prefix_step(JsonPrefix *p, uint8_t c);

#endif
