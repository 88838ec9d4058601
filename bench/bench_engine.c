// The engine's figures: aggregate decode tokens/s of a batch of 1, 4, 16 and 64 sequences on the
// ~108M-parameter benchmark model (bench/configs/v3-108m.json, random weights, BF16 and FP8, fp32
// and BF16 compute), and MTP
// speculative decoding with K = 0..3 drafts on a model with a TRAINED MTP head — `make demo`'s
// checkpoint (build/demo/run/step-300; skipped, and said so, when it is absent) — next to what a
// bandwidth model predicts: a verify step streams the dense weights once, the routed experts the
// K + 1 tokens reach (more than one token's), and the MTP module once per draft.
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/file.h"
#include "bench_common.h"
#include "infer/engine.h"
#include "kernels/matmul.h"
#include "model/init.h"
#include "model/model.h"
#include "model/tensors.h"
#include "text/tokenizer.h"

// Bytes of the matrices one token multiplies by, split into routed experts (per expert) and the
// rest, over the main layers; and the MTP module's.
typedef struct {
    const ModelConfig *c;
    double dense, expert, mtp;  // expert: the bytes of ONE routed expert of one layer
} Bytes;

static int add_bytes(const TensorSpec *t, void *ctx) {
    Bytes *b = ctx;
    if (!t->mat) return 0;
    double v = (double)tensor_view_bytes(t->mat);
    if (t->expert >= 0) {
        if (t->mtp >= 0) b->mtp += v * b->c->num_experts_per_tok / b->c->n_routed_experts;  // K_r of them
        else b->expert = v * 3;  // gate, up, down of one expert (all the same size)
    } else if (tensor_cost(b->c, t).matmul) {
        if (t->mtp >= 0) b->mtp += v;
        else b->dense += v;
    }
    return 0;
}

static void on_token(void *owner, int seq, const EngineToken *t) { (void)owner, (void)seq, (void)t; }

// Runs n sequences (prompt of P ids each, G new tokens) with parallel n and K drafts, the decode
// steps' phases timed when profile (EngineStats.decode_profile); stats out.
static int run(const Model *m, int n, int P, int G, int K, const int *prompt, int profile, EngineStats *st) {
    Error err = {0};
    EngineOptions o = {.parallel = n, .ctx = P + G + 1, .prefill_chunk = 512, .speculative = K, .profile = profile};
    Engine *e = engine_new(m, &o, &err);
    if (!e) {
        fprintf(stderr, "%s\n", err.msg);
        return -1;
    }
    SeqParams sp = seq_params_default();
    sp.max_new = G;
    sp.stop_at_eos = 0;
    for (int i = 0; i < n; i++) {
        int ids[512];
        for (int t = 0; t < P; t++) ids[t] = prompt ? prompt[t] : (t * 7919 + i * 104729 + 13) % m->cfg.vocab_size;
        if (engine_add(e, ids, P, &sp, on_token, NULL, &err) < 0) {
            fprintf(stderr, "%s\n", err.msg);
            engine_free(e);
            return -1;
        }
    }
    int live;
    while ((live = engine_step(e, &err)) > 0) {
    }
    *st = *engine_stats(e);
    engine_free(e);
    if (live < 0) fprintf(stderr, "%s\n", err.msg);
    return live < 0 ? -1 : 0;
}

