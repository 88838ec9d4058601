// Latent attention (attention.h): plain and absorbed forward, plain backward.
#include <math.h>
#include <omp.h>
#include <string.h>

#include <stdlib.h>

#include "kernels/attention.h"
#include "kernels/convert.h"
#include "kernels/kernels_cpu.h"
#include "kernels/ops.h"

#define QC LATENT_QCHUNK
// Plain attention packs a head's keys and values once for all its query chunks up to this many
// positions (the scratch for them stays bounded); longer, gemm_avx512 packs them per chunk.
#define PACKED_MAX_S 4096

// One thread's scratch.
typedef struct Scratch {
    float *k, *v;     // (S, nope + rope), (S, nope + v): one head's keys [k_nope | k_pe] and values
                      // (plain; v holds the expansion's [k_nope | v] rows first)
    float *kp, *vp;   // plain, S <= PACKED_MAX_S: the keys' and the values' panels (f32_panels_pack)
    float *p;         // (QC, S) scores
    float *q, *qp;    // (QC, nope + rope) query rows (plain), (QC, rope) rotary queries (absorbed)
    float *qa, *ol;   // (QC, kv_lora) absorbed queries, latent-space outputs (absorbed)
    float *o;         // (QC, v)
    float *part, *state;  // (QC, kv_lora + 2) absorbed: a chunk's [max, sum, latent sum], and the merge
} Scratch;

// Each buffer starts on a 64-byte line, whatever S is (the vector kernels read them).
static size_t lines(size_t floats) { return (floats + 15) & ~(size_t)15; }

static int packed_positions(int S) { return S <= PACKED_MAX_S ? S : 0; }

size_t latent_attention_scratch_floats(const LatentAttention *a, int S) {
    size_t Q = QC;
    int P = packed_positions(S < PACKED_MAX_S ? S : PACKED_MAX_S);  // (a shorter S may pack)
    return lines((size_t)S * (a->nope + a->rope)) + lines((size_t)S * (a->nope + a->v)) +
           lines(f32_panels_floats(P, a->nope + a->rope)) + lines(f32_panels_floats(a->v, P)) + lines(Q * S) +
           lines(Q * (a->nope + a->rope)) + lines(Q * a->rope) + 2 * lines(Q * a->kv_lora) + lines(Q * a->v) +
           2 * lines(Q * (a->kv_lora + 2));
}

// base: 64-byte aligned.
static Scratch carve(const LatentAttention *a, float *base, int S) {
    size_t Q = QC;
    Scratch h;
    h.k = base;
    h.v = h.k + lines((size_t)S * (a->nope + a->rope));
    h.kp = h.v + lines((size_t)S * (a->nope + a->v));
    h.vp = h.kp + lines(f32_panels_floats(packed_positions(S), a->nope + a->rope));
    h.p = h.vp + lines(f32_panels_floats(a->v, packed_positions(S)));
    h.q = h.p + lines(Q * S);
    h.qp = h.q + lines(Q * (a->nope + a->rope));
    h.qa = h.qp + lines(Q * a->rope);
    h.ol = h.qa + lines(Q * a->kv_lora);
    h.o = h.ol + lines(Q * a->kv_lora);
    h.part = h.o + lines(Q * a->v);
    h.state = h.part + lines(Q * (a->kv_lora + 2));
    return h;
}

// p (n, S) = p · scale, causally masked (row i sees keys 0 .. first_pos + i), softmaxed; masked
// entries become 0 so the weighted sum can run over the whole row.
static void scores_to_probs(float *p, int n, int S, int first_pos, float scale) {
    for (int i = 0; i < n; i++) {
        float *row = p + (size_t)i * S;
        int visible = first_pos + i + 1;
        if (kernels_cpu_avx512()) add_scale_avx512(row, NULL, visible, scale);
        else
            for (int j = 0; j < visible; j++) row[j] *= scale;
        softmax_inplace(row, visible);
        if (visible < S) memset(row + visible, 0, sizeof(float) * (S - visible));
    }
}

