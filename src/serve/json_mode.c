#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "serve/json_mode.h"

int json_mode_init(JsonMode *m, const Tokenizer *tok, int vocab, const int *end_ids, int n_end) {
    memset(m, 0, sizeof *m);
    json_prefix_init(&m->answer);
    m->tok = tok;
    m->vocab = vocab;
    for (int i = 0; i < n_end && m->n_end < 2; i++)
        if (end_ids[i] >= 0) m->end_ids[m->n_end++] = end_ids[i];
    m->allow = malloc(vocab > 0 ? (size_t)vocab : 1);
    return m->allow ? 0 : -1;
}

void json_mode_free(JsonMode *m) {
    free(m->allow);
    m->allow = NULL;
}

int json_mode_complete(const JsonMode *m) { return json_prefix_complete(&m->answer); }

// The bytes an id adds to the answer: NULL for special tokens and ids the tokenizer lacks.
static const char *id_bytes(const JsonMode *m, int id, size_t *n) {
    *n = 0;
    if (id >= tok_vocab_size(m->tok) || tok_is_special(m->tok, id)) return NULL;
    return tok_token_bytes(m->tok, id, n);
}

static void mask(void *ctx, float *logits, int vocab) {
    JsonMode *m = ctx;
    int complete = json_prefix_complete(&m->answer), any = 0;
    if (vocab > m->vocab) vocab = m->vocab;
    for (int id = 0; id < vocab; id++) {
        int ok = 0;
        for (int e = 0; e < m->n_end; e++) ok |= id == m->end_ids[e] && complete;
        size_t n;
        const char *b = ok || complete ? NULL : id_bytes(m, id, &n);
        if (b && n > 0) {
            JsonPrefix t = m->answer;
            ok = json_prefix_feed(&t, b, n) == 0;
        }
        m->allow[id] = (uint8_t)ok;
        any |= ok;
    }
    if (any)
        for (int id = 0; id < vocab; id++)
            if (!m->allow[id]) logits[id] = -INFINITY;
}

static void accept(void *ctx, int token) {
    JsonMode *m = ctx;
    size_t n;
    const char *b = token >= 0 && token < m->vocab ? id_bytes(m, token, &n) : NULL;
    if (b && n > 0 && !json_prefix_complete(&m->answer)) json_prefix_feed(&m->answer, b, n);
}

TokenConstraint json_mode_constraint(JsonMode *m) { return (TokenConstraint){.ctx = m, .mask = mask, .accept = accept}; }
