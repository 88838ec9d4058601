// expert_parallel.h: the MoE seam over an all-to-all of packed rows.
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "dist/expert_parallel.h"
#include "kernels/convert.h"
#include "kernels/gemm_lowp.h"
#include "kernels/logfmt.h"
#include "model/tensors.h"

// What a part of one MoE layer's tokens leaves for the backward pass. With overlap a layer's
// tokens go in two chunks, so that one chunk's all-to-all is in flight while the other's experts
// run. Rows are received tokens (i), slots are (received token, chosen expert held here) pairs
// sorted by expert.
typedef struct EpChunk {
    int t0, N;         // this rank's tokens [t0, t0 + N)
    int Ns, Rn, S;     // rows sent, rows received, slots
    int *send_counts;  // (E) rows sent to each rank
    int *recv_counts;  // (E) rows received from each rank
    int *expert_off;   // (experts per rank + 1) each local expert's slots
    int *send_tok;     // (Ns) the local token of each sent row, grouped by destination in rank order
    int *rec;          // (Rn, K) each received token's choice k: the slot serving it here, or -1
    float *gate;       // (Rn, K) its gates (0 where not held here)
    int *slot_src;     // (S) the received token each slot serves
    int *slot_k;       // (S) and which of its choices
    float *xg, *eo;    // (S, d) the slot's input, the expert's output
    float *eg, *eu, *eh;  // (S, moe_inter) the expert's SwiGLU activations
    size_t cap_send, cap_recv, cap_slots;
} EpChunk;

typedef struct EpLayer {
    int N, n_chunks;   // this rank's tokens in the last forward, in 1 or 2 chunks
    EpChunk ch[2];
} EpLayer;

// A chunk's transient buffers (one set per chunk: both may be in flight): packed rows out and
// in, and the backward's per-row and per-slot scratch.
typedef struct EpBuffers {
    char *out, *in;
    float *rows, *sums;
    float *de_out, *dxg, *deg, *deu, *deh;
    size_t cap_out, cap_in, cap_rows, cap_sums, cap_dslots;
    DistExchange x;  // its exchange in flight
} EpBuffers;

