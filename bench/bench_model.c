// Prefill and decode speed of a ~108M-parameter DeepSeek-V3-layout model (bench/configs/
// v3-108m.json, random weights from `dsv3 init`'s code), in BF16 and FP8, with fp32 and BF16
// compute (--compute), next to this machine's limits: prefill is bound by the GEMM peaks, decode by
// streaming the active weights once per token (the read bandwidth). v3-108m reads 31 MB (FP8) to
// 53 MB (BF16) per token, which a 32 MB last-level cache partly holds between tokens, so its
// decode can stream faster than the bandwidth probe reads; decode is measured again on the same
// layers four times over (bench/configs/v3-deep.json: 99 and 188 MB per token), beyond the cache,
// as a released model's decode is — and, since v3-deep's layers are a hundredth of a released
// model's (a layer's fixed costs, attention and the threads' meetings, weigh as much as its
// weights there), on four layers of DeepSeek-V2-Lite's widths (bench/configs/v3-wide.json: hidden
// 2048, experts of 1408, 16 heads over a 512 + 64 latent; 239 and 443 MB per token).
#include <stdio.h>
#include <string.h>

#include "base/bigmem.h"
#include "base/file.h"
#include "base/rng.h"
#include "bench_common.h"
#include "kernels/convert.h"
#include "kernels/matmul.h"
#include "model/init.h"
#include "model/model.h"
#include "model/tensors.h"

// Bytes a decode step reads: every matrix one token is multiplied by (tensor_cost's matmul
// weights: K_r routed experts per MoE layer, the router, the head) in its stored type, and the one
// embedding row it looks up. The norm vectors (a few KB) are left out.
typedef struct Streamed {
    const ModelConfig *c;
    double bytes;
} Streamed;

static int add_streamed(const TensorSpec *t, void *ctx) {
    Streamed *s = ctx;
    if (t->mat && tensor_cost(s->c, t).matmul) s->bytes += (double)tensor_view_bytes(t->mat);
    return 0;
}

static double active_weight_bytes(Model *m) {
    Streamed s = {&m->cfg, (double)m->cfg.hidden_size * dtype_size(m->w.embed_tokens.dtype)};
    tensor_walk(&m->cfg, 0, &m->w, add_streamed, &s);
    return s.bytes;
}

typedef struct Flops {
    const ModelConfig *c;
    double matmul;  // active matrix params, the head's included
} Flops;

static int add_flops(const TensorSpec *t, void *ctx) {
    Flops *f = ctx;
    if (!t->mat) return 0;
    double p = (double)tensor_cost(f->c, t).matmul;
    f->matmul += p;
    return 0;
}

// FLOPs of a prefill of T tokens that asks for the last position's logits: 2 per multiply-add of
// every active matrix for every token (the head once), and the causal attention core (QKᵀ and PV
// over the positions each row sees: 2·H·(qk + v)·(t + 1) per row and layer).
static double prefill_flops(Model *m, int T) {
    const ModelConfig *c = &m->cfg;
    Flops f = {c, 0};
    tensor_walk(c, 0, &m->w, add_flops, &f);
    double head = (double)c->hidden_size * c->vocab_size;
    double attn = 2.0 * c->num_attention_heads * (config_qk_head_dim(c) + c->v_head_dim) * ((double)T * (T + 1) / 2) *
                  c->num_hidden_layers;
    return 2.0 * (f.matmul - head) * T + 2.0 * head + attn;
}

// bw_buf: a buffer of bw_bytes whose read speed is measured before every run.
// The machine's peaks, measured once: OpenBLAS sgemm and gemm_lowp's BF16 product on 2048^3, and
// the BF16 dot-product unit on registers.
typedef struct Peaks {
    double f32, bf16, unit;
} Peaks;

