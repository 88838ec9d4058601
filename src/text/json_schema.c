// The JSON Schema prefix automaton (json_schema.h): a schema compiled into nodes (one per schema
// object, $ref cycles sharing them) with the nesting each needs to complete, then a document read
// byte by byte over json_prefix's grammar and its structural events, one frame per open container.
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#include "text/json_schema.h"
#include "text/pattern.h"

// The kinds of JSON value a schema tells apart by a value's first byte.
enum { K_OBJECT, K_ARRAY, K_STRING, K_NUMBER, K_INTEGER, K_BOOLEAN, K_NULL, N_KINDS };
static const char *const KIND_NAMES[N_KINDS] = {"object", "array", "string", "number", "integer", "boolean", "null"};
#define ALL_KINDS ((1u << N_KINDS) - 1)

// One compiled schema. A value of kind k is read by node branch[k]: the node itself, or (anyOf /
// oneOf) the branch that accepts that kind.
typedef struct Node {
    unsigned kinds;            // bit k: values of kind k accepted
    uint16_t branch[N_KINDS];
    // objects
    int n_props;
    char **key;                // (n_props) each property's name as JSON text, quotes included
    uint16_t *key_len;
    uint16_t *prop;            // (n_props) the schemas of their values
    uint64_t required;         // bit i: property i must be present
    int additional;            // other keys allowed (their values unconstrained)
    // arrays
    uint16_t items;
    long min_items, max_items;  // max -1: none
    // integers: minimum / maximum / exclusiveMinimum / exclusiveMaximum as the integers [lo, hi],
    // and multipleOf (1: none); has_range: either is given
    int has_range;
    int64_t lo, hi, multiple;
    // numbers (type "number"): the same bounds as doubles, each included or not; has_nrange: given
    int has_nrange;
    double nlo, nhi;
    uint8_t nlo_incl, nhi_incl;
    // strings: minLength / maxLength, in characters (code points); max -1: none; pattern or NULL
    long min_len, max_len;
    Pattern *pattern;
    // enum / const: the values' JSON texts (scalars)
    int n_enum;
    char **enum_text;
    uint16_t *enum_len;
    // the nesting a value of kind k needs to be complete (0 for scalars, 1 for an object of
    // scalars, ...; HEIGHT_NONE: it cannot be), and the least over the kinds: so that a prefix never
    // opens what the grammar's depth limit would not let it close
    uint8_t height[N_KINDS];
    uint8_t min_height;
} Node;

#define HEIGHT_NONE 255

struct JsonSchema {
    Node *nodes;
    int n, cap;
    uint16_t root;
};

// ---- compiling ----

typedef struct {
    JsonSchema *s;
    const json_t *root;
    const json_t **memo;  // (s->n) the schema object each node was compiled from (NULL: made up)
    char *why;
    size_t why_n;
    int depth;            // schemas being compiled inside one another (JSON_SCHEMA_MAX_NESTING)
} Compiler;

// Schemas inside schemas, at most (the compiler recurses: a request's schema may not exhaust a
// thread's stack).
#define JSON_SCHEMA_MAX_NESTING 64

static int fail(Compiler *c, const char *path, const char *fmt, ...) {
    int k = snprintf(c->why, c->why_n, "%s: ", path);
    if (k < 0 || (size_t)k >= c->why_n) return -1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->why + k, c->why_n - k, fmt, ap);
    va_end(ap);
    return -1;
}

static void node_free(Node *nd) {
    for (int i = 0; i < nd->n_props; i++) free(nd->key[i]);
    for (int i = 0; i < nd->n_enum; i++) free(nd->enum_text[i]);
    free(nd->key), free(nd->key_len), free(nd->prop), free(nd->enum_text), free(nd->enum_len);
    pattern_free(nd->pattern);
}

void json_schema_free(JsonSchema *s) {
    if (!s) return;
    for (int i = 0; i < s->n; i++) node_free(&s->nodes[i]);
    free(s->nodes);
    free(s);
}

// A new node accepting every kind with no constraint, remembered as compiled from `from`; its
// index, or -1.
static int node_new(Compiler *c, const json_t *from, const char *path) {
    JsonSchema *s = c->s;
    if (s->n == JSON_SCHEMA_MAX_NODES) return fail(c, path, "more than %d schemas", JSON_SCHEMA_MAX_NODES);
    if (s->n == s->cap) {
        int cap = s->cap ? 2 * s->cap : 16;
        Node *nodes = realloc(s->nodes, sizeof *nodes * cap);
        if (!nodes) return fail(c, path, "out of memory");
        s->nodes = nodes;
        const json_t **memo = realloc(c->memo, sizeof *memo * cap);
        if (!memo) return fail(c, path, "out of memory");
        c->memo = memo;
        s->cap = cap;
    }
    int i = s->n++;
    Node *nd = &s->nodes[i];
    memset(nd, 0, sizeof *nd);
    nd->kinds = ALL_KINDS;
    for (int k = 0; k < N_KINDS; k++) nd->branch[k] = (uint16_t)i;
    nd->additional = 1;
    nd->items = JSON_SCHEMA_ANY;
    nd->max_items = -1;
    nd->multiple = 1;
    nd->max_len = -1;
    c->memo[i] = from;
    return i;
}

// Keywords that only annotate (or, as format, only annotate in JSON Schema's default vocabulary).
static const char *const ANNOTATIONS[] = {"title",   "description", "default",    "examples",  "format", "$schema",
                                          "$id",     "$comment",    "deprecated", "readOnly", "writeOnly", "strict",
                                          "$defs",   "definitions", NULL};
