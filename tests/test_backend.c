// The backend interface (kernels/backend.h): errors travel instead of aborting, and the latent
// attention op's two ways (plain and absorbed) compute the same function, also for several new
// positions at once behind a cached prefix (what speculative verification runs).
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/rng.h"
#include "kernels/backend.h"
#include "kernels/convert.h"
#include "kernels/matmul.h"
#include "test.h"

static float *randn(Rng *rng, size_t n, float scale) {
    float *p = malloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) p[i] = scale * rng_normal(rng);
    return p;
}

TEST(test_backend_reports_a_matrix_it_cannot_multiply) {
    Backend *be = backend_cpu();
    int64_t data[4 * 8] = {0};
    float x[8] = {0}, out[4];
    MatView w = {.dtype = DT_I64, .rows = 4, .cols = 8, .data = data};
    CHECK(be->ops->matmul(be, out, x, &w, 1, NULL) == -1);
    CHECK_MSG(strstr(be->err.msg, "I64") && strstr(be->err.msg, "not a weight type"), "%s", be->err.msg);
    // FP8 without its scale grid is no weight either
    MatView f = {.dtype = DT_F8_E4M3, .rows = 4, .cols = 8, .data = data};
    CHECK(be->ops->matmul(be, out, x, &f, 1, NULL) == -1);
}

// BF16 compute takes the release's 128 x 128 FP8 blocks; a checkpoint with other blocks gets a
// message that says so (not "out of memory"), and fp32 compute takes it.
TEST(test_backend_bf16_compute_names_fp8_blocks_it_does_not_take) {
    Backend *be = backend_cpu();
    uint8_t codes[4 * 64];
    for (int i = 0; i < 4 * 64; i++) codes[i] = (uint8_t)(0x30 + i % 7);
    float scale = 0.5f, x[64], out[4];
    for (int i = 0; i < 64; i++) x[i] = 0.01f * i;
    MatView w = {.dtype = DT_F8_E4M3, .rows = 4, .cols = 64, .data = codes, .scale_inv = &scale, .scale_cols = 1,
                 .block = 64, .compute_bf16 = 1};
    CHECK(be->ops->matmul(be, out, x, &w, 1, NULL) == -1);
    CHECK_MSG(strstr(be->err.msg, "128 x 128 blocks") && strstr(be->err.msg, "blocks of 64"), "%s", be->err.msg);
    w.compute_bf16 = 0;
    CHECK_MSG(be->ops->matmul(be, out, x, &w, 1, NULL) == 0, "%s", be->err.msg);
    for (int r = 0; r < 4; r++) {
        double want = 0, mag = 0;
        for (int c = 0; c < 64; c++) {
            double t = (double)fp8_e4m3_to_f32(codes[r * 64 + c]) * scale * x[c];
            want += t, mag += fabs(t);
        }
        CHECK_MSG(fabs(out[r] - want) <= 1e-6 * mag + 1e-30, "row %d: %.9g vs %.9g", r, out[r], want);
    }
}

TEST(test_backend_matmul_backward_needs_an_f32_gradient) {
    Backend *be = backend_cpu();
    float w[6] = {1, 2, 3, 4, 5, 6}, x[3] = {1, 1, 1}, dout[2] = {1, 1}, dx[3] = {0};
    uint16_t g16[6] = {0};
    MatView W = matview_f32(w, 2, 3), G = {.dtype = DT_BF16, .rows = 2, .cols = 3, .data = g16};
    CHECK(be->ops->matmul_backward(be, dx, &G, dout, x, &W, 1, NULL) == -1);
    CHECK_MSG(strstr(be->err.msg, "F32"), "%s", be->err.msg);
    // with an F32 gradient: dx = doutᵀ W = (5, 7, 9), dW = dout xᵀ = all ones
    float gw[6] = {0};
    MatView GW = matview_f32(gw, 2, 3);
    CHECK(be->ops->matmul_backward(be, dx, &GW, dout, x, &W, 1, NULL) == 0);
    CHECK_NEAR(dx[0], 5, 0);
    CHECK_NEAR(dx[2], 9, 0);
    for (int i = 0; i < 6; i++) CHECK_NEAR(gw[i], 1, 0);
}

