// The decode step: the next rows of several sequences (one token each in batched decoding, K + 1
// in a speculative verification) through every layer with absorbed attention, in ONE parallel
// region.
//
// Decoding is bound by streaming the weights, and at a few rows the matrices are small (an expert
// of a 100M model is 256 x 512). Forking a team per product spends much of the step starting and
// joining threads, so here the team is formed once per step and every product is split between
// its threads by output rows (in proportion to their measured speeds: share_rows), with a barrier
// only where the next phase reads the whole of what the previous one wrote. Small per-row work (the
// RMSNorms, the router's top-k, the dispatch) is repeated by every thread into its own scratch
// instead of costing a barrier.
//
// Batch invariance: every product is matmul_nt_invariant (one chain per output element, whatever
// the number of rows or the split), attention runs per sequence, and the MoE sums each token's
// experts in a fixed order (its routed experts in selection order, then the shared experts) — so a
// row's bits depend only on its sequence, never on the rest of the batch or the thread count.
//
// Phases of a layer, each ending in a barrier:
//   q_a / q_proj and kv_a rows  →  q_b rows, the cache rows  →  attention (sequence, head) items
//   (a batch of several sequences: each thread's whole sequences, W_UK to W_UV, own_sequences)
//   →  o_proj rows + residual  →  router rows (thread 0's, meanwhile the other threads start the
//   shared experts, a flag instead of a barrier)  →  expert gate/up rows, then the down matrices
//   of the experts whose rows are all this thread's (from 8 rows: whole experts from a counter)
//   →  the split experts' down features  →  every row's sum of its experts + residual       (MoE)
//   →  gate/up rows  →  down rows + residual                                                (dense)
#include <math.h>
#include <omp.h>
#include <string.h>

#include "kernels/convert.h"
#include "kernels/matmul.h"
#include "kernels/ops.h"
#include "model/forward_internal.h"
#include "model/layer.h"
#include "model/moe.h"

// Output rows are handed out in units of 32: threads never write the same cache line, and a
// weight panel's rows (matmul.h: 32 per panel) are never split between threads, each of which
// would read the whole panel.
#define SHARE_UNIT 32

// The profile (forward_state_profile): this thread's time since its last mark goes to a kind of work.
static void prof_mark(ForwardState *s, int kind) {
    if (!s->profile) return;
    double now = omp_get_wtime(), *p = s->prof + PROFILE_LINE * omp_get_thread_num();
    p[kind] += now - p[PROFILE_LAST];
    p[PROFILE_LAST] = now;
}

// A profiled step's start on each thread (t0: when the call began — the batch's setup and the
// team's forming count as the products' time) and its end.
static void prof_begin(ForwardState *s, double t0) {
    if (s->profile) s->prof[PROFILE_LINE * omp_get_thread_num() + PROFILE_LAST] = t0;
}

static void prof_end(ForwardState *s, double t0) {
    if (!s->profile) return;
    s->prof_steps++;
    s->prof_seconds += omp_get_wtime() - t0;
}

// The team's threads meet (between the phases of a step: all of a phase's outputs written before
// any thread reads them). A TeamBarrier rather than OpenMP's: a step meets ~10 times per layer.
// The phase before a meeting is a product's unless marked otherwise (prof_mark).
static void meet(ForwardState *s) {
    prof_mark(s, PROFILE_PRODUCTS);
    team_barrier_wait(&s->meet, omp_get_num_threads());
    prof_mark(s, PROFILE_MEETINGS);
}

// A meeting after which this thread's first product is the pieces pc: their first lines are
// requested while the meeting lasts (after arriving, so that the last thread in lets the others go
// before it makes its requests), not after it, when every thread starts its phase with a pipeline
// of misses.
static void meet_ahead(ForwardState *s, const NtPiece *pc, int n) {
    prof_mark(s, PROFILE_PRODUCTS);
    TeamTicket t = team_barrier_arrive(&s->meet, omp_get_num_threads());
    matmul_nt_pieces_ahead(pc, n);
    team_barrier_await(&s->meet, t);
    prof_mark(s, PROFILE_MEETINGS);
}

// [*b, *e) of n for this thread of the team.
static void share(int n, int unit, int *b, int *e) {
    int nt = omp_get_num_threads(), t = omp_get_thread_num();
    long units = (n + unit - 1) / unit, lo = units * t / nt * unit, hi = units * (t + 1) / nt * unit;
    *b = (int)(lo < n ? lo : n);
    *e = (int)(hi < n ? hi : n);
}

// Threads' speeds differ on a shared host: the vCPU taking the host's interrupts ran 10-25% slower
// than its partner for minutes at a time, and the partner then waited at every meeting. So the
// products' output rows go to the threads in proportion to their speed (s->share_cut): each thread
// times its share of those products (share_time), and after a step the cuts move toward equal times
// (share_rebalance). The MoE gate/up rows, shared out by an estimated cost, keep cuts of their own,
// which also correct the estimate (one cut for both would trade one phase's wait for the other's).
// Rows only move between threads and every output is still one chain, so the bits do not change.

// The start of thread t's share of a kind of work (SHARE_KINDS), as a fraction of it (every thread
// computes the same cuts).
static double share_at(const ForwardState *s, int kind, int t) {
    int nt = omp_get_num_threads();
    return nt == s->nthreads ? s->share_cut[kind * (nt + 1) + t] : (double)t / nt;
}

// [*b, *e) of n output rows for this thread, in SHARE_UNITs, by the measured shares.
static void share_rows(const ForwardState *s, int n, int *b, int *e) {
    int t = omp_get_thread_num();
    long units = (n + SHARE_UNIT - 1) / SHARE_UNIT;
    long lo = lround(units * share_at(s, 0, t)) * SHARE_UNIT, hi = lround(units * share_at(s, 0, t + 1)) * SHARE_UNIT;
    *b = (int)(lo < n ? lo : n);
    *e = (int)(hi < n ? hi : n);
}

// [*h0, *h1) of H heads for thread t of one sequence's step: whole heads at the measured shares
// (with 8 heads an equal split until one thread is ~30% faster). Attention and, in a few-row step,
// q_b's columns follow the same cut.
static void share_heads(const ForwardState *s, int H, int t, int *h0, int *h1) {
    *h0 = (int)lround(H * share_at(s, 0, t));
    *h1 = (int)lround(H * share_at(s, 0, t + 1));
}

// Adds the seconds since t0 to this thread's time in its shares of a kind of work this step.
static void share_time(ForwardState *s, int kind, double t0) {
    int nt = omp_get_num_threads();
    if (nt == s->nthreads) s->share_busy[16 * (kind * nt + omp_get_thread_num())] += (float)(omp_get_wtime() - t0);
}

// After a step (outside the team): each thread's share moved part of the way toward its speed's
// share (work done over time taken), within [1/2, 3/2] of an equal share — a step's timing is noisy.
#define SHARE_STEP 0.2
static void share_rebalance_kind(ForwardState *s, int kind) {
    int nt = s->nthreads, ok = 1;
    const float *cut = s->share_cut + kind * (nt + 1);
    float *busy = s->share_busy + 16 * kind * nt;
    double speed[nt], total = 0, f[nt];
    for (int t = 0; t < nt; t++) {
        f[t] = cut[t + 1] - cut[t];
        speed[t] = busy[16 * t] > 0 && f[t] > 0 ? f[t] / busy[16 * t] : 0;
        ok &= speed[t] > 0;  // a thread without a timed share this step: nothing to compare
        total += speed[t];
        busy[16 * t] = 0;
    }
    if (!ok) return;
    for (int t = 0; t < nt; t++) {
        f[t] += SHARE_STEP * (speed[t] / total - f[t]);
        f[t] = f[t] < 0.5 / nt ? 0.5 / nt : f[t] > 1.5 / nt ? 1.5 / nt : f[t];
    }
    share_cuts_set(s, kind, f);
}

static void share_rebalance(ForwardState *s) {
    if (s->nthreads < 2 || s->share_fixed) return;
    for (int k = 0; k < SHARE_KINDS; k++) share_rebalance_kind(s, k);
}

