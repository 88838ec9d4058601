// The JSON Schema prefix automaton (src/text/json_schema.h) against an independent validator:
// tests/data/json_schema/vectors.json holds schemas and documents labelled valid or not by
// python3-jsonschema (tools/json_schema_vectors.py, Draft 2020-12). A document the reference
// accepts is accepted byte by byte — every prefix, however split — and complete at its end; one it
// refuses is refused by its end. Then the compile-time refusals (each naming its path), the
// limits, and what the mask relies on: no accepted prefix is a dead end (some byte always goes on
// until the object is complete), and a copied state goes on as the original would.
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/rng.h"
#include "test.h"
#include "text/json_schema.h"
#include "text/utf8.h"

// Feeds s in pieces of 1 .. max_piece bytes (from rng), each on a copy kept only when it fits, as
// the mask does; 1 complete, 0 an accepted prefix, -1 refused.
static int feed_split(const JsonSchema *schema, const char *s, size_t n, Rng *rng, int max_piece) {
    JsonSchemaPrefix p, copy;
    json_schema_prefix_init(&p, schema);
    for (size_t i = 0; i < n;) {
        size_t k = 1 + (size_t)(rng_uniform(rng) * max_piece);
        if (k > n - i) k = n - i;
        json_schema_prefix_copy(&copy, &p);
        if (json_schema_prefix_feed(&copy, s + i, k)) return -1;
        json_schema_prefix_copy(&p, &copy);
        i += k;
    }
    return json_schema_prefix_complete(&p);
}

static JsonSchema *compile_text(const char *text, char *why, size_t n) {
    json_error_t je;
    json_t *js = json_loads(text, JSON_DECODE_ANY, &je);
    if (!js) {
        snprintf(why, n, "test schema: %s", je.text);
        return NULL;
    }
    JsonSchema *s = NULL;
    json_schema_compile(&s, js, why, n);
    json_decref(js);
    return s;
}

TEST(test_json_schema_matches_reference_validator) {
    char path[600], why[512];
    snprintf(path, sizeof path, "%s/json_schema/vectors.json", test_datadir());
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    CHECK_MSG(root, "%s: %s", path, je.text);
    json_t *cases = json_object_get(root, "cases");
    CHECK(json_array_size(cases) >= 4);
    Rng rng;
    rng_seed(&rng, 11);
    int docs = 0, valid = 0;
    for (size_t i = 0; i < json_array_size(cases); i++) {
        json_t *cs = json_array_get(cases, i);
        JsonSchema *s = NULL;
        CHECK_MSG(json_schema_compile(&s, json_object_get(cs, "schema"), why, sizeof why) == 0, "case %zu: %s", i, why);
        json_t *list = json_object_get(cs, "docs");
        for (size_t j = 0; j < json_array_size(list); j++) {
            json_t *d = json_array_get(list, j);
            const char *text = json_string_value(json_object_get(d, "text"));
            size_t n = json_string_length(json_object_get(d, "text"));
            int want = json_is_true(json_object_get(d, "valid"));
            for (int piece = 1; piece <= 7; piece += 3) {
                int got = feed_split(s, text, n, &rng, piece);
                CHECK_MSG((got == 1) == want, "case %zu: %s: the reference says %s, dsv3 %s", i, text,
                          want ? "valid" : "invalid", got == 1 ? "complete" : got == 0 ? "incomplete" : "refused");
            }
            docs++;
            valid += want;
        }
        json_schema_free(s);
    }
    printf("    %d documents (%d valid) over %zu schemas agree with python3-jsonschema\n", docs, valid,
           json_array_size(cases));
    json_decref(root);
    CHECK(docs > 500 && valid > 100 && docs - valid > 100);
}

typedef struct {
    const char *text;
    int bad_at;  // the first byte refused; -1: none (the whole text is a prefix)
    int complete;
} RefusalCase;