// B sequences with a cached prefix of pos0 positions and T new rows each: absorbed attention
// equals plain attention to fp32 rounding, for T = 1 (decode) and T = 2..4 (verification).
static void check_absorbed_matches_plain(int B, int pos0, int T, int nope) {
    Rng rng;
    rng_seed(&rng, 11 + T);
    int H = 4, r = 8, v = 6, L = 16, ld = pos0 + T + 3, S = pos0 + T;
    float *latent = randn(&rng, (size_t)B * ld * L, 1), *kpe = randn(&rng, (size_t)B * ld * r, 1);
    float *q = randn(&rng, (size_t)B * T * H * (nope + r), 1);
    float *kvb = randn(&rng, (size_t)H * (nope + v) * L, 0.3f);
    MatView kv_b = matview_f32(kvb, H * (nope + v), L);
    float *plain = calloc((size_t)B * T * H * v, sizeof(float)), *absorbed = calloc((size_t)B * T * H * v, sizeof(float));
    LatentAttention a = {.B = B, .T = T, .pos0 = pos0, .H = H, .nope = nope, .rope = r, .v = v, .kv_lora = L,
                         .scale = 0.3f, .q = q, .latent = latent, .kpe = kpe, .ld = ld, .kv_b_proj = &kv_b,
                         .out = plain};
    a.per_thread = latent_attention_scratch_floats(&a, S);
    a.scratch = malloc(sizeof(float) * a.per_thread * 64);
    Backend *be = backend_cpu();
    CHECK(be->ops->latent_attention(be, &a) == 0);
    a.absorbed = 1;
    a.out = absorbed;
    CHECK(be->ops->latent_attention(be, &a) == 0);
    double worst = 0, scale = 0;
    for (size_t i = 0; i < (size_t)B * T * H * v; i++) {
        worst = fmax(worst, fabs(plain[i] - absorbed[i]));
        scale = fmax(scale, fabs(plain[i]));
    }
    CHECK_MSG(worst <= 1e-5 * scale, "B %d pos0 %d T %d: max |plain - absorbed| %.3g of %.3g", B, pos0, T, worst, scale);
    // row t of a sequence sees positions up to pos0 + t only: changing a later key moves nothing
    if (T > 1) {
        float *before = malloc(sizeof(float) * (size_t)T * H * v);
        memcpy(before, absorbed, sizeof(float) * (size_t)T * H * v);
        latent[(size_t)(pos0 + T - 1) * L] += 5.0f;  // sequence 0's last new position
        CHECK(be->ops->latent_attention(be, &a) == 0);
        for (size_t i = 0; i < (size_t)(T - 1) * H * v; i++) CHECK(absorbed[i] == before[i]);
        free(before);
    }
    free(latent), free(kpe), free(q), free(kvb), free(plain), free(absorbed), free(a.scratch);
}

TEST(test_latent_attention_absorbed_matches_plain_decode) { check_absorbed_matches_plain(2, 9, 1, 5); }
TEST(test_latent_attention_absorbed_matches_plain_2_to_4_new_positions) {
    for (int T = 2; T <= 4; T++) check_absorbed_matches_plain(2, 7, T, 5);
}
TEST(test_latent_attention_absorbed_matches_plain_rope_only) { check_absorbed_matches_plain(1, 4, 3, 0); }
// Plain attention's query chunks of 64 rows (a head's keys and values packed once for all of them)
// after cached positions, and a last chunk of few rows.
TEST(test_latent_attention_absorbed_matches_plain_many_rows) {
    check_absorbed_matches_plain(2, 37, 150, 5);
    check_absorbed_matches_plain(1, 3, 133, 5);
}