// The batch of one step: rows of sequences, sequence i owning rows [row0[i], row0[i] + T).
typedef struct {
    const DecodeSeq *seqs;
    int n_seqs, N;
    int row0[DECODE_MAX_SEQS];
    int pos0[DECODE_MAX_SEQS];  // each sequence's first new position in the layer being run
    int by_work[DECODE_MAX_SEQS];  // the sequences by their attention's work (rows x positions), most first
} Batch;

// A thread's private vectors, carved from s->own: every thread normalises and routes all rows for
// itself rather than wait at a barrier for one thread to do it.
typedef struct {
    float *xn;        // (N, d) the normed input of a sub-layer
    float *cq;        // (N, q_lora) the normed q latents
    float *cat;       // (N, 2d) the MTP input
    float *xin;       // (N, d) an expert's tokens' inputs, gathered
    float *scores;    // (N_r) router scores of one token
    float *gw;        // (N, K_r) gating weights of the chosen experts
    int *idx;         // (N, K_r) the chosen experts
    int *slot_of;     // (N, K_r) slot of choice (t, k) in the expert-sorted order
    int *slot_tok;    // (N·K_r) the token each slot serves
    int *expert_off;  // (N_r + 1) each expert's slots
    float *attn;      // this thread's attention scratch
    int failed;       // a product of this thread failed (out of kernel scratch)
    const LayerWeights *next_layer;  // the layer after the one running (NULL: none): its first lines are
                                     // requested at the last meeting of this one
} Own;

size_t decode_own_floats(const ModelConfig *c, int rows) {
    size_t d = c->hidden_size, K = c->num_experts_per_tok > 0 ? c->num_experts_per_tok : 1;
    return (size_t)rows * (4 * d + c->q_lora_rank + 4 * K) + 2 * (size_t)c->n_routed_experts + 1;
}

static Own own_vectors(const ModelConfig *c, ForwardState *s) {
    int t = omp_get_thread_num(), K = c->num_experts_per_tok > 0 ? c->num_experts_per_tok : 1, R = s->max_decode;
    size_t d = c->hidden_size;
    Own o;
    o.xn = s->own + (size_t)t * s->own_per_thread;
    o.cq = o.xn + R * d;
    o.cat = o.cq + (size_t)R * c->q_lora_rank;
    o.xin = o.cat + 2 * R * d;
    o.scores = o.xin + R * d;
    o.gw = o.scores + c->n_routed_experts;
    o.idx = (int *)(o.gw + (size_t)R * K);  // int and float have the same size
    o.slot_of = o.idx + (size_t)R * K;
    o.slot_tok = o.slot_of + (size_t)R * K;
    o.expert_off = o.slot_tok + (size_t)R * K;
    o.attn = s->attn + (size_t)t * s->attn_per_thread;
    o.failed = 0;
    o.next_layer = NULL;
    return o;
}

// This thread's output rows of out (N, w->rows) = x (N, cols) · Wᵀ.
static int gemv_share(ForwardState *s, float *out, const float *x, const MatView *w, int N) {
    int b, e;
    double t0 = omp_get_wtime();
    share_rows(s, w->rows, &b, &e);
    int rc = matmul_nt_invariant(out, w->rows, x, w->cols, w, N, b, e);
    share_time(s, 0, t0);
    return rc;
}

// This thread's output rows of each piece's w (its r0, r1 set here), one stream of weights.
static int gemv_share_pieces(ForwardState *s, NtPiece *pc, int n) {
    double t0 = omp_get_wtime();
    for (int i = 0; i < n; i++) share_rows(s, pc[i].w->rows, &pc[i].r0, &pc[i].r1);
    int rc = matmul_nt_pieces(pc, n);
    share_time(s, 0, t0);
    return rc;
}

// The meeting at a layer's end: the next layer's first products, q_a's and kv_a's rows of this
// thread, requested while it lasts.
static void meet_before_layer(const ModelConfig *c, ForwardState *s, const Own *ts, int N) {
    NtPiece pc[2];
    int n = 0;
    if (ts->next_layer) {
        const MlaWeights *a = &ts->next_layer->self_attn;
        pc[n++] = (NtPiece){.w = c->q_lora_rank > 0 ? &a->q_a_proj : &a->q_proj, .N = N};
        pc[n++] = (NtPiece){.w = &a->kv_a_proj_with_mqa, .N = N};
        for (int i = 0; i < n; i++) share_rows(s, pc[i].w->rows, &pc[i].r0, &pc[i].r1);
    }
    meet_ahead(s, pc, n);
}

// x += o_proj · attn (or down · act): this thread's features of y, then of x, for all N rows.
static int gemv_share_residual(ForwardState *s, float *x, float *y, const float *in, const MatView *w, int N) {
    int b, e, d = w->rows;
    double t0 = omp_get_wtime();
    share_rows(s, d, &b, &e);
    int rc = matmul_nt_invariant(y, d, in, w->cols, w, N, b, e);
    for (int n = 0; n < N; n++) {
        float *xr = x + (size_t)n * d, *yr = y + (size_t)n * d;
#pragma omp simd
        for (int r = b; r < e; r++) xr[r] += yr[r];
    }
    share_time(s, 0, t0);
    return rc;
}

// The rows of sequence i in the store of one layer: position pos → row of the pool's layer.
static size_t store_row(const KVCache *kv, int pos) {
    return latent_store_row(kv->blocks, kv->pool->block_size, 0, 0, pos);
}

// Does sequence i of the step spread its attention's chunks over the threads? With few rows and
// at least two chunks per thread: with fewer, a wave of one chunk per thread would leave threads
// idle (at 1,025-2,048 positions one of two threads did a whole chunk, the other a few
// positions), and the split by heads keeps them all busy — the same bits either way.
static int long_context(const Batch *bt, int i) {
    int chunks = (bt->pos0[i] + bt->seqs[i].T + LATENT_CHUNK - 1) / LATENT_CHUNK;
    return bt->seqs[i].T <= LONG_ROWS && chunks > 1 && chunks >= 2 * omp_get_num_threads();
}

// Steps of one sequence of up to this many rows take decode_mla's path without the meetings around
// q_b (a speculative verification's K + 1; one thread stores their cache rows).
#define FLAG_MAX_ROWS 9

// Does the step fold W_UK into the queries and apply W_UV itself, one product per head over every
// row, rather than attention doing it per (row, head)? With several sequences (each weight then
// serves them all at once), more rows of one than FLAG_MAX_ROWS (a prompt piece: one product per
// head over its rows — a piece of 128 rows alone 2-3% faster, 15 of 20 and 50 of 60 rounds), or
// one whose chunks spread over the threads (else every chunk would fold its queries again), and
// room for their rows; the products are the same, so are the bits.
static int latent_fold(const Batch *bt, const ForwardState *s) {
    return (bt->n_seqs > 1 || long_context(bt, 0) || bt->N > FLAG_MAX_ROWS) && bt->N <= s->latent_rows;
}

// The absorbed attention call of sequence i in layer l (its rows' queries, rotated, in s->q).
static LatentAttention decode_attention(const Model *m, ForwardState *s, const Batch *bt, int l, int i,
                                        const MlaWeights *w) {
    const ModelConfig *c = &m->cfg;
    const KVCache *kv = bt->seqs[i].kv;
    int H = c->num_attention_heads, qk = config_qk_head_dim(c), row0 = bt->row0[i];
    LayerPass p = {.c = c, .B = 1, .T = bt->seqs[i].T, .pos0 = bt->pos0[i], .softmax_scale = m->softmax_scale,
                   .latent = kvcache_latent(kv, c, l), .kpe = kvcache_kpe(kv, c, l), .blocks = kv->blocks,
                   .block_size = kv->pool->block_size, .store = kv->dtype, .mode = ATTN_ABSORBED};
    LatentAttention at = mla_attention_call(&p, w, s->q + (size_t)row0 * H * qk,
                                            s->ao + (size_t)row0 * H * c->v_head_dim, NULL, NULL);
    if (latent_fold(bt, s)) {
        at.q_latent = s->q_latent + (size_t)row0 * H * c->kv_lora_rank;
        at.out_latent = s->out_latent + (size_t)row0 * H * c->kv_lora_rank;
    }
    return at;
}

