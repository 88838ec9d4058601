#include <string.h>

#include "text/json_prefix.h"

// What the next byte may be.
enum {
    S_TOP,        // before the object: whitespace or '{'
    S_OBJ_OPEN,   // after '{': whitespace, '"' (a key) or '}'
    S_KEY,        // after ',' in an object: whitespace or '"'
    S_COLON,      // after a key: whitespace or ':'
    S_VALUE,      // after ':' or ',' in an array: whitespace or a value
    S_ARR_OPEN,   // after '[': whitespace, a value or ']'
    S_AFTER,      // after a value in a container: whitespace, ',' or the container's closer
    S_STRING,     // in a string
    S_ESCAPE,     // after a backslash
    S_UHEX,       // in the hex digits of \uXXXX (pending left)
    S_LOW_SLASH,  // after a high surrogate's \uXXXX: the backslash of its low half
    S_LOW_U,      // then the 'u'
    S_UTF8,       // in a multi-byte character (pending continuation bytes left)
    S_LITERAL,    // in true, false or null
    S_NUM_MINUS,  // after '-': a digit
    S_NUM_ZERO,   // after a leading 0: '.', 'e', 'E' or the number's end
    S_NUM_INT,    // in the integer digits
    S_NUM_DOT,    // after '.': a digit
    S_NUM_FRAC,   // in the fraction digits
    S_NUM_E,      // after 'e': a sign or a digit
    S_NUM_ESIGN,  // after the exponent's sign: a digit
    S_NUM_EXP,    // in the exponent digits
    S_DONE,       // the object is complete: nothing more
    S_BAD,        // not the beginning of an object
};

static const char *const LITERALS[3] = {"true", "false", "null"};

void json_prefix_init(JsonPrefix *p) { memset(p, 0, sizeof *p); }

int json_prefix_complete(const JsonPrefix *p) { return p->state == S_DONE; }

int json_prefix_in_string(const JsonPrefix *p) { return p->state >= S_STRING && p->state <= S_UTF8; }

int json_prefix_at_text(const JsonPrefix *p) { return p->state == S_STRING; }

int json_prefix_between_tokens(const JsonPrefix *p) { return p->state <= S_AFTER; }