// Past LATENT_CHUNK positions the cache goes in chunks merged in order: still plain attention to
// fp32 rounding, and the chunks computed apart (as a decode step spreads them over threads) then
// merged in order give the bits one thread going chunk after chunk gives.
TEST(test_latent_attention_long_context_chunks) {
    const int cases[][2] = {{2500, 1}, {2045, 3}, {1023, 1}, {1024, 2}};
    for (int k = 0; k < 4; k++) {
        int pos0 = cases[k][0], T = cases[k][1];
        check_absorbed_matches_plain(1, pos0, T, 5);
        Rng rng;
        rng_seed(&rng, 40 + k);
        int H = 4, r = 8, v = 6, L = 16, nope = 5, S = pos0 + T;
        float *latent = randn(&rng, (size_t)S * L, 1), *kpe = randn(&rng, (size_t)S * r, 1);
        float *q = randn(&rng, (size_t)T * H * (nope + r), 1), *kvb = randn(&rng, (size_t)H * (nope + v) * L, 0.3f);
        MatView kv_b = matview_f32(kvb, H * (nope + v), L);
        float *one = calloc((size_t)T * H * v, sizeof(float)), *spread = calloc((size_t)T * H * v, sizeof(float));
        LatentAttention a = {.B = 1, .T = T, .pos0 = pos0, .H = H, .nope = nope, .rope = r, .v = v, .kv_lora = L,
                             .scale = 0.3f, .absorbed = 1, .q = q, .latent = latent, .kpe = kpe, .ld = S, .kv_b_proj = &kv_b,
                             .out = one};
        size_t per = latent_attention_scratch_floats(&a, S);
        float *scratch = malloc(sizeof(float) * per);
        CHECK(latent_attention_absorbed_part(&a, 0, H, scratch) == 0);
        int chunks = latent_attention_chunk_count(&a), E = H * T;
        CHECK(chunks == (S + LATENT_CHUNK - 1) / LATENT_CHUNK);
        float *parts = malloc(sizeof(float) * chunks * E * (L + 2)), *state = malloc(sizeof(float) * E * (L + 2));
        for (int c = chunks - 1; c >= 0; c--)  // (any order of computing)
            CHECK(latent_attention_chunk(&a, c, parts + (size_t)c * E * (L + 2), scratch) == 0);
        for (int c = 0; c < chunks; c++) {  // merged in order, entries in two shares
            latent_attention_merge(&a, 0, E / 2, parts + (size_t)c * E * (L + 2), state, c == 0);
            latent_attention_merge(&a, E / 2, E, parts + (size_t)c * E * (L + 2), state, c == 0);
        }
        a.out = spread;
        CHECK(latent_attention_finish(&a, 0, E / 3, state, scratch) == 0);
        CHECK(latent_attention_finish(&a, E / 3, E, state, scratch) == 0);
        CHECK_MSG(memcmp(one, spread, sizeof(float) * T * H * v) == 0, "pos0 %d T %d: spread chunks differ", pos0, T);
        free(latent), free(kpe), free(q), free(kvb), free(one), free(spread), free(scratch), free(parts), free(state);
    }
}