// q_pe of rows [r0, r1) and heads [h0, h1), rotated in place in s->q.
static void rotate_queries(const ModelConfig *c, ForwardState *s, int r0, int r1, int h0, int h1) {
    int H = c->num_attention_heads, qk = config_qk_head_dim(c), nope = c->qk_nope_head_dim, r = c->qk_rope_head_dim;
    for (int n = r0; n < r1; n++)
        for (int h = h0; h < h1; h++)
            rope_forward(s->q + ((size_t)n * H + h) * qk + nope, r, s->rope_cos + (size_t)n * (r / 2),
                         s->rope_sin + (size_t)n * (r / 2));
}

// A batched step's W_UK,hᵀ q_nope into s->q_latent, and W_UV applied to s->out_latent into s->ao,
// for rows [r0, r1) and heads [h0, h1): one product per head over the rows (latent_fold).
static void fold_queries(const Model *m, ForwardState *s, const Batch *bt, int l, const MlaWeights *a, int r0, int r1,
                         int h0, int h1, Own *ts) {
    const ModelConfig *c = &m->cfg;
    int H = c->num_attention_heads, qk = config_qk_head_dim(c), L = c->kv_lora_rank;
    LatentAttention shape = decode_attention(m, s, bt, l, 0, a);  // (its weights and widths)
    ts->failed |= latent_attention_fold_queries(&shape, h0, h1, s->q + (size_t)r0 * H * qk, H * qk, r1 - r0,
                                                s->q_latent + (size_t)r0 * H * L, H * L) != 0;
}

static void apply_w_uv(const Model *m, ForwardState *s, const Batch *bt, int l, const MlaWeights *a, int r0, int r1,
                       int h0, int h1, Own *ts) {
    const ModelConfig *c = &m->cfg;
    int H = c->num_attention_heads, v = c->v_head_dim, L = c->kv_lora_rank;
    LatentAttention shape = decode_attention(m, s, bt, l, 0, a);  // (its weights and widths)
    ts->failed |= latent_attention_apply_w_uv(&shape, h0, h1, s->out_latent + (size_t)r0 * H * L, H * L, r1 - r0,
                                              s->ao + (size_t)r0 * H * v, H * v) != 0;
}

// Does each thread take whole sequences of a batched step through the rest of attention — the q_pe
// rotation, W_UK folded into their queries, attention, W_UV — with no meeting between those
// phases? With several sequences, at least one a thread, none whose chunks spread over the threads,
// and the fold's room (latent_fold): a sequence's rows then stay in one core's cache from its
// queries to its outputs (split by heads, each phase read half its rows from the other core), two
// meetings a layer fewer. The same products per row: the same bits. (v3-108m FP8, 48 positions,
// one process switching every few steps: 64 sequences +2.0%, 15 of 20 rounds; 16 +2.3%, 17 of 20;
// 16 at 512 positions +1.4%, 7 of 12; BF16, 32 sequences +3.4%, 11 of 16; 4 sequences -0.7%, 8 of
// 20; 16 and 64 of 32-932 positions, where the shared counter balanced whole sequences, -0.1% and
// +2.6%.)
static int own_sequences(const Batch *bt, const ForwardState *s) {
    if (bt->n_seqs < omp_get_num_threads() || bt->n_seqs < 2 || !latent_fold(bt, s)) return 0;
    for (int i = 0; i < bt->n_seqs; i++)
        if (long_context(bt, i)) return 0;
    return 1;
}

// Sequence i's work in own_sequences' split: its attention (rows x positions) and its rows' W_UK
// and W_UV products, in positions' worth.
static double own_work(const ModelConfig *c, const Batch *bt, int i) {
    int L = c->kv_lora_rank, r = c->qk_rope_head_dim;
    double per_row = (double)(c->qk_nope_head_dim + c->v_head_dim) * L / (2.0 * L + r);
    return (double)bt->seqs[i].T * (bt->pos0[i] + bt->seqs[i].T + per_row);
}

// This thread's sequences [i0, i1) of the batch, in batch order, cut by work at the threads'
// measured shares of the products.
static void own_range(const ModelConfig *c, const ForwardState *s, const Batch *bt, int *i0, int *i1) {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    double total = 0, acc = 0;
    for (int i = 0; i < bt->n_seqs; i++) total += own_work(c, bt, i);
    double lo = t ? total * share_at(s, 0, t) : -1, hi = t == nt - 1 ? total + 1 : total * share_at(s, 0, t + 1);
    *i0 = *i1 = 0;
    for (int i = 0; i < bt->n_seqs; i++) {
        double w = own_work(c, bt, i), mid = acc + w / 2;  // a sequence goes where its middle falls
        if (mid <= lo) *i0 = i + 1;
        if (mid <= hi) *i1 = i + 1;
        acc += w;
    }
}

static void attend_own_sequences(const Model *m, ForwardState *s, const Batch *bt, int l, const MlaWeights *a,
                                 Own *ts) {
    const ModelConfig *c = &m->cfg;
    int H = c->num_attention_heads, i0, i1;
    own_range(c, s, bt, &i0, &i1);
    if (i0 >= i1) return;
    int r0 = bt->row0[i0], r1 = bt->row0[i1 - 1] + bt->seqs[i1 - 1].T;
    rotate_queries(c, s, r0, r1, 0, H);
    fold_queries(m, s, bt, l, a, r0, r1, 0, H, ts);
    for (int i = i0; i < i1; i++) {
        LatentAttention at = decode_attention(m, s, bt, l, i, a);
        ts->failed |= latent_attention_absorbed_part(&at, 0, H, ts->attn);
    }
    apply_w_uv(m, s, bt, l, a, r0, r1, 0, H, ts);
}

