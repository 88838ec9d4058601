#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "infer/engine.h"
#include "infer/sampler.h"

typedef enum { SEQ_WAITING, SEQ_RUNNING, SEQ_DONE } SeqState;

typedef struct Seq {
    SeqState state;
    int *prompt;          // (n_prompt)
    int n_prompt;
    int prefilled;        // prompt positions already in the cache
    int generated;
    int last;             // the token the next decode step feeds
    SeqParams p;
    int *stop_ids;        // (p.n_stop_ids) owned copy
    Sampler sampler;
    EngineTokenFn fn;
    void *owner;
    int slot;             // -1 while waiting or done
} Seq;

struct Engine {
    const Model *m;
    EngineOptions o;
    KVCache *cache;        // (parallel) one per slot, ctx positions each
    int *slot_seq;         // (parallel) the sequence in each slot, or -1
    ForwardState *fs;      // shared: sequences run one forward pass at a time
    float *logits;         // (vocab)
    Seq *seqs;             // (n_seqs) every sequence ever added, by id
    int n_seqs, cap_seqs;
    int next_waiting;      // sequences below this id have been admitted (or cancelled)
    EngineStats stats;
};

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

SeqParams seq_params_default(void) {
    return (SeqParams){.max_new = 32, .temperature = 0.0f, .top_k = 0, .top_p = 1.0f, .seed = 0, .stop_at_eos = 1};
}

Engine *engine_new(const Model *m, const EngineOptions *o, Error *err) {
    if (o->parallel < 1 || o->ctx < 2 || o->prefill_chunk < 1) {
        err_set(err, "engine: parallel %d, ctx %d, prefill chunk %d: each must be positive (ctx at least 2)",
                o->parallel, o->ctx, o->prefill_chunk);
        return NULL;
    }
    if (o->speculative != 0) {
        err_set(err, "engine: speculative decoding is not built yet");
        return NULL;
    }
    Engine *e = xcalloc(err, 1, sizeof *e, "engine");
    if (!e) return NULL;
    e->m = m;
    e->o = *o;
    if (e->o.prefill_chunk > o->ctx) e->o.prefill_chunk = o->ctx;
    e->cache = xcalloc(err, o->parallel, sizeof *e->cache, "engine slots");
    e->slot_seq = xmalloc(err, sizeof(int) * o->parallel, "engine slots");
    e->logits = xmalloc(err, sizeof(float) * m->cfg.vocab_size, "logits");
    if (!e->cache || !e->slot_seq || !e->logits) goto fail;
    for (int i = 0; i < o->parallel; i++) {
        e->slot_seq[i] = -1;
        if (kvcache_init_as(&e->cache[i], &m->cfg, 0, o->ctx, o->kv_dtype, err)) goto fail;
    }
    e->fs = forward_state_new(m, e->o.prefill_chunk, o->ctx, err);
    if (!e->fs) goto fail;
    return e;
fail:
    engine_free(e);
    return NULL;
}

static void seq_release(Seq *s) {
    free(s->prompt);
    free(s->stop_ids);
    sampler_free(&s->sampler);
    s->prompt = NULL;
    s->stop_ids = NULL;
}

void engine_free(Engine *e) {
    if (!e) return;
    if (e->cache)
        for (int i = 0; i < e->o.parallel; i++) kvcache_free(&e->cache[i]);
    for (int i = 0; i < e->n_seqs; i++) seq_release(&e->seqs[i]);
    forward_state_free(e->fs);
    free(e->cache);
    free(e->slot_seq);
    free(e->logits);
    free(e->seqs);
    free(e);
}

int engine_add(Engine *e, const int *prompt, int n, const SeqParams *p, EngineTokenFn fn, void *owner, Error *err) {
    int V = e->m->cfg.vocab_size;
    if (n < 1) return err_set(err, "engine: an empty prompt");
    if (n >= e->o.ctx)
        return err_set(err, "engine: a prompt of %d tokens leaves no room in a context of %d positions", n, e->o.ctx);
    for (int i = 0; i < n; i++)
        if (prompt[i] < 0 || prompt[i] >= V)
            return err_set(err, "engine: token %d at prompt position %d is outside the vocabulary [0, %d)", prompt[i], i, V);
    if (p->max_new < 1) return err_set(err, "engine: max_new %d must be at least 1", p->max_new);
    if (p->top_logprobs < 0 || p->top_logprobs > ENGINE_MAX_TOP_LOGPROBS)
        return err_set(err, "engine: top_logprobs %d is outside [0, %d]", p->top_logprobs, ENGINE_MAX_TOP_LOGPROBS);
    if (e->n_seqs == e->cap_seqs) {
        int cap = e->cap_seqs ? 2 * e->cap_seqs : 16;
        Seq *ns = realloc(e->seqs, sizeof *ns * cap);
        if (!ns) return err_set(err, "engine: out of memory for %d sequences", cap);
        e->seqs = ns;
        e->cap_seqs = cap;
    }
    Seq *s = &e->seqs[e->n_seqs];
    memset(s, 0, sizeof *s);
    s->p = *p;
    s->fn = fn;
    s->owner = owner;
    s->slot = -1;
    s->n_prompt = n;
    s->prompt = malloc(sizeof(int) * n);
    s->stop_ids = malloc(sizeof(int) * (p->n_stop_ids > 0 ? p->n_stop_ids : 1));
    if (!s->prompt || !s->stop_ids ||
        sampler_init(&s->sampler, V, p->temperature, p->top_k, p->top_p, p->seed)) {
        seq_release(s);
        return err_set(err, "engine: out of memory for a sequence");
    }
    memcpy(s->prompt, prompt, sizeof(int) * n);
    if (p->n_stop_ids > 0) memcpy(s->stop_ids, p->stop_ids, sizeof(int) * p->n_stop_ids);
    s->p.stop_ids = s->stop_ids;
    s->state = SEQ_WAITING;
    return e->n_seqs++;
}