// The benchmark model of config cfg_path in dtype dt: build/bench-models/<config's name>-bf16 or -fp8.
static void model_dir(char *dir, size_t n, const char *cfg_path, DType dt) {
    const char *base = strrchr(cfg_path, '/') ? strrchr(cfg_path, '/') + 1 : cfg_path;
    int len = strlen(base) > 5 && strcmp(base + strlen(base) - 5, ".json") == 0 ? (int)strlen(base) - 5 : (int)strlen(base);
    snprintf(dir, n, "build/bench-models/%.*s-%s", len, base, dt == DT_F8_E4M3 ? "fp8" : "bf16");
}

// `steps` decode steps of one sequence after its prompt in kv, as generate and serve run them, on a
// fixed stream of ids (random weights give no meaningful argmax). 0, or -1 with err.
static int decode_steps(const Model *m, ForwardState *s, KVCache *kv, int steps, float *logits, Error *err) {
    int next = 0;
    for (int i = 0; i < steps; i++) {
        next = (next * 31 + 7) % m->cfg.vocab_size;
        DecodeSeq ds = {.kv = kv, .tokens = &next, .T = 1};
        if (model_decode(m, s, &ds, 1, logits, NULL, err)) return -1;
    }
    return 0;
}

// Prefill and decode of one model (made first if missing) in one compute mode.
static int bench_one(const char *cfg_path, DType dt, int bf16, StLoadMode mode, const void *bw_buf, size_t bw_bytes,
                     const Peaks *pk) {
    char dir[600];
    model_dir(dir, sizeof dir, cfg_path, dt);
    Error err = {0};
    ModelConfig c;
    if (config_load(&c, cfg_path, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    char probe[700];
    snprintf(probe, sizeof probe, "%s/config.json", dir);
    if (!path_exists(probe) && model_write_random(&c, dir, 1, dt, (size_t)8 << 30, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    Model m;
    st_set_load_mode(mode);
    if (model_load(&m, dir, 0, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    if (model_set_compute(&m, bf16 ? COMPUTE_BF16 : COMPUTE_F32, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        model_free(&m);
        return 1;
    }
    const char *how = bf16 ? " compute bf16" : "";
    enum { PROMPT = 512, DECODE = 128, REPS = 7 };
    int V = m.cfg.vocab_size, tok[PROMPT];
    for (int i = 0; i < PROMPT; i++) tok[i] = (i * 7919 + 13) % V;
    float *logits = malloc(sizeof(float) * V);
    double pre[REPS], dec[REPS], bws[REPS], ratio[REPS], peak[REPS], pratio[REPS], wb = active_weight_bytes(&m);
    double with_cache[REPS];  // (weights + the latent cache a step reads) / read bandwidth
    double share0[REPS];  // thread 0's share of the decode products after each run's steps (model.h)
    // each run's decode steps again, profiled (DecodeProfile): the products' share of a step, their
    // weights' rate over the read bandwidth, attention's share, the meetings' share
    double prod[REPS], prod_bw[REPS], attn[REPS], meets[REPS];
    double flops = prefill_flops(&m, PROMPT);
    // The host's memory and GEMM speeds drift from minute to minute (a shared virtual machine: the
    // AMX unit's rate was seen to double and halve between runs a minute apart), so every run is
    // paired with a bandwidth measurement and a GEMM peak of its precision taken just before it,
    // and the ratios are per pair.
    // one state and one cache for every run, as a server keeps them (the engine's pool), their
    // memory touched by an untimed run first
    ForwardState *s = forward_state_new(&m, PROMPT, PROMPT + DECODE, &err);
    KVCache kv;
    const DType kv_dtype = model_kv_dtype_auto(&m);  // (the cache generate and serve keep for this compute)
    // A step also reads its sequence's latent cache, every layer's rows of every position so far
    // (bytes counted once, as memory-bandwidth utilisation counts them, though the threads each
    // read all of it for their heads): at the decode's middle position
    const double cb = (PROMPT + DECODE / 2) * (double)kvcache_bytes_per_token(&m.cfg, kv_dtype);
    if (!s || kvcache_init_as(&kv, &m.cfg, 0, PROMPT + DECODE, kv_dtype, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    for (int r = -1; r < REPS; r++) {
        kvcache_clear(&kv);
        if (r < 0) {
            if (model_forward(&m, s, &kv, tok, PROMPT, ATTN_PLAIN, NULL, logits, NULL, &err)) return 1;
            continue;
        }
        peak[r] = bf16 ? bench_bf16_gemm_peak(2048, 2) : bench_sgemm_peak(2048, 1);
        bws[r] = bench_read_bandwidth_of(bw_buf, bw_bytes, 3);
        double t0 = bench_now();
        if (model_forward(&m, s, &kv, tok, PROMPT, ATTN_PLAIN, NULL, logits, NULL, &err)) return 1;
        double t1 = bench_now();
        if (decode_steps(&m, s, &kv, DECODE, logits, &err)) return 1;
        double t2 = bench_now();
        pre[r] = PROMPT / (t1 - t0);
        dec[r] = DECODE / (t2 - t1);
        ratio[r] = wb * dec[r] / 1e9 / bws[r];
        with_cache[r] = (wb + cb) * dec[r] / 1e9 / bws[r];
        float sh[1];
        share0[r] = forward_state_shares(s, sh, 1) > 1 ? sh[0] : 1.0;
        pratio[r] = flops / (t1 - t0) / 1e9 / peak[r];
        // the same steps profiled, apart from the timed ones (the marks cost ~1% of a step)
        kvcache_clear(&kv);
        if (model_forward(&m, s, &kv, tok, PROMPT, ATTN_PLAIN, NULL, logits, NULL, &err)) return 1;
        forward_state_profile(s, 1);
        if (decode_steps(&m, s, &kv, DECODE, logits, &err)) return 1;
        DecodeProfile pf;
        forward_state_profile_take(s, &pf);
        forward_state_profile(s, 0);
        double all = pf.products + pf.attention + pf.meetings;
        prod[r] = pf.products / all, attn[r] = pf.attention / all, meets[r] = pf.meetings / all;
        prod_bw[r] = wb * pf.steps / pf.products / 1e9 / bws[r];
    }
    kvcache_free(&kv);
    forward_state_free(s);
    double rlo, rhi, plo, phi, klo, khi, clo, chi;
    bench_range(with_cache, REPS, &clo, &chi);
    bench_range(ratio, REPS, &rlo, &rhi);
    bench_range(pratio, REPS, &plo, &phi);
    bench_range(peak, REPS, &klo, &khi);
    double p = bench_median(pre, REPS), d = bench_median(dec, REPS), bw = bench_median(bws, REPS);
    double q = bench_median(ratio, REPS);
    double gf = p * flops / PROMPT / 1e9;
    printf("%-5s%s prefill %d tokens: %8.1f tokens/s, %.1f GFLOP/s", dtype_name(dt), how, PROMPT, p, gf);
    if (bf16) printf(" (%.0f%% of the %s)", 100 * gf / pk->unit, bench_bf16_unit);
    printf("\n      GFLOP/s / %s peak taken before each run, run by run: median %.0f%% (range %.0f-%.0f%%; the peak "
           "%.0f-%.0f GFLOP/s)\n", bf16 ? "BF16 GEMM" : "sgemm", 100 * bench_median(pratio, REPS), 100 * plo, 100 * phi,
           klo, khi);
    printf("%-5s%s decode (context %d-%d, %s cache): %8.1f tokens/s, %.1f MB of weights per token, %.1f GB/s; read bandwidth %.1f GB/s\n"
           "      weights streamed / read bandwidth, run by run: median %.0f%% (range %.0f-%.0f%%); with the latent "
           "cache's %.1f MB per token: %.0f%% (range %.0f-%.0f%%)\n",
           dtype_name(dt), how, PROMPT, PROMPT + DECODE, dtype_name(kv_dtype), d, wb / 1e6, wb * d / 1e9, bw, 100 * q,
           100 * rlo, 100 * rhi, cb / 1e6, 100 * bench_median(with_cache, REPS), 100 * clo, 100 * chi);
    double blo, bhi;
    bench_range(prod_bw, REPS, &blo, &bhi);
    printf("      a step, profiled (DecodeProfile), run by run medians: the products %.0f%% of it, streaming the weights "
           "there at %.0f%% of the read bandwidth (range %.0f-%.0f%%); absorbed attention %.0f%%; waiting at the "
           "threads' meetings %.0f%%\n", 100 * bench_median(prod, REPS), 100 * bench_median(prod_bw, REPS), 100 * blo,
           100 * bhi, 100 * bench_median(attn, REPS), 100 * bench_median(meets, REPS));
    double slo, shi;
    bench_range(share0, REPS, &slo, &shi);
    printf("      thread 0's share of the decode products after each run (they follow the threads' speeds): %.2f-%.2f\n",
           slo, shi);
    // (a file freshly written through the page cache sits there in 4 KB pages, one read afresh in
    // 2 MB ones where the kernel gives them: see atomic_commit in base/file.h)
    const void *panels[1] = {m.panels};
    long long frss = 0, prss = 0, fh = st_model_huge_bytes(&m.files, &frss), ph = bigmem_huge_bytes(panels, 1, &prss);
    if (fh >= 0) printf("      pages: the checkpoint's %.0f MB resident, %.0f%% of them mapped 2 MB at a time", frss / 1e6,
                        frss ? 100.0 * fh / frss : 0.0);
    if (fh >= 0 && m.panels && ph >= 0) printf("; the weight panels' %.0f MB, %.0f%%", prss / 1e6, prss ? 100.0 * ph / prss : 0.0);
    if (fh >= 0) printf("\n");
    free(logits);
    model_free(&m);
    return 0;
}

// FP8 against BF16 weights of one config (--compute bf16, mmapped, the cache generate keeps for
// it: BF16, model_kv_dtype_auto), decode of 128 tokens after a prompt of `prompt` (512: positions
// 512-640; 0: an empty context, as llama-bench's tg128 measures decode), the two taking turns run by
// run (each round in the other order, a read-bandwidth measurement before each round): the issue's
// 1.5x, measured so that a drift of the host moves both sides (the two medians of bench_one's
// runs, minutes apart, gave 1.86x in a pass where the host read 30 GB/s for one and 61 for the
// other). Prints the median ratio and its range, and each side's weights streamed / read bandwidth.
enum { TURN_PROMPT = 512, TURN_DECODE = 128, TURN_ROUNDS = 9 };
static int fp8_over_bf16(const char *cfg_path, int prompt, const void *probe, size_t probe_bytes) {
    enum { PROMPT = TURN_PROMPT, DECODE = TURN_DECODE, ROUNDS = TURN_ROUNDS };
    const DType types[2] = {DT_BF16, DT_F8_E4M3};
    Model m[2];
    ForwardState *s[2] = {NULL, NULL};
    KVCache kv[2];
    Error err = {0};
    st_set_load_mode(ST_MAP);
    for (int i = 0; i < 2; i++) {
        char dir[600];
        model_dir(dir, sizeof dir, cfg_path, types[i]);  // (bench_one wrote them)
        if (model_load(&m[i], dir, 0, &err) || model_set_compute(&m[i], COMPUTE_BF16, &err) ||
            !(s[i] = forward_state_new(&m[i], PROMPT, PROMPT + DECODE, &err)) ||
            kvcache_init_as(&kv[i], &m[i].cfg, 0, PROMPT + DECODE, model_kv_dtype_auto(&m[i]), &err)) {
            fprintf(stderr, "%s\n", err.msg);
            return 1;
        }
    }
    int V = m[0].cfg.vocab_size, tok[PROMPT];
    for (int i = 0; i < PROMPT; i++) tok[i] = (i * 7919 + 13) % V;
    float *logits = malloc(sizeof(float) * V);
    // (the weights' bytes per token, BF16 over FP8: what a step spent only on reading them would gain —
    // the embedding and the output head stay BF16 in both, as DeepSeek releases them)
    const double wb[2] = {active_weight_bytes(&m[0]), active_weight_bytes(&m[1])};
    double tps[2][ROUNDS], share[2][ROUNDS], ratio[ROUNDS];
    for (int r = -1; r < ROUNDS; r++) {  // (round -1: untimed, the states' memory touched)
        double bw = r >= 0 ? bench_read_bandwidth_of(probe, probe_bytes, 3) : 0;
        for (int k = 0; k < 2; k++) {
            int i = r % 2 ? 1 - k : k;
            kvcache_clear(&kv[i]);
            if (prompt > 0 && model_forward(&m[i], s[i], &kv[i], tok, prompt, ATTN_PLAIN, NULL, logits, NULL, &err))
                goto fail;
            double t0 = bench_now();
            if (decode_steps(&m[i], s[i], &kv[i], DECODE, logits, &err)) goto fail;
            if (r >= 0) tps[i][r] = DECODE / (bench_now() - t0), share[i][r] = wb[i] * tps[i][r] / 1e9 / bw;
        }
    }
    for (int r = 0; r < ROUNDS; r++) ratio[r] = tps[1][r] / tps[0][r];
    double lo, hi;
    bench_range(ratio, ROUNDS, &lo, &hi);
    printf("   %s, positions %d-%d: FP8 %.1f, BF16 %.1f tokens/s (medians), their weights streamed at %.0f%% and "
           "%.0f%% of the read bandwidth; FP8 / BF16 round by round: median %.2fx (range %.2f-%.2fx); weights per "
           "token %.1f / %.1f MB = %.2fx\n",
           cfg_path, prompt, prompt + DECODE, bench_median(tps[1], ROUNDS), bench_median(tps[0], ROUNDS),
           100 * bench_median(share[1], ROUNDS), 100 * bench_median(share[0], ROUNDS), bench_median(ratio, ROUNDS), lo,
           hi, wb[0] / 1e6, wb[1] / 1e6, wb[0] / wb[1]);
    free(logits);
    for (int i = 0; i < 2; i++) kvcache_free(&kv[i]), forward_state_free(s[i]), model_free(&m[i]);
    return 0;
fail:
    fprintf(stderr, "%s\n", err.msg);
    free(logits);
    return 1;
}

// Decode tokens/s with ctx positions already in the cache (of dtype), engine-style steps
// (model_decode, one sequence). The cache holds random latents: the speed of a step does not
// depend on their values, and prefilling 32K tokens would take minutes.
static double decode_at(Model *m, int ctx, DType dtype, Error *err) {
    enum { STEPS = 32 };
    const ModelConfig *c = &m->cfg;
    KVCache kv;
    ForwardState *s = forward_state_new(m, 1, ctx + STEPS + 2, err);
    if (!s || kvcache_init_as(&kv, c, 0, ctx + STEPS + 2, dtype, err)) return -1;
    Rng rng;
    rng_seed(&rng, 7);
    int L = c->kv_lora_rank, r = c->qk_rope_head_dim;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        char *lat = kvcache_latent(&kv, c, l), *kpe = kvcache_kpe(&kv, c, l);
        for (long i = 0; i < (long)ctx * L; i++) {
            float x = rng_normal(&rng);
            if (dtype == DT_BF16) ((uint16_t *)lat)[i] = bf16_from_f32(x);
            else ((float *)lat)[i] = x;
        }
        for (long i = 0; i < (long)ctx * r; i++) {
            float x = rng_normal(&rng);
            if (dtype == DT_BF16) ((uint16_t *)kpe)[i] = bf16_from_f32(x);
            else ((float *)kpe)[i] = x;
        }
    }
    kv.len = ctx;
    int tok = 5;
    double t0 = 0;
    for (int i = -2; i < STEPS; i++) {  // two untimed steps first
        if (i == 0) t0 = bench_now();
        DecodeSeq ds = {.kv = &kv, .tokens = &tok, .T = 1};
        if (model_decode(m, s, &ds, 1, NULL, NULL, err)) return -1;
        tok = (tok * 31 + 7) % c->vocab_size;
    }
    double tps = STEPS / (bench_now() - t0);
    forward_state_free(s);
    kvcache_free(&kv);
    return tps;
}

// Decode at long contexts (the config's YaRN context allows 163,840), f32 and BF16 cache: tokens/s,
// the attention's share of a step (its time above a step at context 64, the two taken in turns),
// and the cache bytes a step reads.
static int long_context_table(const char *cfg_path, DType dt, int bf16) {
    Error err = {0};
    char dir[600];
    model_dir(dir, sizeof dir, cfg_path, dt);
    Model m;
    if (model_load(&m, dir, 0, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    if (model_set_compute(&m, bf16 ? COMPUTE_BF16 : COMPUTE_F32, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        model_free(&m);
        return 1;
    }
    const ModelConfig *c = &m.cfg;
    printf("-- long context: %s, compute %s, decode steps of one sequence (model_decode), cache of random latents; "
           "max_position_embeddings %d (YaRN factor %.0f)\n", dir, bf16 ? "bf16" : "f32", c->max_position_embeddings,
           c->rope_factor);
    // (Against a 64-position figure measured minutes before, the host's drift once made the share
    // -29%: each round now measures both.)
    const int ctxs[] = {64, 1024, 8192, 32768};
    enum { ROUNDS = 3 };
    for (int k = 0; k < 2; k++) {
        DType dt = k ? DT_BF16 : DT_F32;
        for (int i = 0; i < 4; i++) {
            double t[ROUNDS], share[ROUNDS];
            for (int rep = 0; rep < ROUNDS; rep++) {
                double base = 0;
                for (int j = 0; j < 2; j++) {  // (each round in the other order)
                    int at_ctx = (j + rep) % 2 == 0;
                    double tps = decode_at(&m, at_ctx ? ctxs[i] : ctxs[0], dt, &err);
                    if (tps < 0) {
                        fprintf(stderr, "%s\n", err.msg);
                        return 1;
                    }
                    if (at_ctx) t[rep] = tps;
                    else base = tps;
                }
                share[rep] = 1 - t[rep] / base;
            }
            double tps = bench_median(t, ROUNDS);
            double bytes = (double)ctxs[i] * kvcache_bytes_per_token(c, dt);
            printf("   cache %-4s context %6d: %8.1f tokens/s, attention %3.0f%% of a step, cache %6.1f MB per token "
                   "(%5.1f GB/s)\n", k ? "bf16" : "f32", ctxs[i], tps, i ? 100 * bench_median(share, ROUNDS) : 0.0,
                   bytes / 1e6, bytes * tps / 1e9);
        }
    }
    model_free(&m);
    return 0;
}

#define PROBE_BYTES ((size_t)1 << 30)

#define DEFAULT_CONFIG "bench/configs/v3-108m.json"
#define DEEP_CONFIG "bench/configs/v3-deep.json"
#define WIDE_CONFIG "bench/configs/v3-wide.json"

// FP8 against BF16 taking turns (fp8_over_bf16) on v3-108m (when with_default), v3-deep and
// v3-wide, after a prompt of 512 and after none.
static int fp8_turns(const void *probe, size_t probe_bytes, int with_default) {
    printf("-- FP8 against BF16 weights, --compute bf16 (BF16 cache, as generate keeps it), %d tokens decoded after "
           "a prompt of %d (positions %d-%d) and after none (0-%d, as llama-bench's tg128), the two taking turns "
           "run by run (%d rounds, each after a read-bandwidth measurement)\n",
           TURN_DECODE, TURN_PROMPT, TURN_PROMPT, TURN_PROMPT + TURN_DECODE, TURN_DECODE, TURN_ROUNDS);
    const char *cfgs[3] = {DEFAULT_CONFIG, DEEP_CONFIG, WIDE_CONFIG};
    const int prompts[2] = {TURN_PROMPT, 0};
    for (int i = with_default ? 0 : 1; i < 3; i++)
        for (int j = 0; j < 2; j++)
            if (fp8_over_bf16(cfgs[i], prompts[j], probe, probe_bytes)) return 1;
    return 0;
}

// Decode beyond the last-level cache, --compute bf16, weights mmapped: v3-deep and v3-wide, each
// in BF16 and FP8 (bench_one), then FP8 against BF16 taking turns (and first on the default model
// when asked: a full run has made it).
static int beyond_cache(const void *probe, size_t probe_bytes, const Peaks *pk, int with_default) {
    const char *cfgs[2] = {DEEP_CONFIG, WIDE_CONFIG};
    const char *what[2] = {"v3-108m's layers four times over", "four layers of DeepSeek-V2-Lite's widths"};
    for (int i = 0; i < 2; i++) {
        printf("-- beyond the last-level cache: %s (%s), --compute bf16, weights mmapped\n", cfgs[i], what[i]);
        if (bench_one(cfgs[i], DT_BF16, 1, ST_MAP, probe, probe_bytes, pk) ||
            bench_one(cfgs[i], DT_F8_E4M3, 1, ST_MAP, probe, probe_bytes, pk))
            return 1;
    }
    return fp8_turns(probe, probe_bytes, with_default);
}

// bench_model [--long-context | --beyond-cache | --fp8-turns] [CONFIG]: --long-context prints only
// the long-context table, --fp8-turns only the FP8 / BF16 turns (for both, the benchmark models
// must exist: a full run makes them), --beyond-cache only decode beyond the last-level cache
// (v3-deep and v3-wide, made if missing) and their FP8 / BF16 turns. With the default config,
// decode beyond the cache follows the default model's figures.
int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--long-context") == 0)
        return long_context_table(DEFAULT_CONFIG, DT_BF16, 0) || long_context_table(DEFAULT_CONFIG, DT_F8_E4M3, 1);
    const int beyond_only = argc > 1 && strcmp(argv[1], "--beyond-cache") == 0;
    const int turns_only = argc > 1 && strcmp(argv[1], "--fp8-turns") == 0;
    const char *cfg = argc > 1 && !beyond_only && !turns_only ? argv[1] : DEFAULT_CONFIG;
    Error err = {0};
    if (make_dirs("build/bench-models", &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    void *probe = bench_probe_alloc(PROBE_BYTES);
    if (!probe) {
        fprintf(stderr, "bench_model: out of memory for the 1 GiB bandwidth probe\n");
        return 1;
    }
    if (turns_only) {
        printf("%d threads, kernels %s\n", omp_get_max_threads(), kernels_isa());
        int rc = fp8_turns(probe, PROBE_BYTES, 1);
        free(probe);
        return rc;
    }
    printf("model %s, %d threads, kernels %s; medians of 7 runs, each after its own read-bandwidth measurement\n", cfg,
           omp_get_max_threads(), kernels_isa());
    Peaks pk = {bench_sgemm_peak(2048, 5), bench_bf16_gemm_peak(2048, 5), bench_bf16_unit_peak()};
    printf("peaks: sgemm 2048^3 %.1f GFLOP/s, BF16 GEMM (gemm_lowp, %s) 2048^3 %.1f GFLOP/s, %s %.1f GFLOP/s; "
           "prefill FLOPs: every active matrix per token (the head once) + the causal attention core\n",
           pk.f32, gemm_lowp_isa(), pk.bf16, bench_bf16_unit, pk.unit);
    if (beyond_only) {
        int rc = beyond_cache(probe, PROBE_BYTES, &pk, 0);
        free(probe);
        return rc;
    }
    for (int mode = ST_MAP; mode <= ST_READ; mode++) {
        printf("-- weights %s\n", mode == ST_MAP ? "mmapped from the page cache (the default)"
                                                 : "read into huge-page memory (--no-mmap)");
        // f32 and --compute bf16 taking turns
        for (int bf16 = 0; bf16 < 2; bf16++)
            if (bench_one(cfg, DT_BF16, bf16, mode, probe, PROBE_BYTES, &pk) ||
                bench_one(cfg, DT_F8_E4M3, bf16, mode, probe, PROBE_BYTES, &pk))
                return 1;
    }
    if (argc < 2 && beyond_cache(probe, PROBE_BYTES, &pk, 1)) return 1;
    free(probe);
    return long_context_table(cfg, DT_BF16, 0) || long_context_table(cfg, DT_F8_E4M3, 1);
}
