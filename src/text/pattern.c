// A pattern compiled to a Thompson NFA (pattern.h): parsed into a syntax tree, the tree built into
// states back to front (each piece given the state that follows it, so a counted repetition is the
// piece built again), then the epsilon closures and the states from which a match is still
// reachable, once. A string is followed as the set of NFA states it may be in, restarted at every
// position (a match may begin anywhere) unless the pattern is anchored.
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "text/pattern.h"
#include "text/utf8.h"

#define WORDS (PATTERN_MAX_STATES / 64)
#define MAX_CP 0x10FFFFu

// ---- character classes: sorted, disjoint ranges of code points ----

typedef struct Class {
    uint32_t (*r)[2];
    int n, cap;
} Class;

static int class_add(Class *c, uint32_t lo, uint32_t hi) {
    if (c->n == c->cap) {
        int cap = c->cap ? 2 * c->cap : 4;
        uint32_t(*r)[2] = realloc(c->r, sizeof *r * cap);
        if (!r) return -1;
        c->r = r, c->cap = cap;
    }
    c->r[c->n][0] = lo, c->r[c->n][1] = hi;
    c->n++;
    return 0;
}

// The gaps of sorted, disjoint ranges r[0, n) in [0, MAX_CP] into out.
static int class_add_complement(Class *out, const uint32_t (*r)[2], int n) {
    uint32_t next = 0;
    for (int i = 0; i < n; i++) {
        if (r[i][0] > next && class_add(out, next, r[i][0] - 1)) return -1;
        next = r[i][1] + 1;
    }
    return next <= MAX_CP ? class_add(out, next, MAX_CP) : 0;
}

static int range_cmp(const void *a, const void *b) {
    const uint32_t *x = a, *y = b;
    return x[0] < y[0] ? -1 : x[0] > y[0];
}

// Sorts and merges the ranges; with negate, takes the complement; then removes what a JSON string
// cannot hold (U+0000, the surrogates).
static int class_finish(Class *c, int negate) {
    qsort(c->r, c->n, sizeof *c->r, range_cmp);
    int m = 0;
    for (int i = 0; i < c->n; i++) {
        if (m && c->r[i][0] <= c->r[m - 1][1] + 1) {
            if (c->r[i][1] > c->r[m - 1][1]) c->r[m - 1][1] = c->r[i][1];
        } else {
            c->r[m][0] = c->r[i][0], c->r[m][1] = c->r[i][1], m++;
        }
    }
    c->n = m;
    Class out = {0};
    uint32_t(*src)[2] = c->r;
    int n = c->n;
    Class neg = {0};
    if (negate) {
        if (class_add_complement(&neg, src, n)) {
            free(neg.r);
            return -1;
        }
        src = neg.r, n = neg.n;
    }
    static const uint32_t KEEP[2][2] = {{1, 0xD7FF}, {0xE000, MAX_CP}};
    for (int i = 0; i < n; i++)
        for (int k = 0; k < 2; k++) {
            uint32_t a = src[i][0] > KEEP[k][0] ? src[i][0] : KEEP[k][0], b = src[i][1] < KEEP[k][1] ? src[i][1] : KEEP[k][1];
            if (a <= b && class_add(&out, a, b)) {
                free(neg.r);
                return -1;
            }
        }
    free(neg.r);
    free(c->r);
    *c = out;
    return 0;
}

static int class_meets(const Class *c, uint32_t lo, uint32_t hi) {
    for (int i = 0; i < c->n; i++)
        if (c->r[i][0] <= hi && lo <= c->r[i][1]) return 1;
    return 0;
}

// ---- the syntax tree ----

enum { A_CLASS, A_CAT, A_ALT, A_REP, A_BOL, A_EOL };

typedef struct Ast {
    uint8_t kind;
    int child, next;  // first child, next sibling (-1: none)
    int min, max;     // A_REP; max -1: unbounded
    int cls;          // A_CLASS: index of its class
} Ast;

