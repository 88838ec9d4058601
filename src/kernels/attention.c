// Latent attention (attention.h): plain and absorbed forward, plain backward.
#include <omp.h>
#include <string.h>

#include <stdlib.h>

#include "kernels/attention.h"
#include "kernels/convert.h"
#include "kernels/ops.h"

#define QC LATENT_QCHUNK

// One thread's scratch.
typedef struct Scratch {
    float *k, *v;     // (S, nope), (S, v): one head's expanded keys and values (plain)
    float *p, *p2;    // (QC, S) scores: latent/no-rope part, then the rotary part
    float *qn, *qp;   // (QC, nope), (QC, rope) query rows
    float *qa, *ol;   // (QC, kv_lora) absorbed queries, latent-space outputs (absorbed)
    float *o;         // (QC, v)
} Scratch;

// Each buffer starts on a 64-byte line, whatever S is (the vector kernels read them).
static size_t lines(size_t floats) { return (floats + 15) & ~(size_t)15; }

size_t latent_attention_scratch_floats(const LatentAttention *a, int S) {
    size_t Q = QC;
    return lines((size_t)S * a->nope) + lines((size_t)S * a->v) + 2 * lines(Q * S) + lines(Q * a->nope) +
           lines(Q * a->rope) + 2 * lines(Q * a->kv_lora) + lines(Q * a->v);
}

// base: 64-byte aligned.
static Scratch carve(const LatentAttention *a, float *base, int S) {
    size_t Q = QC;
    Scratch h;
    h.k = base;
    h.v = h.k + lines((size_t)S * a->nope);
    h.p = h.v + lines((size_t)S * a->v);
    h.p2 = h.p + lines(Q * S);
    h.qn = h.p2 + lines(Q * S);
    h.qp = h.qn + lines(Q * a->nope);
    h.qa = h.qp + lines(Q * a->rope);
    h.ol = h.qa + lines(Q * a->kv_lora);
    h.o = h.ol + lines(Q * a->kv_lora);
    return h;
}

// p (n, S) = (p + p2) · scale, causally masked (row i sees keys 0 .. first_pos + i), softmaxed;
// masked entries become 0 so the weighted sum can run over the whole row.
static void scores_to_probs(float *p, const float *p2, int n, int S, int first_pos, float scale, int has_rope) {
    for (int i = 0; i < n; i++) {
        float *row = p + (size_t)i * S;
        const float *row2 = p2 + (size_t)i * S;
        int visible = first_pos + i + 1;
        for (int j = 0; j < visible; j++) row[j] = (row[j] + (has_rope ? row2[j] : 0.0f)) * scale;
        softmax_inplace(row, visible);
        for (int j = visible; j < S; j++) row[j] = 0.0f;
    }
}