static const char *const KEYWORDS[] = {"type",     "properties", "required", "additionalProperties", "items", "minItems",
                                       "maxItems", "enum",       "const",    "anyOf",                "oneOf", "$ref",
                                       "nullable", "minimum",    "maximum",  "exclusiveMinimum",     "exclusiveMaximum",
                                       "multipleOf", "minLength", "maxLength", "pattern", NULL};
// (the bounds first, in this order: compile_range reads them by index)
static const char *const RANGE_KEYWORDS[] = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", NULL};
static const char *const LENGTH_KEYWORDS[] = {"minLength", "maxLength", NULL};
static const char *const STRING_KEYWORDS[] = {"minLength", "maxLength", "pattern", NULL};

// The largest magnitude JSON mode's grammar writes: 18 integer digits.
#define INT_MAX_MAG 999999999999999999LL

static int in_list(const char *k, const char *const *list) {
    for (int i = 0; list[i]; i++)
        if (!strcmp(k, list[i])) return 1;
    return 0;
}

static int compile(Compiler *c, const json_t *js, const char *path);

// The schema a $ref names: "#", "#/$defs/NAME" or "#/definitions/NAME".
static const json_t *resolve_ref(Compiler *c, const char *ref, const char *path) {
    if (!strcmp(ref, "#")) return c->root;
    const char *name = NULL, *where = NULL;
    if (!strncmp(ref, "#/$defs/", 8)) name = ref + 8, where = "$defs";
    else if (!strncmp(ref, "#/definitions/", 14)) name = ref + 14, where = "definitions";
    if (!name || !*name || strchr(name, '/') || strchr(name, '~')) {
        fail(c, path, "'$ref' \"%.80s\" is not \"#\" or \"#/$defs/NAME\"", ref);
        return NULL;
    }
    const json_t *t = json_object_get(json_object_get(c->root, where), name);
    if (!t) fail(c, path, "'$ref' \"%.80s\" names no schema", ref);
    return t;
}

static int kind_of_name(const char *name) {
    for (int k = 0; k < N_KINDS; k++)
        if (!strcmp(name, KIND_NAMES[k])) return k;
    return -1;
}

// The JSON text of a scalar (a string's quotes included), or NULL.
static char *scalar_text(const json_t *v) { return json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT); }

// Whether the grammar lets `text` be written as a value (as_key 0) or a key (1): a number past its
// digit limits, or a string holding U+0000, it refuses — the mask could never complete one.
static int writable(const char *text, int as_key) {
    JsonPrefix p;
    json_prefix_init(&p);
    return json_prefix_feed(&p, as_key ? "{" : "{\"\":", as_key ? 1 : 4) == 0 && json_prefix_feed(&p, text, strlen(text)) == 0 &&
           json_prefix_feed(&p, as_key ? ":0}" : "}", as_key ? 3 : 1) == 0 && json_prefix_complete(&p);
}

static int kind_of_value(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_STRING: return K_STRING;
    case JSON_INTEGER:
    case JSON_REAL: return K_NUMBER;
    case JSON_TRUE:
    case JSON_FALSE: return K_BOOLEAN;
    case JSON_NULL: return K_NULL;
    default: return -1;
    }
}

static int compile_enum(Compiler *c, int i, const json_t *values, const char *path) {
    size_t n = json_array_size(values);
    if (n == 0 || n > JSON_SCHEMA_MAX_ENUM) return fail(c, path, "1 to %d values", JSON_SCHEMA_MAX_ENUM);
    Node *nd = &c->s->nodes[i];
    nd->enum_text = calloc(n, sizeof *nd->enum_text);
    nd->enum_len = calloc(n, sizeof *nd->enum_len);
    if (!nd->enum_text || !nd->enum_len) return fail(c, path, "out of memory");
    nd->kinds = 0;
    for (size_t j = 0; j < n; j++) {
        const json_t *v = json_array_get(values, j);
        int k = kind_of_value(v);
        if (k < 0) return fail(c, path, "value %zu is an object or array (only strings, numbers, booleans and null)", j);
        char *t = scalar_text(v);
        if (!t) return fail(c, path, "out of memory");
        nd->enum_text[nd->n_enum++] = t;
        if (strlen(t) > 1000) return fail(c, path, "value %zu is longer than 1000 bytes as JSON", j);
        if (!writable(t, 0))
            return fail(c, path, "value %zu (%.40s) cannot be written within JSON mode's limits (18 integer digits, "
                        "2 exponent digits, no U+0000)", j, t);
        nd->enum_len[j] = (uint16_t)strlen(t);
        nd->kinds |= 1u << k;
    }
    return 0;
}