// The absorbed scores (one fused kernel over the latent and the rotary values): at V3-like widths
// (128 + 32) and ragged ones (20 + 12), F32 and BF16 caches, any grouping of the heads gives the
// same bits (a thread's share of them, a verify pass's rows), and the portable path computes the
// same function as the AVX-512 one (plain attention, fp32 rounding, on both).
TEST(test_latent_attention_absorbed_scores_any_grouping) {
    const int widths[][2] = {{128, 32}, {20, 12}};
    // 39 and 41 positions: the last tile of the AVX-512 scores (6 positions) holds 3 or 5 of them
    for (int w = 0; w < 4; w++)
        for (int bf = 0; bf < 2; bf++) {
            Rng rng;
            rng_seed(&rng, 70 + 2 * w + bf);
            int H = 16, T = 2, pos0 = w < 2 ? 37 : 39, S = pos0 + T, L = widths[w % 2][0], r = widths[w % 2][1], nope = 7, v = 5;
            float *latent = randn(&rng, (size_t)S * L, 1), *kpe = randn(&rng, (size_t)S * r, 1);
            float *q = randn(&rng, (size_t)T * H * (nope + r), 0.3f), *kvb = randn(&rng, (size_t)H * (nope + v) * L, 0.3f);
            uint16_t *lat16 = malloc(sizeof(uint16_t) * S * L), *kpe16 = malloc(sizeof(uint16_t) * S * r);
            bf16_from_f32_n(lat16, latent, (size_t)S * L);
            bf16_from_f32_n(kpe16, kpe, (size_t)S * r);
            MatView kv_b = matview_f32(kvb, H * (nope + v), L);
            float *all = calloc((size_t)T * H * v, sizeof(float)), *split = calloc((size_t)T * H * v, sizeof(float));
            LatentAttention a = {.B = 1, .T = T, .pos0 = pos0, .H = H, .nope = nope, .rope = r, .v = v, .kv_lora = L,
                                 .scale = 0.2f, .absorbed = 1, .q = q, .latent = bf ? (void *)lat16 : latent,
                                 .kpe = bf ? (void *)kpe16 : kpe, .ld = S, .dtype = bf ? DT_BF16 : DT_F32,
                                 .kv_b_proj = &kv_b, .out = all};
            float *scratch = malloc(sizeof(float) * latent_attention_scratch_floats(&a, S));
            CHECK(latent_attention_absorbed_part(&a, 0, H, scratch) == 0);
            a.out = split;
            // groups of 1, 3, 11 and 1 heads: 2 to 22 entries, each score against the same score
            // of all 32 entries at once (a BF16 cache's rows widened once for them all)
            const int cuts[] = {0, 1, 4, 15, 16};
            for (int g = 0; g < 4; g++) CHECK(latent_attention_absorbed_part(&a, cuts[g], cuts[g + 1], scratch) == 0);
            CHECK_MSG(memcmp(all, split, sizeof(float) * T * H * v) == 0, "L %d r %d %s: grouping changed the bits", L,
                      r, bf ? "bf16" : "f32");
            // the portable path against the AVX-512 one: the same function to fp32 rounding
            CHECK(kernels_set_isa("scalar") == 0);
            CHECK(latent_attention_absorbed_part(&a, 0, H, scratch) == 0);
            CHECK(kernels_set_isa("auto") == 0);
            double worst = 0, big = 0;
            for (int i = 0; i < T * H * v; i++) worst = fmax(worst, fabs(split[i] - all[i])), big = fmax(big, fabs(all[i]));
            CHECK_MSG(worst <= 1e-5 * big, "L %d r %d: portable vs vector %.3g of %.3g", L, r, worst, big);
            free(latent), free(kpe), free(q), free(kvb), free(lat16), free(kpe16), free(all), free(split), free(scratch);
        }
    check_absorbed_matches_plain(2, 9, 1, 5);  // and the plain comparison on the portable path
    CHECK(kernels_set_isa("scalar") == 0);
    check_absorbed_matches_plain(2, 9, 1, 5);
    check_absorbed_matches_plain(1, 4, 3, 0);
    CHECK(kernels_set_isa("auto") == 0);
}

