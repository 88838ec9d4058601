#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "serve/json_mode.h"
#include "text/utf8.h"

int json_vocab_init(JsonVocab *v, const Tokenizer *tok, int vocab) {
    memset(v, 0, sizeof *v);
    v->tok = tok;
    v->vocab = vocab;
    v->text = calloc(vocab > 0 ? (size_t)vocab : 1, 1);
    v->lead = calloc(vocab > 0 ? (size_t)vocab : 1, 1);
    if (!v->text || !v->lead) {
        json_vocab_free(v);
        return -1;
    }
    int n_tok = tok_vocab_size(tok) < vocab ? tok_vocab_size(tok) : vocab;
    for (int id = 0; id < n_tok; id++) {
        size_t n;
        const uint8_t *b = tok_is_added(tok, id) ? NULL : (const uint8_t *)tok_token_bytes(tok, id, &n);
        int ok = b && n > 0 && utf8_valid_prefix(b, n) == n;
        for (size_t i = 0; ok && i < n; i++) ok = b[i] >= 0x20 && b[i] != '"' && b[i] != '\\';
        v->text[id] = (uint8_t)ok;
        size_t k = 0;
        while (b && k < n && k < 255 && (b[k] == ' ' || b[k] == '\t' || b[k] == '\n' || b[k] == '\r')) k++;
        v->lead[id] = (uint8_t)k;
    }
    return 0;
}

void json_vocab_free(JsonVocab *v) {
    free(v->text);
    free(v->lead);
    v->text = v->lead = NULL;
}

int json_mode_init(JsonMode *m, const JsonVocab *v, const int *end_ids, int n_end, const JsonSchema *schema) {
    memset(m, 0, sizeof *m);
    json_schema_prefix_init(&m->answer, schema);
    m->phase = JSON_MODE_OBJECT;  // unframed: the object first
    m->v = v;
    for (int i = 0; i < n_end && m->n_end < 2; i++)
        if (end_ids[i] >= 0) m->end_ids[m->n_end++] = end_ids[i];
    m->allow = malloc(v->vocab > 0 ? (size_t)v->vocab : 1);
    return m->allow ? 0 : -1;
}

void json_mode_free(JsonMode *m) {
    free(m->allow);
    free(m->live);
    m->allow = NULL;
    m->live = NULL;
}

// A literal part begins: every candidate (the heads — or, for a later call, again and close — or
// the tail) still matches.
static void literal_begin(JsonMode *m, JsonModePhase phase) {
    m->phase = phase;
    m->n_live = phase != JSON_MODE_HEAD ? 1 : m->calls > 0 ? m->f.n_heads + 1 : m->f.n_heads;
    for (int i = 0; i < m->n_live; i++) m->live[i] = i;
    m->lit_n = 0;
}

int json_mode_frame(JsonMode *m, const JsonFrame *f) {
    free(m->live);
    if (!(m->live = malloc(sizeof *m->live * (size_t)(f->n_heads + 1)))) return -1;
    m->f = *f;
    m->calls = 0;
    m->trig_n = 0;
    if (f->trigger) m->phase = JSON_MODE_WAIT;
    else literal_begin(m, JSON_MODE_HEAD);
    return 0;
}

int json_mode_complete(const JsonMode *m) { return m->phase == JSON_MODE_DONE; }

static const char *candidate(const JsonMode *m, int i) {
    if (m->phase != JSON_MODE_HEAD) return m->f.tail;
    if (m->calls == 0) return m->f.heads[i];
    return i < m->f.n_heads ? m->f.again[i] : m->f.close;
}

// In a literal part, whether the bytes matched so far + b[0, n) go on live candidate k: 0 no, 1 as
// its start, 2 as the whole of it.
static int literal_fits(const JsonMode *m, int k, const char *b, size_t n) {
    const char *t = candidate(m, m->live[k]);
    size_t tn = strlen(t);
    if (m->lit_n + n > tn || memcmp(t + m->lit_n, b, n)) return 0;
    return m->lit_n + n == tn ? 2 : 1;
}

// The bytes an id adds to the answer: NULL for special tokens and ids the tokenizer lacks.
static const char *id_bytes(const JsonMode *m, int id, size_t *n) {
    *n = 0;
    if (id >= tok_vocab_size(m->v->tok) || tok_is_special(m->v->tok, id)) return NULL;
    return tok_token_bytes(m->v->tok, id, n);
}