static int compile_object(Compiler *c, int i, const json_t *js, const char *path) {
    char sub[512];
    const json_t *props = json_object_get(js, "properties"), *req = json_object_get(js, "required");
    const json_t *add = json_object_get(js, "additionalProperties");
    if (props && !json_is_object(props)) return fail(c, path, "'properties' must be an object");
    size_t n = json_object_size(props);
    if (n > JSON_SCHEMA_MAX_PROPS) return fail(c, path, "more than %d properties", JSON_SCHEMA_MAX_PROPS);
    if (n > 0) {
        Node *nd = &c->s->nodes[i];
        nd->key = calloc(n, sizeof *nd->key);
        nd->key_len = calloc(n, sizeof *nd->key_len);
        nd->prop = calloc(n, sizeof *nd->prop);
        if (!nd->key || !nd->key_len || !nd->prop) return fail(c, path, "out of memory");
        const char *name;
        const json_t *v;
        json_object_foreach((json_t *)props, name, v) {
            json_t *str = json_string(name);
            char *t = str ? scalar_text(str) : NULL;
            json_decref(str);
            if (!t) return fail(c, path, "property name %.60s: out of memory or not UTF-8", name);
            nd = &c->s->nodes[i];
            int k = nd->n_props++;
            nd->key[k] = t;
            if (strlen(t) > 1000) return fail(c, path, "property name longer than 1000 bytes as JSON");
            if (!writable(t, 1)) return fail(c, path, "property name %.40s cannot be written (it holds U+0000)", t);
            nd->key_len[k] = (uint16_t)strlen(t);
            snprintf(sub, sizeof sub, "%.200s.properties.%.200s", path, name);
            int p = compile(c, v, sub);
            if (p < 0) return -1;
            c->s->nodes[i].prop[k] = (uint16_t)p;
        }
    }
    Node *nd = &c->s->nodes[i];
    if (req) {
        if (!json_is_array(req)) return fail(c, path, "'required' must be an array of property names");
        for (size_t j = 0; j < json_array_size(req); j++) {
            const char *name = json_string_value(json_array_get(req, j));
            if (!name) return fail(c, path, "'required' must be an array of property names");
            // the property's index: properties are numbered in the object's iteration order
            int k = 0;
            const char *pn;
            const json_t *pv;
            int found = -1;
            json_object_foreach((json_t *)props, pn, pv) {
                if (!strcmp(pn, name)) found = k;
                k++;
            }
            if (found < 0) return fail(c, path, "required property '%.60s' is not in 'properties'", name);
            nd->required |= 1ull << found;
        }
    }
    if (add) {
        if (json_is_boolean(add)) nd->additional = json_is_true(add);
        else if (json_is_object(add) && json_object_size(add) == 0) nd->additional = 1;
        else return fail(c, path, "'additionalProperties' must be true or false");
    }
    return 0;
}

static int compile_array(Compiler *c, int i, const json_t *js, const char *path) {
    char sub[512];
    const json_t *items = json_object_get(js, "items"), *lo = json_object_get(js, "minItems"),
                 *hi = json_object_get(js, "maxItems");
    if (items) {
        if (json_is_array(items)) return fail(c, path, "'items' as an array (tuples) is not supported");
        snprintf(sub, sizeof sub, "%.400s.items", path);
        int k = compile(c, items, sub);
        if (k < 0) return -1;
        c->s->nodes[i].items = (uint16_t)k;
    }
    Node *nd = &c->s->nodes[i];
    if (lo && (!json_is_integer(lo) || json_integer_value(lo) < 0)) return fail(c, path, "'minItems' must be an integer >= 0");
    if (hi && (!json_is_integer(hi) || json_integer_value(hi) < 0)) return fail(c, path, "'maxItems' must be an integer >= 0");
    nd->min_items = lo ? (long)json_integer_value(lo) : 0;
    nd->max_items = hi ? (long)json_integer_value(hi) : -1;
    if (nd->max_items >= 0 && nd->min_items > nd->max_items) return fail(c, path, "'minItems' is above 'maxItems'");
    return 0;
}

// anyOf / oneOf: the branches, told apart by the kind of a value's first byte.
static int compile_union(Compiler *c, int i, const json_t *list, const char *key, const char *path) {
    char sub[512];
    if (!json_is_array(list) || json_array_size(list) == 0) return fail(c, path, "'%s' must be a non-empty array", key);
    unsigned kinds = 0;
    uint16_t branch[N_KINDS];
    for (size_t j = 0; j < json_array_size(list); j++) {
        snprintf(sub, sizeof sub, "%.400s.%s[%zu]", path, key, j);
        int b = compile(c, json_array_get(list, j), sub);
        if (b < 0) return -1;
        if (b == JSON_SCHEMA_ANY) {  // a branch that takes anything: so does the union
            c->s->nodes[i].kinds = ALL_KINDS;
            for (int k = 0; k < N_KINDS; k++) c->s->nodes[i].branch[k] = JSON_SCHEMA_ANY;
            return 0;
        }
        const Node *bn = &c->s->nodes[b];
        unsigned bk = bn->kinds;
        // an integer and a number both begin with a digit or '-': a value's first byte cannot tell
        // them apart, nor two branches of one kind
        unsigned clash = kinds & bk;
        if ((kinds & (1u << K_NUMBER | 1u << K_INTEGER)) && (bk & (1u << K_NUMBER | 1u << K_INTEGER))) clash |= 1u << K_NUMBER;
        if (clash) {
            int k = 0;
            while (!(clash >> k & 1)) k++;
            return fail(c, path, "'%s' branches that both accept %s values are not supported (a value's first byte must tell them apart)",
                        key, KIND_NAMES[k]);
        }
        for (int k = 0; k < N_KINDS; k++)
            if (bk >> k & 1) branch[k] = bn->branch[k];
        kinds |= bk;
    }
    Node *nd = &c->s->nodes[i];
    nd->kinds = kinds;
    for (int k = 0; k < N_KINDS; k++)
        if (kinds >> k & 1) nd->branch[k] = branch[k];
    return 0;
}

static int compile_body(Compiler *c, const json_t *js, const char *path);

// The node of schema js (compiled once per schema object, so $ref cycles end); -1 with why.
static int compile(Compiler *c, const json_t *js, const char *path) {
    if (c->depth == JSON_SCHEMA_MAX_NESTING) return fail(c, path, "schemas nested more than %d deep", JSON_SCHEMA_MAX_NESTING);
    c->depth++;
    int rc = compile_body(c, js, path);
    c->depth--;
    return rc;
}

// The first of the keywords that js has, or NULL.
static const char *keyword_in(const json_t *js, const char *const *list) {
    for (int i = 0; list[i]; i++)
        if (json_object_get(js, list[i])) return list[i];
    return NULL;
}

// Whether [a, b] ∩ [lo, hi] holds a multiple of the node's multipleOf.
static int has_multiple(const Node *nd, int64_t a, int64_t b) {
    a = a > nd->lo ? a : nd->lo;
    b = b < nd->hi ? b : nd->hi;
    if (a > b) return 0;
    int64_t r = a % nd->multiple;  // (magnitudes below 1e18 + 1: no overflow)
    if (r < 0) r += nd->multiple;
    return (r == 0 ? a : a + (nd->multiple - r)) <= b;
}