// Training's attention (keys and values expanded by the caller, probabilities kept): the same
// outputs and kept probabilities, to fp32 rounding, as the attention that expands them itself and
// keeps them as it goes (one product over [k_nope | k_pe] against the two of the other), at
// T = 150 (three query chunks, one ragged) and without the no-rope part; upper triangles 0.
TEST(test_latent_attention_training_path_matches_expanding_one) {
    for (int nope = 0; nope <= 12; nope += 12) {
        Rng rng;
        rng_seed(&rng, 31 + nope);
        int B = 2, T = 150, H = 3, r = 8, v = 6, L = 16;
        float *latent = randn(&rng, (size_t)B * T * L, 1), *kpe = randn(&rng, (size_t)B * T * r, 1);
        float *q = randn(&rng, (size_t)B * T * H * (nope + r), 1);
        float *kvb = randn(&rng, (size_t)H * (nope + v) * L, 0.3f);
        MatView kv_b = matview_f32(kvb, H * (nope + v), L);
        size_t no = (size_t)B * T * H * v, nk = (size_t)B * T * H * (nope + v), np = (size_t)B * H * T * T;
        float *out1 = calloc(no, 4), *out2 = calloc(no, 4), *kv = calloc(nk + 1, 4), *p1 = malloc(4 * np), *p2 = malloc(4 * np);
        for (size_t i = 0; i < np; i++) p1[i] = p2[i] = NAN;  // every entry written, the masked ones 0
        LatentAttention a = {.B = B, .T = T, .H = H, .nope = nope, .rope = r, .v = v, .kv_lora = L, .scale = 0.3f,
                             .q = q, .latent = latent, .kpe = kpe, .ld = T, .kv_b_proj = &kv_b, .out = out1,
                             .kv_save = kv, .probs_save = p1};
        a.per_thread = latent_attention_scratch_floats(&a, T);
        a.scratch = malloc(sizeof(float) * a.per_thread * 64);
        Backend *be = backend_cpu();
        CHECK(be->ops->latent_attention(be, &a) == 0);  // expands [k_nope | v] into kv
        a.kv_save = NULL, a.kv_in = kv, a.out = out2, a.probs_save = p2;
        CHECK(be->ops->latent_attention(be, &a) == 0);
        double wo = 0, so = 0, wp = 0;
        for (size_t i = 0; i < no; i++) wo = fmax(wo, fabs(out1[i] - out2[i])), so = fmax(so, fabs(out1[i]));
        int masked_ok = 1;
        for (int bh = 0; bh < B * H; bh++)
            for (int t = 0; t < T; t++)
                for (int j = 0; j < T; j++) {
                    size_t i = ((size_t)bh * T + t) * T + j;
                    wp = fmax(wp, fabs(p1[i] - p2[i]));
                    if (j > t && p2[i] != 0.0f) masked_ok = 0;
                }
        CHECK_MSG(wo <= 1e-5 * so && wp <= 1e-5, "nope %d: outputs %.3g of %.3g, probabilities %.3g apart", nope, wo, so, wp);
        CHECK(masked_ok);
        free(latent), free(kpe), free(q), free(kvb), free(out1), free(out2), free(kv), free(p1), free(p2), free(a.scratch);
    }
}

TEST(test_latent_attention_backward_refuses_an_unsaved_forward) {
    Backend *be = backend_cpu();
    LatentAttention a = {.B = 1, .T = 2, .pos0 = 1, .H = 1, .nope = 2, .rope = 2, .v = 2, .kv_lora = 2};
    float d[16] = {0};
    CHECK(be->ops->latent_attention_backward(be, &a, d, d, d, d, d) == -1);
    CHECK_MSG(strstr(be->err.msg, "latent_attention_backward"), "%s", be->err.msg);
}

// The routed experts in one call (the MoE seam's grouped product) give the bits of matmul and
// swiglu expert by expert — whole experts on different threads, the largest first — for fp32 and
// BF16 compute, F32/BF16/FP8 weights, experts of 0, 1, a few and many rows; a bad weight type in
// one expert is reported.
// gather_rows' backward: dx[rows[i]] += dout[i] with rows repeating in any order gives the bits of
// the loop over i (each element's additions in the order of i), on any number of threads.
TEST(test_backend_scatter_add_rows_in_order) {
    Backend *be = backend_cpu();
    Rng rng;
    rng_seed(&rng, 13);
    enum { R = 37, n = 500, d = 45 };
    int rows[n];
    for (int i = 0; i < n; i++) rows[i] = (int)(rng_next(&rng) % R);
    rows[n - 1] = R - 1;
    float *dout = randn(&rng, (size_t)n * d, 1.0f), *x0 = randn(&rng, (size_t)R * d, 1.0f);
    float *want = malloc(sizeof(float) * R * d), *got = malloc(sizeof(float) * R * d);
    memcpy(want, x0, sizeof(float) * R * d);
    for (int i = 0; i < n; i++)
        for (int c = 0; c < d; c++) {
            volatile float v = want[(size_t)rows[i] * d + c] + dout[(size_t)i * d + c];
            want[(size_t)rows[i] * d + c] = v;
        }
    memcpy(got, x0, sizeof(float) * R * d);
    CHECK(be->ops->scatter_add_rows(be, got, dout, rows, n, d) == 0);
    CHECK_MSG(memcmp(got, want, sizeof(float) * R * d) == 0, "the sums differ from the loop over i");
    free(dout), free(x0), free(want), free(got);
}