static int is_space(uint8_t c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

static int hex_value(uint8_t c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

// A value has ended inside the innermost container.
static void value_done(JsonPrefix *p) { p->state = S_AFTER; }

// c starts a value (S_VALUE, S_ARR_OPEN); 0, or -1 when it cannot.
static int value_start(JsonPrefix *p, uint8_t c) {
    p->events |= JSON_EV_VALUE;
    switch (c) {
    case '{':
    case '[':
        if (p->depth == JSON_PREFIX_MAX_DEPTH) return -1;
        p->stack[p->depth++] = c;
        p->state = c == '{' ? S_OBJ_OPEN : S_ARR_OPEN;
        return 0;
    case '"':
        p->in_key = 0;
        p->state = S_STRING;
        return 0;
    case '-': p->state = S_NUM_MINUS; return 0;
    case '0':
        p->state = S_NUM_ZERO;
        p->lit = 1;
        return 0;
    case 't':
    case 'f':
    case 'n':
        p->which = c == 't' ? 0 : c == 'f' ? 1 : 2;
        p->lit = 1;
        p->state = S_LITERAL;
        return 0;
    default:
        if (c >= '1' && c <= '9') {
            p->state = S_NUM_INT;
            p->lit = 1;  // digits so far
            return 0;
        }
        return -1;
    }
}

// c after a value in a container (S_AFTER, or the end of a number); 0 or -1.
static int after_value(JsonPrefix *p, uint8_t c) {
    uint8_t open = p->stack[p->depth - 1];
    if (c == ',') {
        p->events |= JSON_EV_COMMA;
        p->state = open == '{' ? S_KEY : S_VALUE;
        return 0;
    }
    if (c == (open == '{' ? '}' : ']')) {
        p->events |= JSON_EV_CLOSE;
        p->depth--;
        if (p->depth == 0) p->state = S_DONE;
        else value_done(p);
        return 0;
    }
    return -1;
}

// The escapes of one character and what they stand for.
static const char ESCAPES[] = "\"\\/bfnrt", ESCAPED[] = "\"\\/\b\f\n\r\t";

// A character of a string is complete: code point cp.
static int char_done(JsonPrefix *p, uint32_t cp) {
    p->cp = cp;
    p->events |= JSON_EV_CHAR;
    p->state = S_STRING;
    return 0;
}

// The first byte of a UTF-8 character in a string, 0x80 or above: how many continuation bytes
// follow and the range of the first (RFC 3629: no overlongs, surrogates or code points past
// U+10FFFF).
static int utf8_lead(JsonPrefix *p, uint8_t c) {
    p->lo = 0x80, p->hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) p->pending = 1;
    else if (c >= 0xE0 && c <= 0xEF) {
        p->pending = 2;
        if (c == 0xE0) p->lo = 0xA0;
        if (c == 0xED) p->hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        p->pending = 3;
        if (c == 0xF0) p->lo = 0x90;
        if (c == 0xF4) p->hi = 0x8F;
    } else {
        return -1;
    }
    p->cp = c & (0x3F >> p->pending);  // the lead byte's bits of the code point
    p->state = S_UTF8;
    return 0;
}

// [lo, hi] ∩ the code points an escape can write (every one but U+0000 and the surrogates) into
// the ranges out[*n ..].
static void add_writable(uint32_t lo, uint32_t hi, uint32_t out[][2], int *n) {
    static const uint32_t W[2][2] = {{1, 0xD7FF}, {0xE000, 0x10FFFF}};
    for (int i = 0; i < 2; i++) {
        uint32_t a = lo > W[i][0] ? lo : W[i][0], b = hi < W[i][1] ? hi : W[i][1];
        if (a <= b) out[*n][0] = a, out[*n][1] = b, ++*n;
    }
}

int json_prefix_char_range(const JsonPrefix *p, uint32_t out[3][2]) {
    int n = 0;
    switch (p->state) {
    case S_UTF8: {  // the next byte in [lo, hi], any continuation bytes after it
        int rest = 6 * (p->pending - 1);
        out[0][0] = (p->cp << 6 | (p->lo & 0x3Fu)) << rest;
        out[0][1] = (p->cp << 6 | (p->hi & 0x3Fu)) << rest | ((1u << rest) - 1);
        return 1;
    }
    case S_ESCAPE: add_writable(1, 0x10FFFF, out, &n); return n;
    case S_UHEX: {
        uint32_t lo = (uint32_t)p->code << (4 * p->pending), hi = lo + (1u << (4 * p->pending)) - 1;
        if (p->low_due) {  // the low half of a pair: its code point follows from the two
            lo = lo > 0xDC00 ? lo : 0xDC00, hi = hi < 0xDFFF ? hi : 0xDFFF;
            uint32_t base = 0x10000 + ((p->cp - 0xD800) << 10);
            out[0][0] = base + lo - 0xDC00, out[0][1] = base + hi - 0xDC00;
            return lo <= hi;
        }
        add_writable(lo < 0xFFFF ? lo : 0xFFFF, hi < 0xFFFF ? hi : 0xFFFF, out, &n);  // one escape: the BMP
        uint32_t a = lo > 0xD800 ? lo : 0xD800, b = hi < 0xDBFF ? hi : 0xDBFF;  // a high surrogate: a pair
        if (a <= b) out[n][0] = 0x10000 + ((a - 0xD800) << 10), out[n][1] = 0x10000 + ((b - 0xD800) << 10) + 0x3FF, n++;
        return n;
    }
    case S_LOW_SLASH:
    case S_LOW_U:
        out[0][0] = 0x10000 + ((p->cp - 0xD800) << 10);
        out[0][1] = out[0][0] + 0x3FF;
        return 1;
    default: return 0;
    }
}

// One byte; 0 or -1.
static int feed_byte(JsonPrefix *p, uint8_t c) {
    switch (p->state) {
    case S_STRING:
        if (c == '"') {
            p->events |= p->in_key ? JSON_EV_KEY_END : JSON_EV_END;
            if (p->in_key) p->state = S_COLON;
            else value_done(p);
            return 0;
        }
        if (c == '\\') {
            p->state = S_ESCAPE;
            return 0;
        }
        if (c < 0x20) return -1;  // control characters are escaped in JSON
        if (c >= 0x80) return utf8_lead(p, c);
        return char_done(p, c);
    case S_UTF8:
        if (c < p->lo || c > p->hi) return -1;
        p->lo = 0x80, p->hi = 0xBF;
        p->cp = p->cp << 6 | (c & 0x3F);
        if (--p->pending == 0) return char_done(p, p->cp);
        return 0;
    case S_ESCAPE: {
        if (c == 'u') {
            p->state = S_UHEX;
            p->pending = 4;
            p->code = 0;
            return 0;
        }
        const char *e = c ? strchr(ESCAPES, c) : NULL;
        if (!e) return -1;
        return char_done(p, (uint8_t)ESCAPED[e - ESCAPES]);
    }
    case S_UHEX: {
        int h = hex_value(c);
        if (h < 0) return -1;
        p->code = (uint16_t)(p->code << 4 | h);
        if (--p->pending > 0) {
            // refused as soon as no digits can follow that make it valid (a prefix is never a dead
            // end): the escape's values still possible are [lo, hi]
            unsigned lo = (unsigned)p->code << (4 * p->pending), hi = lo + (1u << (4 * p->pending)) - 1;
            if (p->low_due ? hi < 0xDC00 || lo > 0xDFFF : lo >= 0xDC00 && hi <= 0xDFFF) return -1;
            return 0;
        }
        int high = p->code >= 0xD800 && p->code <= 0xDBFF, low = p->code >= 0xDC00 && p->code <= 0xDFFF;
        if (p->low_due) {  // this was the second half of a surrogate pair (the first is in cp)
            p->low_due = 0;
            if (!low) return -1;
            return char_done(p, 0x10000 + ((p->cp - 0xD800) << 10) + (p->code - 0xDC00u));
        }
        if (low || p->code == 0) return -1;  // a low surrogate alone; U+0000, which many parsers refuse
        if (!high) return char_done(p, p->code);
        p->low_due = 1;
        p->cp = p->code;
        p->state = S_LOW_SLASH;
        return 0;
    }
    case S_LOW_SLASH:
        if (c != '\\') return -1;
        p->state = S_LOW_U;
        return 0;
    case S_LOW_U:
        if (c != 'u') return -1;
        p->state = S_UHEX;
        p->pending = 4;
        p->code = 0;
        return 0;
    case S_LITERAL:
        if (c != (uint8_t)LITERALS[p->which][p->lit]) return -1;
        if (LITERALS[p->which][++p->lit] == '\0') {
            p->events |= JSON_EV_END;
            value_done(p);
        }
        return 0;
    case S_NUM_MINUS:
        if (c == '0') p->state = S_NUM_ZERO;
        else if (c >= '1' && c <= '9') p->state = S_NUM_INT;
        else return -1;
        p->lit = 1;
        return 0;
    case S_NUM_DOT:
        if (c < '0' || c > '9') return -1;
        p->state = S_NUM_FRAC;
        return 0;
    case S_NUM_E:
        if (c == '+' || c == '-') p->state = S_NUM_ESIGN;
        else if (c >= '0' && c <= '9') p->state = S_NUM_EXP, p->lit = 1;
        else return -1;
        return 0;
    case S_NUM_ESIGN:
        if (c < '0' || c > '9') return -1;
        p->state = S_NUM_EXP;
        p->lit = 1;
        return 0;
    case S_NUM_ZERO:
    case S_NUM_INT:
    case S_NUM_FRAC:
    case S_NUM_EXP:
        if (c >= '0' && c <= '9' && p->state != S_NUM_ZERO) {
            // integer digits (an int64) and exponent digits (a finite double) are limited
            if (p->state == S_NUM_INT && ++p->lit > JSON_PREFIX_MAX_INT_DIGITS) return -1;
            if (p->state == S_NUM_EXP && ++p->lit > JSON_PREFIX_MAX_EXP_DIGITS) return -1;
            return 0;
        }
        if (c == '.' && p->state != S_NUM_FRAC && p->state != S_NUM_EXP) {
            p->state = S_NUM_DOT;
            return 0;
        }
        if ((c == 'e' || c == 'E') && p->state != S_NUM_EXP) {
            p->state = S_NUM_E;
            return 0;
        }
        p->state = S_AFTER;  // the number ended; c belongs to what follows it
        p->events |= JSON_EV_END;
        if (is_space(c)) {
            p->space = 1;
            return 0;
        }
        return after_value(p, c);
    default:
        break;
    }
    // between tokens (and after the object): whitespace, up to a limit
    if (is_space(c)) {
        if (++p->space > JSON_PREFIX_MAX_SPACE) return -1;
        return 0;
    }
    p->space = 0;
    switch (p->state) {
    case S_TOP:
        if (c != '{') return -1;
        p->events |= JSON_EV_VALUE;
        p->stack[p->depth++] = c;
        p->state = S_OBJ_OPEN;
        return 0;
    case S_OBJ_OPEN:
        if (c == '}') return after_value(p, c);
        /* fall through */
    case S_KEY:
        if (c != '"') return -1;
        p->events |= JSON_EV_KEY;
        p->in_key = 1;
        p->state = S_STRING;
        return 0;
    case S_COLON:
        if (c != ':') return -1;
        p->state = S_VALUE;
        return 0;
    case S_ARR_OPEN:
        if (c == ']') return after_value(p, c);
        /* fall through */
    case S_VALUE: return value_start(p, c);
    case S_AFTER: return after_value(p, c);
    default: return -1;  // S_DONE, S_BAD
    }
}

int json_prefix_step(JsonPrefix *p, uint8_t c) {
    p->events = 0;
    if (p->state == S_BAD || feed_byte(p, c)) {
        p->state = S_BAD;
        return -1;
    }
    return p->events;
}

int json_prefix_feed(JsonPrefix *p, const char *bytes, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (json_prefix_step(p, (uint8_t)bytes[i]) < 0) return -1;
    return p->state == S_BAD ? -1 : 0;
}