// Compiles schema, then feeds each case's text byte by byte: the first byte refused and whether the
// whole is complete.
static void check_refusals(const char *schema, const RefusalCase *cases, size_t n) {
    char why[512];
    JsonSchema *s = compile_text(schema, why, sizeof why);
    CHECK_MSG(s, "%s", why);
    if (!s) return;
    for (size_t i = 0; i < n; i++) {
        JsonSchemaPrefix p;
        json_schema_prefix_init(&p, s);
        const char *t = cases[i].text;
        int bad = -1;
        for (int k = 0; t[k] && bad < 0; k++)
            if (json_schema_prefix_feed(&p, t + k, 1)) bad = k;
        CHECK_MSG(bad == cases[i].bad_at, "%s: refused at byte %d, expected %d", t, bad, cases[i].bad_at);
        CHECK_MSG(json_schema_prefix_complete(&p) == cases[i].complete, "%s: complete %d", t, json_schema_prefix_complete(&p));
    }
    json_schema_free(s);
}

// Where a document goes wrong is where it is refused: the mask then never lets the model write it.
TEST(test_json_schema_refuses_at_the_first_wrong_byte) {
    static const RefusalCase cases[] = {
        {"{\"c\": \"red\"}", -1, 1},
        {"{\"n\": 12, \"c\": \"green\"}", -1, 1},
        {"{\"n\": 1.5}", 7, 0},          // an integer has no fraction
        {"{\"n\": 1e3}", 7, 0},
        {"{\"x\": 1}", 2, 0},            // no property begins with x
        {"{\"nn\": 1}", 3, 0},
        {"{\"n\": 1", -1, 0},
        {"{\"n\": 1}", 7, 0},            // c is still due
        {"{\"c\": \"blue\"}", 7, 0},     // not an enum value
        {"{\"c\": \"re\"}", 9, 0},       // a prefix of one, closed too early
        {"{\"c\": \"red\", \"c\": \"red\"}", 14, 0},  // a property twice
        {"{\"c\": \"red\", \"l\": [1, 2, 3]}", 23, 0},  // no third element: no comma after the second
        {"{\"c\": \"red\", \"n\": 1, \"l\": []", -1, 0},
        {"{\"c\": \"red\", \"n\": 1, \"l\": [],", 28, 0},  // every property is there: no comma
        {"{\"c\": \"red\", \"l\": [1, {\"any\": [null]}]}", -1, 1},
        {"{\"c\": 1}", 6, 0},
        {"[1]", 0, 0},
    };
    check_refusals("{\"type\": \"object\", \"properties\": {\"n\": {\"type\": \"integer\"}, "
                   "\"c\": {\"enum\": [\"red\", \"green\"]}, \"l\": {\"type\": \"array\", \"maxItems\": 2}}, "
                   "\"required\": [\"c\"], \"additionalProperties\": false}",
                   cases, sizeof cases / sizeof cases[0]);
}

// An integer with a range is refused at the first digit (or sign) that no integer it begins can
// bring into the range within 18 digits, or at its end when it is outside.
TEST(test_json_schema_integer_range_refuses_at_the_first_wrong_byte) {
    static const RefusalCase cases[] = {
        {"{\"n\": 10}", -1, 1},
        {"{\"n\": 250}", -1, 1},
        {"{\"n\": 251}", 8, 0},   // 251 itself is excluded, and 251x is too big: at its last digit
        {"{\"n\": 26", -1, 0},     // 26 may end here (260 and longer may not)
        {"{\"n\": 260}", 8, 0},
        {"{\"n\": 5", -1, 0},      // 50-59 are in range
        {"{\"n\": 5}", 7, 0},      // but 5 is not
        {"{\"n\": -", 6, 0},       // nothing negative
        {"{\"n\": 0", 6, 0},       // 0 is only 0
        {"{\"m\": -8}", -1, 1},
        {"{\"m\": -7}", 8, 0},
        {"{\"m\": null}", -1, 1},
        {"{\"m\": 3", 6, 0},
        {"{\"z\": 0}", -1, 1},
        {"{\"z\": -0}", -1, 1},     // -0 is 0
        {"{\"z\": 1", 6, 0},
        {"{\"z\": -1", 7, 0},
        {"{\"s\": \"x\"}", -1, 1}, // a bound says nothing of strings
    };
    check_refusals("{\"type\": \"object\", \"properties\": {\"n\": {\"type\": \"integer\", \"minimum\": 10, "
                   "\"exclusiveMaximum\": 251}, \"m\": {\"type\": [\"integer\", \"null\"], \"maximum\": -7.5}, "
                   "\"z\": {\"type\": \"integer\", \"minimum\": -0.5, \"maximum\": 0.5}, "
                   "\"s\": {\"type\": \"string\", \"minimum\": 3}}}",
                   cases, sizeof cases / sizeof cases[0]);
}

