#define PCRE2_CODE_UNIT_WIDTH 8
#include <jansson.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "text/pretok.h"
#include "text/utf8.h"

// ECMAScript's \s: WhiteSpace (TAB, VT, FF, ZWNBSP and the Zs category) and LineTerminator.
#define JS_SPACE_MEMBERS "\\t\\n\\x0B\\f\\r \\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}\\x{FEFF}"
#define JS_DIGIT_MEMBERS "0-9"
#define JS_WORD_MEMBERS "A-Za-z0-9_"
// The GPT-2 pattern that ByteLevel splits with when use_regex is set (as in both HF libraries).
static const char GPT2_PATTERN[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static int byte_is_self(int b) { return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE; }

uint32_t bytelevel_char(uint8_t byte) {
    if (byte_is_self(byte)) return byte;
    int k = 0;  // how many bytes below this one are remapped
    for (int b = 0; b < byte; b++) k += !byte_is_self(b);
    return 256u + (uint32_t)k;
}

int bytelevel_byte(uint32_t cp) {
    if (cp < 256) return byte_is_self((int)cp) ? (int)cp : -1;
    if (cp >= 256 + 68) return -1;
    int k = (int)(cp - 256);
    for (int b = 0; b < 256; b++)
        if (!byte_is_self(b) && k-- == 0) return b;
    return -1;
}

int js_is_space(uint32_t cp) {
    if (cp <= 0x20) return cp == 0x20 || (cp >= 0x09 && cp <= 0x0D);
    return cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
           cp == 0x202F || cp == 0x205F || cp == 0x3000 || cp == 0xFEFF;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

// Reads exactly four hex digits at p; -1 when they are not there.
static long hex4(const char *p, const char *end) {
    if (end - p < 4) return -1;
    long v = 0;
    for (int i = 0; i < 4; i++) {
        int h = hexval(p[i]);
        if (h < 0) return -1;
        v = v * 16 + h;
    }
    return v;
}

char *regex_translate(const char *pat, size_t len, Error *err) {
    ByteBuf o = {0};
    const char *p = pat, *end = pat + len;
    int in_class = 0, class_start = 0, fail = 0;
    char tmp[32];
    while (p < end && !fail) {
        char c = *p;
        if (c == '\\' && p + 1 < end) {
            char e = p[1];
            const char *members = NULL, *negated = NULL;
            if (e == 's') members = JS_SPACE_MEMBERS;
            else if (e == 'd') members = JS_DIGIT_MEMBERS;
            else if (e == 'w') members = JS_WORD_MEMBERS;
            else if (e == 'S') negated = JS_SPACE_MEMBERS;
            else if (e == 'D') negated = JS_DIGIT_MEMBERS;
            else if (e == 'W') negated = JS_WORD_MEMBERS;
            if (members) {
                fail = in_class ? bb_puts(&o, members) : (bb_puts(&o, "[") || bb_puts(&o, members) || bb_puts(&o, "]"));
                p += 2;
            } else if (negated && !in_class) {
                fail = bb_puts(&o, "[^") || bb_puts(&o, negated) || bb_puts(&o, "]");
                p += 2;
            } else if (e == 'u') {
                // \u{X...} or \uXXXX, with a UTF-16 surrogate pair read as one code point
                long cp = -1;
                const char *q = p + 2;
                if (q < end && *q == '{') {
                    cp = 0;
                    q++;
                    int nd = 0;
                    while (q < end && *q != '}' && hexval(*q) >= 0 && cp <= 0x10FFFF) cp = cp * 16 + hexval(*q++), nd++;
                    if (q >= end || *q != '}' || nd == 0) cp = -1;
                    else q++;
                } else {
                    cp = hex4(q, end);
                    if (cp >= 0) q += 4;
                    if (cp >= 0xD800 && cp <= 0xDBFF && end - q >= 6 && q[0] == '\\' && q[1] == 'u') {
                        long lo = hex4(q + 2, end);
                        if (lo >= 0xDC00 && lo <= 0xDFFF) {
                            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                            q += 6;
                        }
                    }
                }
                if (cp < 0 || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
                    bb_free(&o);
                    err_set(err, "regex '%.*s': malformed or unpaired \\u escape at offset %d", (int)(len > 200 ? 200 : len),
                            pat, (int)(p - pat));
                    return NULL;
                }
                snprintf(tmp, sizeof tmp, "\\x{%lX}", cp);
                fail = bb_puts(&o, tmp);
                p = q;
            } else {
                // any other escape is copied whole (with a multi-byte escaped character)
                size_t cl = 1;
                while (p + 1 + cl < end && ((unsigned char)p[1 + cl] & 0xC0) == 0x80) cl++;
                fail = bb_append(&o, p, 1 + cl);
                p += 1 + cl;
            }
            class_start = 0;
            continue;
        }
        if (in_class) {
            // JavaScript closes a class at the first ']' (even right after '[' or '[^': an empty
            // class), which PCRE2_ALLOW_EMPTY_CLASS also does
            if (c == ']') in_class = 0;
            else if (c == '^' && class_start) {
                fail = bb_append(&o, p, 1);
                p++;
                continue;  // still at the start of the class
            }
            class_start = 0;
            fail = fail || bb_append(&o, p, 1);
            p++;
            continue;
        }
        if (c == '[') {
            in_class = 1;
            class_start = 1;
            fail = bb_append(&o, p, 1);
        } else if (c == '.') {
            fail = bb_puts(&o, "[^\\n\\r\\x{2028}\\x{2029}]");  // JavaScript's '.' without the s flag
        } else {
            fail = bb_append(&o, p, 1);
        }
        p++;
    }
    if (fail || bb_reserve(&o, 0)) {
        bb_free(&o);
        err_set(err, "out of memory");
        return NULL;
    }
    return o.p;
}

void regex_free(Regex *r) {
    if (r->md) pcre2_match_data_free(r->md);
    if (r->mctx) pcre2_match_context_free(r->mctx);
    if (r->jstack) pcre2_jit_stack_free(r->jstack);
    if (r->code) pcre2_code_free(r->code);
    *r = (Regex){0};
}

int regex_compile(Regex *r, const char *pattern, size_t len, int literal, Error *err) {
    *r = (Regex){0};
    char *tr = NULL;
    const char *src = pattern;
    size_t slen = len;
    if (!literal) {
        tr = regex_translate(pattern, len, err);
        if (!tr) return -1;
        src = tr;
        slen = strlen(tr);
    }
    if (utf8_valid_prefix((const uint8_t *)src, slen) != slen) {
        free(tr);
        return err_set(err, "regex is not valid UTF-8");
    }
    int ecode;
    PCRE2_SIZE eoff;
    // PCRE2_LITERAL admits only a few companions (UTF, NO_UTF_CHECK among them)
    uint32_t opts = literal ? PCRE2_UTF | PCRE2_NO_UTF_CHECK | PCRE2_LITERAL
                            : PCRE2_UTF | PCRE2_UCP | PCRE2_DOLLAR_ENDONLY | PCRE2_ALLOW_EMPTY_CLASS | PCRE2_NO_UTF_CHECK;
    pcre2_code *code = pcre2_compile((PCRE2_SPTR)src, slen, opts, &ecode, &eoff, NULL);
    if (!code) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(ecode, msg, sizeof msg);
        err_set(err, "regex '%.*s': %s at offset %zu", (int)(len > 200 ? 200 : len), pattern, (const char *)msg,
                (size_t)eoff);
        free(tr);
        return -1;
    }
    free(tr);
    r->code = code;
    r->md = pcre2_match_data_create_from_pattern(code, NULL);
    r->mctx = pcre2_match_context_create(NULL);
    if (!r->md || !r->mctx) {
        regex_free(r);
        return err_set(err, "out of memory");
    }
    if (pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0) {
        // the default 32 KiB JIT stack is too small for patterns like \s+(?!\S) on long runs
        r->jstack = pcre2_jit_stack_create(64 * 1024, 64 * 1024 * 1024, NULL);
        if (r->jstack) {
            pcre2_jit_stack_assign(r->mctx, NULL, r->jstack);
            r->jit = 1;
        }
    }
    return 0;
}

int regex_next(Regex *r, const uint8_t *s, size_t n, size_t from, size_t *ms, size_t *me, Error *err) {
    while (from < n) {
        int rc = r->jit ? pcre2_jit_match(r->code, s, n, from, 0, r->md, r->mctx)
                        : pcre2_match(r->code, s, n, from, PCRE2_NO_UTF_CHECK, r->md, r->mctx);
        if (rc == PCRE2_ERROR_NOMATCH) return 0;
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            return err_set(err, "regex match failed: %s", (const char *)msg);
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(r->md);
        if (ov[1] > ov[0]) {
            *ms = ov[0];
            *me = ov[1];
            return 1;
        }
        // an empty match: move on by one character, as JavaScript's matchAll does
        from = ov[0] + 1;
        while (from < n && (s[from] & 0xC0) == 0x80) from++;
    }
    return 0;
}

// ---- the chain ----

static int spans_push(SpanVec *v, size_t start, size_t len) {
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 64;
        Span *nv = realloc(v->v, cap * sizeof(Span));
        if (!nv) return -1;
        v->v = nv;
        v->cap = cap;
    }
    v->v[v->n++] = (Span){(uint32_t)start, (uint32_t)len};
    return 0;
}