// The NFA's states.
enum { N_CHAR, N_SPLIT, N_BOL, N_EOL, N_MATCH };

typedef struct NState {
    uint8_t type;
    int out, out2;  // N_SPLIT: both; N_CHAR, N_BOL, N_EOL: out
    int cls;        // N_CHAR
} NState;

struct Pattern {
    Class *cls;
    int n_cls;
    NState st[PATTERN_MAX_STATES];
    int n, start, match;
    uint64_t cl[PATTERN_MAX_STATES][WORDS];   // epsilon closure of a state, ^ not passable
    uint64_t cl0[PATTERN_MAX_STATES][WORDS];  // the same at the string's start (^ passable)
    uint8_t live[PATTERN_MAX_STATES];         // N_CHAR: after it a match is reachable; N_EOL: ending here
                                            // matches; N_MATCH: 1
    int restart_live;                       // a match can begin after any prefix
};

typedef struct Parser {
    const char *p, *end;
    Ast *ast;
    int n_ast, cap_ast;
    Pattern *re;
    int depth;
    char *why;
    size_t why_n;
} Parser;

static int fail(Parser *ps, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ps->why, ps->why_n, fmt, ap);
    va_end(ap);
    return -1;
}

static int ast_new(Parser *ps, int kind) {
    if (ps->n_ast == ps->cap_ast) {
        int cap = ps->cap_ast ? 2 * ps->cap_ast : 64;
        Ast *a = realloc(ps->ast, sizeof *a * cap);
        if (!a) return fail(ps, "out of memory");
        ps->ast = a, ps->cap_ast = cap;
    }
    Ast *a = &ps->ast[ps->n_ast];
    memset(a, 0, sizeof *a);
    a->kind = (uint8_t)kind;
    a->child = a->next = -1;
    return ps->n_ast++;
}

// A new empty class: its index, or -1.
static int class_new(Parser *ps) {
    Pattern *re = ps->re;
    Class *c = realloc(re->cls, sizeof *c * (re->n_cls + 1));
    if (!c) return fail(ps, "out of memory");
    re->cls = c;
    memset(&c[re->n_cls], 0, sizeof *c);
    return re->n_cls++;
}

// The next code point of the pattern.
static uint32_t next_cp(Parser *ps) {
    uint32_t cp;
    ps->p += utf8_decode((const uint8_t *)ps->p, (size_t)(ps->end - ps->p), &cp);
    return cp;
}

static int hex_digits(Parser *ps, int count, uint32_t *v) {
    *v = 0;
    for (int i = 0; i < count; i++) {
        char c = ps->p < ps->end ? *ps->p : 0;
        int h = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (h < 0) return fail(ps, "'\\%c' wants %d hex digits", count == 2 ? 'x' : 'u', count);
        *v = *v << 4 | (uint32_t)h;
        ps->p++;
    }
    return 0;
}

// \d \w \s and their complements as ranges into c (negated ones complemented here).
static int class_escape(Class *c, char e) {
    static const uint32_t D[][2] = {{'0', '9'}};
    static const uint32_t W[][2] = {{'0', '9'}, {'A', 'Z'}, {'_', '_'}, {'a', 'z'}};
    static const uint32_t S[][2] = {{0x09, 0x0D}, {0x20, 0x20}, {0xA0, 0xA0}, {0x1680, 0x1680}, {0x2000, 0x200A},
                                    {0x2028, 0x2029}, {0x202F, 0x202F}, {0x205F, 0x205F}, {0x3000, 0x3000}, {0xFEFF, 0xFEFF}};
    const uint32_t(*set)[2] = e == 'd' || e == 'D' ? D : e == 'w' || e == 'W' ? W : S;
    int n = e == 'd' || e == 'D' ? 1 : e == 'w' || e == 'W' ? 4 : 10;
    if (e < 'a') return class_add_complement(c, set, n);
    for (int i = 0; i < n; i++)
        if (class_add(c, set[i][0], set[i][1])) return -1;
    return 0;
}