// The batch sizes on the BF16 and the FP8 copy of the model, each with fp32 and BF16 compute
// (--compute), the four taking turns at every size so that a drift of the host's memory speed
// does not favour one of them.
static int batch_figures(const int *sizes, int n_sizes) {
    const char *dirs[2] = {"build/bench-models/v3-108m-bf16", "build/bench-models/v3-108m-fp8"};
    const DType types[2] = {DT_BF16, DT_F8_E4M3};
    Error err = {0};
    ModelConfig c;
    Model m[2];
    if (config_load(&c, "bench/configs/v3-108m.json", &err) || make_dirs("build/bench-models", &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    for (int d = 0; d < 2; d++) {
        char probe[600];
        snprintf(probe, sizeof probe, "%s/config.json", dirs[d]);
        if ((!path_exists(probe) && model_write_random(&c, dirs[d], 1, types[d], (size_t)8 << 30, &err)) ||
            model_load(&m[d], dirs[d], 0, &err)) {
            fprintf(stderr, "%s\n", err.msg);
            return 1;
        }
    }
    printf("-- batched decoding, bench/configs/v3-108m.json (random weights): prompts of 32, 32 new tokens each; "
           "aggregate decode tokens/s (medians of 3)\n");
    double base[6] = {0};
    // where the CPU has AMX tiles, the BF16-compute products as --decode-tiles auto puts them there for
    // steps of that many sequences (model_set_panel_tiles)
    const int variants = weight_panels_tiles() ? 6 : 4;
    for (int i = 0; i < n_sizes; i++)
        for (int v = 0; v < variants; v++) {  // v: weights (bit 1) x compute (bit 0); 4, 5: BF16, FP8 on tiles
            Model *mv = &m[v < 4 ? v >> 1 : v - 4];
            if (model_set_compute(mv, v & 1 || v >= 4 ? COMPUTE_BF16 : COMPUTE_F32, &err)) {
                fprintf(stderr, "%s\n", err.msg);
                return 1;
            }
            int tiled = model_set_panel_tiles(mv, v >= 4 ? sizes[i] : 0);
            double r[3];
            for (int k = 0; k < 3; k++) {
                EngineStats st;
                if (run(mv, sizes[i], 32, 32, 0, NULL, 0, &st)) return 1;
                r[k] = st.decode_tokens / st.decode_s;
            }
            double tps = bench_median(r, 3);
            if (i == 0) base[v] = tps;
            char how[64] = "";
            if (v >= 4) snprintf(how, sizeof how, ", --decode-tiles auto (%d matrices)", tiled);
            printf("   %-4s weights, compute %-4s%s, batch %2d: %8.1f tokens/s aggregate, %6.1f per sequence, %.2fx batch "
                   "%d\n", dtype_name(types[v < 4 ? v >> 1 : v - 4]), v & 1 || v >= 4 ? "bf16" : "f32", how, sizes[i], tps,
                   tps / sizes[i], tps / base[v], sizes[0]);
            if (v == 3) {  // FP8 weights, BF16 compute: one run more, its decode steps' phases timed
                EngineStats st;
                if (run(mv, sizes[i], 32, 32, 0, NULL, 1, &st)) return 1;
                const DecodeProfile *p = &st.decode_profile;
                double all = p->products + p->attention + p->meetings;
                if (all > 0 && p->steps > 0)
                    printf("        its decode steps, profiled: %.2f ms a pass; the products %.0f%%, absorbed attention "
                           "%.0f%%, the threads' meetings %.0f%%\n", 1e3 * p->seconds / p->steps, 100 * p->products / all,
                           100 * p->attention / all, 100 * p->meetings / all);
            }
        }
    model_free(&m[0]);
    model_free(&m[1]);
    return 0;
}

static int speculative_figures(void) {
    const char *dir = "build/demo/run/step-300";
    char probe[600];
    snprintf(probe, sizeof probe, "%s/config.json", dir);
    if (!path_exists(probe)) {
        printf("-- speculative decoding: skipped (needs a trained MTP head: run `make demo` first)\n");
        return 0;
    }
    Error err = {0};
    Model m;
    Tokenizer *tok = tok_load_dir(dir, &err);
    if (!tok || model_load(&m, dir, 1, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    const char *text = "And God said unto Moses, I AM THAT I AM: and he said, Thus shalt thou say unto the children";
    TokIds ids = {0};
    if (tok_encode(tok, text, strlen(text), TOK_ADD_SPECIAL, &ids, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    Bytes b = {.c = &m.cfg};
    tensor_walk(&m.cfg, m.w.n_mtp, &m.w, add_bytes, &b);
    int Nr = m.cfg.n_routed_experts, Kr = m.cfg.num_experts_per_tok;
    int moe_layers = m.cfg.num_hidden_layers - m.cfg.first_k_dense_replace;
    double plain_bytes = b.dense + moe_layers * Kr * b.expert;
    // K = 0..3 take turns round by round (each round in another order), and each round's K > 0 is
    // compared with that round's K = 0: a drift of the host's speed moves both sides alike.
    enum { ROUNDS = 5 };
    printf("-- speculative decoding, %s (make demo's checkpoint, greedy, 4 sequences of 128 new tokens, one at a "
           "time; K = 0..3 taking turns, %d rounds, medians)\n   plain step streams %.1f MB\n",
           dir, ROUNDS, plain_bytes / 1e6);
    double tps[4][ROUNDS], acc[4] = {0};
    for (int r = 0; r < ROUNDS; r++)
        for (int i = 0; i < 4; i++) {
            int K = (r + i) % 4;
            EngineStats st;
            if (run(&m, 1, (int)ids.n, 128, K, ids.v, 0, &st)) return 1;
            tps[K][r] = st.decode_tokens / st.decode_s;
            acc[K] = st.draft_tokens ? (double)st.accepted_tokens / st.draft_tokens : 0;  // (greedy: the same every round)
        }
    // each K's share of the bandwidth model round by round, before bench_median sorts the rounds apart
    double per_step[4], experts[4], step_bytes[4], share[4][ROUNDS];
    for (int K = 1; K <= 3; K++) {
        // tokens a step yields: 1 + accepted drafts (drafts accepted in a row, each with rate acc)
        double run_p = 1;
        per_step[K] = 1;
        for (int j = 0; j < K; j++) per_step[K] += (run_p *= acc[K]);
        // experts K + 1 tokens reach, routing taken as uniform: Nr (1 − (1 − Kr/Nr)^(K+1)) per layer
        experts[K] = Nr > 0 ? Nr * (1 - pow(1 - (double)Kr / Nr, K + 1)) : 0;
        step_bytes[K] = b.dense + moe_layers * experts[K] * b.expert + K * b.mtp;
        for (int r = 0; r < ROUNDS; r++)
            share[K][r] = tps[K][r] / (tps[0][r] * per_step[K] * plain_bytes / step_bytes[K]);
    }
    printf("   K=0: %8.1f tokens/s\n", bench_median(tps[0], ROUNDS));
    for (int K = 1; K <= 3; K++) {
        double lo, hi;
        bench_range(share[K], ROUNDS, &lo, &hi);
        printf("   K=%d: %8.1f tokens/s, acceptance %.0f%%, %.2f tokens per step; a step streams %.1f MB "
               "(%.1f experts per MoE layer, %d MTP passes); against the bandwidth model (the same round's K=0 "
               "scaled by tokens per step and bytes per step): median %.0f%% (range %.0f-%.0f%%)\n",
               K, bench_median(tps[K], ROUNDS), 100 * acc[K], per_step[K], step_bytes[K] / 1e6, experts[K], K,
               100 * bench_median(share[K], ROUNDS), 100 * lo, 100 * hi);
    }
    ids_free(&ids);
    tok_free(tok);
    model_free(&m);
    return 0;
}

// bench_engine [--batch N]...: only the batch sizes named (for profiling one of them) and no
// speculative figures; without arguments, every figure.
int main(int argc, char **argv) {
    int sizes[16] = {1, 4, 16, 64}, n_sizes = 4, chosen = 0;
    for (int i = 1; i < argc; i++) {
        char *end;
        long v = i + 1 < argc ? strtol(argv[i + 1], &end, 10) : 0;
        if (strcmp(argv[i], "--batch") || i + 1 >= argc || *end || v < 1 || v > 256 || chosen == 16) {
            fprintf(stderr, "usage: bench_engine [--batch N (1..256)]... (at most 16)\n");
            return 2;
        }
        sizes[chosen++] = (int)v;
        i++;
    }
    if (chosen) n_sizes = chosen;
    printf("bench_engine: %d threads, kernels %s\n", omp_get_max_threads(), kernels_isa());
    return batch_figures(sizes, n_sizes) || (!chosen && speculative_figures());
}
