// The engine (engine.h): admission, chunked prefill, the batched decode step, speculative decoding
// with the MTP module as the drafter, and the hand-over of tokens to their owners.
//
// Speculative decoding, per sequence, with n = its cache length and x_n the token just produced
// (not yet in the cache), h_t the main model's final-normed hidden state at position t:
//  - the MTP module's cache row t holds (h_t, x_{t+1}) (SPEC §2.3). Prefill fills rows up to n − 2
//    from the prompt; the rows not yet run are pending: (h_t, x_{t+1}) for t = mtp_len .. n − 1;
//  - draft: the module runs the pending rows (one batched forward over all sequences); the last
//    row's argmax is draft d_1. For K > 1 the module chains on its own output (its hidden state
//    after shared_head.norm, as training feeds the next module) with d_j as the next token;
//  - verify: ONE model_decode over [x_n, d_1 .. d_K] at positions n .. n + K; row j's logits are
//    exactly what a plain step at position n + j computes (batch invariance). Row j decides the
//    token at n + j + 1: greedy accepts d_{j+1} when it is the argmax; sampling accepts it with
//    probability p_j(d_{j+1}), and on a rejection draws from p_j without d_{j+1} (the residual of a
//    greedy draft), so the output distribution is plain sampling's. The first rejection's token (or
//    after K acceptances the bonus from row K) ends the step;
//  - roll back: the main cache keeps positions up to n + a (a drafts accepted); the module's cache
//    drops the chained rows; the verify rows 0 .. a become the next pending rows.
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "infer/engine.h"
#include "infer/prefix_cache.h"
#include "infer/sampler.h"
#include "kernels/ops.h"

typedef enum { SEQ_WAITING, SEQ_RUNNING, SEQ_DONE } SeqState;

typedef struct Seq {
    SeqState state;
    int *prompt;          // (n_prompt)
    int n_prompt;
    int prefilled;        // prompt positions already in the cache
    int generated;
    int last;             // the token the next step feeds (produced, not yet in the cache)
    SeqParams p;
    int *stop_ids;        // (p.n_stop_ids) owned copy
    Sampler sampler;
    EngineTokenFn fn;
    void *owner;
    KVCache kv;           // while running
    int has_kv;
    // speculative decoding: the module's pending rows (h_t, x_{t+1}), t = kv.mtp_len[0] ..
    int n_pend;
    int *pend_tok;        // (K + 1)
    float *pend_h;        // (K + 1, d)
    int draft[ENGINE_MAX_SPECULATIVE];
    int n_draft;
    TokenConstraint constraint;  // ctx NULL: none
    float *masked;        // (vocab) a row of logits under the constraint
    int row0;             // this step's first row in the batch
    int piece;            // prompt positions this step's batch runs (absorbed prefill), or 0
    // the prefix cache: the sequence's tokens by position, and its blocks already indexed
    int *hist;            // (cap_hist) prompt, then every emitted token
    int n_hist, cap_hist;
    int n_pub;            // blocks 0 .. n_pub − 1 are indexed (this sequence's or equal ones)
    int pub_parent;       // the indexed block of block n_pub − 1, or -1
} Seq;