// x += MLA(RMSNorm(x)) for every row; appends the rows to their sequences' caches (layer l).
static void decode_mla(const Model *m, ForwardState *s, const Batch *bt, int l, const LayerWeights *lw, Own *ts) {
    const ModelConfig *c = &m->cfg;
    const MlaWeights *a = &lw->self_attn;
    int N = bt->N, d = c->hidden_size, H = c->num_attention_heads, qk = config_qk_head_dim(c);
    int r = c->qk_rope_head_dim, L = c->kv_lora_rank, qr = c->q_lora_rank, hr = r / 2;
    float eps = c->rms_norm_eps;
    // (every thread has taken its last MoE unit of the layer before — they all passed the meeting
    // after it — and meets the others at least once before taking one of this layer's)
    if (omp_get_thread_num() == 0) atomic_store(&s->moe_next, 0);
    rmsnorm_forward(ts->xn, NULL, s->x, lw->input_layernorm, N, d, eps);
    {
        const MatView *wq = qr > 0 ? &a->q_a_proj : &a->q_proj, *wkv = &a->kv_a_proj_with_mqa;
        NtPiece pc[2] = {{.w = wq, .x = ts->xn, .ldx = d, .N = N, .out = qr > 0 ? s->qa : s->q, .ldo = wq->rows},
                         {.w = wkv, .x = ts->xn, .ldx = d, .N = N, .out = s->kva, .ldo = wkv->rows}};
        ts->failed |= gemv_share_pieces(s, pc, 2);
    }
    const int one = bt->n_seqs == 1 && N <= FLAG_MAX_ROWS && !long_context(bt, 0), self = omp_get_thread_num();
    int h0, h1;
    share_heads(s, H, self, &h0, &h1);
    {
        NtPiece next = {.w = &a->q_b_proj, .r0 = h0 * qk, .r1 = h1 * qk, .N = N};
        meet_ahead(s, &next, one && qr > 0);
    }
    // A few rows of one sequence (a plain decode step, a speculative verification): each thread's
    // share of q_b is the columns of the heads it attends for, whose q_pe it rotates itself, and
    // the new cache rows, stored by one thread, are awaited with a flag rather than a meeting —
    // nothing else in between needs the other threads' work. Two meetings a layer fewer: one
    // token, v3-108m FP8 +2% and +5.6% (13 and 16 of 20 rounds taking turns), v3-deep FP8 +1.5%
    // (14 of 16), BF16 within the noise; `make demo`'s model speculating K = 2 +4% (10 of 12),
    // plain +5.3% (12 of 12). The same products: the same bits.
    const int stored = team_barrier_passed(&s->meet);
    {
        // this thread's rows of the cache (a few of one sequence: all the last thread's) normalised
        // and rotated in place in kva, then stored in the cache's element type; then its share of
        // q_b. (Split by rows: at 16 rows one thread storing them all kept the other waiting ~50 us
        // a layer, the rows' halves written by both threads' kv_a shares.)
        int kb, ke;
        share(N, 1, &kb, &ke);
        if (one) kb = self == omp_get_num_threads() - 1 ? 0 : N, ke = N;
        for (int i = 0; i < bt->n_seqs; i++) {
            const KVCache *kv = bt->seqs[i].kv;
            char *lat = kvcache_latent(kv, c, l), *kpe = kvcache_kpe(kv, c, l);
            size_t es = dtype_size(kv->dtype);
            for (int t = 0; t < bt->seqs[i].T; t++) {
                int n = bt->row0[i] + t;
                if (n < kb || n >= ke) continue;
                float *row = s->kva + (size_t)n * (L + r);
                size_t at = store_row(kv, bt->pos0[i] + t);
                rmsnorm_forward(row, NULL, row, a->kv_a_layernorm, 1, L, eps);
                rope_forward(row + L, r, s->rope_cos + (size_t)n * hr, s->rope_sin + (size_t)n * hr);
                if (kv->dtype == DT_F32) {
                    memcpy(lat + at * L * es, row, sizeof(float) * L);
                    memcpy(kpe + at * r * es, row + L, sizeof(float) * r);
                } else {
                    bf16_from_f32_n((uint16_t *)lat + at * L, row, L);
                    bf16_from_f32_n((uint16_t *)kpe + at * r, row + L, r);
                }
            }
        }
        if (one && kb < ke) team_flag_raise(&s->row_stored, stored);
    }
    if (qr > 0) {
        rmsnorm_forward(ts->cq, NULL, s->qa, a->q_a_layernorm, N, qr, eps);
        if (one) {
            double t0 = omp_get_wtime();
            ts->failed |= matmul_nt_invariant(s->q, H * qk, ts->cq, qr, &a->q_b_proj, N, h0 * qk, h1 * qk);
            share_time(s, 0, t0);
        } else ts->failed |= gemv_share(s, s->q, ts->cq, &a->q_b_proj, N);
    }
    if (one) {
        rotate_queries(c, s, 0, N, h0, h1);
        prof_mark(s, PROFILE_PRODUCTS);
        team_flag_wait(&s->row_stored, stored);
        prof_mark(s, PROFILE_MEETINGS);
        if (h0 < h1) {
            LatentAttention at = decode_attention(m, s, bt, l, 0, a);
            ts->failed |= latent_attention_absorbed_part(&at, h0, h1, ts->attn);
        }
        prof_mark(s, PROFILE_ATTENTION);
        NtPiece next = {.w = &a->o_proj, .N = N};
        share_rows(s, d, &next.r0, &next.r1);
        meet_ahead(s, &next, 1);
        ts->failed |= gemv_share_residual(s, s->x, s->y, s->ao, &a->o_proj, N);
meet(s);
        return;
    }
    // (no thread takes attention units between the previous layer's attention and this one's)
    if (omp_get_thread_num() == 0) atomic_store(&s->attn_next, 0), atomic_store(&s->chunk_next, 0);
meet(s);
    if (own_sequences(bt, s)) {
        attend_own_sequences(m, s, bt, l, a, ts);
        prof_mark(s, PROFILE_ATTENTION);
meet(s);
        ts->failed |= gemv_share_residual(s, s->x, s->y, s->ao, &a->o_proj, N);
meet(s);
        return;
    }
    int rb, re, hb, he;  // q_pe rotated first, by rows: a long context's chunks read every head's query
    share(N, 1, &rb, &re);
    share(H, 1, &hb, &he);
    rotate_queries(c, s, rb, re, 0, H);
    const int fold = latent_fold(bt, s);
    prof_mark(s, PROFILE_PRODUCTS);
    if (fold) fold_queries(m, s, bt, l, a, 0, N, hb, he, ts);  // meanwhile (q_nope is not rotated), by heads
    prof_mark(s, PROFILE_ATTENTION);
meet(s);
    // The other sequences. Several: units taken in turn from a shared counter, so that a thread
    // slowed down leaves more of them to the others instead of keeping them waiting (on the VMs
    // here the vCPU taking the host's interrupts ran 10-20% slower: a step of 16 sequences at
    // 512-640 positions waited 0.4-0.5 ms of ~9 ms at the meeting after attention with a static
    // split). A unit is a whole sequence when there are at least two per thread, else 1/nth of its
    // heads: a unit's heads score its cache together, each cached row loaded once for all of them
    // (halves of every sequence made attention ~25% slower at 16 sequences). The sequences with the
    // most work go first, so that the last units taken are short ones (16 sequences of 32-932
    // positions, v3-108m FP8: +3.6%, 14 of 16 rounds; in the batch's order a long one taken last
    // kept the other thread waiting). A unit's bits do not depend on which thread runs it.
    int nth = omp_get_num_threads();
    if (bt->n_seqs > 1) {
        int groups = bt->n_seqs >= 2 * nth ? 1 : nth;  // units per sequence
        for (int n_units = bt->n_seqs * groups;;) {
            int u = atomic_fetch_add(&s->attn_next, 1);
            if (u >= n_units) break;
            int i = bt->by_work[u / groups], h0 = H * (u % groups) / groups, h1 = H * (u % groups + 1) / groups;
            if (long_context(bt, i) || h0 >= h1) continue;
            LatentAttention at = decode_attention(m, s, bt, l, i, a);
            ts->failed |= latent_attention_absorbed_part(&at, h0, h1, ts->attn);
        }
    }
    // One: its heads split by the threads' measured shares (share_heads), a thread's heads scoring
    // the cache together, so each cached row is read once per thread, not once per head.
    if (bt->n_seqs == 1 && !long_context(bt, 0)) {  // (h0, h1: share_heads above)
        if (h0 < h1) {
            LatentAttention at = decode_attention(m, s, bt, l, 0, a);
            ts->failed |= latent_attention_absorbed_part(&at, h0, h1, ts->attn);
        }
    }
    prof_mark(s, PROFILE_ATTENTION);
    // A sequence with several chunks of cache and few rows: its chunks spread over the threads, so
    // the cache is read once per step, not once per thread. A wave of as many chunks as the parts
    // hold (all of them, up to 128K positions of a one-row step), each taken in turn from a shared
    // counter — a thread slowed down leaves more of them to the other — then merged in chunk order
    // by entries: the same bits as one thread going chunk after chunk. (A wave of one chunk per
    // thread, as before, met twice per chunk pair: at 32K positions the threads waited at those
    // meetings ~19% of a step.)
    int nt = omp_get_num_threads(), claims = 0;  // chunk_next's claims so far, the same count on every thread
    for (int i = 0; i < bt->n_seqs; i++) {
        if (!long_context(bt, i)) continue;
        LatentAttention at = decode_attention(m, s, bt, l, i, a);
        int chunks = latent_attention_chunk_count(&at), E = H * bt->seqs[i].T, e0, e1;
        size_t part = (size_t)E * (c->kv_lora_rank + 2);
        int slots = (int)((size_t)LONG_SLOTS * nt * LONG_ROWS * H * (c->kv_lora_rank + 2) / part);
        share(E, 1, &e0, &e1);
        for (int w0 = 0; w0 < chunks; w0 += slots) {
            int wn = chunks - w0 < slots ? chunks - w0 : slots;
            for (;;) {  // every thread ends with one claim past the wave: nt of them a wave
                int k = atomic_fetch_add(&s->chunk_next, 1) - claims;
                if (k >= wn) break;
                ts->failed |= latent_attention_chunk(&at, w0 + k, s->attn_parts + k * part, ts->attn);
            }
            claims += wn + nt;
            prof_mark(s, PROFILE_ATTENTION);
meet(s);
            for (int k = 0; k < wn; k++)
                latent_attention_merge(&at, e0, e1, s->attn_parts + k * part, s->attn_state, w0 + k == 0);
            prof_mark(s, PROFILE_ATTENTION);
meet(s);
        }
        ts->failed |= latent_attention_finish(&at, e0, e1, s->attn_state, ts->attn);
        prof_mark(s, PROFILE_ATTENTION);
    }
meet(s);
    if (fold) {  // W_UV applied to every row's latent output, by heads
        apply_w_uv(m, s, bt, l, a, 0, N, hb, he, ts);
        prof_mark(s, PROFILE_ATTENTION);
meet(s);
    }
    ts->failed |= gemv_share_residual(s, s->x, s->y, s->ao, &a->o_proj, N);
meet(s);
}