// Training's plain attention (pos0 = 0, keys and values expanded by the caller, probabilities kept
// for the backward pass): head h of sequence b, on the library's GEMM as its backward. The head's
// keys are laid out [k_nope | k_pe] so that one product over qk columns gives the scores, written
// straight into the kept probabilities' rows (softmaxed there in place), and the outputs go
// straight to out.
static void plain_head_saved(const LatentAttention *a, int b, int h, Scratch s) {
    int H = a->H, nope = a->nope, r = a->rope, v = a->v, qk = nope + r, T = a->T;
    const float *kpe = (const float *)a->kpe + (size_t)b * a->ld * r;
    for (int j = 0; j < T; j++) {
        const float *src = a->kv_in + ((size_t)(b * T + j) * H + h) * (nope + v);
        memcpy(s.k + (size_t)j * qk, src, sizeof(float) * nope);
        memcpy(s.k + (size_t)j * qk + nope, kpe + (size_t)j * r, sizeof(float) * r);
        memcpy(s.v + (size_t)j * v, src + nope, sizeof(float) * v);
    }
    for (int t0 = 0; t0 < T; t0 += QC) {
        int n = T - t0 < QC ? T - t0 : QC, Sc = t0 + n;  // the rows see keys 0 .. t0 + n - 1 at most
        float *P = a->probs_save + (((size_t)b * H + h) * T + t0) * T;
        const float *q = a->q + ((size_t)(b * T + t0) * H + h) * qk;
        if (qk > 0) gemm_f32(0, 1, n, Sc, qk, a->scale, q, H * qk, s.k, qk, 0.0f, P, T);  // scaled scores
        else
            for (int i = 0; i < n; i++) memset(P + (size_t)i * T, 0, sizeof(float) * Sc);
        for (int i = 0; i < n; i++) {
            float *row = P + (size_t)i * T;
            int visible = t0 + i + 1;
            softmax_inplace(row, visible);
            memset(row + visible, 0, sizeof(float) * (T - visible));
        }
        gemm_f32(0, 0, n, v, Sc, 1.0f, P, T, s.v, v, 0.0f, a->out + ((size_t)(b * T + t0) * H + h) * v, H * v);
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
    if (a->kv_in) {  // expanded by the caller: head h's [k_nope | v], rows of sequence b
        for (int j = 0; j < S; j++) {
            const float *src = a->kv_in + ((size_t)(b * T + j) * H + h) * (nope + v);
            memcpy(s.k + (size_t)j * qk, src, sizeof(float) * nope);
            memcpy(s.v + (size_t)j * v, src + nope, sizeof(float) * v);
        }
    } else {
        // the head's nope + v rows of kv_b_proj are adjacent: one product (the latents rounded and
        // packed once), its [k_nope | v] rows then split — v moved down in place
        MatView wkv = matview_rows(a->kv_b_proj, h * (nope + v), nope + v);
        rc |= matmul_nt(s.v, latent, &wkv, S);
        for (int j = 0; j < S; j++) {
            memcpy(s.k + (size_t)j * qk, s.v + (size_t)j * (nope + v), sizeof(float) * nope);
            memmove(s.v + (size_t)j * v, s.v + (size_t)j * (nope + v) + nope, sizeof(float) * v);
        }
    }
    for (int j = 0; j < S; j++) memcpy(s.k + (size_t)j * qk + nope, kpe + (size_t)j * r, sizeof(float) * r);
    if (a->kv_save)  // [k_nope | v] of head h, rows of sequence b
        for (int j = 0; j < S; j++) {
            float *dst = a->kv_save + ((size_t)(b * T + j) * H + h) * (nope + v);
            memcpy(dst, s.k + (size_t)j * qk, sizeof(float) * nope);
            memcpy(dst + nope, s.v + (size_t)j * v, sizeof(float) * v);
        }
    MatView K = matview_f32(s.k, S, qk), V = matview_f32(s.v, S, v);
    // Training (probabilities kept for the backward pass) takes the library GEMM, as its backward
    // does; inference keeps the kernels whose rows do not depend on how many there are.
    const int library = a->probs_save != NULL;
    // The keys and values packed once for all the query chunks (gemm_avx512 packs its operand per
    // product: ~15% of prefill's attention), the queries read and the outputs written in place
    // (no row copies); the same products, so the same bits.
    const int packed = !library && packed_positions(S) && qk > 0 && v > 0 && kernels_cpu_avx512();
    if (packed) {
        f32_panels_pack(s.kp, &K, 1, S, qk);
        f32_panels_pack(s.vp, &V, 0, v, S);
    }
    for (int t0 = 0; t0 < T; t0 += QC) {
        int n = T - t0 < QC ? T - t0 : QC, Sc = pos0 + t0 + n;
        if (packed && n > GEMV_MAX_N) {  // (fewer rows: the few-row kernels, as matmul_nt and matmul_nn take them)
            const float *q = a->q + ((size_t)(b * T + t0) * H + h) * qk;
            float *o = a->out + ((size_t)(b * T + t0) * H + h) * v;
            rc |= f32_panels_product(s.p, Sc, q, H * qk, n, s.kp, S, qk, Sc, qk);
            scores_to_probs(s.p, n, Sc, pos0 + t0, a->scale);
            rc |= f32_panels_product(o, H * v, s.p, Sc, n, s.vp, v, S, v, Sc);
            continue;
        }
        for (int i = 0; i < n; i++)
            memcpy(s.q + (size_t)i * qk, a->q + ((size_t)(b * T + t0 + i) * H + h) * qk, sizeof(float) * qk);
        K.rows = V.rows = Sc;
        if (qk > 0 && library) gemm_f32(0, 1, n, Sc, qk, 1.0f, s.q, qk, s.k, qk, 0.0f, s.p, Sc);
        else if (qk > 0) rc |= matmul_nt(s.p, s.q, &K, n);
        else memset(s.p, 0, sizeof(float) * n * Sc);
        scores_to_probs(s.p, n, Sc, pos0 + t0, a->scale);
        if (a->probs_save)
            for (int i = 0; i < n; i++) {
                float *dst = a->probs_save + (((size_t)b * H + h) * T + t0 + i) * T;
                memcpy(dst, s.p + (size_t)i * Sc, sizeof(float) * Sc);
                memset(dst + Sc, 0, sizeof(float) * (T - Sc));
            }
        if (library) gemm_f32(0, 0, n, v, Sc, 1.0f, s.p, Sc, s.v, v, 0.0f, s.o, v);
        else rc |= matmul_nn(s.o, s.p, &V, n);
        for (int i = 0; i < n; i++)
            memcpy(a->out + ((size_t)(b * T + t0 + i) * H + h) * v, s.o + (size_t)i * v, sizeof(float) * v);
    }
    return rc ? -1 : 0;
}

// Absorbed attention, in chunks of LATENT_CHUNK positions (attention.h). Entry e of sequence b is
// head e / T, row e % T (head-major); a part row is [max score, Σ exp, Σ exp · latent (kv_lora)].

// Head h's W_UK,hᵀ q_nope (n rows) as a piece of a->w_uk_t's product, *wt its view of the head's rows.
static NtPiece fold_piece(const LatentAttention *a, int h, MatView *wt, const float *q_nope, int ldq, int n, float *out,
                          int ldo) {
    *wt = matview_rows(a->w_uk_t, h * a->kv_lora, a->kv_lora);
    return (NtPiece){.w = wt, .r0 = 0, .r1 = a->kv_lora, .x = q_nope, .ldx = ldq, .N = n, .out = out, .ldo = ldo};
}

// Head h's W_UK,hᵀ q_nope (n rows) without w_uk_t's panels: q_nope · W_UK,h over kv_b_proj's rows
// (zero when nope is 0).
static int fold_head_nn(const LatentAttention *a, int h, const float *q_nope, int ldq, int n, float *out, int ldo) {
    if (a->nope <= 0) {
        for (int i = 0; i < n; i++) memset(out + (size_t)i * ldo, 0, sizeof(float) * a->kv_lora);
        return 0;
    }
    MatView wuk = matview_rows(a->kv_b_proj, h * (a->nope + a->v), a->nope);
    return matmul_nn_invariant(out, ldo, q_nope, ldq, &wuk, n, 0, a->kv_lora, 0);
}

// Head h's W_UV,h (ol_h) as a piece of a->kv_b_proj's product (n rows), *wv its view of the head's rows.
static NtPiece w_uv_piece(const LatentAttention *a, int h, MatView *wv, const float *ol, int ldl, int n, float *out,
                          int ldo) {
    *wv = matview_rows(a->kv_b_proj, h * (a->nope + a->v) + a->nope, a->v);
    return (NtPiece){.w = wv, .r0 = 0, .r1 = a->v, .x = ol, .ldx = ldl, .N = n, .out = out, .ldo = ldo};
}

// Heads go to matmul_nt_pieces this many at a time: one stream of weights for all of them (each
// head's W_UK or W_UV alone is a few KB — 8 KB in FP8 at v3-108m's widths).
#define HEAD_PIECES 16

typedef NtPiece (*HeadPiece)(const LatentAttention *a, int h, MatView *w, const float *x, int ldx, int n, float *out,
                             int ldo);

// One product per head of [h0, h1), piece(h) the head's, its input at x + h·x_step and its output
// at out + h·out_step (rows ldx and ldo apart).
static int head_products(const LatentAttention *a, HeadPiece piece, int h0, int h1, const float *x, size_t x_step,
                         int ldx, int n, float *out, size_t out_step, int ldo) {
    MatView w[HEAD_PIECES];
    NtPiece pc[HEAD_PIECES];
    int rc = 0;
    for (int g = h0; g < h1; g += HEAD_PIECES) {
        int np = h1 - g < HEAD_PIECES ? h1 - g : HEAD_PIECES;
        for (int k = 0; k < np; k++)
            pc[k] = piece(a, g + k, &w[k], x + (g + k) * x_step, ldx, n, out + (g + k) * out_step, ldo);
        rc |= matmul_nt_pieces(pc, np);
    }
    return rc ? -1 : 0;
}

int latent_attention_fold_queries(const LatentAttention *a, int h0, int h1, const float *q, int ldq, int n, float *out,
                                  int ldo) {
    int L = a->kv_lora, qk = a->nope + a->rope, rc = 0;
    if (!a->w_uk_t || a->nope <= 0) {
        for (int h = h0; h < h1; h++) rc |= fold_head_nn(a, h, q + (size_t)h * qk, ldq, n, out + (size_t)h * L, ldo);
        return rc ? -1 : 0;
    }
    return head_products(a, fold_piece, h0, h1, q, qk, ldq, n, out, L, ldo);
}

int latent_attention_apply_w_uv(const LatentAttention *a, int h0, int h1, const float *ol, int ldl, int n, float *out,
                                int ldo) {
    return head_products(a, w_uv_piece, h0, h1, ol, a->kv_lora, ldl, n, out, a->v, ldo);
}

// The queries of entries [e0, e0 + n) (n <= QC) of sequence b in the latent space: s.qa (n,
// kv_lora) = W_UKᵀ q_nope, s.qp (n, rope) = q_pe — once per entry group, for all its chunks, a
// head's rows of the group in one product.
static int entry_queries(const LatentAttention *a, int b, int e0, int n, Scratch s) {
    int H = a->H, nope = a->nope, r = a->rope, L = a->kv_lora, qk = nope + r, T = a->T, rc = 0, np = 0;
    const float *q = a->q + (size_t)b * T * H * qk;
    MatView wt[QC];  // on w_uk_t's panels the heads' products are one stream of pieces
    NtPiece pc[QC];
    for (int i = 0; i < n; i++) {
        int h = (e0 + i) / T, t = (e0 + i) % T;
        const float *qr = q + ((size_t)t * H + h) * qk;
        memcpy(s.qp + (size_t)i * r, qr + nope, sizeof(float) * r);
        if (a->q_latent) {
            memcpy(s.qa + (size_t)i * L, a->q_latent + (((size_t)b * T + t) * H + h) * L, sizeof(float) * L);
        } else if (t == 0 || i == 0) {  // the head's rows in this group, from this one on
            int rows = 1;
            while (i + rows < n && t + rows < T) rows++;
            if (a->w_uk_t && nope > 0) {
                pc[np] = fold_piece(a, h, &wt[np], qr, H * qk, rows, s.qa + (size_t)i * L, L);
                np++;
            } else {
                rc |= fold_head_nn(a, h, qr, H * qk, rows, s.qa + (size_t)i * L, L);
            }
        }
    }
    rc |= matmul_nt_pieces(pc, np);
    return rc ? -1 : 0;
}

// s[e * lds + j] = scale · (qa[e] · latent[j] + qp[e] · kpe[j]) for entries e < n and the run of
// cached positions j < run: each score one sum over the latent then the rotary values, the same
// bits whatever n (the AVX-512 kernel: its own fixed order).
static void latent_scores(float *s, int lds, const float *qa, const float *qp, int n, const void *lat,
                          const void *kpe, DType dt, int run, int L, int r, float scale) {
    if (kernels_cpu_avx512()) {
        latent_scores_avx512(s, lds, qa, qp, n, lat, kpe, dt == DT_BF16, run, L, r, scale);
        return;
    }
    for (int e = 0; e < n; e++)
        for (int j = 0; j < run; j++) {
            float acc = 0.0f;
            for (int k = 0; k < L; k++)
                acc += qa[(size_t)e * L + k] * (dt == DT_BF16 ? bf16_to_f32(((const uint16_t *)lat)[(size_t)j * L + k])
                                                               : ((const float *)lat)[(size_t)j * L + k]);
            for (int k = 0; k < r; k++)
                acc += qp[(size_t)e * r + k] * (dt == DT_BF16 ? bf16_to_f32(((const uint16_t *)kpe)[(size_t)j * r + k])
                                                               : ((const float *)kpe)[(size_t)j * r + k]);
            s[(size_t)e * lds + j] = acc * scale;
        }
}

// The rows of sequence b's store from position j, as many as lie in one block of a paged store
// and before j1 (*run), as a view of `cols` columns of base (latent or kpe).
static MatView store_run(const LatentAttention *a, const void *base, int cols, int b, int j, int j1, int *run) {
    int n = a->blocks ? a->block_size - j % a->block_size : j1 - j;
    *run = n < j1 - j ? n : j1 - j;
    size_t row = latent_store_row(a->blocks, a->block_size, a->ld, b, j);
    return (MatView){.dtype = a->dtype, .rows = *run, .cols = cols,
                     .data = (const char *)base + row * cols * dtype_size(a->dtype)};
}

// Entries [e0, e0 + n) (n <= QC, their queries in s.qa / s.qp) over chunk c's positions: their
// part rows (ld kv_lora + 2). The entries score the cache together (every head's key and value is
// the latent, MQA-like), a block of the paged store at a time, with the batch-invariant products.
static int chunk_entries(const LatentAttention *a, int b, int c, int e0, int n, float *part, Scratch s) {
    int r = a->rope, L = a->kv_lora, T = a->T, pos0 = a->pos0;
    int j0 = c * LATENT_CHUNK, S = pos0 + T, j1 = S - j0 < LATENT_CHUNK ? S : j0 + LATENT_CHUNK, len = j1 - j0, rc = 0;
    const int ld = S < LATENT_CHUNK ? S : LATENT_CHUNK;  // of the scores (carve gave (QC, S))
    for (int j = j0, run; j < j1; j += run) {  // (n, len) scores over the chunk
        MatView C = store_run(a, a->latent, L, b, j, j1, &run);
        MatView P = store_run(a, a->kpe, r, b, j, j1, &run);
        latent_scores(s.p + (j - j0), ld, s.qa, s.qp, n, C.data, P.data, a->dtype, run, L, r, a->scale);
    }
    for (int i = 0; i < n; i++) {
        float *row = s.p + (size_t)i * ld, *pr = part + (size_t)i * (L + 2);
        int vis = pos0 + (e0 + i) % T + 1 - j0;  // the entry's row sees positions < pos0 + t + 1
        vis = vis < 0 ? 0 : vis > len ? len : vis;
        pr[1] = exp_shifted_inplace(row, vis, &pr[0]);
        for (int j = vis; j < len; j++) row[j] = 0.0f;
    }
    for (int j = j0, run; j < j1; j += run) {  // (n, L) the exp-weighted latent sums, one chain per element
        MatView C = store_run(a, a->latent, L, b, j, j1, &run);
        rc |= matmul_nn_invariant(s.ol, L, s.p + (j - j0), ld, &C, n, 0, L, j > j0);
    }
    for (int i = 0; i < n; i++) memcpy(part + (size_t)i * (L + 2) + 2, s.ol + (size_t)i * L, sizeof(float) * L);
    return rc ? -1 : 0;
}

void latent_attention_merge(const LatentAttention *a, int e0, int e1, const float *part, float *state, int first) {
    int L = a->kv_lora;
    for (int e = e0; e < e1; e++) {
        const float *p = part + (size_t)e * (L + 2);
        float *st = state + (size_t)e * (L + 2);
        if (first) {
            memcpy(st, p, sizeof(float) * (L + 2));
            continue;
        }
        if (p[1] == 0.0f) continue;  // no position of the chunk is visible to the entry
        float m = st[0] > p[0] ? st[0] : p[0], fs = expf(st[0] - m), fp = expf(p[0] - m);
        st[0] = m;
        st[1] = st[1] * fs + p[1] * fp;
#pragma omp simd
        for (int k = 0; k < L; k++) st[2 + k] = st[2 + k] * fs + p[2 + k] * fp;
    }
}

// Entries [e0, e1) of sequence b from their merged state (row i: entry e0 + i): the latent sums
// over Σ exp, through W_UV into out.
static int finish_entries(const LatentAttention *a, int b, int e0, int e1, const float *state, Scratch s) {
    int H = a->H, v = a->v, L = a->kv_lora, T = a->T, np = 0, rc = 0;
    float *out = a->out + (size_t)b * T * H * v;
    MatView wuv[QC];  // up to QC entries' products one stream of pieces (on panels), s.ol their inputs
    NtPiece pc[QC];
    for (int e = e0; e < e1; e++) {
        if (np == QC) rc |= matmul_nt_pieces(pc, np), np = 0;
        int h = e / T, t = e % T;
        const float *st = state + (size_t)(e - e0) * (L + 2);
        float inv = 1.0f / st[1];
        if (a->out_latent) {
            float *ol = a->out_latent + (((size_t)b * T + t) * H + h) * L;
#pragma omp simd
            for (int k = 0; k < L; k++) ol[k] = st[2 + k] * inv;
            continue;
        }
        float *ol = s.ol + (size_t)np * L;
#pragma omp simd
        for (int k = 0; k < L; k++) ol[k] = st[2 + k] * inv;
        pc[np] = w_uv_piece(a, h, &wuv[np], ol, L, 1, out + ((size_t)t * H + h) * v, v);
        np++;
    }
    rc |= matmul_nt_pieces(pc, np);
    return rc ? -1 : 0;
}

// Sequence b, heads [h0, h1) × rows 0..T-1, on the calling thread: QC entries at a time, chunk
// after chunk merged in order — what the split over threads computes, so a verify pass over K + 1
// rows computes what K + 1 single steps do, however the chunks are spread.
static int absorbed_heads(const LatentAttention *a, int b, int h0, int h1, Scratch s) {
    int T = a->T, chunks = latent_attention_chunk_count(a), rc = 0;
    for (int e0 = h0 * T; e0 < h1 * T; e0 += QC) {
        int n = h1 * T - e0 < QC ? h1 * T - e0 : QC;
        rc |= entry_queries(a, b, e0, n, s);
        for (int c = 0; c < chunks; c++) {
            rc |= chunk_entries(a, b, c, e0, n, c ? s.part : s.state, s);
            if (c) latent_attention_merge(a, 0, n, s.part, s.state, 0);
        }
        rc |= finish_entries(a, b, e0, e0 + n, s.state, s);
    }
    return rc ? -1 : 0;
}

int latent_attention_absorbed_part(const LatentAttention *a, int h0, int h1, float *scratch) {
    return absorbed_heads(a, 0, h0, h1, carve(a, scratch, a->pos0 + a->T));
}

int latent_attention_chunk_count(const LatentAttention *a) { return (a->pos0 + a->T + LATENT_CHUNK - 1) / LATENT_CHUNK; }

int latent_attention_chunk(const LatentAttention *a, int c, float *part, float *scratch) {
    Scratch s = carve(a, scratch, a->pos0 + a->T);
    int E = a->H * a->T, rc = 0;
    for (int e0 = 0; e0 < E; e0 += QC) {
        int n = E - e0 < QC ? E - e0 : QC;
        rc |= entry_queries(a, 0, e0, n, s);
        rc |= chunk_entries(a, 0, c, e0, n, part + (size_t)e0 * (a->kv_lora + 2), s);
    }
    return rc;
}

int latent_attention_finish(const LatentAttention *a, int e0, int e1, const float *state, float *scratch) {
    return finish_entries(a, 0, e0, e1, state + (size_t)e0 * (a->kv_lora + 2), carve(a, scratch, a->pos0 + a->T));
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
    int failed = 0, saved = a->probs_save ? gemm_f32_serial_begin() : 1;  // (training's products: gemm_f32)
#pragma omp parallel for schedule(static) reduction(| : failed)
    for (int bh = 0; bh < a->B * a->H; bh++) {
        int b = bh / a->H, h = bh % a->H;
        Scratch s = carve(a, a->scratch + (size_t)omp_get_thread_num() * a->per_thread, a->pos0 + a->T);
        if (!a->absorbed && a->probs_save && a->kv_in) plain_head_saved(a, b, h, s);
        else failed |= (a->absorbed ? absorbed_heads(a, b, h, h + 1, s) : plain_head(a, b, h, s)) != 0;
    }
    gemm_f32_serial_end(saved);
    return failed ? -1 : 0;
}

int latent_attention_backward(const LatentAttention *a, const float *dout, float *dq, float *dkv, float *dkpe,
                              float *dkpe_heads) {
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
        // a query chunk's score gradients (QC, T) in this thread's scratch (its score rows), where
        // they stay in cache between the products that make and use them
        float *dSr = carve(a, a->scratch + (size_t)omp_get_thread_num() * a->per_thread, T).p;
        float *dqb = dq + (size_t)b * T * H * qk + (size_t)h * qk;
        float *dkb = dkv + (size_t)b * T * H * kvw + (size_t)h * kvw;
        // query rows in chunks of QC, each against the keys it can see (0 .. its last row): the
        // products skip the masked upper triangle
        const float *kpb = kpe + (size_t)b * a->ld * r;
        float *dkh = dkpe_heads + (size_t)bh * T * r;
        if (r > 0) memset(dkh, 0, sizeof(float) * T * r);
        for (int t0 = 0; t0 < T; t0 += QC) {
            int n = T - t0 < QC ? T - t0 : QC, S = t0 + n;
            const float *dor = dob + (size_t)t0 * H * v, *qr = qb + (size_t)t0 * H * qk, *Pr = P + (size_t)t0 * T;
            float *dqr = dqb + (size_t)t0 * H * qk;
            gemm_f32(0, 1, n, S, v, 1.0f, dor, H * v, kb + nope, H * kvw, 0.0f, dSr, T);  // dP = dO Vᵀ
            gemm_f32(1, 0, S, v, n, 1.0f, Pr, T, dor, H * v, 1.0f, dkb + nope, H * kvw);  // dV += Pᵀ dO
            // dS = P ⊙ (dP − Σ_j P dP), times the score scale (folded here once); 0 past the diagonal
            for (int i = 0; i < n; i++) {
                int t = t0 + i;
                const float *pr = Pr + (size_t)i * T;
                float *ds = dSr + (size_t)i * T, dot = 0;
#pragma omp simd reduction(+ : dot)
                for (int j = 0; j <= t; j++) dot += pr[j] * ds[j];
#pragma omp simd
                for (int j = 0; j <= t; j++) ds[j] = pr[j] * (ds[j] - dot) * scale;
                for (int j = t + 1; j < S; j++) ds[j] = 0.0f;
            }
            if (nope > 0) {
                gemm_f32(0, 0, n, nope, S, 1.0f, dSr, T, kb, H * kvw, 1.0f, dqr, H * qk);  // dQ_nope += dS K_nope
                gemm_f32(1, 0, S, nope, n, 1.0f, dSr, T, qr, H * qk, 1.0f, dkb, H * kvw);  // dK_nope += dSᵀ Q_nope
            }
            if (r > 0) {
                gemm_f32(0, 0, n, r, S, 1.0f, dSr, T, kpb, r, 1.0f, dqr + nope, H * qk);  // dQ_pe += dS K_pe
                gemm_f32(1, 0, S, r, n, 1.0f, dSr, T, qr + nope, H * qk, 1.0f, dkh, r);   // dK_pe (head h) += dSᵀ Q_pe
            }
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