// After a backslash: a class escape into c (1), or one character into *cp (0); -1 when refused.
static int escape(Parser *ps, Class *c, uint32_t *cp, int in_class) {
    if (ps->p >= ps->end) return fail(ps, "the pattern ends with a backslash");
    char e = *ps->p++;
    switch (e) {
    case 'd': case 'D': case 'w': case 'W': case 's': case 'S':
        return class_escape(c, e) ? fail(ps, "out of memory") : 1;
    case 't': *cp = '\t'; return 0;
    case 'n': *cp = '\n'; return 0;
    case 'r': *cp = '\r'; return 0;
    case 'f': *cp = '\f'; return 0;
    case 'v': *cp = '\v'; return 0;
    case 'x': return hex_digits(ps, 2, cp);
    case 'u': return hex_digits(ps, 4, cp);
    case 'b':
        if (in_class) return *cp = '\b', 0;
        return fail(ps, "the word boundary \\b is not supported");
    case 'B': return fail(ps, "the word boundary \\B is not supported");
    case 'p': case 'P': return fail(ps, "Unicode property escapes (\\%c{...}) are not supported", e);
    case 'c': return fail(ps, "control escapes (\\c) are not supported");
    case 'k': return fail(ps, "named backreferences (\\k) are not supported");
    default:
        if (e >= '0' && e <= '9') return fail(ps, "backreferences and \\0 are not supported");
        if ((e >= 'a' && e <= 'z') || (e >= 'A' && e <= 'Z')) return fail(ps, "the escape \\%c is not supported", e);
        ps->p--;
        *cp = next_cp(ps);  // escaped punctuation (or any other character) stands for itself
        return 0;
    }
}

// Class k finished (complemented when negate) as a leaf of the syntax tree: its node, or -1.
static int class_leaf(Parser *ps, int k, int negate) {
    if (class_finish(&ps->re->cls[k], negate)) return fail(ps, "out of memory");
    int a = ast_new(ps, A_CLASS);
    if (a >= 0) ps->ast[a].cls = k;
    return a;
}

// [...] after its '['.
static int parse_class(Parser *ps) {
    int k = class_new(ps);
    if (k < 0) return -1;
    Class *c = &ps->re->cls[k];
    int negate = ps->p < ps->end && *ps->p == '^';
    if (negate) ps->p++;
    int first = 1;
    for (;;) {
        if (ps->p >= ps->end) return fail(ps, "a class '[' is not closed");
        if (*ps->p == ']' && !first) break;
        first = 0;
        uint32_t lo;
        if (*ps->p == '\\') {
            ps->p++;
            int r = escape(ps, c, &lo, 1);
            if (r < 0) return -1;
            if (r == 1) continue;  // \d and the like: no range from them
        } else {
            lo = next_cp(ps);
        }
        uint32_t hi = lo;
        if (ps->p + 1 < ps->end && ps->p[0] == '-' && ps->p[1] != ']') {
            ps->p++;
            if (*ps->p == '\\') {
                ps->p++;
                Class scratch = {0};
                int r = escape(ps, &scratch, &hi, 1);
                free(scratch.r);
                if (r < 0) return -1;
                if (r == 1) return fail(ps, "a class range ends in a class escape");
            } else {
                hi = next_cp(ps);
            }
            if (hi < lo) return fail(ps, "a class range is out of order");
        }
        if (class_add(c, lo, hi)) return fail(ps, "out of memory");
    }
    ps->p++;  // ']'
    return class_leaf(ps, k, negate);
}