// The gate/up rows of a MoE step (the experts in use, F rows each, then the shared experts' Fs)
// are shared out by cost, not by count: a row costs widening/reading its weights once plus a dot
// product per token it serves, so an expert chosen by six tokens weighs more than one chosen by
// one. In units of one token's dot product, reading a row costs about this many.
#define MOE_ROW_READ_COST 4.0

// The first row at which the cumulative cost reaches `target`, in whole SHARE_UNITs of an expert's
// rows (every thread computes the same boundaries, so the shares tile the rows exactly).
static int moe_row_at_cost(const int *off, int Nr, int F, int Fs, int N, const MoeParallel *mp, double target) {
    double acc = 0;
    int base = 0;
    for (int x = 0; x <= Nr; x++) {
        int rows = x < Nr ? F : Fs, nt = x < Nr ? off[x + 1] - off[x] : N;
        if (rows <= 0 || nt == 0 || (x < Nr && mp && !mp->ops->holds(mp, x))) continue;
        double per = MOE_ROW_READ_COST + nt;
        if (target < acc + rows * per) {
            int in = (int)((target - acc) / per) / SHARE_UNIT * SHARE_UNIT;
            return base + (in < rows ? in : rows);
        }
        acc += rows * per;
        base += rows;
    }
    return base;
}

// The gate and up pieces of rows [lo, hi) of an expert (its own F rows each, or the shared
// experts' Fs) over n tokens, from `in` (n rows of d), into gate and up (rows ld apart), appended
// to pc[*np]; run_gate_up multiplies the pieces as one stream of weights, then applies SwiGLU.
static void gate_up_pieces(NtPiece *pc, int *np, const FfnWeights *f, const float *in, int d, int n, float *gate,
                           float *up, int ld, int lo, int hi) {
    pc[(*np)++] = (NtPiece){.w = &f->gate_proj, .r0 = lo, .r1 = hi, .x = in, .ldx = d, .N = n, .out = gate, .ldo = ld};
    pc[(*np)++] = (NtPiece){.w = &f->up_proj, .r0 = lo, .r1 = hi, .x = in, .ldx = d, .N = n, .out = up, .ldo = ld};
}

static void run_gate_up(const NtPiece *pc, int np, Own *ts) {
    ts->failed |= matmul_nt_pieces(pc, np) != 0;
    for (int i = 0; i < np; i += 2) {
        const NtPiece *g = &pc[i], *u = &pc[i + 1];
        for (int j = 0; j < g->N; j++) {
            float *gr = g->out + (size_t)j * g->ldo + g->r0;
            swiglu_forward(gr, gr, u->out + (size_t)j * u->ldo + u->r0, g->r1 - g->r0);
        }
    }
}

// Routed expert x's tokens' inputs (slots off[x] .. off[x + 1]): the one token's row of xn, or
// several gathered into xin.
static const float *expert_input(const ModelConfig *c, const int *off, int x, Own *ts) {
    int d = c->hidden_size, nt = off[x + 1] - off[x];
    if (nt == 1) return ts->xn + (size_t)ts->slot_tok[off[x]] * d;
    for (int j = 0; j < nt; j++)
        memcpy(ts->xin + (size_t)j * d, ts->xn + (size_t)ts->slot_tok[off[x] + j] * d, sizeof(float) * d);
    return ts->xin;
}

// Rows [lo, hi) of routed expert x's gate and up pieces over its tokens: into e_gate's and
// e_up's rows of its slots.
static void expert_gate_up_pieces(const ModelConfig *c, ForwardState *s, const MoeWeights *w, int x, const int *off,
                                  const float *in, int lo, int hi, NtPiece *pc, int *np) {
    int F = c->moe_intermediate_size;
    gate_up_pieces(pc, np, &w->experts[x], in, c->hidden_size, off[x + 1] - off[x], s->e_gate + (size_t)off[x] * F,
                   s->e_up + (size_t)off[x] * F, F, lo, hi);
}

// Features [b, e) of routed expert x's down projection over its tokens (into e_out's rows of its
// slots), a piece.
static NtPiece expert_down_piece(const ModelConfig *c, ForwardState *s, const MoeWeights *w, int x, const int *off,
                                 int b, int e) {
    int d = c->hidden_size, F = c->moe_intermediate_size;
    return (NtPiece){.w = &w->experts[x].down_proj, .r0 = b, .r1 = e, .x = s->e_gate + (size_t)off[x] * F, .ldx = F,
                     .N = off[x + 1] - off[x], .out = s->e_out + (size_t)off[x] * d, .ldo = d};
}

static NtPiece shared_down_piece(const ModelConfig *c, ForwardState *s, const MoeWeights *w, int N, int b, int e) {
    int Fs = c->n_shared_experts * c->moe_intermediate_size;
    return (NtPiece){.w = &w->shared_experts.down_proj, .r0 = b, .r1 = e, .x = s->gate, .ldx = Fs, .N = N,
                     .out = s->y, .ldo = c->hidden_size};
}

// From this many rows a step's expert gate/up work is taken in units of a whole expert from a
// shared counter instead of shared out by cost beforehand: a thread slowed down by its vCPU's
// share of the host then does fewer (at 16 sequences the static split left one thread waiting
// 0.25-0.6 ms of ~9 ms at the meeting after it). At a few rows the units are too small for it —
// handing rows out dynamically to a single sequence's step was slower (the counter's line moving
// between the cores, each thread's reads no longer one stream).
#define MOE_DYNAMIC_MIN_ROWS 8

// Unit u of a MoE step's shared counter (decode_moe): shared expert u's F rows over all N tokens,
// or expert in_use[u - n_shared] over its tokens — its gate and up, SwiGLU, then, when down_done,
// its down projection, all features: three whole matrices a unit, its SwiGLU output still in this
// core's cache (split by features after the meeting, each thread read half of every expert's
// down matrix, a stream too short to reach full speed: 16 sequences of v3-108m FP8 +4.2%, 18 of 20
// rounds; BF16 +2.1%). The same products, cut into other row ranges: the same bits. 0 past the
// last unit. (A shared expert's unit reads nothing of the routing: in_use and off may be NULL.)
static int moe_unit(const ModelConfig *c, ForwardState *s, const MoeWeights *w, int u, int n_shared,
                    const int *in_use, int used, const int *off, int N, int down_done, Own *ts) {
    int d = c->hidden_size, F = c->moe_intermediate_size, Fs = c->n_shared_experts * F, np = 0;
    NtPiece pc[2], down;
    if (u < n_shared) {
        gate_up_pieces(pc, &np, &w->shared_experts, ts->xn, d, N, s->gate, s->up, Fs, u * F, (u + 1) * F);
        down = shared_down_piece(c, s, w, N, 0, d);
    } else if (u - n_shared < used) {
        int x = in_use[u - n_shared];
        expert_gate_up_pieces(c, s, w, x, off, expert_input(c, off, x, ts), 0, F, pc, &np);
        down = expert_down_piece(c, s, w, x, off, 0, d);
    } else {
        return 0;
    }
    run_gate_up(pc, np, ts);
    if (down_done) ts->failed |= matmul_nt_pieces(&down, 1) != 0;
    return 1;
}