// A string is refused at the first character past maxLength (its first byte: a multi-byte character
// or an escape never begins where it could not end) and at a closing quote before minLength;
// characters are code points (a surrogate pair's two escapes are one). An integer with multipleOf
// (and a range) is refused at the first digit no multiple in range can begin.
TEST(test_json_schema_lengths_and_multiples_refuse_at_the_first_wrong_byte) {
    static const RefusalCase cases[] = {
        {"{\"a\": \"xy\"}", -1, 1},
        {"{\"a\": \"x\"}", 8, 0},                 // one character: the quote comes too early
        {"{\"a\": \"xyz\"}", -1, 1},
        {"{\"a\": \"xyzw\"}", 10, 0},             // a fourth character, at its first byte
        {"{\"a\": \"\xc3\xa9\xe2\x9c\x93\xf0\x9f\x98\x80\"}", -1, 1},  // é ✓ 😀: three code points
        {"{\"a\": \"\xc3\xa9\xe2\x9c\x93\xf0\x9f\x98\x80\xc3\xa9\"}", 16, 0},  // a fourth: its lead byte
        {"{\"a\": \"\\ud83d\\ude00x\"}", -1, 1},  // a surrogate pair is one character: two in all
        {"{\"a\": \"xy\\n\"}", -1, 1},
        {"{\"a\": \"xyz\\n\"}", 10, 0},         // an escape is refused at its backslash
        {"{\"b\": \"\"}", -1, 1},
        {"{\"b\": \"x\"}", 7, 0},
        {"{\"b\": null}", -1, 1},
        {"{\"m\": 125}", -1, 1},
        {"{\"m\": -50}", -1, 1},
        {"{\"m\": 0}", -1, 1},
        {"{\"m\": -0}", -1, 1},
        {"{\"m\": 12", -1, 0},                      // 125 is ahead
        {"{\"m\": 12}", 8, 0},
        {"{\"m\": 13", 7, 0},                       // 13x is past 130 and no multiple of 25 is 13
        {"{\"m\": -7", 7, 0},                       // -75 is below -60
        {"{\"m\": 150}", 7, 0},                     // 15 is no multiple, 150 and longer are past 130
        {"{\"e\": 123456789012345678}", -1, 1},     // 18 digits, even
        {"{\"e\": 123456789012345677}", 23, 0},     // odd at the 18th digit, after which none may come
        {"{\"e\": -14}", -1, 1},
        {"{\"e\": 7}", 7, 0},
    };
    check_refusals("{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"string\", \"minLength\": 2, "
                   "\"maxLength\": 3}, \"b\": {\"type\": [\"string\", \"null\"], \"maxLength\": 0}, "
                   "\"m\": {\"type\": \"integer\", \"multipleOf\": 25, \"minimum\": -60, \"maximum\": 130}, "
                   "\"e\": {\"type\": \"integer\", \"multipleOf\": 2}}}",
                   cases, sizeof cases / sizeof cases[0]);
}