// A class of one code point, or of '.'.
static int single(Parser *ps, uint32_t cp, int dot) {
    int k = class_new(ps);
    if (k < 0) return -1;
    Class *c = &ps->re->cls[k];
    if (dot) {  // anything but a line terminator
        if (class_add(c, '\n', '\n') || class_add(c, '\r', '\r') || class_add(c, 0x2028, 0x2029)) return fail(ps, "out of memory");
    } else if (class_add(c, cp, cp)) {
        return fail(ps, "out of memory");
    }
    return class_leaf(ps, k, dot);
}

static int parse_alt(Parser *ps);

static int parse_atom(Parser *ps) {
    char ch = *ps->p;
    switch (ch) {
    case '(': {
        ps->p++;
        if (ps->p < ps->end && *ps->p == '?') {
            if (ps->p + 1 < ps->end && ps->p[1] == ':') ps->p += 2;
            else if (ps->p + 1 < ps->end && (ps->p[1] == '=' || ps->p[1] == '!'))
                return fail(ps, "lookahead (?%c is not supported", ps->p[1]);
            else if (ps->p + 1 < ps->end && ps->p[1] == '<')
                return fail(ps, "lookbehind and named groups (?< are not supported");
            else
                return fail(ps, "the group (? is not supported");
        }
        if (++ps->depth > 64) return fail(ps, "groups nested more than 64 deep");
        int a = parse_alt(ps);
        ps->depth--;
        if (a < 0) return -1;
        if (ps->p >= ps->end || *ps->p != ')') return fail(ps, "a group '(' is not closed");
        ps->p++;
        return a;
    }
    case ')': return fail(ps, "an unmatched ')'");
    case '[': ps->p++; return parse_class(ps);
    case '.': ps->p++; return single(ps, 0, 1);
    case '^': ps->p++; return ast_new(ps, A_BOL);
    case '$': ps->p++; return ast_new(ps, A_EOL);
    case '*': case '+': case '?': return fail(ps, "a quantifier '%c' with nothing to repeat", ch);
    case '\\': {  // a class escape, or one character
        ps->p++;
        int k = class_new(ps);
        if (k < 0) return -1;
        uint32_t cp;
        int r = escape(ps, &ps->re->cls[k], &cp, 0);
        if (r < 0) return -1;
        if (r == 0 && class_add(&ps->re->cls[k], cp, cp)) return fail(ps, "out of memory");
        return class_leaf(ps, k, 0);
    }
    default: return single(ps, next_cp(ps), 0);
    }
}

// {n}, {n,} or {n,m} at p: 1 with the bounds (p past it), 0 when the brace is not a quantifier
// (a literal '{', as ECMA-262's web grammar and Python read it), -1 for {,n}.
static int counted(Parser *ps, int *min, int *max) {
    const char *q = ps->p + 1;
    long a = 0, b;
    int digits = 0;
    while (q < ps->end && *q >= '0' && *q <= '9' && digits < 6) a = a * 10 + (*q++ - '0'), digits++;
    if (!digits) {
        if (q < ps->end && *q == ',') return fail(ps, "'{,' is ambiguous (text in ECMA-262, {0,n} in other engines): write {0,n} or \\{"), -1;
        return 0;
    }
    b = a;
    if (q < ps->end && *q == ',') {
        q++;
        b = -1;
        if (q < ps->end && *q >= '0' && *q <= '9') {
            b = 0;
            digits = 0;
            while (q < ps->end && *q >= '0' && *q <= '9' && digits < 6) b = b * 10 + (*q++ - '0'), digits++;
        }
    }
    if (q >= ps->end || *q != '}') return 0;
    ps->p = q + 1;
    *min = (int)a, *max = (int)b;
    return 1;
}