// Does the last thread start on the shared experts while thread 0 computes the router? They need
// no routing. In a few-row step (the static split by cost), with two threads or more, when the
// shared experts' rows lie in the last thread's share however the tokens are routed: their cost
// over the least the routed experts can cost (K experts, N tokens each) within its share. Every
// thread decides alike (the cuts change only between steps). The same products: the same bits.
// (v3-deep FP8 at 576 positions, one process switching every 16 steps: meetings 372 -> 318 us a
// step, tokens/s +1.0% median, faster in 38 of 60 rounds; again +2.5%, 33 of 60; v3-108m +0.5%,
// 33 of 60 — one barrier's wait a MoE layer, ~1% of a step.)
static int shared_first(const ModelConfig *c, const ForwardState *s, int N, const MoeParallel *mp) {
    int nth = omp_get_num_threads(), F = c->moe_intermediate_size, Fs = c->n_shared_experts * F;
    if (nth < 2 || N >= MOE_DYNAMIC_MIN_ROWS || Fs <= 0 || mp) return 0;
    double routed = (double)c->num_experts_per_tok * F * (MOE_ROW_READ_COST + N), shared = (double)Fs * (MOE_ROW_READ_COST + N);
    return shared / (routed + shared) <= 1.0 - share_at(s, 1, nth - 1);
}

// Features of an expert's down matrix that go with the first r of its `rows` gate/up rows, in
// whole SHARE_UNITs (the same boundary for the two threads it lies between).
static int down_feature_at(int d, int r, int rows) {
    return r >= rows ? d : (int)((long)d * r / rows) / SHARE_UNIT * SHARE_UNIT;
}

// A few-row MoE step's down projections, after this thread's gate/up rows [b, e) of the experts in
// use (then the shared experts' Fs rows): the down matrix of every expert whose gate/up rows are
// all this thread's, all its features, at once — then, after the other threads' gate/up rows are
// done (a meeting whose wait the whole experts fill), its part of the features of each expert
// whose rows it shares with another thread, in proportion to its part of the rows. Each thread so
// reads whole down matrices, long streams, where splitting every expert's down by features gave
// each thread short ones (an expert of v3-108m: 256 rows of K = 256, 8 KiB panels in FP8): FP8
// down matrices of 512 x 256 alone from memory, 2 threads, whole 45-46 GB/s against split 38-40.
// One token at 576 positions, one process switching every 16 steps: v3-108m FP8 +1.8% and +0.9%
// (23 and 18 of 30 rounds), v3-deep FP8 +4.2% and +0.5% (22 and 23 of 30), v3-wide FP8 +2.5% (9
// of 16); BF16 +0.5% and +1.2%. The same products into the same outputs: the same bits.
static void down_by_owner(const ModelConfig *c, ForwardState *s, const MoeWeights *w, const int *off, int N, int b,
                          int e, const MoeParallel *mp, Own *ts) {
    int d = c->hidden_size, F = c->moe_intermediate_size, Nr = c->n_routed_experts, Fs = c->n_shared_experts * F;
    NtPiece whole[Nr + 1], split[Nr + 1];
    int n_whole = 0, n_split = 0;
    for (int x = 0, base = 0; x <= Nr; x++) {  // the experts in use in gate/up's order, then the shared ones
        int rows = x < Nr ? F : Fs;
        if (rows <= 0 || (x < Nr && (off[x + 1] == off[x] || (mp && !mp->ops->holds(mp, x))))) continue;
        int lo = b > base ? b : base, hi = e < base + rows ? e : base + rows;
        if (lo < hi) {
            int fb = down_feature_at(d, lo - base, rows), fe = down_feature_at(d, hi - base, rows);
            NtPiece p = x < Nr ? expert_down_piece(c, s, w, x, off, fb, fe) : shared_down_piece(c, s, w, N, fb, fe);
            if (lo == base && hi == base + rows) whole[n_whole++] = p;
            else if (fe > fb) split[n_split++] = p;
        }
        base += rows;
    }
    double t0 = omp_get_wtime();
    prof_mark(s, PROFILE_PRODUCTS);
    TeamTicket t = team_barrier_arrive(&s->meet, omp_get_num_threads());
    ts->failed |= matmul_nt_pieces(whole, n_whole) != 0;
    share_time(s, 1, t0);
    prof_mark(s, PROFILE_PRODUCTS);
    team_barrier_await(&s->meet, t);
    prof_mark(s, PROFILE_MEETINGS);
    t0 = omp_get_wtime();
    ts->failed |= matmul_nt_pieces(split, n_split) != 0;
    share_time(s, 1, t0);
}

// A row's features [b, e) of x += its routed experts' sum (acc: those features, from b) and, with
// shared experts, their output ys. (Vectorised: the compiler would not, x and ys may alias; a
// 16-sequence step of v3-108m spent ~12 us a layer here.)
static void add_expert_sums(float *x, const float *acc, const float *ys, int b, int e) {
    if (ys) {
#pragma omp simd
        for (int r = b; r < e; r++) x[r] += acc[r - b] + ys[r];
    } else {
#pragma omp simd
        for (int r = b; r < e; r++) x[r] += acc[r - b];
    }
}

