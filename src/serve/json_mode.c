#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "serve/json_mode.h"

int json_mode_init(JsonMode *m, const Tokenizer *tok, int vocab, const int *end_ids, int n_end) {
    memset(m, 0, sizeof *m);
    json_prefix_init(&m->answer);
    m->phase = 1;  // unframed: the object first
    m->tok = tok;
    m->vocab = vocab;
    for (int i = 0; i < n_end && m->n_end < 2; i++)
        if (end_ids[i] >= 0) m->end_ids[m->n_end++] = end_ids[i];
    m->allow = malloc(vocab > 0 ? (size_t)vocab : 1);
    return m->allow ? 0 : -1;
}

void json_mode_free(JsonMode *m) {
    free(m->allow);
    free(m->lit);
    m->allow = NULL;
    m->lit = NULL;
}

int json_mode_frame(JsonMode *m, const char *const *heads, int n_heads, const char *tail) {
    size_t cap = tail ? strlen(tail) : 0;
    for (int i = 0; i < n_heads; i++)
        if (strlen(heads[i]) > cap) cap = strlen(heads[i]);
    free(m->lit);
    if (!(m->lit = malloc(cap + 1))) return -1;
    m->lit_cap = cap;
    m->lit_n = 0;
    m->heads = heads;
    m->n_heads = n_heads;
    m->tail = tail;
    m->phase = n_heads > 0 ? 0 : 1;
    return 0;
}

int json_mode_complete(const JsonMode *m) {
    if (!json_prefix_complete(&m->answer) || m->phase == 0) return 0;
    return !m->tail || (m->phase == 2 && m->lit_n == strlen(m->tail));
}

// In a literal part: 0 when the bytes so far + b[0, n) are the start of one of the part's texts,
// 2 when they are one of them whole, -1 when neither.
static int literal_fits(const JsonMode *m, const char *b, size_t n) {
    int cands = m->phase == 0 ? m->n_heads : 1, best = -1;
    for (int i = 0; i < cands; i++) {
        const char *t = m->phase == 0 ? m->heads[i] : m->tail;
        size_t tn = strlen(t);
        if (m->lit_n + n > tn || memcmp(t, m->lit, m->lit_n) || memcmp(t + m->lit_n, b, n)) continue;
        best = m->lit_n + n == tn ? 2 : best < 0 ? 0 : best;
    }
    return best;
}

// The bytes an id adds to the answer: NULL for special tokens and ids the tokenizer lacks.
static const char *id_bytes(const JsonMode *m, int id, size_t *n) {
    *n = 0;
    if (id >= tok_vocab_size(m->tok) || tok_is_special(m->tok, id)) return NULL;
    return tok_token_bytes(m->tok, id, n);
}

static void mask(void *ctx, float *logits, int vocab) {
    JsonMode *m = ctx;
    int complete = json_mode_complete(m), any = 0;
    int literal = m->phase == 0 || (m->phase == 2 && !complete) ||
                  (m->phase == 1 && m->tail && json_prefix_complete(&m->answer));
    if (vocab > m->vocab) vocab = m->vocab;
    for (int id = 0; id < vocab; id++) {
        int ok = 0;
        for (int e = 0; e < m->n_end; e++) ok |= id == m->end_ids[e] && complete;
        size_t n;
        const char *b = ok || complete ? NULL : id_bytes(m, id, &n);
        if (b && n > 0 && literal) {
            ok = literal_fits(m, b, n) >= 0;
        } else if (b && n > 0) {
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
    if (!b || n == 0 || json_mode_complete(m)) return;
    if (m->phase == 1 && m->tail && json_prefix_complete(&m->answer)) m->phase = 2, m->lit_n = 0;  // the tail begins
    if (m->phase == 1) {
        json_prefix_feed(&m->answer, b, n);
        return;
    }
    int fit = literal_fits(m, b, n);  // (the mask let only fitting ids through, unless none fitted)
    if (fit < 0) return;
    memcpy(m->lit + m->lit_n, b, n);
    m->lit_n += n;
    if (fit == 2 && m->phase == 0) m->phase = 1, m->lit_n = 0;  // a head is whole: the object follows
}

TokenConstraint json_mode_constraint(JsonMode *m) { return (TokenConstraint){.ctx = m, .mask = mask, .accept = accept}; }