static int parse_repeat(Parser *ps) {
    int a = parse_atom(ps);
    if (a < 0) return -1;
    if (ps->p >= ps->end) return a;
    int min, max, k;
    char q = *ps->p;
    if (q == '*') min = 0, max = -1, ps->p++;
    else if (q == '+') min = 1, max = -1, ps->p++;
    else if (q == '?') min = 0, max = 1, ps->p++;
    else if (q == '{' && (k = counted(ps, &min, &max)) != 0) {
        if (k < 0) return -1;
        if (max >= 0 && max < min) return fail(ps, "a repetition {%d,%d} is out of order", min, max);
        if (min > PATTERN_MAX_STATES || max > PATTERN_MAX_STATES) return fail(ps, "a repetition count above %d", PATTERN_MAX_STATES);
    } else return a;
    if (ps->ast[a].kind == A_BOL || ps->ast[a].kind == A_EOL) return fail(ps, "an anchor cannot be repeated");
    if (ps->p < ps->end && *ps->p == '?') ps->p++;  // lazy: the same strings match
    if (ps->p < ps->end && (*ps->p == '*' || *ps->p == '+' || *ps->p == '?' ||
                            (*ps->p == '{' && counted(&(Parser){.p = ps->p, .end = ps->end, .why = ps->why, .why_n = ps->why_n}, &(int){0}, &(int){0}) != 0)))
        return fail(ps, "a quantifier after a quantifier");
    int r = ast_new(ps, A_REP);
    if (r < 0) return -1;
    ps->ast[r].child = a, ps->ast[r].min = min, ps->ast[r].max = max;
    return r;
}

// Pieces until ')' , '|' or the end: a concatenation (A_CAT with no child: the empty string).
static int parse_cat(Parser *ps) {
    int cat = ast_new(ps, A_CAT), last = -1;
    if (cat < 0) return -1;
    while (ps->p < ps->end && *ps->p != '|' && *ps->p != ')') {
        int a = parse_repeat(ps);
        if (a < 0) return -1;
        if (last < 0) ps->ast[cat].child = a;
        else ps->ast[last].next = a;
        last = a;
    }
    return cat;
}

static int parse_alt(Parser *ps) {
    int first = parse_cat(ps);
    if (first < 0 || ps->p >= ps->end || *ps->p != '|') return first;
    int alt = ast_new(ps, A_ALT), last = first;
    if (alt < 0) return -1;
    ps->ast[alt].child = first;
    while (ps->p < ps->end && *ps->p == '|') {
        ps->p++;
        int b = parse_cat(ps);
        if (b < 0) return -1;
        ps->ast[last].next = b;
        last = b;
    }
    return alt;
}

// ---- the NFA ----

static int state_new(Parser *ps, int type, int out, int out2, int cls) {
    Pattern *re = ps->re;
    if (re->n == PATTERN_MAX_STATES) return fail(ps, "the pattern needs more than %d states", PATTERN_MAX_STATES);
    re->st[re->n] = (NState){(uint8_t)type, out, out2, cls};
    return re->n++;
}

static int build(Parser *ps, int a, int next);

// The siblings from a on: alt 0, one after the other (a concatenation), then next; alt 1, each
// followed by next, tried in order (an alternation). Its first state, or -1.
static int build_list(Parser *ps, int a, int next, int alt) {
    int rest = ps->ast[a].next;
    if (!alt) {
        int after = rest < 0 ? next : build_list(ps, rest, next, 0);
        return after < 0 ? -1 : build(ps, a, after);
    }
    int first = build(ps, a, next);
    if (first < 0 || rest < 0) return first;
    int others = build_list(ps, rest, next, 1);
    return others < 0 ? -1 : state_new(ps, N_SPLIT, first, others, -1);
}