void pretok_free(PreTokenizer *p) {
    for (int i = 0; i < p->n; i++) {
        if (p->steps[i].has_regex) regex_free(&p->steps[i].re);
        free(p->steps[i].scratch.v);
    }
    free(p->steps);
    *p = (PreTokenizer){0};
}

static int add_step(PreTokenizer *p, PreTokStep st, Error *err) {
    PreTokStep *ns = realloc(p->steps, (p->n + 1) * sizeof *ns);
    if (!ns) return err_set(err, "out of memory");
    p->steps = ns;
    p->steps[p->n++] = st;
    return 0;
}

static int bool_field(const json_t *o, const char *key, int dflt, int *out, const char *where, const char *path,
                      Error *err) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        *out = dflt;
        return 0;
    }
    if (!json_is_boolean(v)) return err_set(err, "%s: %s.%s: expected true or false", where, path, key);
    *out = json_is_true(v);
    return 0;
}

static int parse_step(PreTokenizer *p, const json_t *o, const char *where, const char *path, Error *err) {
    if (!json_is_object(o)) return err_set(err, "%s: %s: expected an object", where, path);
    const char *type = json_string_value(json_object_get(o, "type"));
    if (!type) return err_set(err, "%s: %s.type: missing", where, path);
    if (strcmp(type, "Sequence") == 0) {
        json_t *arr = json_object_get(o, "pretokenizers");
        if (!json_is_array(arr)) return err_set(err, "%s: %s.pretokenizers: expected an array", where, path);
        for (size_t i = 0; i < json_array_size(arr); i++) {
            char sub[512];
            snprintf(sub, sizeof sub, "%s.pretokenizers[%zu]", path, i);
            if (parse_step(p, json_array_get(arr, i), where, sub, err)) return -1;
        }
        return 0;
    }
    if (p->n && p->steps[p->n - 1].kind == PT_BYTELEVEL)
        return err_set(err, "%s: %s: a '%s' step after ByteLevel is not supported (ByteLevel must come last)", where,
                       path, type);
    PreTokStep st = {0};
    if (strcmp(type, "Split") == 0) {
        st.kind = PT_SPLIT;
        json_t *pat = json_object_get(o, "pattern");
        json_t *rx = json_is_object(pat) ? json_object_get(pat, "Regex") : NULL;
        json_t *lit = json_is_object(pat) ? json_object_get(pat, "String") : NULL;
        if (!json_is_string(rx) && !json_is_string(lit))
            return err_set(err, "%s: %s.pattern: expected {\"Regex\": ...} or {\"String\": ...}", where, path);
        const char *behavior = json_string_value(json_object_get(o, "behavior"));
        static const char *const names[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"};
        int b = -1;
        for (int i = 0; behavior && i < 5; i++)
            if (strcmp(behavior, names[i]) == 0) b = i;
        if (b < 0)
            return err_set(err, "%s: %s.behavior: '%s' is not one of Removed, Isolated, MergedWithPrevious, "
                           "MergedWithNext, Contiguous", where, path, behavior ? behavior : "(missing)");
        st.behavior = (SplitBehavior)b;
        if (bool_field(o, "invert", 0, &st.invert, where, path, err)) return -1;
        json_t *ps = rx ? rx : lit;
        if (regex_compile(&st.re, json_string_value(ps), json_string_length(ps), rx == NULL, err))
            return err_prefix(err, "%s: %s.pattern", where, path);
        st.has_regex = 1;
    } else if (strcmp(type, "ByteLevel") == 0) {
        st.kind = PT_BYTELEVEL;
        int use_regex = 1;
        // a missing add_prefix_space reads as false, as in the JavaScript reference
        if (bool_field(o, "add_prefix_space", 0, &st.add_prefix_space, where, path, err) ||
            bool_field(o, "use_regex", 1, &use_regex, where, path, err))
            return -1;
        if (use_regex) {
            if (regex_compile(&st.re, GPT2_PATTERN, strlen(GPT2_PATTERN), 0, err)) return -1;
            st.has_regex = 1;
            st.behavior = SPLIT_ISOLATED;
        }
    } else {
        return err_set(err, "%s: %s: unsupported pre-tokenizer type '%s' (dsv3 supports Sequence, Split, ByteLevel)",
                       where, path, type);
    }
    if (add_step(p, st, err)) {
        if (st.has_regex) regex_free(&st.re);
        return -1;
    }
    return 0;
}

int pretok_from_json(PreTokenizer *p, const void *json, const char *where, Error *err) {
    *p = (PreTokenizer){0};
    const json_t *o = json;
    if (!o || json_is_null(o))
        return err_set(err, "%s: pre_tokenizer: missing (dsv3 supports byte-level BPE, which needs a ByteLevel "
                       "pre-tokenizer)", where);
    if (parse_step(p, o, where, "pre_tokenizer", err)) {
        pretok_free(p);
        return -1;
    }
    if (p->n == 0 || p->steps[p->n - 1].kind != PT_BYTELEVEL) {
        pretok_free(p);
        return err_set(err, "%s: pre_tokenizer: no ByteLevel step (dsv3 supports byte-level BPE only)", where);
    }
    return 0;
}

// The pieces of one Split over s[0, n), in order, into out (HF semantics for every behaviour).
static int split_spans(PreTokStep *st, const uint8_t *s, size_t n, SpanVec *out, Error *err) {
    out->n = 0;
    size_t pos = 0, ms, me;
    // segments alternate between gaps and matches; a "delimiter" is a match (a gap with invert)
    int prev_delim = 0;
    int pending_next = 0;     // MergedWithNext: a delimiter waiting for the following piece
    size_t pending_start = 0;
    for (;;) {
        int rc = regex_next(&st->re, s, n, pos, &ms, &me, err);
        if (rc < 0) return -1;
        size_t seg_s[2], seg_e[2];
        int seg_m[2], nseg = 0;
        if (rc == 0) ms = me = n;
        if (ms > pos) seg_s[nseg] = pos, seg_e[nseg] = ms, seg_m[nseg++] = 0;
        if (rc == 1) seg_s[nseg] = ms, seg_e[nseg] = me, seg_m[nseg++] = 1;
        for (int k = 0; k < nseg; k++) {
            int delim = seg_m[k] ^ st->invert;
            size_t a = seg_s[k], b = seg_e[k];
            switch (st->behavior) {
            case SPLIT_REMOVED:
                if (!delim && spans_push(out, a, b - a)) goto oom;
                break;
            case SPLIT_ISOLATED:
                if (spans_push(out, a, b - a)) goto oom;
                break;
            case SPLIT_MERGED_WITH_PREVIOUS:
                if (delim && !prev_delim && out->n) out->v[out->n - 1].len = (uint32_t)(b - out->v[out->n - 1].start);
                else if (spans_push(out, a, b - a)) goto oom;
                break;
            case SPLIT_CONTIGUOUS:
                if (delim == prev_delim && out->n) out->v[out->n - 1].len = (uint32_t)(b - out->v[out->n - 1].start);
                else if (spans_push(out, a, b - a)) goto oom;
                break;
            case SPLIT_MERGED_WITH_NEXT:
                // a delimiter opens a piece that the next non-delimiter closes; two delimiters in a
                // row each stand alone but the second still merges forward
                if (delim) {
                    if (pending_next && spans_push(out, pending_start, a - pending_start)) goto oom;
                    pending_next = 1;
                    pending_start = a;
                } else {
                    size_t st0 = pending_next ? pending_start : a;
                    if (spans_push(out, st0, b - st0)) goto oom;
                    pending_next = 0;
                }
                break;
            }
            prev_delim = delim;
        }
        if (rc == 0) break;
        pos = me;
    }
    if (pending_next && spans_push(out, pending_start, n - pending_start)) goto oom;
    return 0;
oom:
    return err_set(err, "out of memory");
}

typedef struct RunCtx {
    PreTokenizer *p;
    PieceFn fn;
    void *ctx;
    ByteBuf prefixed;  // " " + piece for ByteLevel's add_prefix_space with use_regex
} RunCtx;

static int run_level(RunCtx *rc, int k, const uint8_t *s, size_t n, Error *err) {
    if (n == 0) return 0;
    PreTokStep *st = &rc->p->steps[k];
    if (st->kind == PT_BYTELEVEL) {
        int prefix = st->add_prefix_space && s[0] != ' ';
        if (!st->has_regex) return rc->fn(rc->ctx, s, n, prefix, err);
        const uint8_t *t = s;
        size_t tn = n;
        if (prefix) {
            rc->prefixed.n = 0;
            if (bb_append(&rc->prefixed, " ", 1) || bb_append(&rc->prefixed, s, n)) return err_set(err, "out of memory");
            t = (const uint8_t *)rc->prefixed.p;
            tn = n + 1;
        }
        if (split_spans(st, t, tn, &st->scratch, err)) return -1;
        for (size_t i = 0; i < st->scratch.n; i++)
            if (rc->fn(rc->ctx, t + st->scratch.v[i].start, st->scratch.v[i].len, 0, err)) return -1;
        return 0;
    }
    if (split_spans(st, s, n, &st->scratch, err)) return -1;
    // the next level reuses no storage of this one, so iterating our scratch is safe
    for (size_t i = 0; i < st->scratch.n; i++) {
        Span sp = st->scratch.v[i];
        if (run_level(rc, k + 1, s + sp.start, sp.len, err)) return -1;
    }
    return 0;
}

int pretok_run(PreTokenizer *p, const uint8_t *s, size_t n, PieceFn fn, void *ctx, Error *err) {
    RunCtx rc = {p, fn, ctx, {0}};
    int r = run_level(&rc, 0, s, n, err);
    bb_free(&rc.prefixed);
    return r;
}