static void mask(void *ctx, float *logits, int vocab) {
    JsonMode *m = ctx;
    if (m->phase == JSON_MODE_WAIT) return;  // free text until the trigger
    int done = m->phase == JSON_MODE_DONE, any = 0;
    int object = m->phase == JSON_MODE_OBJECT, free_text = object && json_schema_prefix_at_free_text(&m->answer);
    int between = object && json_prefix_between_tokens(&m->answer.lex);
    // the bytes that may come next: an id starting otherwise is refused unfed — and, between
    // tokens, where leading whitespace changes nothing else, so is one whose first byte after it
    // may not come next
    uint8_t first[256];
    for (int c = 0; object && c < 256; c++) {
        JsonSchemaPrefix t;
        json_schema_prefix_copy(&t, &m->answer);
        char byte = (char)c;
        first[c] = json_schema_prefix_feed(&t, &byte, 1) == 0;
    }
    if (vocab > m->v->vocab) vocab = m->v->vocab;
    for (int id = 0; id < vocab; id++) {
        int ok = 0;
        for (int e = 0; e < m->n_end; e++) ok |= id == m->end_ids[e] && done;
        if (free_text && m->v->text[id]) {  // inside free string text: no need to feed it
            m->allow[id] = 1;
            any = 1;
            continue;
        }
        size_t n;
        const char *b = done ? NULL : id_bytes(m, id, &n);
        if (b && n > 0 && object && tok_is_added(m->v->tok, id)) {  // a marker: never JSON
            ok = 0;
        } else if (b && n > 0 && object) {
            ok = first[(uint8_t)b[0]];
            if (ok && between && m->v->lead[id] < n) ok = first[(uint8_t)b[m->v->lead[id]]];
            if (ok && n > 1) {
                JsonSchemaPrefix t;
                json_schema_prefix_copy(&t, &m->answer);
                ok = json_schema_prefix_feed(&t, b, n) == 0;
            }
        } else if (b && n > 0) {
            for (int k = 0; k < m->n_live && !ok; k++) ok = literal_fits(m, k, b, n) > 0;
        }
        m->allow[id] = (uint8_t)ok;
        any |= ok;
    }
    if (any)
        for (int id = 0; id < vocab; id++)
            if (!m->allow[id]) logits[id] = -INFINITY;
}

static void accept_bytes(JsonMode *m, const char *b, size_t n);

// Waiting for the trigger: the answer's bytes, one at a time; from the one that completes the
// trigger, the frame begins and takes the rest. trig_n: the longest end of the answer that begins
// the trigger.
static void wait_bytes(JsonMode *m, const char *b, size_t n) {
    const char *t = m->f.trigger;
    size_t tn = strlen(t);
    for (size_t i = 0; i < n; i++) {
        if (b[i] == t[m->trig_n]) {
            m->trig_n++;
        } else {  // the longest k with t[0, k) = the last k bytes of t[0, trig_n) + b[i]
            size_t k = m->trig_n;
            while (k > 0 && !(t[k - 1] == b[i] && memcmp(t, t + m->trig_n - k + 1, k - 1) == 0)) k--;
            m->trig_n = k;
        }
        if (m->trig_n == tn) {
            literal_begin(m, JSON_MODE_HEAD);
            if (i + 1 < n) accept_bytes(m, b + i + 1, n - i - 1);
            return;
        }
    }
}

static void accept(void *ctx, int token) {
    JsonMode *m = ctx;
    size_t n;
    const char *b = token >= 0 && token < m->v->vocab ? id_bytes(m, token, &n) : NULL;
    if (b && n > 0) accept_bytes(m, b, n);
}

static void accept_bytes(JsonMode *m, const char *b, size_t n) {
    if (m->phase == JSON_MODE_DONE) return;
    if (m->phase == JSON_MODE_WAIT) {
        wait_bytes(m, b, n);
        return;
    }
    if (m->phase == JSON_MODE_OBJECT) {
        if (json_schema_prefix_feed(&m->answer, b, n) == 0 && json_schema_prefix_complete(&m->answer)) {
            if (m->f.tail) literal_begin(m, JSON_MODE_TAIL);
            else m->phase = JSON_MODE_DONE;
        }
        return;
    }
    // a literal part: the candidates this token goes on stay (the mask let only such ids through,
    // unless none fitted, when the answer is left where it was)
    int kept = 0, whole = -1;
    for (int k = 0; k < m->n_live; k++) {
        int fit = literal_fits(m, k, b, n);
        if (fit == 2) whole = m->live[k];
        if (fit) m->live[kept++] = m->live[k];
    }
    if (kept == 0) return;
    m->n_live = kept;
    m->lit_n += n;
    if (whole < 0) return;
    if (m->phase == JSON_MODE_HEAD && whole < m->f.n_heads) {  // a head: the object, held to its schema
        m->phase = JSON_MODE_OBJECT;
        m->calls++;
        json_schema_prefix_init(&m->answer, m->f.head_schemas ? m->f.head_schemas[whole] : NULL);
    } else if (m->phase == JSON_MODE_TAIL && m->f.again) {  // another call, or the close
        literal_begin(m, JSON_MODE_HEAD);
    } else {
        m->phase = JSON_MODE_DONE;
    }
}

TokenConstraint json_mode_constraint(JsonMode *m) { return (TokenConstraint){.ctx = m, .mask = mask, .accept = accept}; }