// The routed experts and the shared experts of every row. Each thread routes every row and sorts
// the choices by expert (slots: expert by expert, tokens in order), then the experts' gate and up
// rows, over all experts in use, are shared out over the team by cost (moe_row_at_cost), and their
// down matrices go with them (down_by_owner); after a barrier each thread owns a slice of the
// output features and sums every token's experts into it — routed in selection order, then the
// shared experts, the order a token alone would use. From MOE_DYNAMIC_MIN_ROWS rows the experts
// are instead taken whole (gate, up and down) from a shared counter (with several shared experts,
// whose one down matrix is split by features after the barrier). Adds the result to x.
// With the experts split over ranks (m->moe_parallel; every rank runs the same rows) a rank runs
// only the experts it holds; each row's routed sum of those is added up over the ranks in rank
// order (by thread 0, MPI's thread) before the shared experts join it — another order than one
// process's, but the same on every rank and, per row, whatever else is in the batch.
static void decode_moe(const Model *m, ForwardState *s, const MoeWeights *w, int N, Own *ts) {
    const ModelConfig *c = &m->cfg;
    int d = c->hidden_size, K = c->num_experts_per_tok, F = c->moe_intermediate_size, Nr = c->n_routed_experts;
    int Fs = c->n_shared_experts * F;
    MoeParallel *mp = m->moe_parallel;
    int used = 0, R, b, e, nth = omp_get_num_threads(), tid = omp_get_thread_num();
    // From MOE_DYNAMIC_MIN_ROWS rows the experts are units taken from a shared counter: each shared
    // expert's F rows over all N tokens (the largest, so first), then each expert in use. A
    // unit's down projection too, all its features, right after its gate and up (when there is one
    // shared expert: several share one down matrix, which stays split by features).
    const int dynamic = N >= MOE_DYNAMIC_MIN_ROWS && nth > 1, n_shared = Fs > 0 ? c->n_shared_experts : 0;
    const int down_done = dynamic && n_shared <= 1;
    int pending = -1, in_use[Nr];  // (pending: a routed expert's unit taken before the routing)
    // The router's outputs: shared out, then a meeting; or, with the shared experts first, all of
    // them thread 0's, awaited on a flag meanwhile the shared experts run — a few rows: the last
    // thread's share of their gate and up (shared_first; the router is 32 rows of v3-deep, one
    // thread's SHARE_UNIT anyway, the other had waited ~1.8 us a layer at the meeting after it);
    // more rows: the other threads take units from the counter, the shared experts' first.
    const int early = dynamic ? n_shared > 0 && !mp : shared_first(c, s, N, mp), done = team_barrier_passed(&s->meet);
    const double t_moe = omp_get_wtime();
    if (!early) {
        ts->failed |= gemv_share(s, s->router, ts->xn, &w->gate, N);
meet(s);
    } else if (tid == 0) {
        ts->failed |= matmul_nt_invariant(s->router, Nr, ts->xn, d, &w->gate, N, 0, Nr) != 0;
        team_flag_raise(&s->router_done, done);
    } else {
        while (dynamic) {
            int u = atomic_fetch_add(&s->moe_next, 1);
            if (u >= n_shared) {
                pending = u;
                break;
            }
            moe_unit(c, s, w, u, n_shared, NULL, 0, NULL, N, down_done, ts);
        }
        if (!dynamic && tid == nth - 1) {
            NtPiece pc[2];
            int np = 0;
            gate_up_pieces(pc, &np, &w->shared_experts, ts->xn, d, N, s->gate, s->up, Fs, 0, Fs);
            run_gate_up(pc, np, ts);
        }
        prof_mark(s, PROFILE_PRODUCTS);
        team_flag_wait(&s->router_done, done);
        prof_mark(s, PROFILE_MEETINGS);
    }
    for (int n = 0; n < N; n++)
        moe_route(c, s->router + (size_t)n * Nr, w->e_score_correction_bias, ts->scores, ts->idx + (size_t)n * K,
                  ts->gw + (size_t)n * K);
    int *off = ts->expert_off;
    memset(off, 0, sizeof(int) * (Nr + 1));
    for (int i = 0; i < N * K; i++) off[ts->idx[i] + 1]++;
    for (int e = 0; e < Nr; e++) off[e + 1] += off[e];
    int cursor[Nr];  // slot of choice (t, k): the next free slot of its expert, tokens in order
    memcpy(cursor, off, sizeof(int) * Nr);
    for (int i = 0; i < N * K; i++) {
        int sl = cursor[ts->idx[i]]++;
        ts->slot_of[i] = sl;
        ts->slot_tok[sl] = i / K;
    }
    // gate and up rows: experts in use (each F rows over its tokens), then the shared experts
    if (dynamic) {
        // (the experts in use listed in the same order on every thread)
        for (int x = 0; x < Nr; x++)
            if (off[x + 1] > off[x] && (!mp || mp->ops->holds(mp, x))) in_use[used++] = x;
        for (int u = pending >= 0 ? pending : atomic_fetch_add(&s->moe_next, 1);; u = atomic_fetch_add(&s->moe_next, 1))
            if (!moe_unit(c, s, w, u, n_shared, in_use, used, off, N, down_done, ts)) break;
    } else {
        // (shared experts first: the router's time, or theirs, counts too — the cut evens out ends)
        double cost = 0, t0 = early ? t_moe : omp_get_wtime();
        for (int x = 0; x < Nr; x++)
            if (off[x + 1] > off[x] && (!mp || mp->ops->holds(mp, x))) used++, cost += F * (MOE_ROW_READ_COST + off[x + 1] - off[x]);
        R = used * F + (Fs > 0 ? Fs : 0);
        cost += Fs > 0 ? Fs * (MOE_ROW_READ_COST + N) : 0;
        b = tid == 0 ? 0 : moe_row_at_cost(off, Nr, F, Fs, N, mp, cost * share_at(s, 1, tid));
        e = tid == nth - 1 ? R : moe_row_at_cost(off, Nr, F, Fs, N, mp, cost * share_at(s, 1, tid + 1));
        // this thread's rows of every expert's gate and up as one stream of pieces (up to an expert
        // of several tokens: its gathered inputs' buffer is the next one's)
        NtPiece pc[2 * Nr + 2];
        int np = 0;
        for (int x = 0, base = 0; x < Nr && base < e; x++) {
            int nt = off[x + 1] - off[x];
            if (nt == 0 || (mp && !mp->ops->holds(mp, x))) continue;
            int lo = b > base ? b - base : 0, hi = e - base < F ? e - base : F;
            base += F;
            if (lo >= hi) continue;
            expert_gate_up_pieces(c, s, w, x, off, expert_input(c, off, x, ts), lo, hi, pc, &np);
            if (nt > 1) run_gate_up(pc, np, ts), np = 0;
        }
        if (Fs > 0 && !early) {
            int lo = b - used * F, hi = e - used * F;
            lo = lo < 0 ? 0 : lo;
            hi = hi > Fs ? Fs : hi;
            if (lo < hi) gate_up_pieces(pc, &np, &w->shared_experts, ts->xn, d, N, s->gate, s->up, Fs, lo, hi);
        }
        run_gate_up(pc, np, ts);
        share_time(s, 1, t0);
        down_by_owner(c, s, w, off, N, b, e, mp, ts);
    }
    // this thread's features: with several shared experts after the counter's units, of every
    // slot's down projection and of the shared experts', as one stream of pieces (their first
    // lines requested at the meeting); then every row's sum of its experts
    share_rows(s, d, &b, &e);
    NtPiece down[Nr + 1];
    int n_down = 0;
    if (dynamic && !down_done && e > b) {
        for (int x = 0; x < Nr; x++)
            if (off[x + 1] > off[x] && (!mp || mp->ops->holds(mp, x))) down[n_down++] = expert_down_piece(c, s, w, x, off, b, e);
        if (Fs > 0) down[n_down++] = shared_down_piece(c, s, w, N, b, e);
    }
    meet_ahead(s, down, n_down);
    double t0 = omp_get_wtime();
    if (e > b) {
        ts->failed |= matmul_nt_pieces(down, n_down) != 0;
        for (int n = 0; n < N; n++) {
            float *x = s->x + (size_t)n * d, *ys = s->y + (size_t)n * d, *part = s->xg + (size_t)n * d;
            // the row's routed sum over this thread's features: its choices computed on this rank
            // (all of them without mp) in selection order, into part (mp: this rank's part, summed
            // over the ranks below) or the gathered inputs' scratch, free now
            float *acc = mp ? part + b : ts->xin;
            memset(acc, 0, sizeof(float) * (e - b));
            for (int k = 0; k < K; k++)
                if (!mp || mp->ops->holds(mp, ts->idx[n * K + k]))
                    axpy_f32(acc, ts->gw[n * K + k], s->e_out + (size_t)ts->slot_of[n * K + k] * d + b, e - b);
            if (!mp) add_expert_sums(x, acc, Fs > 0 ? ys : NULL, b, e);
        }
    }
    share_time(s, 0, t0);
    meet_before_layer(c, s, ts, N);
    if (!mp) return;
    // s->xg (N, d): free in decoding, the routed parts of every row
#pragma omp master
    ts->failed |= mp->ops->sum_rows(mp, s->xg, (long)N * d, &m->be->err) != 0;
meet(s);
    if (e > b)
        for (int n = 0; n < N; n++) {
            float *x = s->x + (size_t)n * d, *ys = s->y + (size_t)n * d, *part = s->xg + (size_t)n * d;
            add_expert_sums(x, part + b, Fs > 0 ? ys : NULL, b, e);
        }
meet(s);
}

// x += FFN(RMSNorm(x)): the dense SwiGLU or the MoE.
static void decode_ffn(const Model *m, ForwardState *s, const LayerWeights *lw, int N, Own *ts) {
    const ModelConfig *c = &m->cfg;
    rmsnorm_forward(ts->xn, NULL, s->x, lw->post_attention_layernorm, N, c->hidden_size, c->rms_norm_eps);
    if (lw->is_moe) {
        decode_moe(m, s, &lw->moe, N, ts);
        return;
    }
    const FfnWeights *f = &lw->mlp;
    int b, e, F = c->intermediate_size;
    double t0 = omp_get_wtime();
    share_rows(s, F, &b, &e);
    NtPiece pc[2];
    int np = 0;
    gate_up_pieces(pc, &np, f, ts->xn, c->hidden_size, N, s->gate, s->up, F, b, e);
    run_gate_up(pc, np, ts);
    share_time(s, 0, t0);
meet(s);
    ts->failed |= gemv_share_residual(s, s->x, s->y, s->gate, &f->down_proj, N);
    meet_before_layer(c, s, ts, N);
}