// A string with a pattern is refused at the first byte after which no completion can match: a
// multi-byte character or an escape at the byte that rules out every code point the pattern could
// take next (the escape's hex digits narrowing it, a surrogate pair's two halves together), the
// closing quote when the string does not match. Escapes stand for their characters.
TEST(test_json_schema_pattern_refuses_at_the_first_wrong_byte) {
    static const RefusalCase cases[] = {
        {"{\"id\": \"ab1\"}", -1, 1},
        {"{\"id\": \"a1\"}", 9, 0},
        {"{\"id\": \"ab\"}", 10, 0},               // the quote: no digit yet
        {"{\"id\": \"ab12\"}", 11, 0},
        {"{\"id\": \"\\u0061b1\"}", -1, 1},        // an escaped letter is the letter
        {"{\"id\": \"\xc3\xa9\"}", 8, 0},           // a two-byte character cannot be a-z: its lead byte
        {"{\"id\": \"\\u00e9\"}", 12, 0},          // U+00E0..U+00EF holds no a-z: at the digit saying so
        {"{\"t\": \"x\xc3\xa9\"}", -1, 1},
        {"{\"t\": \"\xc3\xa9x\"}", 10, 0},          // anything may come (the match is at the end), but must end in é
        {"{\"t\": \"\\u00e9\"}", -1, 1},
        {"{\"u\": \"\\ud83d\\ude00\"}", -1, 1},   // a surrogate pair is its code point
        {"{\"u\": \"\\ud83d\\ude01\"}", 18, 0},
        {"{\"u\": \"\xf0\x9f\x98\x81\"}", 10, 0},  // U+1F601: at the byte that tells it from U+1F600
        {"{\"u\": \"\xc3\xa9tail\"}", -1, 1},       // ^é matched: anything may follow
    };
    check_refusals("{\"type\": \"object\", \"properties\": {\"id\": {\"type\": \"string\", \"pattern\": "
                   "\"^[a-z]{2}[0-9]$\"}, \"t\": {\"type\": \"string\", \"pattern\": \"\xc3\xa9$\"}, "
                   "\"u\": {\"type\": \"string\", \"pattern\": \"^\\\\u00e9|^\xf0\x9f\x98\x80\"}}}",
                   cases, sizeof cases / sizeof cases[0]);
}

// A number with bounds (any number, not only integers) is refused at the first byte after which no
// completion lies in bounds, and at its end when outside; it is written without an exponent.
TEST(test_json_schema_number_bounds_refuse_at_the_first_wrong_byte) {
    static const RefusalCase cases[] = {
        {"{\"r\": 2.5}", -1, 1},
        {"{\"r\": 0.001}", -1, 1},
        {"{\"r\": 1}", -1, 1},
        {"{\"r\": 0}", 7, 0},          // 0 is excluded: at the end ("0." could still go on)
        {"{\"r\": 0.000}", 11, 0},
        {"{\"r\": 2.51}", 9, 0},       // 2.51 and longer are past 2.5
        {"{\"r\": 2.50001}", 12, 0},
        {"{\"r\": 3", 6, 0},           // 3, 3.x, 30... all past 2.5
        {"{\"r\": -", 6, 0},           // nothing at or below 0
        {"{\"r\": 1e0}", 7, 0},        // no exponent beside bounds
        {"{\"t\": -40.5}", -1, 1},
        {"{\"t\": -40.51}", 11, 0},
        {"{\"t\": -41", 8, 0},
        {"{\"t\": 59.999}", -1, 1},
        {"{\"t\": 60}", 7, 0},         // 60 is excluded, 60.x and 600... are past it
        {"{\"t\": 59.", -1, 0},        // 59.x is below 60
        {"{\"t\": 6", -1, 0},          // 6 and 6.x, 59.x ... 6 itself
        {"{\"t\": null}", -1, 1},
        {"{\"z\": 0.25}", -1, 1},
        {"{\"z\": 0.250}", -1, 1},
        {"{\"z\": 0.26", 9, 0},
        {"{\"z\": 0.2}", 9, 0},
    };
    check_refusals("{\"type\": \"object\", \"properties\": {\"r\": {\"type\": \"number\", \"exclusiveMinimum\": 0, "
                   "\"maximum\": 2.5}, \"t\": {\"type\": [\"number\", \"null\"], \"minimum\": -40.5, "
                   "\"exclusiveMaximum\": 60}, \"z\": {\"type\": \"number\", \"minimum\": 0.25, \"maximum\": 0.25}}}",
                   cases, sizeof cases / sizeof cases[0]);
}