// The states of tree node a, followed by state next: its first state, or -1.
static int build(Parser *ps, int a, int next) {
    const Ast *t = &ps->ast[a];
    switch (t->kind) {
    case A_CLASS: return state_new(ps, N_CHAR, next, -1, t->cls);
    case A_BOL: return state_new(ps, N_BOL, next, -1, -1);
    case A_EOL: return state_new(ps, N_EOL, next, -1, -1);
    case A_CAT:  // the pieces back to front, each followed by the one after it
        return t->child < 0 ? next : build_list(ps, t->child, next, 0);
    case A_ALT: return build_list(ps, t->child, next, 1);
    default: {  // A_REP: min copies, then (max - min) optional ones or a loop
        int s = next, child = t->child, min = t->min, max = t->max;
        if (max < 0) {
            int loop = state_new(ps, N_SPLIT, -1, next, -1);
            if (loop < 0) return -1;
            int body = build(ps, child, loop);
            if (body < 0) return -1;
            ps->re->st[loop].out = body;
            s = loop;
        } else {
            for (int i = 0; i < max - min && s >= 0; i++) {
                int b = build(ps, child, s);
                s = b < 0 ? -1 : state_new(ps, N_SPLIT, b, next, -1);
            }
        }
        for (int i = 0; i < min && s >= 0; i++) s = build(ps, child, s);
        return s;
    }
    }
}

static void set_bit(uint64_t *s, int i) { s[i >> 6] |= 1ull << (i & 63); }
static int has_bit(const uint64_t *s, int i) { return s[i >> 6] >> (i & 63) & 1; }

// The closure of state s into set: the consuming states, $ and the match reachable through splits
// (and ^ when at_start).
static void closure(const Pattern *re, int s, int at_start, uint64_t *set, uint64_t *seen) {
    if (s < 0 || has_bit(seen, s)) return;
    set_bit(seen, s);
    const NState *n = &re->st[s];
    switch (n->type) {
    case N_SPLIT:
        closure(re, n->out, at_start, set, seen);
        closure(re, n->out2, at_start, set, seen);
        return;
    case N_BOL:
        if (at_start) closure(re, n->out, at_start, set, seen);
        return;
    default: set_bit(set, s); return;  // N_CHAR, N_EOL, N_MATCH
    }
}

// Whether the end of the string right after $ state e still matches: the match reachable from it
// through splits and further $ (no ^: past the start).
static int end_matches(const Pattern *re, int s, uint64_t *seen) {
    if (s < 0 || has_bit(seen, s)) return 0;
    set_bit(seen, s);
    const NState *n = &re->st[s];
    if (n->type == N_MATCH) return 1;
    if (n->type == N_SPLIT) return end_matches(re, n->out, seen) || end_matches(re, n->out2, seen);
    if (n->type == N_EOL) return end_matches(re, n->out, seen);
    return 0;
}

static int set_has_live(const Pattern *re, const uint64_t *set) {
    for (int w = 0; w < WORDS; w++)
        for (uint64_t b = set[w]; b; b &= b - 1)
            if (re->live[w * 64 + __builtin_ctzll(b)]) return 1;
    return 0;
}

static void analyse(Pattern *re) {
    for (int s = 0; s < re->n; s++) {
        uint64_t seen[WORDS] = {0}, seen0[WORDS] = {0};
        closure(re, s, 0, re->cl[s], seen);
        closure(re, s, 1, re->cl0[s], seen0);
    }
    for (int s = 0; s < re->n; s++) {
        uint64_t seen[WORDS] = {0};
        if (re->st[s].type == N_MATCH) re->live[s] = 1;
        if (re->st[s].type == N_EOL) re->live[s] = (uint8_t)end_matches(re, re->st[s].out, seen);
    }
    for (int changed = 1; changed;) {  // a consuming state is live when what follows it is
        changed = 0;
        for (int s = 0; s < re->n; s++) {
            const NState *n = &re->st[s];
            if (n->type != N_CHAR || re->live[s] || re->cls[n->cls].n == 0) continue;
            if (set_has_live(re, re->cl[n->out])) re->live[s] = 1, changed = 1;
        }
    }
    re->restart_live = set_has_live(re, re->cl[re->start]);
}