// A bound as an integer, clamped to the grammar's magnitudes: up = 1 rounds up (a lower bound), 0
// down; strict: the next integer past it.
static int64_t int_bound(const json_t *v, int up, int strict) {
    if (json_is_integer(v)) {
        json_int_t x = json_integer_value(v);
        if (strict) x = up ? (x < INT_MAX_MAG + 1 ? x + 1 : x) : (x > -INT_MAX_MAG - 1 ? x - 1 : x);
        return x > INT_MAX_MAG + 1 ? INT_MAX_MAG + 1 : x < -INT_MAX_MAG - 1 ? -INT_MAX_MAG - 1 : (int64_t)x;
    }
    double x = json_real_value(v), r = up ? ceil(x) : floor(x);
    if (strict && r == x) r += up ? 1 : -1;
    return r > 1e18 ? INT_MAX_MAG + 1 : r < -1e18 ? -INT_MAX_MAG - 1 : (int64_t)r;
}

// minimum / maximum / exclusiveMinimum / exclusiveMaximum on a node that takes any number: the
// bounds as doubles (a number is compared as the double it parses to, as Python's and most
// validators do). multipleOf is refused there.
static int compile_number_range(Compiler *c, int i, const json_t *js, const char *path) {
    Node *nd = &c->s->nodes[i];
    if (json_object_get(js, "multipleOf")) return fail(c, path, "'multipleOf' is supported on integers only: give 'type': 'integer'");
    double lo = -INFINITY, hi = INFINITY;
    int lo_incl = 1, hi_incl = 1;
    for (int r = 0; r < 4; r++) {
        const json_t *v = json_object_get(js, RANGE_KEYWORDS[r]);
        if (!v) continue;
        if (!json_is_number(v) || !isfinite(json_number_value(v)))
            return fail(c, path, "'%s' must be a number", RANGE_KEYWORDS[r]);
        double b = json_number_value(v);
        int strict = r >= 2;
        if (r == 0 || r == 2) {
            if (b > lo || (b == lo && strict)) lo = b, lo_incl = !strict;
        } else if (b < hi || (b == hi && strict)) {
            hi = b, hi_incl = !strict;
        }
    }
    if (lo > hi || (lo == hi && !(lo_incl && hi_incl)))
        return fail(c, path, "no number lies within 'minimum'/'maximum'");
    nd->has_nrange = 1;
    nd->nlo = lo, nd->nhi = hi, nd->nlo_incl = (uint8_t)lo_incl, nd->nhi_incl = (uint8_t)hi_incl;
    return 0;
}

// minimum / maximum / exclusiveMinimum / exclusiveMaximum / multipleOf on a node's integers (JSON
// Schema applies them to numbers only: a node that takes no numbers ignores them; one that takes
// non-integer numbers is refused — this automaton bounds integers only).
static int compile_range(Compiler *c, int i, const json_t *js, const char *path) {
    const char *kw = keyword_in(js, RANGE_KEYWORDS);
    if (!kw) return 0;
    Node *nd = &c->s->nodes[i];
    if (nd->kinds >> K_NUMBER & 1) return compile_number_range(c, i, js, path);
    const json_t *mult = json_object_get(js, "multipleOf");
    int64_t multiple = 1;
    if (mult) {
        double m = json_number_value(mult);
        if (!json_is_number(mult) || !(m > 0) || m != floor(m))
            return fail(c, path, "'multipleOf' must be a whole number above 0 (on integers)");
        multiple = m > (double)INT_MAX_MAG ? INT_MAX_MAG + 1 : json_is_integer(mult) ? (int64_t)json_integer_value(mult) : (int64_t)m;
    }
    int64_t lo = -INT_MAX_MAG, hi = INT_MAX_MAG;
    for (int r = 0; r < 4; r++) {
        const json_t *v = json_object_get(js, RANGE_KEYWORDS[r]);
        if (!v) continue;
        if (!json_is_number(v) || !isfinite(json_number_value(v)))
            return fail(c, path, "'%s' must be a number", RANGE_KEYWORDS[r]);
        int lower = r == 0 || r == 2;
        int64_t b = int_bound(v, lower, r >= 2);
        if (lower && b > lo) lo = b;
        if (!lower && b < hi) hi = b;
    }
    nd->lo = lo;
    nd->hi = hi;
    nd->multiple = multiple;
    if (!has_multiple(nd, lo, hi))
        return fail(c, path, "no integer of at most 18 digits lies within 'minimum'/'maximum'%s",
                    multiple > 1 ? " and is a multiple of 'multipleOf'" : "");
    if (!(nd->kinds >> K_INTEGER & 1)) return 0;  // no numbers: the bounds say nothing
    nd->has_range = 1;
    return 0;
}

// minLength / maxLength: a string's length in characters (code points, as JSON Schema counts).
static int compile_length(Compiler *c, int i, const json_t *js, const char *path) {
    Node *nd = &c->s->nodes[i];
    for (int r = 0; LENGTH_KEYWORDS[r]; r++) {
        const json_t *v = json_object_get(js, LENGTH_KEYWORDS[r]);
        if (!v) continue;
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > JSON_SCHEMA_MAX_LENGTH)
            return fail(c, path, "'%s' must be an integer from 0 to %d", LENGTH_KEYWORDS[r], JSON_SCHEMA_MAX_LENGTH);
        if (r == 0) nd->min_len = (long)json_integer_value(v);
        else nd->max_len = (long)json_integer_value(v);
    }
    if (nd->max_len >= 0 && nd->min_len > nd->max_len) return fail(c, path, "'minLength' is above 'maxLength'");
    const json_t *pat = json_object_get(js, "pattern");
    if (!pat) return 0;
    // (a length and a pattern together could leave a prefix no completion of which fits both)
    const char *len_kw = keyword_in(js, LENGTH_KEYWORDS);
    if (len_kw) return fail(c, path, "'pattern' beside '%s' is not supported", len_kw);
    if (!json_is_string(pat)) return fail(c, path, "'pattern' must be a string");
    char why[256];
    if (pattern_compile(&c->s->nodes[i].pattern, json_string_value(pat), why, sizeof why))
        return fail(c, path, "'pattern': %s", why);
    return 0;
}