TEST(test_json_schema_compile_refusals_name_the_path) {
    static const struct {
        const char *schema, *why;
    } cases[] = {
        {"{\"type\": \"object\", \"properties\": {\"name\": {\"type\": \"string\", \"minProperties\": 1}}}",
         "schema.properties.name: 'minProperties' is not supported"},
        {"{\"type\": \"object\", \"properties\": {\"x\": {\"type\": \"number\", \"exclusiveMinimum\": 1, \"maximum\": 1}}}",
         "schema.properties.x: no number lies within"},
        {"{\"type\": \"object\", \"properties\": {\"x\": {\"type\": \"number\", \"multipleOf\": 2}}}",
         "'multipleOf' is supported on integers only"},
        {"{\"type\": \"object\", \"properties\": {\"x\": {\"type\": \"integer\", \"multipleOf\": 0.5}}}",
         "'multipleOf' must be a whole number above 0"},
        {"{\"type\": \"object\", \"properties\": {\"x\": {\"type\": \"integer\", \"multipleOf\": 0}}}",
         "'multipleOf' must be a whole number above 0"},
        {"{\"type\": \"object\", \"properties\": {\"x\": {\"type\": \"integer\", \"multipleOf\": 7, \"minimum\": 8, "
         "\"maximum\": 13}}}", "is a multiple of 'multipleOf'"},
        {"{\"type\": \"object\", \"properties\": {\"s\": {\"type\": \"string\", \"minLength\": 3, \"maxLength\": 2}}}",
         "schema.properties.s: 'minLength' is above 'maxLength'"},
        {"{\"type\": \"object\", \"properties\": {\"s\": {\"type\": \"string\", \"maxLength\": -1}}}",
         "'maxLength' must be an integer from 0"},
        {"{\"type\": \"object\", \"properties\": {\"s\": {\"type\": \"string\", \"minLength\": 1.5}}}",
         "'minLength' must be an integer from 0"},
        {"{\"type\": \"object\", \"properties\": {\"s\": {\"enum\": [\"a\"], \"maxLength\": 3}}}",
         "'maxLength' beside 'enum'"},
        {"{\"type\": \"object\", \"properties\": {\"s\": {\"type\": \"string\", \"pattern\": \"(?=a)\"}}}",
         "schema.properties.s: 'pattern': lookahead (?= is not supported"},
        {"{\"type\": \"object\", \"properties\": {\"s\": {\"pattern\": \"(a)\\\\1\"}}}", "backreferences"},
        {"{\"type\": \"object\", \"properties\": {\"s\": {\"pattern\": \"a{,2}\"}}}", "'{,' is ambiguous"},
        {"{\"type\": \"object\", \"properties\": {\"s\": {\"pattern\": \"(ab\"}}}", "a group '(' is not closed"},
        {"{\"type\": \"object\", \"properties\": {\"s\": {\"pattern\": \"a**\"}}}", "a quantifier after a quantifier"},
        {"{\"type\": \"object\", \"properties\": {\"s\": {\"pattern\": \"[b-a]\"}}}", "out of order"},
        {"{\"type\": \"object\", \"properties\": {\"s\": {\"pattern\": \"\\\\bword\"}}}", "\\b is not supported"},
        {"{\"type\": \"object\", \"properties\": {\"s\": {\"pattern\": \"a{200}b{200}\"}}}", "more than 256 states"},
        {"{\"type\": \"object\", \"properties\": {\"s\": {\"pattern\": 5}}}", "'pattern' must be a string"},
        {"{\"type\": \"object\", \"properties\": {\"s\": {\"pattern\": \"a$b\"}}}", "matches no string"},
        {"{\"type\": \"object\", \"properties\": {\"s\": {\"pattern\": \"^\\\\x00$\"}}}", "matches no string"},
        {"{\"type\": \"object\", \"properties\": {\"s\": {\"pattern\": \"a\", \"maxLength\": 3}}}",
         "'pattern' beside 'maxLength' is not supported"},
        {"{\"type\": \"object\", \"properties\": {\"s\": {\"enum\": [\"a\"], \"pattern\": \"a\"}}}", "'pattern' beside 'enum'"},
        {"{\"type\": \"object\", \"properties\": {\"x\": {\"multipleOf\": 3}}}", "'multipleOf' is supported on integers only"},
        {"{\"type\": \"object\", \"properties\": {\"x\": {\"enum\": [1, 2], \"minimum\": 0}}}", "beside 'enum'"},
        {"{\"type\": \"object\", \"properties\": {\"x\": {\"type\": \"integer\", \"minimum\": 2.5, \"maximum\": 2.9}}}",
         "no integer"},
        {"{\"type\": \"object\", \"properties\": {\"x\": {\"type\": \"integer\", \"exclusiveMinimum\": 3, \"maximum\": 3}}}",
         "no integer"},
        {"{\"type\": \"object\", \"properties\": {\"x\": {\"type\": \"integer\", \"minimum\": 1e19}}}", "no integer"},
        {"{\"type\": \"object\", \"properties\": {\"x\": {\"type\": \"integer\", \"maximum\": \"9\"}}}",
         "'maximum' must be a number"},
        {"{\"type\": \"string\"}", "the root must accept an object"},
        {"{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"strin\"}}}", "schema.properties.a: 'type' \"strin\""},
        {"{\"type\": \"object\", \"required\": [\"a\"], \"additionalProperties\": false}", "required property 'a'"},
        {"{\"$ref\": \"#/$defs/missing\"}", "names no schema"},
        {"{\"$ref\": \"http://example.com/s.json\"}", "is not \"#\""},
        {"{\"type\": \"object\", \"properties\": {\"v\": {\"anyOf\": [{\"type\": \"integer\"}, {\"type\": \"number\"}]}}}",
         "both accept number values"},
        {"{\"type\": \"object\", \"properties\": {\"v\": {\"enum\": [[1]]}}}", "value 0 is an object or array"},
        {"{\"type\": \"object\", \"properties\": {\"v\": {\"type\": \"array\", \"minItems\": 3, \"maxItems\": 2}}}",
         "'minItems' is above 'maxItems'"},
        {"{\"type\": \"object\", \"properties\": {\"v\": false}}", "schema.properties.v: the schema false accepts nothing"},
        {"{\"type\": \"object\", \"properties\": {\"v\": {\"type\": \"array\", \"items\": [{}]}}}", "tuples"},
        {"{\"allOf\": [{\"type\": \"object\"}]}", "'allOf' is not supported"},
        {"{\"type\": \"object\", \"additionalProperties\": {\"type\": \"string\"}}", "'additionalProperties' must be true or false"},
        {"[1]", "a schema must be an object or a boolean"},
        {"{\"type\": \"object\", \"properties\": {\"v\": {\"enum\": [1e300]}}}", "cannot be written within JSON mode's limits"},
        {"{\"type\": \"object\", \"properties\": {\"a\": {\"$ref\": \"#\"}}, \"required\": [\"a\"]}", "nests at most 32 deep"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char why[512] = "";
        JsonSchema *s = compile_text(cases[i].schema, why, sizeof why);
        CHECK_MSG(!s && strstr(why, cases[i].why), "%s: got \"%s\", want \"%s\"", cases[i].schema, why, cases[i].why);
        json_schema_free(s);
    }
    // nesting: 64 schemas inside one another at most (the compiler recurses)
    for (int levels = 63; levels <= 64; levels++) {
        char text[4096] = "{\"type\": \"object\", \"properties\": {\"a\": ";
        for (int i = 0; i < levels - 1; i++) strcat(text, "{\"items\": ");
        strcat(text, "{}");
        for (int i = 0; i < levels - 1; i++) strcat(text, "}");
        strcat(text, "}}");
        char why[512] = "";
        JsonSchema *s = compile_text(text, why, sizeof why);
        CHECK_MSG((s != NULL) == (levels == 63) && (s || strstr(why, "nested more than 64")), "%d levels: %s", levels, why);
        json_schema_free(s);
    }
    // the limits: 64 properties and enum values; 65 refused
    for (int n = 64; n <= 65; n++) {
        char text[8192] = "{\"type\": \"object\", \"properties\": {";
        for (int i = 0; i < n; i++) snprintf(text + strlen(text), sizeof text - strlen(text), "%s\"p%d\": {}", i ? "," : "", i);
        strcat(text, "}}");
        char why[512] = "";
        JsonSchema *s = compile_text(text, why, sizeof why);
        CHECK_MSG((s != NULL) == (n == 64), "%d properties: %s", n, why);
        json_schema_free(s);
    }
}

// Recursion through $ref ends at the grammar's depth limit; true and {} accept anything; a schema
// without constraints behaves as JSON mode's object; a copy goes on as the original.
TEST(test_json_schema_recursion_any_and_copies) {
    char why[512];
    JsonSchema *s = compile_text("{\"type\": \"object\", \"properties\": {\"next\": {\"anyOf\": [{\"$ref\": \"#\"}, "
                                 "{\"type\": \"null\"}]}}, \"required\": [\"next\"], \"additionalProperties\": false}",
                                 why, sizeof why);
    CHECK_MSG(s, "%s", why);
    char doc[4096] = "";
    for (int i = 0; i <= JSON_PREFIX_MAX_DEPTH; i++) strcat(doc, "{\"next\":");
    JsonSchemaPrefix p;
    json_schema_prefix_init(&p, s);
    CHECK(json_schema_prefix_feed(&p, doc, strlen(doc)) == -1);  // one level past the limit
    json_schema_prefix_init(&p, s);
    CHECK(json_schema_prefix_feed(&p, doc, strlen(doc) - 8) == 0);
    CHECK(json_schema_prefix_feed(&p, "null", 4) == 0);
    for (int i = 0; i < JSON_PREFIX_MAX_DEPTH; i++) CHECK(json_schema_prefix_feed(&p, "}", 1) == 0);
    CHECK(json_schema_prefix_complete(&p));
    // a copy taken mid-document accepts and refuses what the original does
    json_schema_prefix_init(&p, s);
    CHECK(json_schema_prefix_feed(&p, "{\"next\": {\"ne", 13) == 0);
    JsonSchemaPrefix q;
    json_schema_prefix_copy(&q, &p);
    CHECK(json_schema_prefix_feed(&q, "xt\": null}}", 11) == 0 && json_schema_prefix_complete(&q));
    json_schema_prefix_copy(&q, &p);
    CHECK(json_schema_prefix_feed(&q, "w", 1) == -1);
    CHECK(json_schema_prefix_feed(&q, "x", 1) == -1);  // refused stays refused
    json_schema_free(s);
    static const char *const anything[] = {"true", "{}", "{\"description\": \"only annotations\", \"title\": \"t\"}"};
    for (int i = 0; i < 3; i++) {
        s = compile_text(anything[i], why, sizeof why);
        CHECK_MSG(s, "%s: %s", anything[i], why);
        json_schema_prefix_init(&p, s);
        const char *d = "{\"a\": [1, {\"b\": null}], \"c\": \"d\"}";
        CHECK(json_schema_prefix_feed(&p, d, strlen(d)) == 0 && json_schema_prefix_complete(&p));
        json_schema_free(s);
    }
}

// Random walks over the reference's schemas, each byte drawn among those the automaton accepts
// after the prefix (structural bytes preferred, so walks end): there is always one besides
// whitespace between tokens until the object is complete, and the complete text is an object for
// jansson.
TEST(test_json_schema_prefixes_never_dead_end) {
    char path[600], why[512];
    snprintf(path, sizeof path, "%s/json_schema/vectors.json", test_datadir());
    json_t *root = json_load_file(path, 0, NULL);
    CHECK(root);
    json_t *cases = json_object_get(root, "cases");
    Rng rng;
    rng_seed(&rng, 5);
    int complete = 0, walks = 0;
    static char doc[4096];
    for (size_t i = 0; i < json_array_size(cases); i++) {
        JsonSchema *s = NULL;
        CHECK_MSG(json_schema_compile(&s, json_object_get(json_array_get(cases, i), "schema"), why, sizeof why) == 0, "%s", why);
        for (int w = 0; w < 200; w++, walks++) {
            JsonSchemaPrefix p, q;
            json_schema_prefix_init(&p, s);
            size_t n = 0;
            while (!json_schema_prefix_complete(&p) && n < sizeof doc - 1) {
                uint8_t ok[256];
                int n_ok = 0;
                int text = json_prefix_in_string(&p.lex);
                for (int c = 1; c < 256; c++) {  // whitespace between tokens completes nothing: not counted
                    if (!text && (c == ' ' || c == '\n' || c == '\t' || c == '\r')) continue;
                    json_schema_prefix_copy(&q, &p);
                    char b = (char)c;
                    if (json_schema_prefix_feed(&q, &b, 1) == 0) ok[n_ok++] = (uint8_t)c;
                }
                CHECK_MSG(n_ok > 0, "case %zu: a dead end after %.*s", i, (int)n, doc);
                if (n_ok == 0) break;
                uint8_t pick = ok[(int)(rng_uniform(&rng) * n_ok)];
                for (int k = 0; k < n_ok; k++)  // structure first (most of the time)
                    if (strchr("}]\"tfn0123,:{[", ok[k]) && rng_uniform(&rng) < 0.35) {
                        pick = ok[k];
                        break;
                    }
                doc[n++] = (char)pick;
                CHECK(json_schema_prefix_feed(&p, (char *)&pick, 1) == 0);
            }
            if (!json_schema_prefix_complete(&p)) continue;
            complete++;
            json_t *o = json_loadb(doc, n, 0, NULL);
            CHECK_MSG(json_is_object(o), "case %zu: complete but not an object for jansson: %.*s", i, (int)n, doc);
            json_decref(o);
        }
        json_schema_free(s);
    }
    json_decref(root);
    printf("    %d random walks, %d complete objects, no dead end\n", walks, complete);
    CHECK(complete > walks / 2);
}

// The mask's shortcut: where json_schema_prefix_at_free_text says so, any run of whole characters
// without '"', '\\' or control characters is accepted (random runs of random code points); where
// an enum or a closed list of names constrains the string, it does not say so.
TEST(test_json_schema_free_text_shortcut) {
    char why[512];
    JsonSchema *s = compile_text("{\"type\": \"object\", \"properties\": {\"e\": {\"enum\": [\"x\"]}, \"s\": {\"type\": \"string\"}, "
                                 "\"o\": {\"type\": \"object\"}}, \"additionalProperties\": false}",
                                 why, sizeof why);
    CHECK_MSG(s, "%s", why);
    static const struct {
        const char *prefix;
        int schema, free;
    } at[] = {
        {"{\"s\": \"ab", 1, 1},   {"{\"o\": {\"k", 1, 1},  // a value string; a key of an open object
        {"{\"e\": \"", 1, 0},     {"{\"", 1, 0},           // an enum value; a key of a closed object
        {"{\"s\": \"a\\", 1, 0},  {"{\"s\": ", 1, 0},      // an escape; not in a string
        {"{\"k\": [\"", 0, 1},    {"{\"", 0, 1},           // JSON mode: every string
    };
    Rng rng;
    rng_seed(&rng, 3);
    for (size_t i = 0; i < sizeof at / sizeof at[0]; i++) {
        JsonSchemaPrefix p, q;
        json_schema_prefix_init(&p, at[i].schema ? s : NULL);
        CHECK(json_schema_prefix_feed(&p, at[i].prefix, strlen(at[i].prefix)) == 0);
        CHECK_MSG(json_schema_prefix_at_free_text(&p) == at[i].free, "%s", at[i].prefix);
        for (int r = 0; at[i].free && r < 200; r++) {
            char run[64];
            int n = 0;
            for (int k = 0; k < 8; k++) {
                uint32_t cp = 0x20 + (uint32_t)(rng_uniform(&rng) * (rng_uniform(&rng) < 0.5 ? 0x60 : 0x10FFDF));
                if (cp == '"' || cp == '\\' || (cp >= 0xD800 && cp <= 0xDFFF)) continue;
                n += utf8_encode(cp, run + n);
            }
            json_schema_prefix_copy(&q, &p);
            CHECK_MSG(json_schema_prefix_feed(&q, run, (size_t)n) == 0, "%s + %.*s", at[i].prefix, n, run);
        }
    }
    json_schema_free(s);
}
