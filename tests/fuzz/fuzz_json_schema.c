// The JSON Schema prefix automaton (src/text/json_schema.h) on any bytes: an input is a schema,
// a NUL, then a document. A schema that compiles gives an automaton that says the same fed whole
// or in two pieces; that calls complete only what jansson (with its defaults) parses as an object;
// and that, on an accepted incomplete prefix, always has a byte besides whitespace to go on with
// (the constrained decoder's mask never runs dry; whitespace counts only inside a string).
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "text/json_schema.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *nul = memchr(data, 0, size);
    if (!nul) return 0;
    json_t *js = json_loadb((const char *)data, (size_t)(nul - data), JSON_DECODE_ANY, NULL);
    JsonSchema *s = NULL;
    char why[256];
    int rc = js ? json_schema_compile(&s, js, why, sizeof why) : -1;
    json_decref(js);
    if (rc) return 0;
    const char *doc = (const char *)nul + 1;
    size_t n = size - (size_t)(nul - data) - 1;
    JsonSchemaPrefix whole, split, probe;
    json_schema_prefix_init(&whole, s);
    json_schema_prefix_init(&split, s);
    int a = json_schema_prefix_feed(&whole, doc, n);
    size_t cut = n ? (uint8_t)doc[0] % (n + 1) : 0;
    int b = json_schema_prefix_feed(&split, doc, cut);
    if (b == 0) b = json_schema_prefix_feed(&split, doc + cut, n - cut);
    if (a != b || (a == 0 && json_schema_prefix_complete(&whole) != json_schema_prefix_complete(&split))) abort();
    if (a == 0 && json_schema_prefix_complete(&whole)) {
        json_t *o = json_loadb(doc, n, 0, NULL);
        if (!o || !json_is_object(o)) abort();
        json_decref(o);
    } else if (a == 0) {
        int any = 0, text = json_prefix_in_string(&whole.lex);
        for (int c = 1; c < 256 && !any; c++) {
            if (!text && (c == ' ' || c == '\t' || c == '\n' || c == '\r')) continue;
            json_schema_prefix_copy(&probe, &whole);
            char byte = (char)c;
            any = json_schema_prefix_feed(&probe, &byte, 1) == 0;
        }
        if (!any) abort();  // a dead end
    }
    json_schema_free(s);
    return 0;
}