struct Engine {
    const Model *m;
    EngineOptions o;
    int K;                 // draft tokens per step (0: plain decoding)
    KVPool pool;
    PrefixCache pc;        // when o.prefix_cache
    int rows_independent;  // model_rows_independent: a plain chunk's row has its bits in any chunk
    ForwardState *fs;
    int max_rows;          // decoding rows of a step: parallel · (K + 1)
    int step_rows;         // rows of a step's batched forward: decoding rows, then prompt pieces
    int logit_rows;        // rows of logits it keeps: max_rows + parallel
    float *logits;         // (logit_rows, vocab) the rows that want them
    float *hidden;         // (max(step_rows, prefill_chunk), d) main model hidden states
    float *mtp_hidden;     // (step_rows, d) the module's input or output states
    float *mtp_logits;     // (parallel, vocab) each drafting sequence's last row
    Seq *seqs;             // (n_seqs) every sequence ever added, by id
    int n_seqs, cap_seqs;
    int next_waiting;      // sequences below this id have been admitted (or cancelled)
    int *run;              // (parallel) ids of the running sequences, in admission order
    int n_run;
    DecodeSeq *batch;      // (parallel)
    int *batch_tok;        // (max_rows)
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

static int refresh_stats(Engine *e);

// The pool reused a retained block: it leaves the prefix index.
static void evicted(void *ctx, int block) { prefix_evict(&((Engine *)ctx)->pc, block); }

Engine *engine_new(const Model *m, const EngineOptions *o, Error *err) {
    const ModelConfig *c = &m->cfg;
    int K = o->speculative;
    if (o->parallel < 1 || o->ctx < 2 || o->prefill_chunk < 1 || o->cache_tokens < 0) {
        err_set(err, "engine: parallel %d, ctx %d, prefill chunk %d, cache %d: each must be positive (ctx at least 2)",
                o->parallel, o->ctx, o->prefill_chunk, o->cache_tokens);
        return NULL;
    }
    if (K < 0 || K > ENGINE_MAX_SPECULATIVE) {
        err_set(err, "engine: speculative %d is outside [0, %d]", K, ENGINE_MAX_SPECULATIVE);
        return NULL;
    }
    if (K > 0 && m->w.n_mtp < 1) {
        err_set(err, "engine: speculative decoding drafts with the MTP module, and this model has no MTP layers loaded "
                     "(num_nextn_predict_layers = %d)", c->num_nextn_predict_layers);
        return NULL;
    }
    if ((long)o->parallel * (K + 1) > DECODE_MAX_ROWS || o->parallel > DECODE_MAX_SEQS) {
        err_set(err, "engine: %d sequences × %d rows exceed a decode step's %d rows", o->parallel, K + 1, DECODE_MAX_ROWS);
        return NULL;
    }
    Engine *e = xcalloc(err, 1, sizeof *e, "engine");
    if (!e) return NULL;
    e->m = m;
    e->o = *o;
    e->rows_independent = model_rows_independent(m);
    e->K = K;
    // by default every running sequence can reach ctx positions (whole blocks each)
    long per_seq = (o->ctx + ENGINE_BLOCK_SIZE - 1) / ENGINE_BLOCK_SIZE;
    long n_blocks = o->cache_tokens > 0 ? (o->cache_tokens + ENGINE_BLOCK_SIZE - 1) / ENGINE_BLOCK_SIZE
                                        : (long)o->parallel * per_seq;
    if (n_blocks > (1L << 30)) {
        err_set(err, "engine: a cache of %ld blocks", n_blocks);
        return NULL;
    }
    e->max_rows = o->parallel * (K + 1);
    long step_rows = (long)e->max_rows + e->o.prefill_chunk;
    e->step_rows = step_rows < DECODE_MAX_ROWS ? (int)step_rows : DECODE_MAX_ROWS;
    int V = c->vocab_size, d = c->hidden_size, hrows = e->step_rows > e->o.prefill_chunk ? e->step_rows : e->o.prefill_chunk;
    if (kvpool_init(&e->pool, c, K > 0 ? 1 : 0, (int)n_blocks, ENGINE_BLOCK_SIZE, o->kv_dtype, err)) {
        free(e);
        return NULL;
    }
    e->logit_rows = e->max_rows + o->parallel;
    e->logits = xmalloc(err, sizeof(float) * e->logit_rows * V, "logits");
    e->hidden = xmalloc(err, sizeof(float) * (size_t)hrows * d, "hidden states");
    e->run = xmalloc(err, sizeof(int) * o->parallel, "engine");
    e->batch = xmalloc(err, sizeof(DecodeSeq) * o->parallel, "engine");
    e->batch_tok = xmalloc(err, sizeof(int) * e->max_rows, "engine");
    if (!e->logits || !e->hidden || !e->run || !e->batch || !e->batch_tok) goto fail;
    if (K > 0) {
        e->mtp_hidden = xmalloc(err, sizeof(float) * e->step_rows * d, "MTP hidden states");
        e->mtp_logits = xmalloc(err, sizeof(float) * o->parallel * V, "MTP logits");
        if (!e->mtp_hidden || !e->mtp_logits) goto fail;
    }
    e->fs = forward_state_new(m, hrows, o->ctx, err);
    if (!e->fs) goto fail;
    forward_state_profile(e->fs, o->profile);
    if (o->prefix_cache) {
        if (prefix_init(&e->pc, (int)n_blocks, ENGINE_BLOCK_SIZE + (K > 0), err)) goto fail;
        e->pool.on_evict = evicted;
        e->pool.evict_ctx = e;
    }
    e->stats.cache_blocks_total = n_blocks;
    refresh_stats(e);
    return e;
fail:
    engine_free(e);
    return NULL;
}

static void seq_release(Seq *s) {
    free(s->prompt);
    free(s->stop_ids);
    free(s->pend_tok);
    free(s->pend_h);
    free(s->hist);
    free(s->masked);
    s->hist = NULL;
    s->masked = NULL;
    sampler_free(&s->sampler);
    if (s->has_kv) kvcache_free(&s->kv);
    s->has_kv = 0;
    s->prompt = s->stop_ids = s->pend_tok = NULL;
    s->pend_h = NULL;
}

void engine_free(Engine *e) {
    if (!e) return;
    for (int i = 0; i < e->n_seqs; i++) seq_release(&e->seqs[i]);
    forward_state_free(e->fs);
    kvpool_free(&e->pool);
    prefix_free(&e->pc);
    free(e->logits);
    free(e->hidden);
    free(e->mtp_hidden);
    free(e->mtp_logits);
    free(e->run);
    free(e->batch);
    free(e->batch_tok);
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
    if (p->max_new < 0) return err_set(err, "engine: max_new %d must not be negative", p->max_new);
    if (p->top_logprobs < 0 || p->top_logprobs > ENGINE_MAX_TOP_LOGPROBS)
        return err_set(err, "engine: top_logprobs %d is outside [0, %d]", p->top_logprobs, ENGINE_MAX_TOP_LOGPROBS);
    if (p->n_stop_ids < 0) return err_set(err, "engine: %d stop ids", p->n_stop_ids);
    if (p->n_bias < 0) return err_set(err, "engine: %d logit biases", p->n_bias);
    for (int i = 0; i < p->n_bias; i++) {
        if (p->bias_ids[i] < 0 || p->bias_ids[i] >= V)
            return err_set(err, "engine: logit bias for id %d, outside the vocabulary [0, %d)", p->bias_ids[i], V);
        if (!isfinite(p->bias_values[i]))
            return err_set(err, "engine: logit bias for id %d is not a finite number", p->bias_ids[i]);
    }
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
    s->n_prompt = n;
    s->prompt = malloc(sizeof(int) * n);
    s->stop_ids = malloc(sizeof(int) * (p->n_stop_ids > 0 ? p->n_stop_ids : 1));
    if (!s->prompt || !s->stop_ids ||
        sampler_init(&s->sampler, V, p->temperature, p->top_k, p->top_p, p->seed) ||
        sampler_set_filters(&s->sampler, p->min_p, p->presence_penalty, p->frequency_penalty) ||
        sampler_set_bias(&s->sampler, p->bias_ids, p->bias_values, p->n_bias)) {
        seq_release(s);
        return err_set(err, "engine: out of memory for a sequence");
    }
    memcpy(s->prompt, prompt, sizeof(int) * n);
    if (e->o.prefix_cache) {
        s->cap_hist = n + 64;
        s->hist = malloc(sizeof(int) * s->cap_hist);
        if (!s->hist) {
            seq_release(s);
            return err_set(err, "engine: out of memory for a sequence");
        }
        memcpy(s->hist, prompt, sizeof(int) * n);
        s->n_hist = n;
    }
    if (p->n_stop_ids > 0) memcpy(s->stop_ids, p->stop_ids, sizeof(int) * p->n_stop_ids);
    if (p->constraint) {
        s->constraint = *p->constraint;
        if (!(s->masked = malloc(sizeof(float) * V))) {
            seq_release(s);
            return err_set(err, "engine: out of memory for a sequence");
        }
    }
    s->p.constraint = NULL;
    s->p.stop_ids = s->stop_ids;
    s->p.bias_ids = NULL;  // held by the sampler
    s->p.bias_values = NULL;
    s->p.n_bias = 0;
    s->state = SEQ_WAITING;
    return e->n_seqs++;
}

// A prompt chunk of at most this many positions runs with absorbed attention inside the step's
// batched forward, beside the decoding sequences, whose weights it shares; a longer one runs alone
// with plain attention. One sequence alone on v3-108m (Zen 4; BF16 and FP8 weights, bf16 and f32
// compute; chunks at positions 0, 512 and 1,536): absorbed costs 0.55–1.1× plain up to 64 rows,
// 0.9–1.25× at 128, 1.1–1.4× at 192–256 (its scores over the 576-wide latent grow with rows ×
// positions; plain attention expands the cache once per chunk) — before the weight reads it
// shares with the rest of the batch.
#define ABSORBED_PREFILL_ROWS 128

// A prompt's chunks are fixed by its length alone: [k·C, min((k + 1)·C, n_prompt)) for C =
// prefill_chunk, each run with plain attention when longer than ABSORBED_PREFILL_ROWS, else
// absorbed (a prompt_logprobs sequence: absorbed throughout). Plain and absorbed attention are
// different arithmetic, so this is what makes a prompt's bits its own: not the company (absorbed
// rows are the bits of single decode steps however they are split, decode.c), not the positions
// the prefix cache supplied (admit: cached blocks computed as this prompt would compute them, and
// a chunk resumed after them the rest of the same chunk, or the whole of it).
// The end of the chunk of s's prompt that holds position pos (< n_prompt).
static int chunk_end(const Engine *e, const Seq *s, int pos) {
    int c1 = pos - pos % e->o.prefill_chunk + e->o.prefill_chunk;
    return c1 < s->n_prompt ? c1 : s->n_prompt;
}

// Is position pos of s's prompt in a plain chunk? (Generated positions: absorbed, decode steps.)
static int chunk_plain(const Engine *e, const Seq *s, int pos) {
    if (pos >= s->n_prompt || s->p.prompt_logprobs) return 0;
    return chunk_end(e, s, pos) - (pos - pos % e->o.prefill_chunk) > ABSORBED_PREFILL_ROWS;
}

// The positions from pos to the end of its chunk of s's prompt.
static int chunk_rest(const Engine *e, const Seq *s, int pos) { return chunk_end(e, s, pos) - pos; }

// How the positions of s's block j were computed, for the prefix cache: two bits per position —
// 0 absorbed, 1 plain, 2 plain in a chunk shorter than prefill_chunk when a row's bits depend on
// the chunk's rows (!rows_independent: such a block matches only one computed the same way).
static unsigned block_how(const Engine *e, const Seq *s, int j) {
    unsigned how = 0;
    for (int i = 0; i < ENGINE_BLOCK_SIZE; i++) {
        int pos = j * ENGINE_BLOCK_SIZE + i;
        unsigned v = chunk_plain(e, s, pos) ? 1u : 0u;
        if (v && !e->rows_independent && chunk_end(e, s, pos) - (pos - pos % e->o.prefill_chunk) < e->o.prefill_chunk)
            v = 2;
        how |= v << (2 * i);
    }
    return how;
}

// May a reused prefix end at position h of s's prompt? Where the rest runs absorbed; inside a plain
// chunk, when its rows' bits do not depend on the chunk's other rows and at least a block of it
// is left to run (on AMX tiles a product of fewer than 16 rows takes the dot products, other
// bits), else only at a chunk's start (the whole chunk then runs as it would alone).
static int prefix_may_end(const Engine *e, const Seq *s, int h) {
    if (h == 0 || !chunk_plain(e, s, h)) return 1;
    if (e->rows_independent) return chunk_rest(e, s, h) >= ENGINE_BLOCK_SIZE;
    return h % e->o.prefill_chunk == 0;
}

// With the prefix cache: indexes the sequence's blocks that are full and final — every position
// verified and, with the MTP module, its rows written (which needs the token after the block).
static void publish(Engine *e, Seq *s) {
    if (!e->o.prefix_cache || !s->has_kv) return;
    int bs = ENGINE_BLOCK_SIZE;
    for (;;) {
        int end = (s->n_pub + 1) * bs;
        if (end > s->kv.len || (e->K > 0 && (s->n_hist <= end || s->kv.mtp_len[0] < end))) return;
        int b = s->kv.blocks[s->n_pub];
        int id = prefix_insert(&e->pc, s->pub_parent, s->hist + (size_t)s->n_pub * bs, block_how(e, s, s->n_pub), b);
        if (id == b) kvpool_retain(&e->pool, b);
        s->pub_parent = id;
        s->n_pub++;
    }
}

// Ends s; t (its last token, or token -1) reaches the owner with the reason. Its cache blocks go
// back to the pool at once (those the prefix cache indexed stay filled until evicted).
static void finish(Engine *e, Seq *s, EngineToken *t, FinishReason why) {
    int id = (int)(s - e->seqs);
    if (s->state == SEQ_RUNNING) {
        publish(e, s);
        int j = 0;
        while (e->run[j] != id) j++;
        memmove(e->run + j, e->run + j + 1, sizeof(int) * (e->n_run - j - 1));
        e->n_run--;
    }
    s->state = SEQ_DONE;
    seq_release(s);
    t->finish = why;
    if (s->fn) s->fn(s->owner, id, t);
}

// The counts of the stats: sequences now, blocks in use.
static int refresh_stats(Engine *e) {
    int waiting = 0;
    for (int i = e->next_waiting; i < e->n_seqs; i++) waiting += e->seqs[i].state == SEQ_WAITING;
    e->stats.running = e->n_run;
    e->stats.waiting = waiting;
    e->stats.cache_blocks_used = e->pool.n_used;
    return waiting + e->n_run;
}

int engine_cancel(Engine *e, int seq) {
    if (seq < 0 || seq >= e->n_seqs || e->seqs[seq].state == SEQ_DONE) return -1;
    EngineToken t = {.token = -1};
    finish(e, &e->seqs[seq], &t, FINISH_CANCELLED);
    refresh_stats(e);
    return 0;
}

const EngineStats *engine_stats(const Engine *e) { return &e->stats; }

// Waiting sequences take free places, oldest first, each with an empty cache on the pool.
static int admit(Engine *e, Error *err) {
    while (e->n_run < e->o.parallel) {
        while (e->next_waiting < e->n_seqs && e->seqs[e->next_waiting].state != SEQ_WAITING) e->next_waiting++;
        if (e->next_waiting == e->n_seqs) return 0;
        Seq *s = &e->seqs[e->next_waiting++];
        int d = e->m->cfg.hidden_size;
        if (kvcache_attach(&s->kv, &e->pool, e->K > 0 ? 1 : 0, e->o.ctx, err)) return -1;
        s->has_kv = 1;
        if (e->K > 0) {
            s->pend_tok = malloc(sizeof(int) * (e->K + 1));
            s->pend_h = malloc(sizeof(float) * (e->K + 1) * d);
            if (!s->pend_tok || !s->pend_h) return err_set(err, "engine: out of memory for a sequence");
        }
        s->state = SEQ_RUNNING;
        s->pub_parent = -1;
        e->run[e->n_run++] = (int)(s - e->seqs);
        if (e->o.prefix_cache && !s->p.prompt_logprobs) {
            // the longest indexed prefix of whole blocks computed as this prompt would compute
            // them, leaving at least the last prompt token to run (its logits give the first
            // token; with the MTP module a block's key includes the token after it, which must be
            // in the prompt) and, when the rest of a plain chunk is to run, at least a block of it:
            // the products of 16 rows and more on AMX tiles are the same bits for any number of
            // rows, not those of fewer rows (matmul.c)
            int bs = ENGINE_BLOCK_SIZE, most = (s->n_prompt - 1) / bs, take = 0;
            for (int parent = -1; take < most; take++) {  // how far the index reaches
                parent = prefix_find(&e->pc, parent, s->prompt + (size_t)take * bs, block_how(e, s, take));
                if (parent < 0) break;
            }
            while (!prefix_may_end(e, s, take * bs)) take--;
            while (s->n_pub < take) {
                int b = prefix_find(&e->pc, s->pub_parent, s->prompt + (size_t)s->n_pub * bs, block_how(e, s, s->n_pub));
                if (b < 0 || kvcache_share(&s->kv, b, err)) break;
                s->pub_parent = b;
                s->n_pub++;
            }
            int hit = s->n_pub * bs;
            s->kv.len = s->prefilled = hit;
            if (e->K > 0) s->kv.mtp_len[0] = hit;
            e->stats.prefix_lookup_tokens += s->n_prompt;
            e->stats.prefix_hit_tokens += hit;
        }
    }
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

// The logits the choice sees: the row itself, or under the sequence's constraint a masked copy.
static const float *choice_logits(const Engine *e, Seq *s, const float *logits) {
    if (!s->constraint.mask) return logits;
    int V = e->m->cfg.vocab_size;
    memcpy(s->masked, logits, sizeof(float) * V);
    s->constraint.mask(s->constraint.ctx, s->masked, V);
    return s->masked;
}

// Hands token `next` (chosen at logits) to the owner; 1 when the sequence has ended.
static int emit(Engine *e, Seq *s, int next, const float *logits) {
    int stop = s->p.stop_at_eos && next == e->m->cfg.eos_token_id;
    sampler_accept(&s->sampler, next);
    if (s->constraint.accept) s->constraint.accept(s->constraint.ctx, next);
    for (int i = 0; i < s->p.n_stop_ids && !stop; i++) stop = next == s->p.stop_ids[i];
    if (s->hist) {  // the prefix cache's record of the positions (grown in step with the tokens)
        if (s->n_hist == s->cap_hist) {
            int cap = 2 * s->cap_hist, *nh = realloc(s->hist, sizeof(int) * cap);
            if (nh) s->hist = nh, s->cap_hist = cap;
        }
        if (s->n_hist < s->cap_hist) s->hist[s->n_hist++] = next;
        else e->o.prefix_cache = 0;  // out of memory: stop caching rather than index wrong tokens
    }
    s->generated++;
    e->stats.generated_tokens++;
    s->last = next;
    EngineToken t = {.token = next};
    if (s->p.logprobs) token_logprobs(logits, e->m->cfg.vocab_size, &t, s->p.top_logprobs);
    FinishReason why = stop ? FINISH_STOP
                       : s->generated >= s->p.max_new || s->kv.len >= e->o.ctx ? FINISH_LENGTH
                                                                              : FINISH_NONE;
    if (why != FINISH_NONE) {
        finish(e, s, &t, why);
        return 1;
    }
    if (s->fn) s->fn(s->owner, (int)(s - e->seqs), &t);
    return s->state == SEQ_DONE;  // the owner may have cancelled it
}

// Ends s because the cache pool ran out.
static void fail_seq(Engine *e, Seq *s) {
    EngineToken t = {.token = -1};
    finish(e, s, &t, FINISH_ERROR);
}


// s's prompt is all in the cache: its first token, chosen at logits; with speculative decoding
// the module's pending row is (h of the last prompt position, that token).
static void prompt_done(Engine *e, Seq *s, const float *logits, const float *last_hidden) {
    if (s->p.max_new == 0) {
        EngineToken t = {.token = -1};
        finish(e, s, &t, FINISH_LENGTH);
        return;
    }
    int next = sampler_sample(&s->sampler, choice_logits(e, s, logits));
    if (e->K > 0) {
        s->pend_tok[0] = next;
        memcpy(s->pend_h, last_hidden, sizeof(float) * e->m->cfg.hidden_size);
        s->n_pend = 1;
    }
    emit(e, s, next, logits);
}

// Plain prefill: each sequence whose next chunk is too long to be absorbed runs it alone, at most
// prefill_chunk positions in all this step (*used counts them) except that the first chunk always
// runs. With speculative decoding the MTP module's cache takes the chunk's rows (h_t, x_{t+1})
// whose next token is in the prompt.
static int prefill_plain(Engine *e, int *used, Error *err) {
    int d = e->m->cfg.hidden_size, ids[DECODE_MAX_SEQS], n_ids = e->n_run;
    memcpy(ids, e->run, sizeof(int) * n_ids);  // sequences may end (and leave e->run) on the way
    for (int j = 0; j < n_ids; j++) {
        Seq *s = &e->seqs[ids[j]];
        if (s->state != SEQ_RUNNING || s->prefilled >= s->n_prompt) continue;
        int n = chunk_rest(e, s, s->prefilled);
        if (!chunk_plain(e, s, s->prefilled)) continue;
        if (*used > 0 && *used + n > e->o.prefill_chunk) break;
        if (kvcache_reserve(&s->kv, s->prefilled + n, err)) {
            fail_seq(e, s);
            continue;
        }
        double t0 = now_s();
        int last_chunk = s->prefilled + n == s->n_prompt;
        if (model_forward(e->m, e->fs, &s->kv, s->prompt + s->prefilled, n, ATTN_PLAIN, NULL,
                          last_chunk ? e->logits : NULL, e->K > 0 ? e->hidden : NULL, err))
            return -1;
        int rows = last_chunk ? n - 1 : n;  // the last prompt position's next token is not known yet
        if (e->K > 0 && rows > 0 &&
            model_mtp_forward(e->m, e->fs, &s->kv, 0, s->prompt + s->prefilled + 1, e->hidden, rows, ATTN_PLAIN, NULL,
                              NULL, err))
            return -1;
        s->prefilled += n;
        *used += n;
        publish(e, s);
        e->stats.prefill_s += now_s() - t0;
        e->stats.prompt_tokens += n;
        if (last_chunk) prompt_done(e, s, e->logits, e->hidden + (size_t)(n - 1) * d);
    }
    return 0;
}

// Drafts for the decoding sequences in ds (n of them): the MTP module over each one's pending
// rows, then chained on its own output, n_draft drafts each (set by the caller). Reorders ds.
static int draft(Engine *e, Seq **ds, int n, Error *err) {
    const ModelConfig *c = &e->m->cfg;
    int d = c->hidden_size, V = c->vocab_size, rows = 0;
    float *h_in = e->hidden;  // the pending rows' hidden states, gathered
    for (int i = 0; i < n; i++) {
        Seq *s = ds[i];
        e->batch[i] = (DecodeSeq){.kv = &s->kv, .tokens = s->pend_tok, .T = s->n_pend, .skip_logits = s->n_pend - 1};
        memcpy(h_in + (size_t)rows * d, s->pend_h, sizeof(float) * s->n_pend * d);
        rows += s->n_pend;
    }
    if (model_mtp_decode(e->m, e->fs, 0, e->batch, n, h_in, e->mtp_logits, e->mtp_hidden, err)) return -1;
    // each sequence's last row drafts d_1 (its logits are row i); its state feeds the chained drafts
    for (int i = 0, r = 0; i < n; i++) {
        r += ds[i]->n_pend;
        ds[i]->draft[0] = argmax_f32(e->mtp_logits + (size_t)i * V, V);
        memmove(e->mtp_hidden + (size_t)i * d, e->mtp_hidden + (size_t)(r - 1) * d, sizeof(float) * d);
        ds[i]->n_pend = 0;
    }
    for (int j = 1; j < e->K; j++) {
        int m = 0;  // the sequences still drafting, their states compacted in order
        for (int i = 0; i < n; i++) {
            if (ds[i]->n_draft <= j) continue;
            e->batch[m] = (DecodeSeq){.kv = &ds[i]->kv, .tokens = &ds[i]->draft[j - 1], .T = 1};
            memmove(e->mtp_hidden + (size_t)m * d, e->mtp_hidden + (size_t)i * d, sizeof(float) * d);
            ds[m] = ds[i];  // drafting ones first (the caller keeps its own order)
            m++;
        }
        if (m == 0) break;
        memcpy(h_in, e->mtp_hidden, sizeof(float) * m * d);
        if (model_mtp_decode(e->m, e->fs, 0, e->batch, m, h_in, e->mtp_logits, e->mtp_hidden, err)) return -1;
        for (int i = 0; i < m; i++) ds[i]->draft[j] = argmax_f32(e->mtp_logits + (size_t)i * V, V);
        n = m;
    }
    return 0;
}

// Row j's verdict on draft `dr` (-1: no draft, the bonus row): *accepted, and the token the
// sequence takes at this position.
static int judge(const Engine *e, Seq *s, const float *logits, int V, int dr, int *accepted) {
    logits = choice_logits(e, s, logits);
    if (s->p.temperature <= 0) {
        // the argmax; of the biased or penalised logits when either is set
        int y = sampler_adjusts(&s->sampler) ? sampler_sample(&s->sampler, logits) : argmax_f32(logits, V);
        *accepted = dr >= 0 && y == dr;
        return y;
    }
    int n = sampler_distribution(&s->sampler, logits);
    if (dr >= 0 && sampler_uniform(&s->sampler) < sampler_prob(&s->sampler, n, dr)) {
        *accepted = 1;
        return dr;
    }
    *accepted = 0;
    return sampler_draw(&s->sampler, n, dr);
}

// The prompt's tokens at positions p0 + 1 .. p0 + n (those in the prompt; position 0 too when p0 is
// 0) reach the owner with their log-probabilities, from logits (n, vocab) of positions p0 ..
// p0 + n − 1. 1 when the owner cancelled the sequence meanwhile.
static int report_prompt(Engine *e, Seq *s, int p0, int n, const float *logits) {
    int V = e->m->cfg.vocab_size, id = (int)(s - e->seqs);
    if (p0 == 0) {
        EngineToken t = {.token = s->prompt[0], .prompt = 1, .logprob = NAN};
        if (s->fn) s->fn(s->owner, id, &t);
    }
    for (int j = 0; j < n && p0 + j + 1 < s->n_prompt; j++) {
        if (s->state != SEQ_RUNNING) return 1;
        EngineToken t = {.token = s->prompt[p0 + j + 1], .prompt = 1};
        token_logprobs(logits + (size_t)j * V, V, &t, s->p.top_logprobs);
        if (s->fn) s->fn(s->owner, id, &t);
    }
    return s->state != SEQ_RUNNING;
}

// The step's batched forward (model_decode): every decoding sequence's rows [last, drafts...],
// then pieces of the prompts whose next chunk is absorbed, as far as the step's prefill budget
// (prefill_chunk positions, `used` of them taken by plain chunks) and rows allow. The module's
// cache takes the pieces' rows after it, in one batched pass of its own.
static int step_forward(Engine *e, int used, Error *err) {
    const ModelConfig *c = &e->m->cfg;
    int V = c->vocab_size, d = c->hidden_size, n = 0, np = 0, rows = 0, ids[DECODE_MAX_SEQS], n_ids = e->n_run;
    Seq *ds[DECODE_MAX_SEQS], *ps[DECODE_MAX_SEQS];
    memcpy(ids, e->run, sizeof(int) * n_ids);
    for (int j = 0; j < n_ids; j++) {
        Seq *s = &e->seqs[ids[j]];
        if (s->state != SEQ_RUNNING || s->prefilled < s->n_prompt) continue;
        // room for the rows this step appends: the verify rows (the module's rows stay below them);
        // with the pool nearly out, fewer drafts; with no room for one row, the sequence ends
        int room = e->o.ctx - 1 - s->kv.len, want = s->kv.len + 1 + (e->K < room ? e->K : room);
        if (kvcache_reserve(&s->kv, want, err) && kvcache_reserve(&s->kv, s->kv.len + 1, err)) {
            fail_seq(e, s);
            continue;
        }
        int have = s->kv.n_blocks * ENGINE_BLOCK_SIZE - s->kv.len - 1;
        s->n_draft = e->K < room ? e->K : room;
        s->n_draft = s->n_draft < have ? s->n_draft : have;
        rows += 1 + s->n_draft;
        ds[n++] = s;
    }
    int drows = rows, lrows = rows;  // lrows: rows of logits, at most logit_rows
    for (int j = 0; j < n_ids; j++) {
        Seq *s = &e->seqs[ids[j]];
        if (s->state != SEQ_RUNNING || s->prefilled >= s->n_prompt) continue;
        int take = chunk_rest(e, s, s->prefilled), left = e->o.prefill_chunk - used;
        if (chunk_plain(e, s, s->prefilled)) continue;  // a plain chunk, next step
        take = take < left ? take : left;
        take = take < e->step_rows - rows ? take : e->step_rows - rows;
        // logits: a piece of a prompt_logprobs sequence keeps every row's, another only its last
        // row's, when it ends the prompt
        if (s->p.prompt_logprobs && take > e->logit_rows - lrows) take = e->logit_rows - lrows;
        if (take <= 0 || lrows == e->logit_rows) break;
        if (kvcache_reserve(&s->kv, s->prefilled + take, err)) {
            fail_seq(e, s);
            continue;
        }
        lrows += s->p.prompt_logprobs ? take : s->prefilled + take == s->n_prompt;
        s->piece = take;
        used += take;
        rows += take;
        ps[np++] = s;
    }
    if (n + np == 0) return 0;
    double t0 = now_s();
    Seq *order[DECODE_MAX_SEQS];
    memcpy(order, ds, sizeof(Seq *) * n);
    if (e->K > 0 && n > 0 && draft(e, ds, n, err)) return -1;
    rows = 0;
    for (int i = 0; i < n; i++) {
        Seq *s = order[i];
        int nd = s->n_draft;
        s->row0 = rows;
        e->batch_tok[rows] = s->last;
        memcpy(e->batch_tok + rows + 1, s->draft, sizeof(int) * nd);
        e->batch[i] = (DecodeSeq){.kv = &s->kv, .tokens = e->batch_tok + rows, .T = 1 + nd};
        rows += 1 + nd;
    }
    for (int i = 0; i < np; i++) {  // a piece wants the logits of its last row when it ends the prompt
        Seq *s = ps[i];
        int ends = s->prefilled + s->piece == s->n_prompt;
        s->row0 = rows;
        e->batch[n + i] = (DecodeSeq){.kv = &s->kv, .tokens = s->prompt + s->prefilled, .T = s->piece,
                                      .skip_logits = s->p.prompt_logprobs ? 0 : s->piece - ends};
        rows += s->piece;
    }
    if (model_decode(e->m, e->fs, e->batch, n + np, e->logits, e->K > 0 ? e->hidden : NULL, err)) return -1;
    if (e->K > 0 && np > 0) {
        // the module's rows (h_t, x_{t+1}) of the pieces whose next token is in the prompt
        int m = 0, mrows = 0;
        for (int i = 0; i < np; i++) {
            Seq *s = ps[i];
            int r = s->prefilled + s->piece == s->n_prompt ? s->piece - 1 : s->piece;
            if (r == 0) continue;
            e->batch[m++] = (DecodeSeq){.kv = &s->kv, .tokens = s->prompt + s->prefilled + 1, .T = r};
            memcpy(e->mtp_hidden + (size_t)mrows * d, e->hidden + (size_t)s->row0 * d, sizeof(float) * r * d);
            mrows += r;
        }
        if (m > 0 && model_mtp_decode(e->m, e->fs, 0, e->batch, m, e->mtp_hidden, NULL, NULL, err)) return -1;
    }
    // the forward's time, shared between decoding and prefill by rows
    double dt = now_s() - t0;
    e->stats.decode_s += dt * drows / rows;
    e->stats.prefill_s += dt * (rows - drows) / rows;
    if (e->o.profile) {  // (this step's drafts too: the profile is taken once a step, here)
        DecodeProfile pf;
        forward_state_profile_take(e->fs, &pf);
        DecodeProfile *sum = &e->stats.decode_profile;
        if (np == 0) {
            sum->steps += pf.steps, sum->seconds += pf.seconds, sum->products += pf.products;
            sum->attention += pf.attention, sum->meetings += pf.meetings;
        }
    }
    int lrow = 0;  // the next row of logits
    for (int i = 0; i < n; i++) {
        Seq *s = order[i];
        int nd = s->n_draft, a = 0, done = 0;
        const float *lg0 = e->logits + (size_t)lrow * V;
        lrow += 1 + nd;
        if (s->state != SEQ_RUNNING) continue;  // cancelled by an owner's callback this step
        int n0 = s->kv.len - 1 - nd;  // the position of `last`
        if (e->K > 0) s->kv.mtp_len[0] = n0;  // the chained rows go; the verify rows become pending
        for (int j = 0; j <= nd && !done; j++) {
            const float *lg = lg0 + (size_t)j * V;
            int ok, y = judge(e, s, lg, V, j < nd ? s->draft[j] : -1, &ok);
            if (e->K > 0) {
                s->pend_tok[j] = y;
                memcpy(s->pend_h + (size_t)j * d, e->hidden + (size_t)(s->row0 + j) * d, sizeof(float) * d);
                s->n_pend = j + 1;
            }
            s->kv.len = n0 + j + 1;  // positions up to n0 + j hold verified tokens
            e->stats.decode_tokens++;
            done = emit(e, s, y, lg);
            if (!ok) break;
            a++;
        }
        e->stats.draft_tokens += nd;
        e->stats.accepted_tokens += a < nd ? a : nd;
        if (s->state == SEQ_RUNNING) publish(e, s);
    }
    for (int i = 0; i < np; i++) {
        Seq *s = ps[i];
        int piece = s->piece, ends = s->prefilled + piece == s->n_prompt, plp = s->p.prompt_logprobs;
        const float *lg = e->logits + (size_t)lrow * V;  // its first row's logits
        lrow += plp ? piece : ends;
        s->piece = 0;
        e->stats.prompt_tokens += piece;
        if (s->state != SEQ_RUNNING) continue;  // cancelled by an owner's callback this step
        int p0 = s->prefilled;
        s->prefilled += piece;
        publish(e, s);
        if (plp && report_prompt(e, s, p0, piece, lg)) continue;  // the owner cancelled it
        if (ends) prompt_done(e, s, plp ? lg + (size_t)(piece - 1) * V : lg, e->hidden + (size_t)(s->row0 + piece - 1) * d);
    }
    return 0;
}

int engine_step(Engine *e, Error *err) {
    int used = 0;  // prompt positions this step
    if (admit(e, err) || prefill_plain(e, &used, err) || step_forward(e, used, err) || admit(e, err)) return -1;
    return refresh_stats(e);
}