static int compile_body(Compiler *c, const json_t *js, const char *path) {
    if (json_is_true(js)) return JSON_SCHEMA_ANY;
    if (json_is_false(js)) return fail(c, path, "the schema false accepts nothing");
    if (!json_is_object(js)) return fail(c, path, "a schema must be an object or a boolean");
    for (int i = 0; i < c->s->n; i++)
        if (c->memo[i] == js) return i;
    const char *k;
    const json_t *v;
    int constraints = 0;
    json_object_foreach((json_t *)js, k, v) {
        if (in_list(k, ANNOTATIONS)) continue;
        if (!in_list(k, KEYWORDS)) return fail(c, path, "'%.60s' is not supported", k);
        constraints++;
    }
    const json_t *ref = json_object_get(js, "$ref");
    if (ref) {
        if (!json_is_string(ref)) return fail(c, path, "'$ref' must be a string");
        if (constraints > 1) return fail(c, path, "'$ref' beside other constraints is not supported");
        char sub[512];
        snprintf(sub, sizeof sub, "%.400s.$ref", path);
        const json_t *t = resolve_ref(c, json_string_value(ref), sub);
        return t ? compile(c, t, sub) : -1;
    }
    if (constraints == 0) return JSON_SCHEMA_ANY;
    int i = node_new(c, js, path);
    if (i < 0) return -1;
    const json_t *any = json_object_get(js, "anyOf"), *one = json_object_get(js, "oneOf");
    if (any || one) {
        if (constraints > 1) return fail(c, path, "'%s' beside other constraints is not supported", any ? "anyOf" : "oneOf");
        return compile_union(c, i, any ? any : one, any ? "anyOf" : "oneOf", path) ? -1 : i;
    }
    const json_t *type = json_object_get(js, "type"), *en = json_object_get(js, "enum"), *cn = json_object_get(js, "const");
    if (en && cn) return fail(c, path, "both 'enum' and 'const'");
    if (en && !json_is_array(en)) return fail(c, path, "'enum' must be an array");
    const char *kw = keyword_in(js, RANGE_KEYWORDS);
    kw = kw ? kw : keyword_in(js, STRING_KEYWORDS);
    if ((en || cn) && kw) return fail(c, path, "'%s' beside '%s' is not supported", kw, en ? "enum" : "const");
    if (en || cn) {
        json_t *one_value = cn ? json_pack("[O]", cn) : NULL;
        int rc = compile_enum(c, i, en ? en : one_value, path);
        json_decref(one_value);
        return rc ? -1 : i;
    }
    if (type) {
        unsigned kinds = 0;
        if (json_is_string(type)) {
            int kd = kind_of_name(json_string_value(type));
            if (kd < 0) return fail(c, path, "'type' \"%.40s\" is not a JSON Schema type", json_string_value(type));
            kinds = 1u << kd;
        } else if (json_is_array(type) && json_array_size(type) > 0) {
            for (size_t j = 0; j < json_array_size(type); j++) {
                const char *name = json_string_value(json_array_get(type, j));
                int kd = name ? kind_of_name(name) : -1;
                if (kd < 0) return fail(c, path, "'type' lists something that is not a JSON Schema type");
                kinds |= 1u << kd;
            }
        } else {
            return fail(c, path, "'type' must be a type name or a non-empty array of them");
        }
        if (kinds >> K_NUMBER & 1) kinds &= ~(1u << K_INTEGER);  // an integer is a number
        c->s->nodes[i].kinds = kinds;
    }
    if (json_is_true(json_object_get(js, "nullable"))) c->s->nodes[i].kinds |= 1u << K_NULL;
    if (compile_object(c, i, js, path) || compile_array(c, i, js, path) || compile_range(c, i, js, path) ||
        compile_length(c, i, js, path))
        return -1;
    return i;
}

static int sat_add(int a, int b) { return a + b >= HEIGHT_NONE ? HEIGHT_NONE : a + b; }

// Node heights, least fixed point: every height starts as HEIGHT_NONE and falls while one does.
static void compute_heights(JsonSchema *s) {
    for (int i = 0; i < s->n; i++) {
        memset(s->nodes[i].height, HEIGHT_NONE, sizeof s->nodes[i].height);
        s->nodes[i].min_height = HEIGHT_NONE;
    }
    for (int changed = 1; changed;) {
        changed = 0;
        for (int i = 0; i < s->n; i++) {
            Node *nd = &s->nodes[i];
            for (int k = 0; k < N_KINDS; k++) {
                if (!(nd->kinds >> k & 1)) continue;
                int h;
                const Node *b = &s->nodes[nd->branch[k]];
                if (b != nd) h = b->height[k];
                else if (k == K_OBJECT) {
                    h = 1;
                    for (int j = 0; j < nd->n_props; j++)
                        if (nd->required >> j & 1) {
                            int need = sat_add(1, s->nodes[nd->prop[j]].min_height);
                            h = need > h ? need : h;
                        }
                } else if (k == K_ARRAY) {
                    h = nd->min_items > 0 ? sat_add(1, s->nodes[nd->items].min_height) : 1;
                } else {
                    h = 0;
                }
                if (h < nd->height[k]) {
                    nd->height[k] = (uint8_t)h;
                    changed = 1;
                }
                if (h < nd->min_height) nd->min_height = (uint8_t)h;
            }
        }
    }
}