// Plain: head h of sequence b expands its keys and values from the latents, then causal attention
// of the T new rows over the pos0 + T positions.
static int plain_head(const LatentAttention *a, int b, int h, Scratch s) {
    int H = a->H, nope = a->nope, r = a->rope, v = a->v, L = a->kv_lora, qk = nope + r;
    int T = a->T, pos0 = a->pos0, S = pos0 + T, rc = 0;
    // plain attention reads an F32 store (latent_attention_forward widens a BF16 one first)
    const float *latent = (const float *)a->latent + (size_t)b * a->ld * L;
    const float *kpe = (const float *)a->kpe + (size_t)b * a->ld * r;
    MatView wk = matview_rows(a->kv_b_proj, h * (nope + v), nope);
    MatView wv = matview_rows(a->kv_b_proj, h * (nope + v) + nope, v);
    if (a->kv_in) {  // expanded by the caller: head h's [k_nope | v], rows of sequence b
        for (int j = 0; j < S; j++) {
            const float *src = a->kv_in + ((size_t)(b * T + j) * H + h) * (nope + v);
            memcpy(s.k + (size_t)j * nope, src, sizeof(float) * nope);
            memcpy(s.v + (size_t)j * v, src + nope, sizeof(float) * v);
        }
    } else {
        if (nope > 0) rc |= matmul_nt(s.k, latent, &wk, S);
        rc |= matmul_nt(s.v, latent, &wv, S);
    }
    if (a->kv_save)  // [k_nope | v] of head h, rows of sequence b
        for (int j = 0; j < S; j++) {
            float *dst = a->kv_save + ((size_t)(b * T + j) * H + h) * (nope + v);
            memcpy(dst, s.k + (size_t)j * nope, sizeof(float) * nope);
            memcpy(dst + nope, s.v + (size_t)j * v, sizeof(float) * v);
        }
    MatView K = matview_f32(s.k, S, nope), P = matview_f32(kpe, S, r), V = matview_f32(s.v, S, v);
    for (int t0 = 0; t0 < T; t0 += QC) {
        int n = T - t0 < QC ? T - t0 : QC, Sc = pos0 + t0 + n;
        for (int i = 0; i < n; i++) {
            const float *src = a->q + ((size_t)(b * T + t0 + i) * H + h) * qk;
            memcpy(s.qn + (size_t)i * nope, src, sizeof(float) * nope);
            memcpy(s.qp + (size_t)i * r, src + nope, sizeof(float) * r);
        }
        K.rows = P.rows = V.rows = Sc;
        if (nope > 0) rc |= matmul_nt(s.p, s.qn, &K, n);
        else memset(s.p, 0, sizeof(float) * n * Sc);
        if (r > 0) rc |= matmul_nt(s.p2, s.qp, &P, n);
        scores_to_probs(s.p, s.p2, n, Sc, pos0 + t0, a->scale, r > 0);
        if (a->probs_save)
            for (int i = 0; i < n; i++) {
                float *dst = a->probs_save + (((size_t)b * H + h) * T + t0 + i) * T;
                memcpy(dst, s.p + (size_t)i * Sc, sizeof(float) * Sc);
                memset(dst + Sc, 0, sizeof(float) * (T - Sc));
            }
        rc |= matmul_nn(s.o, s.p, &V, n);
        for (int i = 0; i < n; i++)
            memcpy(a->out + ((size_t)(b * T + t0 + i) * H + h) * v, s.o + (size_t)i * v, sizeof(float) * v);
    }
    return rc ? -1 : 0;
}

