// UTF-8 as the tokenizer needs it: decoding one character, and repairing invalid input the way
// the WHATWG Encoding Standard does (each maximal invalid subpart becomes one U+FFFD), which is
// what node's Buffer/TextDecoder and therefore the JavaScript reference tokenizer do. Valid
// UTF-8 passes through byte for byte.
#ifndef DSV3_TEXT_UTF8_H
#define DSV3_TEXT_UTF8_H

#include <stddef.h>
#include <stdint.h>

// A growable byte buffer; the bytes are always NUL-terminated (the NUL is not counted in n).
typedef struct ByteBuf {
    char *p;
    size_t n, cap;
} ByteBuf;

// Return 0, or -1 when memory runs out (the buffer is left as it was).
int bb_reserve(ByteBuf *b, size_t extra);
int bb_append(ByteBuf *b, const void *data, size_t n);
int bb_puts(ByteBuf *b, const char *s);  // a NUL-terminated string, without its NUL
void bb_free(ByteBuf *b);

// Length of the valid UTF-8 prefix of s (equal to n when all of s is valid).
size_t utf8_valid_prefix(const uint8_t *s, size_t n);

// Decodes the character at s (n > 0 bytes available). Returns its length in bytes and stores the
// code point; an invalid or truncated sequence gives U+FFFD and the length of its maximal
// subpart (at least 1), exactly as the WHATWG decoder consumes it.
size_t utf8_decode(const uint8_t *s, size_t n, uint32_t *cp);

// Appends the repaired form of s to out. With final == 0 a trailing sequence that is a valid but
// incomplete prefix of a character is not consumed (a later call may complete it); returns the
// number of bytes consumed, or (size_t)-1 when memory runs out.
size_t utf8_repair(const uint8_t *s, size_t n, int final, ByteBuf *out);

// Writes the UTF-8 form of cp (< 0x110000) to out (4 bytes room); returns its length.
int utf8_encode(uint32_t cp, char *out);

#endif