int json_schema_compile(JsonSchema **out, const json_t *schema, char *why, size_t n) {
    *out = NULL;
    Compiler c = {calloc(1, sizeof(JsonSchema)), schema, NULL, why, n, 0};
    if (!c.s) return snprintf(why, n, "out of memory"), -1;
    int any = node_new(&c, NULL, "schema");  // JSON_SCHEMA_ANY
    int root = any < 0 ? -1 : compile(&c, schema, "schema");
    if (root >= 0 && !(c.s->nodes[root].kinds >> K_OBJECT & 1))
        root = fail(&c, "schema", "the root must accept an object (a response is a JSON object)");
    if (root >= 0) {
        compute_heights(c.s);
        if (c.s->nodes[root].height[K_OBJECT] > JSON_PREFIX_MAX_DEPTH)
            root = fail(&c, "schema", "no object it accepts nests at most %d deep (the required members recurse)",
                        JSON_PREFIX_MAX_DEPTH);
    }
    free(c.memo);
    if (root < 0) {
        json_schema_free(c.s);
        return -1;
    }
    c.s->root = (uint16_t)root;
    *out = c.s;
    return 0;
}

// ---- reading a document ----

void json_schema_prefix_init(JsonSchemaPrefix *p, const JsonSchema *schema) {
    memset(p, 0, offsetof(JsonSchemaPrefix, frames));
    json_prefix_init(&p->lex);
    p->schema = schema;
}

void json_schema_prefix_copy(JsonSchemaPrefix *dst, const JsonSchemaPrefix *src) {
    memcpy(dst, src, offsetof(JsonSchemaPrefix, frames) + sizeof src->frames[0] * src->depth);
}

int json_schema_prefix_complete(const JsonSchemaPrefix *p) { return !p->bad && json_prefix_complete(&p->lex); }

int json_schema_prefix_at_free_text(const JsonSchemaPrefix *p) {
    if (p->bad || !json_prefix_at_text(&p->lex)) return 0;
    if (!p->schema) return 1;
    if (p->in_value) {
        const Node *nd = &p->schema->nodes[p->val_node];
        return nd->n_enum == 0 && nd->max_len < 0 && (!nd->pattern || pattern_unconstrained(nd->pattern, &p->pattern));
    }
    const JsonSchemaFrame *f = p->depth ? &p->frames[p->depth - 1] : NULL;
    return f && f->in_key && p->schema->nodes[f->node].additional;  // any key may be written
}

static uint64_t low_bits(int n) { return n >= 64 ? ~0ull : (1ull << n) - 1; }

// The kind of a value whose first byte is c, as node nd reads it; -1 when nd accepts none such.
static int value_kind(const Node *nd, uint8_t c) {
    int k;
    switch (c) {
    case '{': k = K_OBJECT; break;
    case '[': k = K_ARRAY; break;
    case '"': k = K_STRING; break;
    case 't':
    case 'f': k = K_BOOLEAN; break;
    case 'n': k = K_NULL; break;
    default: k = nd->kinds >> K_NUMBER & 1 ? K_NUMBER : K_INTEGER; break;
    }
    return nd->kinds >> k & 1 ? k : -1;
}

// The literal text of an enum value goes on with c (its byte val_len); -1 when no value does.
static int enum_byte(JsonSchemaPrefix *p, const Node *nd, uint8_t c) {
    if (nd->n_enum == 0) return 0;
    uint64_t live = p->val_live;
    for (int i = 0; i < nd->n_enum; i++)
        if ((live >> i & 1) && (p->val_len >= nd->enum_len[i] || (uint8_t)nd->enum_text[i][p->val_len] != c))
            live &= ~(1ull << i);
    p->val_live = live;
    p->val_len++;
    return live ? 0 : -1;
}

// Whether an integer beginning as read so far (its sign, its digits' value and count; a first
// digit 0 makes it exactly 0) can still end within [lo, hi] in at most 18 digits: with L digits in
// all, the magnitudes [mag·10^j, (mag + 1)·10^j − 1], j = L − digits.
static int int_reachable(const Node *nd, const JsonSchemaPrefix *p) {
    int neg = p->num_neg;
    if (p->num_digits == 0) return has_multiple(nd, 0, 0) || has_multiple(nd, -INT_MAX_MAG, -1);  // "-": -0 or below
    if (p->num_zero) return has_multiple(nd, 0, 0);
    int64_t a = p->num_mag, b = p->num_mag;
    for (int L = p->num_digits; L <= 18; L++) {
        int64_t v0 = neg ? -b : a, v1 = neg ? -a : b;
        if (has_multiple(nd, v0, v1)) return 1;
        if (L < 18) a *= 10, b = b * 10 + 9;
    }
    return 0;
}

// Whether the numbers between a and b (each end included when ai / bi) meet the node's bounds;
// a number is a finite decimal, and those are dense: an overlap of positive length holds one.
static int meets_bounds(const Node *nd, double a, int ai, double b, int bi) {
    double lo = a, hi = b;
    int loi = ai, hii = bi;
    if (nd->nlo > lo) lo = nd->nlo, loi = nd->nlo_incl;
    else if (nd->nlo == lo) loi = loi && nd->nlo_incl;
    if (nd->nhi < hi) hi = nd->nhi, hii = nd->nhi_incl;
    else if (nd->nhi == hi) hii = hii && nd->nhi_incl;
    return lo < hi || (lo == hi && loi && hii);
}