// Absorbed, sequence b, rows 0..T-1 × heads [h0, h1): entries (head, row) head-major, stacked
// LATENT_QCHUNK at a time so that one pass over the cache serves all of them. The cache is read a
// block of positions at a time (the whole sequence when the store is contiguous), with the
// batch-invariant products: an entry's scores and weighted sum are the same bits whichever other
// entries, heads or sequences share its chunk, so a verify pass over K + 1 rows computes what K + 1
// single steps do.
static int absorbed_heads(const LatentAttention *a, int b, int h0, int h1, Scratch s) {
    int H = a->H, nope = a->nope, r = a->rope, v = a->v, L = a->kv_lora, qk = nope + r, T = a->T, pos0 = a->pos0;
    size_t es = dtype_size(a->dtype);
    const float *q = a->q + (size_t)b * T * H * qk;
    float *out = a->out + (size_t)b * T * H * v;
    int E = (h1 - h0) * T, rc = 0;  // entry e is head h0 + e / T, row e % T
    for (int e0 = 0; e0 < E; e0 += QC) {
        int n = E - e0 < QC ? E - e0 : QC, S = 0;
        for (int i = 0; i < n; i++) {
            int h = h0 + (e0 + i) / T, t = (e0 + i) % T;
            const float *qr = q + ((size_t)t * H + h) * qk;
            memcpy(s.qp + (size_t)i * r, qr + nope, sizeof(float) * r);
            MatView wuk = matview_rows(a->kv_b_proj, h * (nope + v), nope);
            if (nope > 0) rc |= matmul_nn_part(s.qa + (size_t)i * L, qr, &wuk, 1, 0, L);  // q̃ = W_UKᵀ q_nope
            else memset(s.qa + (size_t)i * L, 0, sizeof(float) * L);
            if (pos0 + t + 1 > S) S = pos0 + t + 1;
        }
        // every head's key and value is the latent (MQA-like): the entries score the cache together
        int bs = a->blocks ? a->block_size : S;
        for (int j0 = 0; j0 < S; j0 += bs) {
            int nb = S - j0 < bs ? S - j0 : bs;
            size_t row = latent_store_row(a->blocks, a->block_size, a->ld, b, j0);
            MatView C = {.dtype = a->dtype, .rows = nb, .cols = L, .data = (const char *)a->latent + row * L * es};
            MatView P = {.dtype = a->dtype, .rows = nb, .cols = r, .data = (const char *)a->kpe + row * r * es};
            rc |= matmul_nt_invariant(s.p + j0, S, s.qa, L, &C, n, 0, nb);  // (n, S) latent scores
            if (r > 0) rc |= matmul_nt_invariant(s.p2 + j0, S, s.qp, r, &P, n, 0, nb);
        }
        for (int i = 0; i < n; i++) {
            float *row = s.p + (size_t)i * S;
            const float *row2 = s.p2 + (size_t)i * S;
            int visible = pos0 + (e0 + i) % T + 1;
            for (int j = 0; j < visible; j++) row[j] = (row[j] + (r > 0 ? row2[j] : 0.0f)) * a->scale;
            softmax_inplace(row, visible);
            for (int j = visible; j < S; j++) row[j] = 0.0f;
        }
        for (int j0 = 0; j0 < S; j0 += bs) {  // (n, L) the weighted sums, in latent space, block after block
            int nb = S - j0 < bs ? S - j0 : bs;
            size_t row = latent_store_row(a->blocks, a->block_size, a->ld, b, j0);
            MatView C = {.dtype = a->dtype, .rows = nb, .cols = L, .data = (const char *)a->latent + row * L * es};
            rc |= matmul_nn_invariant(s.ol, L, s.p + j0, S, &C, n, 0, L, j0 > 0);
        }
        for (int i = 0; i < n; i++) {
            int h = h0 + (e0 + i) / T, t = (e0 + i) % T;
            MatView wuv = matview_rows(a->kv_b_proj, h * (nope + v) + nope, v);
            rc |= matmul_nt_part(out + ((size_t)t * H + h) * v, s.ol + (size_t)i * L, &wuv, 1, 0, v);
        }
    }
    return rc ? -1 : 0;
}

int latent_attention_absorbed_part(const LatentAttention *a, int h0, int h1, float *scratch) {
    return absorbed_heads(a, 0, h0, h1, carve(a, scratch, a->pos0 + a->T));
}

// Plain attention over a BF16 or paged store: its positions gathered (and widened) into a
// contiguous F32 copy once per call, not per head.
static int plain_gathered(const LatentAttention *a) {
    int S = a->pos0 + a->T, L = a->kv_lora, r = a->rope;
    size_t es = dtype_size(a->dtype);
    float *lat = malloc(sizeof(float) * (size_t)a->B * S * L), *kp = malloc(sizeof(float) * ((size_t)a->B * S * r + 1));
    int rc = -1;
    if (lat && kp) {
        for (int b = 0; b < a->B; b++)
            for (int j = 0; j < S; j++) {
                size_t row = latent_store_row(a->blocks, a->block_size, a->ld, b, j);
                const char *ls = (const char *)a->latent + row * L * es, *ks = (const char *)a->kpe + row * r * es;
                float *ld = lat + ((size_t)b * S + j) * L, *kd = kp + ((size_t)b * S + j) * r;
                if (a->dtype == DT_BF16) {
                    bf16_to_f32_n(ld, (const uint16_t *)ls, L);
                    bf16_to_f32_n(kd, (const uint16_t *)ks, r);
                } else {
                    memcpy(ld, ls, sizeof(float) * L);
                    memcpy(kd, ks, sizeof(float) * r);
                }
            }
        LatentAttention f = *a;
        f.latent = lat;
        f.kpe = kp;
        f.ld = S;
        f.dtype = DT_F32;
        f.blocks = NULL;
        rc = latent_attention_forward(&f);
    }
    free(lat);
    free(kp);
    return rc;
}