int pattern_compile(Pattern **out, const char *pattern, char *why, size_t n) {
    *out = NULL;
    size_t len = strlen(pattern);
    if (len > PATTERN_MAX_BYTES) return snprintf(why, n, "longer than %d bytes", PATTERN_MAX_BYTES), -1;
    if (utf8_valid_prefix((const uint8_t *)pattern, len) != len) return snprintf(why, n, "not valid UTF-8"), -1;
    Pattern *re = calloc(1, sizeof *re);
    if (!re) return snprintf(why, n, "out of memory"), -1;
    Parser ps = {.p = pattern, .end = pattern + len, .re = re, .why = why, .why_n = n};
    int root = parse_alt(&ps);
    if (root >= 0 && ps.p < ps.end) root = fail(&ps, "an unmatched ')'");
    if (root >= 0) {
        re->match = state_new(&ps, N_MATCH, -1, -1, -1);
        re->start = re->match < 0 ? -1 : build(&ps, root, re->match);
        root = re->start;
    }
    free(ps.ast);
    if (root < 0) {
        pattern_free(re);
        return -1;
    }
    analyse(re);
    if (!set_has_live(re, re->cl0[re->start])) {  // a string with it could never be completed
        snprintf(why, n, "it matches no string a JSON string can hold (U+0000 and lone surrogates cannot be written)");
        pattern_free(re);
        return -1;
    }
    *out = re;
    return 0;
}

void pattern_free(Pattern *r) {
    if (!r) return;
    for (int i = 0; i < r->n_cls; i++) free(r->cls[i].r);
    free(r->cls);
    free(r);
}

// Keeps only the states of set from which a match is reachable; whether one is the match.
static void settle(const Pattern *re, PatternState *st, const uint64_t *set) {
    memset(st->live, 0, sizeof st->live);
    for (int w = 0; w < WORDS; w++)
        for (uint64_t b = set[w]; b; b &= b - 1) {
            int s = w * 64 + __builtin_ctzll(b);
            if (re->live[s]) set_bit(st->live, s);
        }
    if (has_bit(st->live, re->match)) st->matched = 1;
}

void pattern_start(const Pattern *r, PatternState *st) {
    memset(st, 0, sizeof *st);
    settle(r, st, r->cl0[r->start]);
}

int pattern_unconstrained(const Pattern *r, const PatternState *st) { return st->matched || r->restart_live; }

int pattern_can_take(const Pattern *r, const PatternState *st, uint32_t lo, uint32_t hi) {
    if (pattern_unconstrained(r, st)) return 1;
    for (int w = 0; w < WORDS; w++)
        for (uint64_t b = st->live[w]; b; b &= b - 1) {
            const NState *n = &r->st[w * 64 + __builtin_ctzll(b)];
            if (n->type == N_CHAR && class_meets(&r->cls[n->cls], lo, hi)) return 1;
        }
    return 0;
}

int pattern_take(const Pattern *r, PatternState *st, uint32_t cp) {
    if (st->matched) return 0;
    uint64_t next[WORDS];
    memcpy(next, r->cl[r->start], sizeof next);  // a match may begin here
    for (int w = 0; w < WORDS; w++)
        for (uint64_t b = st->live[w]; b; b &= b - 1) {
            const NState *n = &r->st[w * 64 + __builtin_ctzll(b)];
            if (n->type == N_CHAR && class_meets(&r->cls[n->cls], cp, cp))
                for (int k = 0; k < WORDS; k++) next[k] |= r->cl[n->out][k];
        }
    settle(r, st, next);
    if (st->matched) return 0;
    for (int w = 0; w < WORDS; w++)
        if (st->live[w]) return 0;
    return -1;
}

int pattern_accepts(const Pattern *r, const PatternState *st) {
    if (st->matched) return 1;
    for (int w = 0; w < WORDS; w++)
        for (uint64_t b = st->live[w]; b; b &= b - 1)
            if (r->st[w * 64 + __builtin_ctzll(b)].type == N_EOL) return 1;  // (live: ending here matches)
    return 0;
}