// The magnitudes [a, b) (b excluded unless the range is a single point), or their negatives
// (-b, -a], against the bounds.
static int meets_magnitudes(const Node *nd, int neg, double a, double b) {
    int point = !(b > a);
    return neg ? meets_bounds(nd, -b, point, -a, 1) : meets_bounds(nd, a, 1, b, point);
}

// Whether a number beginning as read so far (its text in num_text: sign, integer digits, '.', the
// fraction's first digits) can still end within the node's bounds. Written without an exponent
// (refused beside bounds): the integer part has at most 18 digits; with L of them the magnitudes
// are [m·10^j, (m + 1)·10^j), j = L − digits so far; in the fraction, with t digits after the
// point, [v, v + 10^−t).
static int number_reachable(const Node *nd, const JsonSchemaPrefix *p) {
    int neg = p->num_neg;
    if (p->num_digits == 0) return meets_magnitudes(nd, 1, 0, 1e18);  // "-": -0 or below
    double m = fabs(strtod(p->num_text, NULL));
    if (p->num_dot) return meets_magnitudes(nd, neg, m, m + pow(10, -p->num_fdigits));
    if (p->num_zero) return meets_magnitudes(nd, neg, 0, 1);
    for (int L = p->num_digits; L <= 18; L++, m *= 10)
        if (meets_magnitudes(nd, neg, m, m + pow(10, L - p->num_digits))) return 1;
    return 0;
}

// Byte c of a number with bounds: its sign, digit or point, kept as text (its first 39 bytes: the
// fraction past them is below a double's resolution), and whether it can still end in bounds.
static int number_byte(JsonSchemaPrefix *p, const Node *nd, uint8_t c) {
    if (!nd->has_nrange) return 0;
    if (c == 'e' || c == 'E') return -1;  // (bounded numbers are written without an exponent)
    if (p->num_len < sizeof p->num_text - 1) p->num_text[p->num_len++] = (char)c, p->num_text[p->num_len] = 0;
    if (c == '-') p->num_neg = 1;
    else if (c == '.') p->num_dot = 1;
    else if (p->num_dot) p->num_fdigits = p->num_fdigits < 255 ? p->num_fdigits + 1 : 255;
    else {
        if (p->num_digits == 0 && c == '0') p->num_zero = 1;
        p->num_digits++;
    }
    return number_reachable(nd, p) ? 0 : -1;
}

// Byte c of an integer with a range: its sign or next digit, and whether it can still end in range.
static int int_byte(JsonSchemaPrefix *p, const Node *nd, uint8_t c) {
    if (!nd->has_range) return 0;
    if (c == '-') p->num_neg = 1;
    else if (c >= '0' && c <= '9') {
        if (p->num_digits == 0 && c == '0') p->num_zero = 1;
        p->num_mag = p->num_mag * 10 + (c - '0');
        p->num_digits++;
    }
    return int_reachable(nd, p) ? 0 : -1;
}

// The scalar value being read has ended: an enum's text must be whole, an integer in its range.
static int value_end(JsonSchemaPrefix *p) {
    const Node *nd = &p->schema->nodes[p->val_node];
    p->in_value = 0;
    if (nd->has_range && p->val_kind == K_INTEGER) {
        int64_t v = p->num_neg ? -p->num_mag : p->num_mag;
        if (p->num_digits == 0 || v < nd->lo || v > nd->hi || v % nd->multiple) return -1;
    }
    if (nd->has_nrange && p->val_kind == K_NUMBER) {
        double v = strtod(p->num_text, NULL);
        if (p->num_digits == 0 || !meets_bounds(nd, v, 1, v, 1)) return -1;
    }
    for (int i = 0; i < nd->n_enum; i++)
        if ((p->val_live >> i & 1) && nd->enum_len[i] == p->val_len) return 0;
    return nd->n_enum ? -1 : 0;
}

// c begins a value in the innermost container (or the document).
static int value_begin(JsonSchemaPrefix *p, uint8_t c) {
    const JsonSchema *s = p->schema;
    JsonSchemaFrame *f = p->depth ? &p->frames[p->depth - 1] : NULL;
    uint16_t node = s->root;
    if (f && f->object) node = f->value;
    else if (f) {
        const Node *fn = &s->nodes[f->node];
        node = fn->items;
        f->count++;
        if (fn->max_items >= 0 && f->count > (uint64_t)fn->max_items) return -1;
    }
    const Node *nd = &s->nodes[node];
    int k = value_kind(nd, c);
    if (k < 0) return -1;
    uint16_t b = nd->branch[k];
    if (k == K_OBJECT || k == K_ARRAY) {
        if (p->depth + nd->height[k] > JSON_PREFIX_MAX_DEPTH) return -1;  // it could not be closed
        JsonSchemaFrame *g = &p->frames[p->depth++];
        memset(g, 0, sizeof *g);
        g->node = b;
        g->object = k == K_OBJECT;
        return 0;
    }
    p->in_value = 1;
    p->val_node = b;
    p->val_kind = (uint8_t)k;
    p->val_len = 0;
    p->val_live = low_bits(s->nodes[b].n_enum);
    p->num_mag = 0, p->num_digits = p->num_neg = p->num_zero = 0;
    p->num_dot = p->num_fdigits = p->num_len = 0;
    p->num_text[0] = 0;
    p->str_chars = 0;
    if (k == K_STRING && s->nodes[b].pattern) pattern_start(s->nodes[b].pattern, &p->pattern);
    if (k == K_INTEGER && int_byte(p, &s->nodes[b], c)) return -1;
    if (k == K_NUMBER && number_byte(p, &s->nodes[b], c)) return -1;
    return enum_byte(p, &s->nodes[b], c);
}