int latent_attention_forward(const LatentAttention *a) {
    if (a->dtype != DT_F32 && a->dtype != DT_BF16) return -1;
    if (a->blocks && (a->B != 1 || a->block_size < 1)) return -1;
    if (!a->absorbed && (a->dtype == DT_BF16 || a->blocks)) return plain_gathered(a);
    int failed = 0;
#pragma omp parallel for schedule(static) reduction(| : failed)
    for (int bh = 0; bh < a->B * a->H; bh++) {
        int b = bh / a->H, h = bh % a->H;
        Scratch s = carve(a, a->scratch + (size_t)omp_get_thread_num() * a->per_thread, a->pos0 + a->T);
        failed |= (a->absorbed ? absorbed_heads(a, b, h, h + 1, s) : plain_head(a, b, h, s)) != 0;
    }
    return failed ? -1 : 0;
}

int latent_attention_backward(const LatentAttention *a, const float *dout, float *dq, float *dkv, float *dkpe,
                              float *dkpe_heads, float *dprobs) {
    int B = a->B, T = a->T, H = a->H, nope = a->nope, r = a->rope, v = a->v, qk = nope + r, kvw = nope + v;
    float scale = a->scale;
    if (a->blocks || a->dtype != DT_F32) return -1;
    const float *q = a->q, *kv = a->kv_save, *kpe = (const float *)a->kpe;
    int saved = gemm_f32_serial_begin();
#pragma omp parallel for schedule(static)
    for (int bh = 0; bh < B * H; bh++) {
        int b = bh / H, h = bh % H;
        const float *dob = dout + (size_t)b * T * H * v + (size_t)h * v;
        const float *qb = q + (size_t)b * T * H * qk + (size_t)h * qk;
        const float *kb = kv + (size_t)b * T * H * kvw + (size_t)h * kvw;
        const float *P = a->probs_save + (size_t)bh * T * T;
        float *dS = dprobs + (size_t)bh * T * T;
        float *dqb = dq + (size_t)b * T * H * qk + (size_t)h * qk;
        float *dkb = dkv + (size_t)b * T * H * kvw + (size_t)h * kvw;
        gemm_f32(0, 1, T, T, v, 1.0f, dob, H * v, kb + nope, H * kvw, 0.0f, dS, T);  // dP = dO Vᵀ
        gemm_f32(1, 0, T, v, T, 1.0f, P, T, dob, H * v, 1.0f, dkb + nope, H * kvw);  // dV += Pᵀ dO
        // dS = P ⊙ (dP − Σ_j P dP), times the score scale (folded here once)
        for (int t = 0; t < T; t++) {
            const float *pr = P + (size_t)t * T;
            float *ds = dS + (size_t)t * T, dot = 0;
            for (int j = 0; j <= t; j++) dot += pr[j] * ds[j];
            for (int j = 0; j <= t; j++) ds[j] = pr[j] * (ds[j] - dot) * scale;
            memset(ds + t + 1, 0, sizeof(float) * (T - t - 1));
        }
        if (nope > 0) {
            gemm_f32(0, 0, T, nope, T, 1.0f, dS, T, kb, H * kvw, 1.0f, dqb, H * qk);  // dQ_nope += dS K_nope
            gemm_f32(1, 0, T, nope, T, 1.0f, dS, T, qb, H * qk, 1.0f, dkb, H * kvw);  // dK_nope += dSᵀ Q_nope
        }
        if (r > 0) {
            const float *kpb = kpe + (size_t)b * a->ld * r;
            gemm_f32(0, 0, T, r, T, 1.0f, dS, T, kpb, r, 1.0f, dqb + nope, H * qk);  // dQ_pe += dS K_pe
            gemm_f32(1, 0, T, r, T, 1.0f, dS, T, qb + nope, H * qk, 0.0f, dkpe_heads + (size_t)bh * T * r, r);
        }
    }
    gemm_f32_serial_end(saved);
    if (r == 0) return 0;
    // the one rotary key per token collects every head's gradient, added in head order
#pragma omp parallel for schedule(static)
    for (int bt = 0; bt < B * T; bt++) {
        int b = bt / T, t = bt % T;
        float *dst = dkpe + (size_t)bt * r;
        for (int h = 0; h < H; h++) {
            const float *src = dkpe_heads + (((size_t)b * H + h) * T + t) * r;
            for (int i = 0; i < r; i++) dst[i] += src[i];
        }
    }
    return 0;
}