// logits = head · norm(x) for the rows that want them (each sequence's last T − skip_logits),
// packed in row order; hidden (N, d) = norm(x) when asked.
static void decode_head(const Model *m, ForwardState *s, const Batch *bt, const float *norm, const MatView *head,
                        float *logits, float *hidden, Own *ts) {
    const ModelConfig *c = &m->cfg;
    size_t d = c->hidden_size;
    rmsnorm_forward(ts->xn, NULL, s->x, norm, bt->N, c->hidden_size, c->rms_norm_eps);
    if (hidden && omp_get_thread_num() == 0) memcpy(hidden, ts->xn, sizeof(float) * bt->N * d);
    if (!logits) return;
    int rows = 0;  // the wanted rows moved to the front of this thread's own copy (never upwards)
    for (int i = 0; i < bt->n_seqs; i++) {
        int skip = bt->seqs[i].skip_logits, n = bt->seqs[i].T - skip;
        if (n > 0 && rows != bt->row0[i] + skip)
            memmove(ts->xn + rows * d, ts->xn + (size_t)(bt->row0[i] + skip) * d, sizeof(float) * n * d);
        rows += n;
    }
    if (rows > 0) ts->failed |= gemv_share(s, logits, ts->xn, head, rows);
}

// Sequence i's attention work in a step: its rows times the positions they see (about).
static long attention_work(const Batch *bt, int i) { return (long)bt->seqs[i].T * (bt->pos0[i] + bt->seqs[i].T); }

// Checks the batch, lays out its rows and the RoPE angles of their positions (pos0 of each
// sequence: kv->len, or kv->mtp_len[mtp] for an MTP module), and makes room in the caches.
static int batch_begin(const Model *m, ForwardState *s, const DecodeSeq *seqs, int n_seqs, int mtp, Batch *bt,
                       Error *err) {
    const ModelConfig *c = &m->cfg;
    if (n_seqs < 1 || n_seqs > DECODE_MAX_SEQS)
        return err_set(err, "decode: %d sequences in a step (1 .. %d)", n_seqs, DECODE_MAX_SEQS);
    bt->seqs = seqs;
    bt->n_seqs = n_seqs;
    bt->N = 0;
    for (int i = 0; i < n_seqs; i++) {
        const DecodeSeq *q = &seqs[i];
        int pos0 = mtp < 0 ? q->kv->len : q->kv->mtp_len[mtp];
        if (q->T < 1) return err_set(err, "decode: sequence %d has %d new tokens", i, q->T);
        if (q->skip_logits < 0 || q->skip_logits > q->T)
            return err_set(err, "decode: sequence %d skips the logits of %d of its %d rows", i, q->skip_logits, q->T);
        if (pos0 + q->T > s->capacity)
            return err_set(err, "decode: positions up to %d exceed the forward state's %d", pos0 + q->T, s->capacity);
        for (int t = 0; t < q->T; t++)
            if (q->tokens[t] < 0 || q->tokens[t] >= c->vocab_size)
                return err_set(err, "token %d at position %d is outside the vocabulary [0, %d)", q->tokens[t], pos0 + t,
                               c->vocab_size);
        if (kvcache_reserve(q->kv, pos0 + q->T, err)) return -1;
        bt->row0[i] = bt->N;
        bt->pos0[i] = pos0;
        bt->N += q->T;
    }
    if (bt->N > s->max_decode)
        return err_set(err, "decode: %d rows in a step, the forward state holds %d", bt->N, s->max_decode);
    for (int i = 0; i < n_seqs; i++) {  // (insertion: at most DECODE_MAX_SEQS; ties keep the batch's order)
        int j = i;
        for (; j > 0 && attention_work(bt, bt->by_work[j - 1]) < attention_work(bt, i); j--) bt->by_work[j] = bt->by_work[j - 1];
        bt->by_work[j] = i;
    }
    int hr = c->qk_rope_head_dim / 2;
    for (int i = 0; i < n_seqs; i++)
        rope_table(s->rope_cos + (size_t)bt->row0[i] * hr, s->rope_sin + (size_t)bt->row0[i] * hr, seqs[i].T,
                   c->qk_rope_head_dim, bt->pos0[i], m->inv_freq, m->rope_mscale);
    return 0;
}

// Every thread's failure, as the step's: 0, or -1 with err set.
static int step_result(int failed, Error *err) {
    return failed ? err_set(err, "decode step: out of memory for kernel scratch") : 0;
}

int model_decode(const Model *m, ForwardState *s, const DecodeSeq *seqs, int n_seqs, float *logits, float *hidden,
                 Error *err) {
    const ModelConfig *c = &m->cfg;
    const double t0 = s->profile ? omp_get_wtime() : 0;
    Batch bt;
    if (batch_begin(m, s, seqs, n_seqs, -1, &bt, err)) return -1;
    int failed = 0, d = c->hidden_size;
    for (int i = 0; i < n_seqs; i++)
        for (int t = 0; t < seqs[i].T; t++)
            failed |= matview_row_f32(&m->w.embed_tokens, seqs[i].tokens[t], s->x + (size_t)(bt.row0[i] + t) * d) != 0;
#pragma omp parallel num_threads(s->nthreads) reduction(| : failed)
    {
        Own ts = own_vectors(c, s);
        prof_begin(s, t0);
        for (int l = 0; l < c->num_hidden_layers; l++) {
            ts.next_layer = l + 1 < c->num_hidden_layers ? &m->w.layers[l + 1] : NULL;
            decode_mla(m, s, &bt, l, &m->w.layers[l], &ts);
            decode_ffn(m, s, &m->w.layers[l], bt.N, &ts);
        }
        decode_head(m, s, &bt, m->w.norm, &m->w.lm_head, logits, hidden, &ts);
        prof_mark(s, PROFILE_PRODUCTS);
        failed |= ts.failed != 0;
    }
    for (int i = 0; i < n_seqs; i++) seqs[i].kv->len += seqs[i].T;
    share_rebalance(s);
    prof_end(s, t0);
    return step_result(failed, err);
}

int model_mtp_decode(const Model *m, ForwardState *s, int k, const DecodeSeq *seqs, int n_seqs, const float *hidden,
                     float *logits, float *hidden_out, Error *err) {
    const ModelConfig *c = &m->cfg;
    if (k < 0 || k >= m->w.n_mtp) return err_set(err, "MTP module %d: the model has %d MTP modules loaded", k, m->w.n_mtp);
    for (int i = 0; i < n_seqs; i++)
        if (k >= seqs[i].kv->n_mtp) return err_set(err, "MTP module %d: sequence %d's cache has no layer for it", k, i);
    const MtpWeights *w = &m->w.mtp[k];
    const double t0 = s->profile ? omp_get_wtime() : 0;
    Batch bt;
    if (batch_begin(m, s, seqs, n_seqs, k, &bt, err)) return -1;
    int failed = 0, d = c->hidden_size, N = bt.N;
    for (int i = 0; i < n_seqs; i++)
        for (int t = 0; t < seqs[i].T; t++)
            failed |= matview_row_f32(&w->embed_tokens, seqs[i].tokens[t], s->emb + (size_t)(bt.row0[i] + t) * d) != 0;
#pragma omp parallel num_threads(s->nthreads) reduction(| : failed)
    {
        Own ts = own_vectors(c, s);
        prof_begin(s, t0);
        // the embedding half comes first, as in the released checkpoints (SPEC §2.3)
        for (int n = 0; n < N; n++) {
            rmsnorm_forward(ts.cat + (size_t)n * 2 * d, NULL, s->emb + (size_t)n * d, w->enorm, 1, d, c->rms_norm_eps);
            rmsnorm_forward(ts.cat + (size_t)n * 2 * d + d, NULL, hidden + (size_t)n * d, w->hnorm, 1, d, c->rms_norm_eps);
        }
        ts.failed |= gemv_share(s, s->x, ts.cat, &w->eh_proj, N);
meet(s);
        decode_mla(m, s, &bt, c->num_hidden_layers + k, &w->layer, &ts);
        decode_ffn(m, s, &w->layer, N, &ts);
        decode_head(m, s, &bt, w->shared_head_norm, &w->shared_head_head, logits, hidden_out, &ts);
        prof_mark(s, PROFILE_PRODUCTS);
        failed |= ts.failed != 0;
    }
    for (int i = 0; i < n_seqs; i++) seqs[i].kv->mtp_len[k] += seqs[i].T;
    share_rebalance(s);
    prof_end(s, t0);
    return step_result(failed, err);
}