// Ends s; t (its last token, or token -1) reaches the owner with the reason.
static void finish(Engine *e, Seq *s, EngineToken *t, FinishReason why) {
    if (s->slot >= 0) e->slot_seq[s->slot] = -1;
    s->slot = -1;
    s->state = SEQ_DONE;
    seq_release(s);
    t->finish = why;
    if (s->fn) s->fn(s->owner, (int)(s - e->seqs), t);
}

int engine_cancel(Engine *e, int seq) {
    if (seq < 0 || seq >= e->n_seqs || e->seqs[seq].state == SEQ_DONE) return -1;
    EngineToken t = {.token = -1};
    finish(e, &e->seqs[seq], &t, FINISH_CANCELLED);
    return 0;
}

// The log-probabilities the owner asked for: token's, and the n most likely (ties: lower id).
static void token_logprobs(const float *logits, int V, EngineToken *t, int n) {
    float m = logits[argmax_f32(logits, V)];
    double sum = 0;
    for (int i = 0; i < V; i++) sum += exp((double)logits[i] - m);
    double lse = m + log(sum);
    t->logprob = (float)(logits[t->token] - lse);
    t->n_top = 0;
    for (int i = 0; i < V; i++) {  // insertion into the n best so far
        int at = t->n_top;
        while (at > 0 && logits[i] > logits[t->top_ids[at - 1]]) at--;
        if (at >= n) continue;
        int last = t->n_top < n ? t->n_top++ : n - 1;
        for (int j = last; j > at; j--) t->top_ids[j] = t->top_ids[j - 1];
        t->top_ids[at] = i;
    }
    for (int j = 0; j < t->n_top; j++) t->top_logprobs[j] = (float)(logits[t->top_ids[j]] - lse);
}

const EngineStats *engine_stats(const Engine *e) { return &e->stats; }

// Free slots take the waiting sequences, oldest first.
static void admit(Engine *e) {
    for (int slot = 0; slot < e->o.parallel; slot++) {
        if (e->slot_seq[slot] >= 0) continue;
        while (e->next_waiting < e->n_seqs && e->seqs[e->next_waiting].state != SEQ_WAITING) e->next_waiting++;
        if (e->next_waiting == e->n_seqs) return;
        Seq *s = &e->seqs[e->next_waiting++];
        s->state = SEQ_RUNNING;
        s->slot = slot;
        e->slot_seq[slot] = (int)(s - e->seqs);
        KVCache *kv = &e->cache[slot];
        kv->len = 0;
    }
}

// Samples the next token from e->logits and hands it to the owner; ends the sequence when it is
// the last.
static void emit(Engine *e, Seq *s) {
    int next = sampler_sample(&s->sampler, e->logits), stop = s->p.stop_at_eos && next == e->m->cfg.eos_token_id;
    for (int i = 0; i < s->p.n_stop_ids && !stop; i++) stop = next == s->p.stop_ids[i];
    s->generated++;
    e->stats.generated_tokens++;
    s->last = next;
    EngineToken t = {.token = next};
    if (s->p.logprobs) token_logprobs(e->logits, e->m->cfg.vocab_size, &t, s->p.top_logprobs);
    FinishReason why = stop ? FINISH_STOP
                       : s->generated >= s->p.max_new || e->cache[s->slot].len >= e->o.ctx ? FINISH_LENGTH
                                                                                             : FINISH_NONE;
    if (why != FINISH_NONE) {
        finish(e, s, &t, why);
        return;
    }
    if (s->fn) s->fn(s->owner, (int)(s - e->seqs), &t);
}

// One forward pass of a running sequence: the next prefill chunk, or one decode step.
static int advance(Engine *e, Seq *s, Error *err) {
    KVCache *kv = &e->cache[s->slot];
    double t0 = now_s();
    if (s->prefilled < s->n_prompt) {
        int n = s->n_prompt - s->prefilled;
        if (n > e->o.prefill_chunk) n = e->o.prefill_chunk;
        if (model_forward(e->m, e->fs, kv, s->prompt + s->prefilled, n, ATTN_PLAIN, NULL, e->logits, NULL, err))
            return -1;
        s->prefilled += n;
        e->stats.prefill_s += now_s() - t0;
        e->stats.prompt_tokens += n;
        if (s->prefilled == s->n_prompt) emit(e, s);
        return 0;
    }
    if (model_forward(e->m, e->fs, kv, &s->last, 1, ATTN_ABSORBED, NULL, e->logits, NULL, err)) return -1;
    e->stats.decode_s += now_s() - t0;
    e->stats.decode_tokens++;
    emit(e, s);
    return 0;
}

int engine_step(Engine *e, Error *err) {
    admit(e);
    for (int slot = 0; slot < e->o.parallel; slot++) {
        int id = e->slot_seq[slot];
        if (id >= 0 && advance(e, &e->seqs[id], err)) return err_prefix(err, "sequence %d", id);
    }
    admit(e);
    int live = 0, running = 0;
    for (int i = 0; i < e->n_seqs; i++) {
        live += e->seqs[i].state != SEQ_DONE;
        running += e->seqs[i].state == SEQ_RUNNING;
    }
    e->stats.running = running;
    e->stats.waiting = live - running;
    return live;
}
