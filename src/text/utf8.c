#include <stdlib.h>
#include <string.h>

#include "text/utf8.h"

int bb_reserve(ByteBuf *b, size_t extra) {
    if (b->n + extra + 1 <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->n + extra + 1) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

int bb_append(ByteBuf *b, const void *data, size_t n) {
    if (bb_reserve(b, n)) return -1;
    if (n) memcpy(b->p + b->n, data, n);
    b->n += n;
    b->p[b->n] = 0;
    return 0;
}

int bb_puts(ByteBuf *b, const char *s) { return bb_append(b, s, strlen(s)); }

void bb_free(ByteBuf *b) {
    free(b->p);
    *b = (ByteBuf){0};
}

// The WHATWG decoder's table: for a lead byte, how many continuation bytes follow and the range
// the first of them must lie in (the later ones are always 0x80..0xBF). need 0 with a non-ASCII
// byte means the byte can never start a character.
static void lead_info(uint8_t c, int *need, uint8_t *lo, uint8_t *hi) {
    *lo = 0x80;
    *hi = 0xBF;
    if (c < 0x80) *need = 0;
    else if (c >= 0xC2 && c <= 0xDF) *need = 1;
    else if (c >= 0xE0 && c <= 0xEF) {
        *need = 2;
        if (c == 0xE0) *lo = 0xA0;  // overlong
        if (c == 0xED) *hi = 0x9F;  // surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
        *need = 3;
        if (c == 0xF0) *lo = 0x90;  // overlong
        if (c == 0xF4) *hi = 0x8F;  // beyond U+10FFFF
    } else *need = -1;
}

// Decodes at s; *status is 0 for a character, 1 for an invalid subpart, 2 when the input ended
// inside a valid prefix of a character.
static size_t decode_one(const uint8_t *s, size_t n, uint32_t *cp, int *status) {
    *status = 0;
    uint8_t c = s[0];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    int need;
    uint8_t lo, hi;
    lead_info(c, &need, &lo, &hi);
    if (need < 0) {
        *cp = 0xFFFD;
        *status = 1;
        return 1;
    }
    uint32_t v = c & (0x3F >> need);
    for (int i = 1; i <= need; i++) {
        if ((size_t)i >= n) {
            *status = 2;
            *cp = 0xFFFD;
            return (size_t)i;
        }
        uint8_t d = s[i];
        if (d < lo || d > hi) {
            *cp = 0xFFFD;
            *status = 1;
            return (size_t)i;
        }
        lo = 0x80;
        hi = 0xBF;
        v = (v << 6) | (d & 0x3F);
    }
    *cp = v;
    return (size_t)need + 1;
}

size_t utf8_decode(const uint8_t *s, size_t n, uint32_t *cp) {
    int t;
    return decode_one(s, n, cp, &t);
}

size_t utf8_valid_prefix(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        // ASCII runs dominate real text: skip them eight bytes at a time
        while (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (w & 0x8080808080808080ull) break;
            i += 8;
        }
        if (i >= n) break;
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        uint32_t cp;
        int st;
        size_t len = decode_one(s + i, n - i, &cp, &st);
        if (st) return i;
        i += len;
    }
    return n;
}

int utf8_encode(uint32_t cp, char *out) {
    unsigned char *o = (unsigned char *)out;
    if (cp < 0x80) {
        o[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (unsigned char)(0xC0 | (cp >> 6));
        o[1] = (unsigned char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (unsigned char)(0xE0 | (cp >> 12));
        o[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (unsigned char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (unsigned char)(0xF0 | (cp >> 18));
    o[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (unsigned char)(0x80 | (cp & 0x3F));
    return 4;
}

size_t utf8_repair(const uint8_t *s, size_t n, int final, ByteBuf *out) {
    size_t i = 0;
    while (i < n) {
        size_t v = utf8_valid_prefix(s + i, n - i);
        if (bb_append(out, s + i, v)) return (size_t)-1;
        i += v;
        if (i >= n) break;
        uint32_t cp;
        int st;
        size_t len = decode_one(s + i, n - i, &cp, &st);
        if (st == 2 && !final) break;
        if (bb_append(out, "\xEF\xBF\xBD", 3)) return (size_t)-1;
        i += len;
    }
    return i;
}