// Training's experts (a recipe: BF16 or FP8 products on F32 master weights), forward and backward
// in one call each — whole experts on the threads — give the bits of each expert computed alone
// (its products then split over the threads), and the backward is the chain rule: every input and
// weight gradient against fp64 sums of the same products' operands within the format's rounding.
TEST(test_backend_experts_training_equal_expert_by_expert) {
    Backend *be = backend_cpu();
    Rng rng;
    rng_seed(&rng, 11);
    enum { E = 5, d = 160, F = 72 };
    const int rows[E] = {40, 0, 300, 1, 97};
    int off[E + 1] = {0};
    for (int e = 0; e < E; e++) off[e + 1] = off[e] + rows[e];
    int S = off[E];
    size_t nF = (size_t)S * F, nd = (size_t)S * d;
    float *x = randn(&rng, nd, 1.0f), *dout = randn(&rng, nd, 1.0f);
    MatView w[3 * E];
    const MatView *wp[3 * E];
    for (int i = 0; i < 3 * E; i++) {
        int r = i % 3 == 2 ? d : F, c = i % 3 == 2 ? F : d;
        w[i] = matview_f32(randn(&rng, (size_t)r * c, 0.1f), r, c);
        wp[i] = &w[i];
    }
    const LinearRecipe recipes[2] = {{.fmt = LOWP_BF16, .grad_fmt = LOWP_BF16},
                                     {.fmt = LOWP_E4M3, .grad_fmt = LOWP_E4M3, .accum = {0, 1}}};
    for (int ri = 0; ri < 2; ri++) {
        const LinearRecipe *rc = &recipes[ri];
        float *buf[2][9];  // out, gate, up, h, dx, dgate, dup, dh, dW (all experts' three)
        size_t nw = (size_t)E * 3 * F * d;
        for (int k = 0; k < 2; k++) {
            size_t sizes[9] = {nd, nF, nF, nF, nd, nF, nF, nF, nw};
            for (int j = 0; j < 9; j++) buf[k][j] = calloc(sizes[j] + 1, sizeof(float));
        }
        MatView dw[2][3 * E];
        const MatView *dwp[2][3 * E];
        for (int k = 0; k < 2; k++)
            for (int i = 0; i < 3 * E; i++) {
                dw[k][i] = matview_f32(buf[k][8] + (size_t)i * F * d, w[i].rows, w[i].cols);
                dwp[k][i] = &dw[k][i];
            }
        // k = 0: every expert in one call; k = 1: one call per expert, the others empty
        CHECK_MSG(be->ops->experts(be, buf[0][0], buf[0][1], buf[0][2], buf[0][3], x, wp, E, off, rc) == 0, "%s", be->err.msg);
        CHECK_MSG(be->ops->experts_backward(be, buf[0][4], dwp[0], dout, x, buf[0][1], buf[0][2], buf[0][3], buf[0][5],
                                            buf[0][6], buf[0][7], wp, E, off, rc) == 0,
                  "%s", be->err.msg);
        for (int e = 0; e < E; e++) {
            int one[E + 1];
            for (int j = 0; j <= E; j++) one[j] = j <= e ? off[e] : off[e + 1];
            CHECK(be->ops->experts(be, buf[1][0], buf[1][1], buf[1][2], buf[1][3], x, wp, E, one, rc) == 0);
            CHECK(be->ops->experts_backward(be, buf[1][4], dwp[1], dout, x, buf[1][1], buf[1][2], buf[1][3], buf[1][5],
                                            buf[1][6], buf[1][7], wp, E, one, rc) == 0);
        }
        const char *names[9] = {"out", "gate", "up", "h", "dx", "dgate", "dup", "dh", "dW"};
        size_t sizes[9] = {nd, nF, nF, nF, nd, nF, nF, nF, nw};
        for (int j = 0; j < 9; j++)
            CHECK_MSG(!memcmp(buf[0][j], buf[1][j], sizeof(float) * sizes[j]), "%s: %s differs from expert by expert",
                      ri ? "fp8" : "bf16", names[j]);
        // the chain rule, in fp64 over the values the products saw (bf16: the rounded operands;
        // fp8 is checked for its scale of error only): dh = dout Wd, dgate/dup from SwiGLU,
        // dx = dgate Wg + dup Wu, dWd = doutᵀ h
        double worst = 0, big = 0, dgu[2 * F];
        for (int e = 0; e < E; e++) {
            const float *wg = w[3 * e].data, *wu = w[3 * e + 1].data, *wd = w[3 * e + 2].data;
            for (int t = off[e]; t < off[e + 1]; t++) {
                for (int f = 0; f < F; f++) {
                    double dh = 0;
                    for (int j = 0; j < d; j++) dh += (double)dout[(size_t)t * d + j] * wd[(size_t)j * F + f];
                    double g = buf[0][1][(size_t)t * F + f], u = buf[0][2][(size_t)t * F + f], sg = 1 / (1 + exp(-g));
                    dgu[f] = dh * u * sg * (1 + g * (1 - sg)), dgu[F + f] = dh * g * sg;
                }
                for (int c = 0; c < d; c++) {
                    double ref = 0;
                    for (int f = 0; f < F; f++) ref += dgu[f] * wg[(size_t)f * d + c] + dgu[F + f] * wu[(size_t)f * d + c];
                    worst = fmax(worst, fabs(ref - buf[0][4][(size_t)t * d + c]));
                    big = fmax(big, fabs(ref));
                }
            }
        }
        double tol = ri ? 0.15 : 0.015;  // of the largest (measured 0.004 and 0.06): BF16 operands 3 products deep; E4M3
        CHECK_MSG(worst <= tol * big, "%s: dx %.3g from fp64 (largest %.3g)", ri ? "fp8" : "bf16", worst, big);
        printf("    %s: dx within %.2g of fp64 (relative to the largest)\n", ri ? "fp8" : "bf16", worst / big);
        for (int k = 0; k < 2; k++)
            for (int j = 0; j < 9; j++) free(buf[k][j]);
    }
    for (int i = 0; i < 3 * E; i++) free((void *)w[i].data);
    free(x), free(dout);
}

