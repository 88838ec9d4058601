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

// What one MoE layer's forward leaves for its backward pass. Rows are received tokens (i), slots
// are (received token, chosen expert held here) pairs sorted by expert.
typedef struct EpLayer {
    int N;             // this rank's tokens in the last forward
    int Ns, Rn, S;     // rows sent, rows received, slots
    int *send_counts;  // (E) rows sent to each rank
    int *recv_counts;  // (E) rows received from each rank
    int *send_tok;     // (Ns) the local token of each sent row, grouped by destination in rank order
    int *rec;          // (Rn, K) each received token's choice k: the slot serving it here, or -1
    float *gate;       // (Rn, K) its gates (0 where not held here)
    int *expert_off;   // (experts per rank + 1) each local expert's slots
    int *slot_src;     // (S) the received token each slot serves
    int *slot_k;       // (S) and which of its choices
    float *xg, *eo;    // (S, d) the slot's input, the expert's output
    float *eg, *eu, *eh;  // (S, moe_inter) the expert's SwiGLU activations
    size_t cap_send, cap_recv, cap_slots;
} EpLayer;

struct ExpertParallel {
    MoeParallel seam;  // first: the seam's pointer is the ExpertParallel's
    MoeParallel replicated;  // the replicated-token seam (inference)
    DistSum *sum;            // its all-reduce
    DistComm *comm;
    int E, rank, per_rank;  // ranks, this one, experts per rank
    int ranks_per_node;     // a rank's node: rank / ranks_per_node
    const ModelConfig *c;
    int n_layers;
    EpLayer *layers;   // (num_hidden_layers + num_nextn_predict_layers), by HF layer index
    A2aDtype dispatch, combine;  // the payloads' formats (see expert_parallel.h)
    // scratch shared by the layers: packed rows out and in (bytes), per-row sums, the backward's
    // slot buffers
    char *out, *in;
    float *rows, *sums;
    size_t cap_out, cap_in, cap_rows, cap_sums;
    float *de_out, *dxg, *deg, *deu, *deh;
    size_t cap_dslots;
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

int expert_parallel_owner(const ExpertParallel *ep, int e) { return e / ep->per_rank; }
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
        lowp_fp8_save_rows((uint8_t *)dst, scales, x, 1, d);
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

// The all-to-all of rows of row_bytes: send_counts rows of ep->out to each rank, recv_counts rows
// into ep->in; what left this rank is added to *bytes.
static int exchange(ExpertParallel *ep, const int *send_counts, const int *recv_counts, size_t row_bytes,
                    double *bytes, Error *err) {
    double t0 = now_s();
    int rc = dist_alltoallv(ep->comm, ep->out, send_counts, ep->in, recv_counts, row_bytes, err);
    ep->st.exchange_s += now_s() - t0;
    for (int r = 0; r < ep->E; r++) {
        if (r == ep->rank) continue;
        double b = (double)send_counts[r] * row_bytes;
        *bytes += b;
        if (r / ep->ranks_per_node == ep->rank / ep->ranks_per_node) ep->st.intra_node_bytes += b;
        else ep->st.inter_node_bytes += b;
    }
    return rc;
}

// Room for n rows of row_bytes in a byte buffer.
static int grow_bytes(char **p, size_t *cap, size_t n, size_t row_bytes) {
    return grow(p, cap, (n * row_bytes + 3) / 4);  // (grow counts 4-byte units)
}

static int ep_forward(MoeParallel *mp, const LayerPass *p, const MoeWeights *w, LayerActs *a, int N, float *y) {
    ExpertParallel *ep = (ExpertParallel *)mp;
    Error *err = &p->be->err;
    const ModelConfig *c = ep->c;
    int E = ep->E, K = c->num_experts_per_tok, d = c->hidden_size, Fm = c->moe_intermediate_size;
    int P = ep->per_rank, e0 = ep->rank * P;
    size_t pay = a2a_row_bytes(d, ep->dispatch), row_bytes = pay + 8 * (size_t)K;
    if (p->layer < 0 || p->layer >= ep->n_layers) return err_set(err, "expert parallel: layer %d out of range", p->layer);
    EpLayer *L = &ep->layers[p->layer];
    L->N = N;
    // the plan: each token once to every rank holding one of its experts, grouped by rank
    memset(L->send_counts, 0, sizeof(int) * E);
    for (int t = 0; t < N; t++) {
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
        for (int r = 0; r < E; r++) L->send_counts[r] += to[r];
        ep->st.token_nodes += nodes;
        if (nodes > ep->st.max_nodes) ep->st.max_nodes = nodes;
    }
    L->Ns = 0;
    for (int r = 0; r < E; r++) L->Ns += L->send_counts[r];
    if (grow(&L->send_tok, &L->cap_send, L->Ns) || grow_bytes(&ep->out, &ep->cap_out, L->Ns, row_bytes))
        return err_set(err, "expert parallel: out of memory");
    // the rows: [input (d, in the dispatch format) | K choices: the expert's index on that rank or −1 | K gates]
    for (int r = 0, j = 0; r < E; r++)
        for (int t = 0; t < N; t++) {
            const int *idx = a->topk_idx + (size_t)t * K;
            int here = 0;
            for (int k = 0; k < K; k++) here |= idx[k] / P == r;
            if (!here) continue;
            char *row = ep->out + (size_t)j * row_bytes;
            a2a_encode_row(row, a->ln2 + (size_t)t * d, d, ep->dispatch);
            for (int k = 0; k < K; k++) {
                int32_t local = idx[k] / P == r ? idx[k] - r * P : -1;
                float gate = local >= 0 ? a->topk_w[(size_t)t * K + k] : 0.0f;
                memcpy(row + pay + 4 * k, &local, 4);
                memcpy(row + pay + 4 * (K + k), &gate, 4);
            }
            L->send_tok[j++] = t;
        }
    ep->st.tokens += N;
    ep->st.token_ranks += L->Ns;
    TRY(dist_alltoall_int(ep->comm, L->send_counts, L->recv_counts, err));
    L->Rn = 0;
    for (int r = 0; r < E; r++) L->Rn += L->recv_counts[r];
    if (grow_bytes(&ep->in, &ep->cap_in, L->Rn, row_bytes) ||
        reserve(&L->cap_recv, L->Rn, 2, (void **[]){(void **)&L->rec, (void **)&L->gate}, (size_t[]){K, K}))
        return err_set(err, "expert parallel: out of memory");
    TRY(exchange(ep, L->send_counts, L->recv_counts, row_bytes, &ep->st.dispatch_bytes, err));
    // the slots: received tokens in order (source rank, then its token order), each choice held here
    int cnt[P + 1];
    memset(cnt, 0, sizeof cnt);
    L->S = 0;
    for (int i = 0; i < L->Rn; i++)
        for (int k = 0; k < K; k++) {
            int32_t local;
            memcpy(&local, ep->in + (size_t)i * row_bytes + pay + 4 * k, sizeof local);
            if (local < 0 || local >= P) {
                L->rec[(size_t)i * K + k] = -1;
                if (local >= P) return err_set(err, "expert parallel: a received choice names expert %d of %d", local, P);
                continue;
            }
            L->rec[(size_t)i * K + k] = local;  // the expert for now, the slot below
            cnt[local + 1]++;
            L->S++;
        }
    void **slot_arrays[] = {(void **)&L->slot_src, (void **)&L->slot_k, (void **)&L->xg, (void **)&L->eo,
                            (void **)&L->eg, (void **)&L->eu, (void **)&L->eh};
    if (reserve(&L->cap_slots, L->S, 7, slot_arrays, (size_t[]){1, 1, d, d, Fm, Fm, Fm}))
        return err_set(err, "expert parallel: out of memory");
    for (int e = 0; e < P; e++) cnt[e + 1] += cnt[e];
    memcpy(L->expert_off, cnt, sizeof(int) * (P + 1));
    for (int i = 0; i < L->Rn; i++) {
        const char *row = ep->in + (size_t)i * row_bytes;
        int first = -1;  // the slot that decoded the row; the token's other slots copy it
        for (int k = 0; k < K; k++) {
            int e = L->rec[(size_t)i * K + k];
            memcpy(&L->gate[(size_t)i * K + k], row + pay + 4 * (K + k), 4);
            if (e < 0) continue;
            int s = cnt[e]++;
            L->slot_src[s] = i, L->slot_k[s] = k;
            L->rec[(size_t)i * K + k] = s;
            if (first < 0) a2a_decode_row(L->xg + (size_t)s * d, row, d, ep->dispatch);
            else memcpy(L->xg + (size_t)s * d, L->xg + (size_t)first * d, sizeof(float) * d);
            if (first < 0) first = s;
        }
    }
    for (int e = 0; e < P; e++) {
        int n = L->expert_off[e + 1] - L->expert_off[e];
        if (n == 0) continue;
        size_t o = L->expert_off[e];
        TRY(ffn_forward(p->be, p->recipe, &w->experts[e0 + e], L->xg + o * d, L->eg + o * Fm, L->eu + o * Fm,
                        L->eh + o * Fm, L->eo + o * d, n));
    }
    TRY(p->be->ops->synchronize(p->be));
    // one row per received token: its gated outputs of the experts held here, in choice order
    size_t cb = a2a_row_bytes(d, ep->combine);
    if (grow_bytes(&ep->out, &ep->cap_out, L->Rn, cb) || grow_bytes(&ep->in, &ep->cap_in, L->Ns, cb) ||
        grow(&ep->sums, &ep->cap_sums, d))
        return err_set(err, "expert parallel: out of memory");
    for (int i = 0; i < L->Rn; i++) {
        float *sum = ep->sums;
        memset(sum, 0, sizeof(float) * d);
        for (int k = 0; k < K; k++) {
            int s = L->rec[(size_t)i * K + k];
            if (s < 0) continue;
            float g = L->gate[(size_t)i * K + k];
            const float *o = L->eo + (size_t)s * d;
            for (int j = 0; j < d; j++) sum[j] += g * o[j];
        }
        a2a_encode_row(ep->out + (size_t)i * cb, sum, d, ep->combine);
    }
    TRY(exchange(ep, L->recv_counts, L->send_counts, cb, &ep->st.combine_bytes, err));
    // each token adds its rows in rank order
    for (int j = 0; j < L->Ns; j++) {
        float *yt = y + (size_t)L->send_tok[j] * d, *row = ep->sums;
        a2a_decode_row(row, ep->in + (size_t)j * cb, d, ep->combine);
        for (int q = 0; q < d; q++) yt[q] += row[q];
    }
    return 0;
}

static int ep_backward(MoeParallel *mp, const LayerPass *p, const MoeWeights *w, MoeWeights *g, LayerActs *a,
                       LayerGradScratch *s, const float *dy, int N) {
    ExpertParallel *ep = (ExpertParallel *)mp;
    Error *err = &p->be->err;
    const ModelConfig *c = ep->c;
    int K = c->num_experts_per_tok, d = c->hidden_size, Fm = c->moe_intermediate_size, P = ep->per_rank;
    int e0 = ep->rank * P;
    if (p->layer < 0 || p->layer >= ep->n_layers) return err_set(err, "expert parallel: layer %d out of range", p->layer);
    EpLayer *L = &ep->layers[p->layer];
    if (L->N != N) return err_set(err, "expert parallel: layer %d backward over %d tokens, forward had %d", p->layer, N, L->N);
    // dispatch the output gradients along the forward's plan
    // the gradients travel in the combine's format both ways
    size_t pay = a2a_row_bytes(d, ep->combine), row_bytes = pay + 4 * (size_t)K;
    int rows_out = L->Ns > L->Rn ? L->Ns : L->Rn;  // each buffer carries both directions
    void **dslot_arrays[] = {(void **)&ep->de_out, (void **)&ep->dxg, (void **)&ep->deg, (void **)&ep->deu,
                             (void **)&ep->deh};
    if (grow_bytes(&ep->out, &ep->cap_out, rows_out, row_bytes) || grow_bytes(&ep->in, &ep->cap_in, rows_out, row_bytes) ||
        grow(&ep->rows, &ep->cap_rows, (size_t)L->Rn * K + (size_t)L->Rn * d) || grow(&ep->sums, &ep->cap_sums, d) ||
        reserve(&ep->cap_dslots, L->S, 5, dslot_arrays, (size_t[]){d, d, Fm, Fm, Fm}))
        return err_set(err, "expert parallel: out of memory");
    for (int j = 0; j < L->Ns; j++) a2a_encode_row(ep->out + (size_t)j * pay, dy + (size_t)L->send_tok[j] * d, d, ep->combine);
    TRY(exchange(ep, L->send_counts, L->recv_counts, pay, &ep->st.dispatch_bytes, err));
    // the rows' gradients: ∂E(x) = g·dy, ∂g = dy · E(x)
    float *dgate = ep->rows, *dyr_all = ep->rows + (size_t)L->Rn * K;  // (Rn, K), (Rn, d)
    for (int i = 0; i < L->Rn; i++) a2a_decode_row(dyr_all + (size_t)i * d, ep->in + (size_t)i * pay, d, ep->combine);
    memset(dgate, 0, sizeof(float) * L->Rn * K);
    for (int sl = 0; sl < L->S; sl++) {
        int i = L->slot_src[sl], k = L->slot_k[sl];
        const float *dyr = dyr_all + (size_t)i * d, *o = L->eo + (size_t)sl * d;
        float gt = L->gate[(size_t)i * K + k], dot = 0;
        float *de = ep->de_out + (size_t)sl * d;
        for (int j = 0; j < d; j++) de[j] = gt * dyr[j], dot += dyr[j] * o[j];
        dgate[(size_t)i * K + k] = dot;
    }
    memset(ep->dxg, 0, sizeof(float) * L->S * d);
    for (int e = 0; e < P; e++) {
        int n = L->expert_off[e + 1] - L->expert_off[e];
        if (n == 0) continue;
        size_t o = L->expert_off[e];
        TRY(ffn_backward(p->be, p->recipe, &w->experts[e0 + e], &g->experts[e0 + e], ep->de_out + o * d, L->xg + o * d,
                         L->eg + o * Fm, L->eu + o * Fm, L->eh + o * Fm, ep->dxg + o * d, ep->deg + o * Fm,
                         ep->deu + o * Fm, ep->deh + o * Fm, n));
    }
    TRY(p->be->ops->synchronize(p->be));
    // one row per received token back: [its input gradient from the experts held here | K gate gradients]
    for (int i = 0; i < L->Rn; i++) {
        char *row = ep->out + (size_t)i * row_bytes;
        float *sum = ep->sums;
        memset(sum, 0, sizeof(float) * d);
        for (int k = 0; k < K; k++) {
            int sl = L->rec[(size_t)i * K + k];
            memcpy(row + pay + 4 * k, &dgate[(size_t)i * K + k], 4);
            if (sl < 0) continue;
            const float *dx = ep->dxg + (size_t)sl * d;
            for (int j = 0; j < d; j++) sum[j] += dx[j];
        }
        a2a_encode_row(row, sum, d, ep->combine);
    }
    TRY(exchange(ep, L->recv_counts, L->send_counts, row_bytes, &ep->st.combine_bytes, err));
    // each token adds its rows in rank order; each gate's gradient comes from the rank holding its expert
    int dest = 0, left = L->send_counts[0];
    for (int j = 0; j < L->Ns; j++) {
        while (left == 0) left = L->send_counts[++dest];
        left--;
        int t = L->send_tok[j];
        const char *row = ep->in + (size_t)j * row_bytes;
        float *dx = s->dln + (size_t)t * d, *got = ep->sums;
        a2a_decode_row(got, row, d, ep->combine);
        for (int q = 0; q < d; q++) dx[q] += got[q];
        for (int k = 0; k < K; k++)
            if (a->topk_idx[(size_t)t * K + k] / P == dest) memcpy(&s->dtopk_w[(size_t)t * K + k], row + pay + 4 * k, 4);
    }
    return 0;
}

static const MoeParallelOps ep_ops = {ep_forward, ep_backward};

// The replicated-token forward: the slots of moe_dispatch (a->expert_off, slot_tk, slot_of) cover
// every expert; this rank runs its own and adds each token's gated outputs in choice order.
static int ep_forward_replicated(MoeParallel *mp, const LayerPass *p, const MoeWeights *w, LayerActs *a, int N,
                                 float *y) {
    ExpertParallel *ep = (ExpertParallel *)((char *)mp - offsetof(ExpertParallel, replicated));
    Error *err = &p->be->err;
    const ModelConfig *c = ep->c;
    int K = c->num_experts_per_tok, d = c->hidden_size, Fm = c->moe_intermediate_size, P = ep->per_rank;
    int e0 = ep->rank * P;
    if (grow(&ep->rows, &ep->cap_rows, (size_t)N * d + (size_t)N * K)) return err_set(err, "expert parallel: out of memory");
    float *partial = ep->rows;  // (N, d)
    int *tok = (int *)(ep->rows + (size_t)N * d);  // (slots of one expert) their tokens
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
    double t0 = now_s();
    if (!ep->sum && !(ep->sum = dist_sum_new(ep->comm, err))) return -1;
    TRY(dist_sum_start(ep->sum, partial, (size_t)N * d, err));
    DistSumStats st;
    TRY(dist_sum_wait(ep->sum, &st, err));
    ep->st.exchange_s += now_s() - t0;
    ep->st.combine_bytes += (double)st.bytes_sent;
    ep->st.tokens += N;
    for (size_t i = 0; i < (size_t)N * d; i++) y[i] += partial[i];
    return 0;
}

static int ep_backward_replicated(MoeParallel *mp, const LayerPass *p, const MoeWeights *w, MoeWeights *g,
                                  LayerActs *a, LayerGradScratch *s, const float *dy, int N) {
    (void)mp, (void)w, (void)g, (void)a, (void)s, (void)dy, (void)N;
    return err_set(&p->be->err, "expert parallel: the replicated-token seam has no backward pass");
}

static const MoeParallelOps ep_replicated_ops = {ep_forward_replicated, ep_backward_replicated};

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
    ep->combine = dtype == A2A_FP32 ? A2A_FP32 : A2A_BF16;
    ep->n_layers = c->num_hidden_layers + c->num_nextn_predict_layers;
    ep->layers = calloc(ep->n_layers, sizeof *ep->layers);
    if (!ep->layers) return expert_parallel_free(ep), err_set(err, "out of memory"), NULL;
    for (int l = 0; l < ep->n_layers; l++) {
        EpLayer *L = &ep->layers[l];
        L->send_counts = calloc(2 * E + ep->per_rank + 1, sizeof(int));
        if (!L->send_counts) return expert_parallel_free(ep), err_set(err, "out of memory"), NULL;
        L->recv_counts = L->send_counts + E;
        L->expert_off = L->recv_counts + E;
    }
    return ep;
}

void expert_parallel_free(ExpertParallel *ep) {
    if (!ep) return;
    for (int l = 0; ep->layers && l < ep->n_layers; l++) {
        EpLayer *L = &ep->layers[l];
        free(L->send_counts), free(L->send_tok), free(L->rec), free(L->gate), free(L->slot_src), free(L->slot_k);
        free(L->xg), free(L->eo), free(L->eg), free(L->eu), free(L->eh);
    }
    free(ep->layers);
    free(ep->out), free(ep->in), free(ep->rows), free(ep->sums);
    dist_sum_free(ep->sum);
    free(ep->de_out), free(ep->dxg), free(ep->deg), free(ep->deu), free(ep->deh);
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
MoeParallel *expert_parallel_seam_replicated(ExpertParallel *ep) { return &ep->replicated; }

int expert_parallel_set_nodes(ExpertParallel *ep, int ranks_per_node, Error *err) {
    if (ranks_per_node < 1 || ep->E % ranks_per_node)
        return err_set(err, "--ranks-per-node %d: an expert-parallel group of %d ranks is not made of whole nodes",
                       ranks_per_node, ep->E);
    ep->ranks_per_node = ranks_per_node;
    return 0;
}