// The properties of the innermost object that may still come: not present yet, and with a value
// that can be completed inside the depth limit.
static uint64_t open_props(const JsonSchemaPrefix *p, const JsonSchemaFrame *f) {
    const Node *nd = &p->schema->nodes[f->node];
    uint64_t m = 0;
    for (int i = 0; i < nd->n_props; i++)
        if (!(f->seen >> i & 1) && p->depth + p->schema->nodes[nd->prop[i]].min_height <= JSON_PREFIX_MAX_DEPTH) m |= 1ull << i;
    return m;
}

// A key's byte c (its quotes included) against the properties' key texts. live: every property
// whose text the key still matches — one present already or too deep included, so that the key
// is refused (not taken for an additional property) when it turns out to be that one.
static int key_byte(JsonSchemaPrefix *p, JsonSchemaFrame *f, uint8_t c, int ends) {
    const Node *nd = &p->schema->nodes[f->node];
    uint64_t live = f->live;
    for (int i = 0; i < nd->n_props; i++)
        if ((live >> i & 1) && (f->key_len >= nd->key_len[i] || (uint8_t)nd->key[i][f->key_len] != c)) live &= ~(1ull << i);
    f->live = live;
    f->key_len++;
    if (!nd->additional && !(live & open_props(p, f))) return -1;
    if (!ends) return 0;
    f->in_key = 0;
    f->value = JSON_SCHEMA_ANY;  // an additional property
    for (int i = 0; i < nd->n_props; i++)
        if ((live >> i & 1) && nd->key_len[i] == f->key_len) {
            if (!(open_props(p, f) >> i & 1)) return -1;  // a property twice, or one too deep to complete
            f->seen |= 1ull << i;
            f->value = nd->prop[i];
            return 0;
        }
    return nd->additional ? 0 : -1;
}

// Byte c of a string value at its text (not inside an escape or a multi-byte character): its
// closing quote or the first byte of a character, against minLength / maxLength.
static int string_text_byte(JsonSchemaPrefix *p, const Node *nd, uint8_t c) {
    if (c == '"') return p->str_chars < (uint32_t)nd->min_len || (nd->pattern && !pattern_accepts(nd->pattern, &p->pattern)) ? -1 : 0;
    if (nd->max_len >= 0 && p->str_chars >= (uint32_t)nd->max_len) return -1;
    p->str_chars++;
    return 0;
}

// A byte of a string value with a pattern, after the grammar took it: a character it completes goes
// to the pattern; inside a character (a multi-byte one or an escape begun) the code points it can
// still become must hold one the pattern can take next.
static int string_pattern_byte(JsonSchemaPrefix *p, const Pattern *re, int ev) {
    if (ev & JSON_EV_CHAR) return pattern_take(re, &p->pattern, p->lex.cp);
    uint32_t r[3][2];
    int n = json_prefix_char_range(&p->lex, r);
    if (n == 0) return 0;
    for (int i = 0; i < n; i++)
        if (pattern_can_take(re, &p->pattern, r[i][0], r[i][1])) return 0;
    return -1;
}

static int step(JsonSchemaPrefix *p, uint8_t c) {
    int text = p->in_value && p->val_kind == K_STRING && json_prefix_at_text(&p->lex);
    int ev = json_prefix_step(&p->lex, c);
    if (ev < 0 || !p->schema) return ev < 0 ? -1 : 0;
    const JsonSchema *s = p->schema;
    if (text && string_text_byte(p, &s->nodes[p->val_node], c)) return -1;
    if (p->in_value && p->val_kind == K_STRING && s->nodes[p->val_node].pattern && string_pattern_byte(p, s->nodes[p->val_node].pattern, ev))
        return -1;
    if (p->in_value) {
        int number = p->val_kind == K_NUMBER || p->val_kind == K_INTEGER;
        if (number && (ev & JSON_EV_END)) {  // the number ended before c, which goes on below
            if (value_end(p)) return -1;
        } else {
            if (p->val_kind == K_INTEGER && (c == '.' || c == 'e' || c == 'E')) return -1;
            if (p->val_kind == K_INTEGER && int_byte(p, &s->nodes[p->val_node], c)) return -1;
            if (p->val_kind == K_NUMBER && number_byte(p, &s->nodes[p->val_node], c)) return -1;
            if (enum_byte(p, &s->nodes[p->val_node], c)) return -1;
            return ev & JSON_EV_END ? value_end(p) : 0;
        }
    }
    JsonSchemaFrame *f = p->depth ? &p->frames[p->depth - 1] : NULL;
    if (f && f->in_key) return key_byte(p, f, c, ev & JSON_EV_KEY_END);
    if (ev & JSON_EV_KEY) {
        const Node *nd = &s->nodes[f->node];
        f->in_key = 1;
        f->key_len = 0;
        f->live = low_bits(nd->n_props);
        return key_byte(p, f, c, 0);
    }
    if (ev & JSON_EV_VALUE) return value_begin(p, c);
    if (ev & JSON_EV_COMMA) {  // only where another member or element can follow: no dead ends
        const Node *nd = &s->nodes[f->node];
        if (f->object && !nd->additional && !open_props(p, f)) return -1;
        if (!f->object && ((nd->max_items >= 0 && f->count >= (uint64_t)nd->max_items) ||
                           p->depth + s->nodes[nd->items].min_height > JSON_PREFIX_MAX_DEPTH))
            return -1;
    }
    if (ev & JSON_EV_CLOSE) {
        const Node *nd = &s->nodes[f->node];
        if (f->object && (f->seen & nd->required) != nd->required) return -1;
        if (!f->object && f->count < (uint64_t)nd->min_items) return -1;
        p->depth--;
    }
    return 0;
}

int json_schema_prefix_feed(JsonSchemaPrefix *p, const char *bytes, size_t n) {
    for (size_t i = 0; i < n && !p->bad; i++) p->bad = step(p, (uint8_t)bytes[i]) != 0;
    return p->bad ? -1 : 0;
}