TEST(test_backend_experts_equal_expert_by_expert) {
    Backend *be = backend_cpu();
    Rng rng;
    rng_seed(&rng, 7);
    enum { E = 6, d = 300, F = 96 };  // (d past one packed slice of K; an expert past a block of rows)
    const int rows[E] = {0, 1, 37, 5, 210, 16};
    int off[E + 1] = {0};
    for (int e = 0; e < E; e++) off[e + 1] = off[e] + rows[e];
    int S = off[E];
    float *x = randn(&rng, (size_t)S * d, 1.0f);
    const DType types[3] = {DT_F32, DT_BF16, DT_F8_E4M3};
    for (int ti = 0; ti < 3; ti++)
        for (int bf = 0; bf < 2; bf++) {
            MatView w[3 * E];
            const MatView *wp[3 * E];
            void *mem[3 * E];
            float *scales[3 * E];
            for (int i = 0; i < 3 * E; i++) {
                int r = i % 3 == 2 ? d : F, c = i % 3 == 2 ? F : d;
                float *f = randn(&rng, (size_t)r * c, 0.1f);
                scales[i] = NULL;
                if (types[ti] == DT_F32) {
                    mem[i] = f;
                } else if (types[ti] == DT_BF16) {
                    uint16_t *b = malloc(sizeof(uint16_t) * r * c);
                    bf16_from_f32_n(b, f, (size_t)r * c);
                    mem[i] = b, free(f);
                } else {
                    uint8_t *q = malloc((size_t)r * c);
                    for (long k = 0; k < (long)r * c; k++) q[k] = fp8_e4m3_from_f32(f[k] * 100);
                    int sr = (r + 127) / 128, sc = (c + 127) / 128;
                    scales[i] = malloc(sizeof(float) * sr * sc);
                    for (int k = 0; k < sr * sc; k++) scales[i][k] = 0.01f * (1 + k);
                    mem[i] = q, free(f);
                }
                w[i] = (MatView){.dtype = types[ti], .rows = r, .cols = c, .data = mem[i], .compute_bf16 = bf,
                                 .scale_inv = scales[i], .scale_cols = (c + 127) / 128, .block = 128};
                wp[i] = &w[i];
            }
            size_t nF = (size_t)S * F + 1, nd = (size_t)S * d + 1;
            float *g1 = calloc(nF, 4), *u1 = calloc(nF, 4), *h1 = calloc(nF, 4), *o1 = calloc(nd, 4);
            float *g2 = calloc(nF, 4), *u2 = calloc(nF, 4), *h2 = calloc(nF, 4), *o2 = calloc(nd, 4);
            CHECK_MSG(be->ops->experts(be, o1, g1, u1, h1, x, wp, E, off, NULL) == 0, "%s", be->err.msg);
            for (int e = 0; e < E; e++) {
                int n = rows[e];
                if (!n) continue;
                size_t o = off[e];
                CHECK(be->ops->matmul(be, g2 + o * F, x + o * d, &w[3 * e], n, NULL) == 0);
                CHECK(be->ops->matmul(be, u2 + o * F, x + o * d, &w[3 * e + 1], n, NULL) == 0);
                CHECK(be->ops->swiglu(be, h2 + o * F, g2 + o * F, u2 + o * F, (long)n * F) == 0);
                CHECK(be->ops->matmul(be, o2 + o * d, h2 + o * F, &w[3 * e + 2], n, NULL) == 0);
            }
            CHECK_MSG(!memcmp(g1, g2, 4 * nF) && !memcmp(u1, u2, 4 * nF) && !memcmp(h1, h2, 4 * nF) &&
                          !memcmp(o1, o2, 4 * nd),
                      "%s weights, compute %s: the grouped experts differ from expert by expert", dtype_name(types[ti]),
                      bf ? "bf16" : "f32");
            double mag = 0;
            for (size_t i = 0; i + 1 < nd; i++) mag += fabs(o1[i]);
            CHECK(mag > 0);
            free(g1), free(u1), free(h1), free(o1), free(g2), free(u2), free(h2), free(o2);
            for (int i = 0; i < 3 * E; i++) free(mem[i]), free(scales[i]);
        }
    // an expert whose weights are no weight type: the error names the op and the type
    int64_t junk[8] = {0};
    MatView bad = {.dtype = DT_I64, .rows = 2, .cols = 4, .data = junk};
    const MatView *wb[3] = {&bad, &bad, &bad};
    int off1[2] = {0, 1};
    float xb[4] = {0}, ob[4], gb[2], ub[2], hb[2];
    CHECK(be->ops->experts(be, ob, gb, ub, hb, xb, wb, 1, off1, NULL) == -1);
    CHECK_MSG(strstr(be->err.msg, "experts") && strstr(be->err.msg, "I64"), "%s", be->err.msg);
    free(x);
}