struct ExpertParallel {
    MoeParallel seam;  // first: the seam's pointer is the ExpertParallel's
    MoeParallel replicated;  // the replicated-token seam (inference)
    DistSum *sum;            // its all-reduce
    DistComm *comm;
    int E, rank, per_rank;  // ranks, this one, experts per rank
    int ranks_per_node;     // a rank's node: rank / ranks_per_node
    int overlap;            // two chunks per layer, one's exchange in flight while the other computes
    const ModelConfig *c;
    int n_layers;
    EpLayer *layers;   // (num_hidden_layers + num_nextn_predict_layers), by HF layer index
    A2aDtype dispatch, combine;  // the payloads' formats (see expert_parallel.h)
    EpBuffers buf[2];
    ExpertParallelStats st;
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// Makes room for n units in each of `count` arrays of 4-byte elements, unit i of array a being
// per[a] elements; *cap counts units and grows by half again. Contents are kept. -1: no memory.
static int reserve(size_t *cap, size_t n, int count, void **arrays[], const size_t per[]) {
    if (n <= *cap) return 0;
    size_t want = n + n / 2 + 16;
    for (int a = 0; a < count; a++) {
        void *q = realloc(*arrays[a], want * per[a] * 4);
        if (!q) return -1;
        *arrays[a] = q;
    }
    *cap = want;
    return 0;
}

// One array of floats or ints, n elements.
static int grow(void *p, size_t *cap, size_t n) {
    const size_t one = 1;
    return reserve(cap, n, 1, (void **[]){(void **)p}, &one);
}

int expert_parallel_holds(const ExpertParallel *ep, int e) { return e / ep->per_rank == ep->rank; }

ExpertParallelStats expert_parallel_take_stats(ExpertParallel *ep) {
    ExpertParallelStats s = ep->st;
    memset(&ep->st, 0, sizeof ep->st);
    return s;
}

// ---- rows on the wire ----
// A row is d values in the payload's format, then `extra` 32-bit words (choices, gates).

// Bytes of d values: fp32 4d, bf16 2d, fp8 d codes + one fp32 scale per 1 × 128 tile.
// LogFMT: its own tiles (logfmt_row_bytes).
size_t a2a_row_bytes(int d, A2aDtype t) {
    switch (t) {
    case A2A_FP32: return 4 * (size_t)d;
    case A2A_BF16: return 2 * (size_t)d;
    case A2A_FP8: return (size_t)d + 4 * (size_t)((d + 127) / 128);
    case A2A_LOGFMT8: return logfmt_row_bytes(d, 8);
    default: return logfmt_row_bytes(d, 10);
    }
}

size_t expert_parallel_pair_bytes(int d, int K, A2aDtype t, int backward) {
    A2aDtype combine = t == A2A_FP32 ? A2A_FP32 : A2A_BF16;  // as expert_parallel_new sets them
    size_t c = a2a_row_bytes(d, combine);
    return a2a_row_bytes(d, t) + 8 * (size_t)K + c + (backward ? 2 * c + 4 * (size_t)K : 0);
}

int a2a_dtype_parse(const char *s, A2aDtype *t) {
    static const char *const names[] = {"fp32", "bf16", "fp8", "logfmt8", "logfmt10"};
    for (int i = 0; i < 5; i++)
        if (strcmp(s, names[i]) == 0) return *t = (A2aDtype)i, 0;
    return -1;
}

void a2a_encode_row(char *dst, const float *x, int d, A2aDtype t) {
    if (t == A2A_LOGFMT8 || t == A2A_LOGFMT10) {
        logfmt_encode_row((uint8_t *)dst, x, d, t == A2A_LOGFMT8 ? 8 : 10);
    } else if (t == A2A_FP32) {
        memcpy(dst, x, 4 * (size_t)d);
    } else if (t == A2A_BF16) {
        for (int j = 0; j < d; j++) {
            uint16_t h = bf16_from_f32(x[j]);
            memcpy(dst + 2 * j, &h, 2);
        }
    } else {  // E4M3 with a scale per 1 × 128 tile, as DeepSeek's dispatch sends them
        float scales[(d + 127) / 128];
        lowp_fp8_save_rows((uint8_t *)dst, scales, x, 1, d, 0);
        memcpy(dst + d, scales, sizeof scales);
    }
}

void a2a_decode_row(float *x, const char *src, int d, A2aDtype t) {
    if (t == A2A_LOGFMT8 || t == A2A_LOGFMT10) {
        logfmt_decode_row(x, (const uint8_t *)src, d, t == A2A_LOGFMT8 ? 8 : 10);
    } else if (t == A2A_FP32) {
        memcpy(x, src, 4 * (size_t)d);
    } else if (t == A2A_BF16) {
        for (int j = 0; j < d; j++) {
            uint16_t h;
            memcpy(&h, src + 2 * j, 2);
            x[j] = bf16_to_f32(h);
        }
    } else {
        float scales[(d + 127) / 128];
        memcpy(scales, src + d, sizeof scales);
        lowp_fp8_restore_rows(x, (const uint8_t *)src, scales, 1, d);
    }
}

// ---- exchanges ----

// Starts the all-to-all of rows of row_bytes from b->out (send_counts rows to each rank) into b->in
// (recv_counts rows from each); what leaves this rank is added to *bytes and to the node counts.
static int exchange_start(ExpertParallel *ep, EpBuffers *b, const int *send_counts, const int *recv_counts,
                          size_t row_bytes, double *bytes, Error *err) {
    for (int r = 0; r < ep->E; r++) {
        if (r == ep->rank) continue;
        double n = (double)send_counts[r] * row_bytes;
        *bytes += n;
        if (r / ep->ranks_per_node == ep->rank / ep->ranks_per_node) ep->st.intra_node_bytes += n;
        else ep->st.inter_node_bytes += n;
    }
    return dist_alltoallv_start(ep->comm, b->out, send_counts, b->in, recv_counts, row_bytes, &b->x, err);
}

// Waits for b's exchange: the time blocked is the communication this rank did not hide; the time
// from start to completion is what it took in flight.
static int exchange_wait(ExpertParallel *ep, EpBuffers *b, Error *err) {
    double t0 = now_s();
    int rc = dist_exchange_wait(&b->x, err);
    ep->st.wait_s += now_s() - t0;
    ep->st.exchange_s += b->x.done_s - b->x.started_s;
    return rc;
}

// Lets MPI move the exchanges in flight on (it does so only inside its calls): called between the
// experts' products.
static int progress(ExpertParallel *ep, Error *err) {
    for (int i = 0; i < 2; i++) {
        int done;
        if (ep->buf[i].x.req && dist_exchange_test(&ep->buf[i].x, &done, err)) return -1;
    }
    return 0;
}

// Room for n rows of row_bytes in a byte buffer.
static int grow_bytes(char **p, size_t *cap, size_t n, size_t row_bytes) {
    return grow(p, cap, (n * row_bytes + 3) / 4);  // (grow counts 4-byte units)
}

// ---- forward ----

// Plans chunk C (each token once to every rank holding one of its experts, grouped by rank), packs
// its rows and starts their dispatch: [input (d, in the dispatch format) | K choices: the expert's
// index on that rank or −1 | K gates].
static int dispatch_start(ExpertParallel *ep, EpChunk *C, EpBuffers *b, const LayerActs *a, Error *err) {
    const ModelConfig *c = ep->c;
    int E = ep->E, K = c->num_experts_per_tok, d = c->hidden_size, P = ep->per_rank;
    size_t pay = a2a_row_bytes(d, ep->dispatch), row_bytes = pay + 8 * (size_t)K;
    memset(C->send_counts, 0, sizeof(int) * E);
    for (int t = C->t0; t < C->t0 + C->N; t++) {
        unsigned char to[E], node[E];
        memset(to, 0, E);
        memset(node, 0, E);
        int nodes = 0;
        for (int k = 0; k < K; k++) {
            int r = a->topk_idx[(size_t)t * K + k] / P;
            to[r] = 1;
            nodes += !node[r / ep->ranks_per_node];
            node[r / ep->ranks_per_node] = 1;
        }
        for (int r = 0; r < E; r++) C->send_counts[r] += to[r];
        ep->st.token_nodes += nodes;
        if (nodes > ep->st.max_nodes) ep->st.max_nodes = nodes;
    }
    C->Ns = 0;
    for (int r = 0; r < E; r++) C->Ns += C->send_counts[r];
    if (grow(&C->send_tok, &C->cap_send, C->Ns) || grow_bytes(&b->out, &b->cap_out, C->Ns, row_bytes))
        return err_set(err, "expert parallel: out of memory");
    for (int r = 0, j = 0; r < E; r++)
        for (int t = C->t0; t < C->t0 + C->N; t++) {
            const int *idx = a->topk_idx + (size_t)t * K;
            int here = 0;
            for (int k = 0; k < K; k++) here |= idx[k] / P == r;
            if (!here) continue;
            char *row = b->out + (size_t)j * row_bytes;
            a2a_encode_row(row, a->ln2 + (size_t)t * d, d, ep->dispatch);
            for (int k = 0; k < K; k++) {
                int32_t local = idx[k] / P == r ? idx[k] - r * P : -1;
                float gate = local >= 0 ? a->topk_w[(size_t)t * K + k] : 0.0f;
                memcpy(row + pay + 4 * k, &local, 4);
                memcpy(row + pay + 4 * (K + k), &gate, 4);
            }
            C->send_tok[j++] = t;
        }
    ep->st.tokens += C->N;
    ep->st.token_ranks += C->Ns;
    double t0 = now_s();
    TRY(dist_alltoall_int(ep->comm, C->send_counts, C->recv_counts, err));
    ep->st.wait_s += now_s() - t0;
    ep->st.exchange_s += now_s() - t0;
    C->Rn = 0;
    for (int r = 0; r < E; r++) C->Rn += C->recv_counts[r];
    if (grow_bytes(&b->in, &b->cap_in, C->Rn, row_bytes) ||
        reserve(&C->cap_recv, C->Rn, 2, (void **[]){(void **)&C->rec, (void **)&C->gate}, (size_t[]){K, K}))
        return err_set(err, "expert parallel: out of memory");
    return exchange_start(ep, b, C->send_counts, C->recv_counts, row_bytes, &ep->st.dispatch_bytes, err);
}

// Chunk C's dispatch has arrived: its slots (received tokens in order — source rank, then its
// token order — each choice held here), this rank's experts over them, and one row per received
// token back (its gated outputs of the experts held here, in choice order), started.
static int experts_forward(ExpertParallel *ep, EpChunk *C, EpBuffers *b, const LayerPass *p, const MoeWeights *w,
                           Error *err) {
    const ModelConfig *c = ep->c;
    int K = c->num_experts_per_tok, d = c->hidden_size, Fm = c->moe_intermediate_size, P = ep->per_rank;
    int e0 = ep->rank * P;
    size_t pay = a2a_row_bytes(d, ep->dispatch), row_bytes = pay + 8 * (size_t)K;
    int cnt[P + 1];
    memset(cnt, 0, sizeof cnt);
    C->S = 0;
    for (int i = 0; i < C->Rn; i++)
        for (int k = 0; k < K; k++) {
            int32_t local;
            memcpy(&local, b->in + (size_t)i * row_bytes + pay + 4 * k, sizeof local);
            if (local >= P) return err_set(err, "expert parallel: a received choice names expert %d of %d", local, P);
            C->rec[(size_t)i * K + k] = local;  // the expert for now, the slot below
            if (local < 0) continue;
            cnt[local + 1]++;
            C->S++;
        }
    void **slot_arrays[] = {(void **)&C->slot_src, (void **)&C->slot_k, (void **)&C->xg, (void **)&C->eo,
                            (void **)&C->eg, (void **)&C->eu, (void **)&C->eh};
    if (reserve(&C->cap_slots, C->S, 7, slot_arrays, (size_t[]){1, 1, d, d, Fm, Fm, Fm}))
        return err_set(err, "expert parallel: out of memory");
    for (int e = 0; e < P; e++) cnt[e + 1] += cnt[e];
    memcpy(C->expert_off, cnt, sizeof(int) * (P + 1));
    for (int i = 0; i < C->Rn; i++) {
        const char *row = b->in + (size_t)i * row_bytes;
        int first = -1;  // the slot that decoded the row; the token's other slots copy it
        for (int k = 0; k < K; k++) {
            int e = C->rec[(size_t)i * K + k];
            memcpy(&C->gate[(size_t)i * K + k], row + pay + 4 * (K + k), 4);
            if (e < 0) continue;
            int s = cnt[e]++;
            C->slot_src[s] = i, C->slot_k[s] = k;
            C->rec[(size_t)i * K + k] = s;
            if (first < 0) a2a_decode_row(C->xg + (size_t)s * d, row, d, ep->dispatch);
            else memcpy(C->xg + (size_t)s * d, C->xg + (size_t)first * d, sizeof(float) * d);
            if (first < 0) first = s;
        }
    }
    for (int e = 0; e < P; e++) {
        int n = C->expert_off[e + 1] - C->expert_off[e];
        if (n == 0) continue;
        size_t o = C->expert_off[e];
        TRY(ffn_forward(p->be, p->recipe, &w->experts[e0 + e], C->xg + o * d, C->eg + o * Fm, C->eu + o * Fm,
                        C->eh + o * Fm, C->eo + o * d, n));
        TRY(p->be->ops->synchronize(p->be));
        TRY(progress(ep, err));
    }
    size_t cb = a2a_row_bytes(d, ep->combine);
    if (grow_bytes(&b->out, &b->cap_out, C->Rn, cb) || grow_bytes(&b->in, &b->cap_in, C->Ns, cb) ||
        grow(&b->sums, &b->cap_sums, d))
        return err_set(err, "expert parallel: out of memory");
    for (int i = 0; i < C->Rn; i++) {
        float *sum = b->sums;
        memset(sum, 0, sizeof(float) * d);
        for (int k = 0; k < K; k++) {
            int s = C->rec[(size_t)i * K + k];
            if (s < 0) continue;
            float g = C->gate[(size_t)i * K + k];
            const float *o = C->eo + (size_t)s * d;
            for (int j = 0; j < d; j++) sum[j] += g * o[j];
        }
        a2a_encode_row(b->out + (size_t)i * cb, sum, d, ep->combine);
    }
    return exchange_start(ep, b, C->recv_counts, C->send_counts, cb, &ep->st.combine_bytes, err);
}

// Chunk C's combine has arrived: each token adds its rows in rank order.
static void combine_finish(ExpertParallel *ep, EpChunk *C, EpBuffers *b, float *y) {
    int d = ep->c->hidden_size;
    size_t cb = a2a_row_bytes(d, ep->combine);
    for (int j = 0; j < C->Ns; j++) {
        float *yt = y + (size_t)C->send_tok[j] * d, *row = b->sums;
        a2a_decode_row(row, b->in + (size_t)j * cb, d, ep->combine);
        for (int q = 0; q < d; q++) yt[q] += row[q];
    }
}

static int ep_forward(MoeParallel *mp, const LayerPass *p, const MoeWeights *w, LayerActs *a, int N, float *y) {
    ExpertParallel *ep = (ExpertParallel *)mp;
    Error *err = &p->be->err;
    if (p->layer < 0 || p->layer >= ep->n_layers) return err_set(err, "expert parallel: layer %d out of range", p->layer);
    EpLayer *L = &ep->layers[p->layer];
    L->N = N;
    L->n_chunks = ep->overlap && N >= 2 ? 2 : 1;
    for (int c = 0; c < L->n_chunks; c++) {
        L->ch[c].t0 = (int)((long)N * c / L->n_chunks);
        L->ch[c].N = (int)((long)N * (c + 1) / L->n_chunks) - L->ch[c].t0;
    }
    // both chunks' dispatches start; each chunk's experts run while the other's exchange is in flight
    for (int c = 0; c < L->n_chunks; c++) TRY(dispatch_start(ep, &L->ch[c], &ep->buf[c], a, err));
    for (int c = 0; c < L->n_chunks; c++) {
        TRY(exchange_wait(ep, &ep->buf[c], err));
        TRY(experts_forward(ep, &L->ch[c], &ep->buf[c], p, w, err));
    }
    for (int c = 0; c < L->n_chunks; c++) {
        TRY(exchange_wait(ep, &ep->buf[c], err));
        combine_finish(ep, &L->ch[c], &ep->buf[c], y);
    }
    return 0;
}

// ---- backward ----

// Chunk C's output gradients dispatched along its forward's plan, in the combine's format (the
// gradients travel so both ways).
static int grad_dispatch_start(ExpertParallel *ep, EpChunk *C, EpBuffers *b, const float *dy, Error *err) {
    int d = ep->c->hidden_size, K = ep->c->num_experts_per_tok;
    size_t pay = a2a_row_bytes(d, ep->combine), row_bytes = pay + 4 * (size_t)K;
    int rows = C->Ns > C->Rn ? C->Ns : C->Rn;  // each buffer carries both directions
    if (grow_bytes(&b->out, &b->cap_out, rows, row_bytes) || grow_bytes(&b->in, &b->cap_in, rows, row_bytes))
        return err_set(err, "expert parallel: out of memory");
    for (int j = 0; j < C->Ns; j++) a2a_encode_row(b->out + (size_t)j * pay, dy + (size_t)C->send_tok[j] * d, d, ep->combine);
    return exchange_start(ep, b, C->send_counts, C->recv_counts, pay, &ep->st.dispatch_bytes, err);
}

// Chunk C's gradients have arrived: ∂E(x) = g·dy and ∂g = dy · E(x) per slot, this rank's experts'
// backward (their weight gradients accumulate into g), and one row per received token back: [its
// input gradient from the experts held here | K gate gradients], started.
static int experts_backward(ExpertParallel *ep, EpChunk *C, EpBuffers *b, const LayerPass *p, const MoeWeights *w,
                            MoeWeights *g, Error *err) {
    const ModelConfig *c = ep->c;
    int K = c->num_experts_per_tok, d = c->hidden_size, Fm = c->moe_intermediate_size, P = ep->per_rank;
    int e0 = ep->rank * P;
    size_t pay = a2a_row_bytes(d, ep->combine), row_bytes = pay + 4 * (size_t)K;
    void **dslot_arrays[] = {(void **)&b->de_out, (void **)&b->dxg, (void **)&b->deg, (void **)&b->deu,
                             (void **)&b->deh};
    if (grow(&b->rows, &b->cap_rows, (size_t)C->Rn * K + (size_t)C->Rn * d) || grow(&b->sums, &b->cap_sums, d) ||
        reserve(&b->cap_dslots, C->S, 5, dslot_arrays, (size_t[]){d, d, Fm, Fm, Fm}))
        return err_set(err, "expert parallel: out of memory");
    float *dgate = b->rows, *dyr_all = b->rows + (size_t)C->Rn * K;  // (Rn, K), (Rn, d)
    for (int i = 0; i < C->Rn; i++) a2a_decode_row(dyr_all + (size_t)i * d, b->in + (size_t)i * pay, d, ep->combine);
    memset(dgate, 0, sizeof(float) * C->Rn * K);
    for (int sl = 0; sl < C->S; sl++) {
        int i = C->slot_src[sl], k = C->slot_k[sl];
        const float *dyr = dyr_all + (size_t)i * d, *o = C->eo + (size_t)sl * d;
        float gt = C->gate[(size_t)i * K + k], dot = 0;
        float *de = b->de_out + (size_t)sl * d;
        for (int j = 0; j < d; j++) de[j] = gt * dyr[j], dot += dyr[j] * o[j];
        dgate[(size_t)i * K + k] = dot;
    }
    memset(b->dxg, 0, sizeof(float) * C->S * d);
    for (int e = 0; e < P; e++) {
        int n = C->expert_off[e + 1] - C->expert_off[e];
        if (n == 0) continue;
        size_t o = C->expert_off[e];
        TRY(ffn_backward(p->be, p->recipe, &w->experts[e0 + e], &g->experts[e0 + e], b->de_out + o * d, C->xg + o * d,
                         C->eg + o * Fm, C->eu + o * Fm, C->eh + o * Fm, b->dxg + o * d, b->deg + o * Fm,
                         b->deu + o * Fm, b->deh + o * Fm, n));
        TRY(p->be->ops->synchronize(p->be));
        TRY(progress(ep, err));
    }
    for (int i = 0; i < C->Rn; i++) {
        char *row = b->out + (size_t)i * row_bytes;
        float *sum = b->sums;
        memset(sum, 0, sizeof(float) * d);
        for (int k = 0; k < K; k++) {
            int sl = C->rec[(size_t)i * K + k];
            memcpy(row + pay + 4 * k, &dgate[(size_t)i * K + k], 4);
            if (sl < 0) continue;
            const float *dx = b->dxg + (size_t)sl * d;
            for (int j = 0; j < d; j++) sum[j] += dx[j];
        }
        a2a_encode_row(row, sum, d, ep->combine);
    }
    return exchange_start(ep, b, C->recv_counts, C->send_counts, row_bytes, &ep->st.combine_bytes, err);
}

// Chunk C's input gradients have arrived: each token adds its rows in rank order; each gate's
// gradient comes from the rank holding its expert.
static void grad_combine_finish(ExpertParallel *ep, EpChunk *C, EpBuffers *b, const LayerActs *a, LayerGradScratch *s) {
    int K = ep->c->num_experts_per_tok, d = ep->c->hidden_size, P = ep->per_rank;
    size_t pay = a2a_row_bytes(d, ep->combine), row_bytes = pay + 4 * (size_t)K;
    int dest = 0, left = C->send_counts[0];
    for (int j = 0; j < C->Ns; j++) {
        while (left == 0) left = C->send_counts[++dest];
        left--;
        int t = C->send_tok[j];
        const char *row = b->in + (size_t)j * row_bytes;
        float *dx = s->dln + (size_t)t * d, *got = b->sums;
        a2a_decode_row(got, row, d, ep->combine);
        for (int q = 0; q < d; q++) dx[q] += got[q];
        for (int k = 0; k < K; k++)
            if (a->topk_idx[(size_t)t * K + k] / P == dest) memcpy(&s->dtopk_w[(size_t)t * K + k], row + pay + 4 * k, 4);
    }
}

static int ep_backward(MoeParallel *mp, const LayerPass *p, const MoeWeights *w, MoeWeights *g, LayerActs *a,
                       LayerGradScratch *s, const float *dy, int N) {
    ExpertParallel *ep = (ExpertParallel *)mp;
    Error *err = &p->be->err;
    if (p->layer < 0 || p->layer >= ep->n_layers) return err_set(err, "expert parallel: layer %d out of range", p->layer);
    EpLayer *L = &ep->layers[p->layer];
    if (L->N != N) return err_set(err, "expert parallel: layer %d backward over %d tokens, forward had %d", p->layer, N, L->N);
    for (int c = 0; c < L->n_chunks; c++) TRY(grad_dispatch_start(ep, &L->ch[c], &ep->buf[c], dy, err));
    for (int c = 0; c < L->n_chunks; c++) {
        TRY(exchange_wait(ep, &ep->buf[c], err));
        TRY(experts_backward(ep, &L->ch[c], &ep->buf[c], p, w, g, err));
    }
    for (int c = 0; c < L->n_chunks; c++) {
        TRY(exchange_wait(ep, &ep->buf[c], err));
        grad_combine_finish(ep, &L->ch[c], &ep->buf[c], a, s);
    }
    return 0;
}

static int ep_holds(const MoeParallel *mp, int e);
static int ep_sum_rows(MoeParallel *mp, float *x, long n, Error *err);
static const MoeParallelOps ep_ops = {ep_forward, ep_backward, ep_holds, ep_sum_rows};

// Both seams' ExpertParallel.
static ExpertParallel *of_seam(const MoeParallel *mp) {
    return mp->ops == &ep_ops ? (ExpertParallel *)mp : (ExpertParallel *)((char *)mp - offsetof(ExpertParallel, replicated));
}

// The replicated-token forward: the slots of moe_dispatch (a->expert_off, slot_tk, slot_of) cover
// every expert; this rank runs its own and adds each token's gated outputs in choice order.
static int ep_forward_replicated(MoeParallel *mp, const LayerPass *p, const MoeWeights *w, LayerActs *a, int N,
                                 float *y) {
    ExpertParallel *ep = of_seam(mp);
    Error *err = &p->be->err;
    const ModelConfig *c = ep->c;
    int K = c->num_experts_per_tok, d = c->hidden_size, Fm = c->moe_intermediate_size, P = ep->per_rank;
    int e0 = ep->rank * P;
    EpBuffers *b = &ep->buf[0];
    if (grow(&b->rows, &b->cap_rows, (size_t)N * d + (size_t)N * K)) return err_set(err, "expert parallel: out of memory");
    float *partial = b->rows;  // (N, d)
    int *tok = (int *)(b->rows + (size_t)N * d);  // (slots of one expert) their tokens
    for (int e = e0; e < e0 + P; e++) {
        int n = a->expert_off[e + 1] - a->expert_off[e];
        if (n == 0) continue;
        size_t o = a->expert_off[e];
        for (int j = 0; j < n; j++) tok[j] = a->slot_tk[o + j] / K;
        TRY(p->be->ops->gather_rows(p->be, a->xg + o * d, a->ln2, tok, n, d));
        TRY(ffn_forward(p->be, p->recipe, &w->experts[e], a->xg + o * d, a->e_gate + o * Fm, a->e_up + o * Fm,
                        a->e_h + o * Fm, a->e_out + o * d, n));
    }
    TRY(p->be->ops->synchronize(p->be));
    memset(partial, 0, sizeof(float) * N * d);
    for (int t = 0; t < N; t++)
        for (int k = 0; k < K; k++) {
            int e = a->topk_idx[(size_t)t * K + k];
            if (e < e0 || e >= e0 + P) continue;
            float g = a->topk_w[(size_t)t * K + k], *pt = partial + (size_t)t * d;
            const float *out = a->e_out + (size_t)a->slot_of[(size_t)t * K + k] * d;
            for (int j = 0; j < d; j++) pt[j] += g * out[j];
        }
    TRY(ep_sum_rows(&ep->replicated, partial, (long)N * d, err));
    ep->st.tokens += N;
    for (size_t i = 0; i < (size_t)N * d; i++) y[i] += partial[i];
    return 0;
}


static int ep_holds(const MoeParallel *mp, int e) { return expert_parallel_holds(of_seam(mp), e); }

static int ep_sum_rows(MoeParallel *mp, float *x, long n, Error *err) {
    ExpertParallel *ep = of_seam(mp);
    double t0 = now_s();
    if (!ep->sum && !(ep->sum = dist_sum_new(ep->comm, err))) return -1;
    TRY(dist_sum_start(ep->sum, x, (size_t)n, err));
    DistSumStats st;
    TRY(dist_sum_wait(ep->sum, &st, err));
    ep->st.exchange_s += now_s() - t0;
    ep->st.wait_s += now_s() - t0;
    ep->st.combine_bytes += (double)st.bytes_sent;
    return 0;
}

static int ep_backward_replicated(MoeParallel *mp, const LayerPass *p, const MoeWeights *w, MoeWeights *g,
                                  LayerActs *a, LayerGradScratch *s, const float *dy, int N) {
    (void)mp, (void)w, (void)g, (void)a, (void)s, (void)dy, (void)N;
    return err_set(&p->be->err, "expert parallel: the replicated-token seam has no backward pass");
}

static const MoeParallelOps ep_replicated_ops = {ep_forward_replicated, ep_backward_replicated, ep_holds,
                                                 ep_sum_rows};

ExpertParallel *expert_parallel_new(DistComm *comm, const ModelConfig *c, A2aDtype dtype, Error *err) {
    int E = dist_size(comm), Nr = c->n_routed_experts;
    if (Nr <= 0) return err_set(err, "--expert-parallel %d: the model has no routed experts", E), NULL;
    if (Nr % E)
        return err_set(err, "--expert-parallel %d: the %d routed experts do not split evenly over %d ranks", E, Nr, E),
               NULL;
    ExpertParallel *ep = calloc(1, sizeof *ep);
    if (!ep) return err_set(err, "out of memory"), NULL;
    ep->seam.ops = &ep_ops;
    ep->replicated.ops = &ep_replicated_ops;
    ep->comm = comm;
    ep->E = E, ep->rank = dist_rank(comm), ep->per_rank = Nr / E;
    ep->c = c;
    ep->dispatch = dtype;
    ep->ranks_per_node = E;
    ep->overlap = 1;
    ep->combine = dtype == A2A_FP32 ? A2A_FP32 : A2A_BF16;  // (expert_parallel_pair_bytes counts so)
    ep->n_layers = c->num_hidden_layers + c->num_nextn_predict_layers;
    ep->layers = calloc(ep->n_layers, sizeof *ep->layers);
    if (!ep->layers) return expert_parallel_free(ep), err_set(err, "out of memory"), NULL;
    for (int l = 0; l < ep->n_layers; l++)
        for (int c = 0; c < 2; c++) {
            EpChunk *C = &ep->layers[l].ch[c];
            C->send_counts = calloc(2 * E + ep->per_rank + 1, sizeof(int));
            if (!C->send_counts) return expert_parallel_free(ep), err_set(err, "out of memory"), NULL;
            C->recv_counts = C->send_counts + E;
            C->expert_off = C->recv_counts + E;
        }
    return ep;
}

void expert_parallel_free(ExpertParallel *ep) {
    if (!ep) return;
    for (int l = 0; ep->layers && l < ep->n_layers; l++)
        for (int c = 0; c < 2; c++) {
            EpChunk *C = &ep->layers[l].ch[c];
            free(C->send_counts), free(C->send_tok), free(C->rec), free(C->gate), free(C->slot_src), free(C->slot_k);
            free(C->xg), free(C->eo), free(C->eg), free(C->eu), free(C->eh);
        }
    free(ep->layers);
    for (int c = 0; c < 2; c++) {
        EpBuffers *b = &ep->buf[c];
        Error ignored;
        dist_exchange_wait(&b->x, &ignored);  // (none is in flight unless a pass failed midway)
        free(b->out), free(b->in), free(b->rows), free(b->sums);
        free(b->de_out), free(b->dxg), free(b->deg), free(b->deu), free(b->deh);
    }
    dist_sum_free(ep->sum);
    free(ep);
}

typedef struct {
    const ExpertParallel *ep;
    long long used, all;
} WeightBytes;

static int count_weight(const TensorSpec *t, void *ctx) {
    WeightBytes *b = ctx;
    long long n = t->mat ? tensor_view_bytes(t->mat) : t->vec ? (long long)sizeof(float) * t->shape[0] : 0;
    b->all += n;
    if (t->expert < 0 || expert_parallel_holds(b->ep, t->expert)) b->used += n;
    return 0;
}

void expert_parallel_weight_bytes(const ExpertParallel *ep, const ModelConfig *c, ModelWeights *w, long long *used,
                                  long long *all) {
    WeightBytes b = {ep, 0, 0};
    tensor_walk(c, w->n_mtp, w, count_weight, &b);
    *used = b.used, *all = b.all;
}

MoeParallel *expert_parallel_seam(ExpertParallel *ep) { return &ep->seam; }
void expert_parallel_set_overlap(ExpertParallel *ep, int on) { ep->overlap = on; }
MoeParallel *expert_parallel_seam_replicated(ExpertParallel *ep) { return &ep->replicated; }

int expert_parallel_set_nodes(ExpertParallel *ep, int ranks_per_node, Error *err) {
    if (ranks_per_node < 1 || ep->E % ranks_per_node)
        return err_set(err, "--ranks-per-node %d: an expert-parallel group of %d ranks is not made of whole nodes",
                       ranks_per_node, ep->E);
    ep->ranks_per_node = ranks_per_node;
    return 0;
}
