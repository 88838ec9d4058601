// Batched decoding (model_decode) and the paged cache: a sequence's logits are bit for bit the same
// alone or in a batch of 7 others at different lengths, with 1 and 3 threads, F32 and BF16 caches,
// on the golden models; a verify pass over K + 1 rows equals K + 1 single steps; the engine's pool
// hands out and takes back blocks, and running out ends one sequence cleanly.
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "base/bigmem.h"
#include "base/file.h"
#include "infer/engine.h"
#include "model/config.h"
#include "model/init.h"
#include "model/model.h"
#include "test.h"

#define STEPS 5

// Decodes `steps` tokens of sequence 0 (prompt p0, then its own argmax) alone in a private cache;
// logits (steps, V) of each step. shares: the threads' fixed shares of the products (one per
// thread), or NULL: measured. prof: the steps profiled into it, or NULL: not profiled.
static int alone_profiled(const Model *m, DType dt, const int *p0, int n0, int steps, const float *shares,
                          DecodeProfile *prof, float *logits, Error *err) {
    KVCache kv;
    if (kvcache_init_as(&kv, &m->cfg, 0, n0 + steps + 1, dt, err)) return -1;
    ForwardState *s = forward_state_new(m, 64, n0 + steps + 1, err);
    if (s && shares && forward_state_set_shares(s, shares, omp_get_max_threads(), err)) {
        forward_state_free(s);
        s = NULL;
    }
    int rc = s ? model_forward(m, s, &kv, p0, n0, ATTN_PLAIN, NULL, NULL, NULL, err) : -1, V = m->cfg.vocab_size;
    if (s && prof) forward_state_profile(s, 1);
    int tok = p0[n0 - 1] % V;
    for (int t = 0; t < steps && rc == 0; t++) {
        DecodeSeq one = {.kv = &kv, .tokens = &tok, .T = 1};
        rc = model_decode(m, s, &one, 1, logits + (size_t)t * V, NULL, err);
        int best = 0;
        for (int v = 1; v < V; v++) best = logits[(size_t)t * V + v] > logits[(size_t)t * V + best] ? v : best;
        tok = best;
    }
    if (s && prof) forward_state_profile_take(s, prof);
    forward_state_free(s);
    kvcache_free(&kv);
    return rc;
}

static int alone_shared(const Model *m, DType dt, const int *p0, int n0, int steps, const float *shares, float *logits,
                        Error *err) {
    return alone_profiled(m, dt, p0, n0, steps, shares, NULL, logits, err);
}

static int alone(const Model *m, DType dt, const int *p0, int n0, int steps, float *logits, Error *err) {
    return alone_shared(m, dt, p0, n0, steps, NULL, logits, err);
}

// The same sequence as row group 0 of a batch of 8 on a shared pool (block size 4, so the
// sequences span several blocks, interleaved), the others at other lengths, some of them
// verifying 3 rows at a time. Returns sequence 0's logits per step.
static int in_batch(const Model *m, DType dt, const int *p0, int n0, int steps, float *logits, Error *err) {
    const ModelConfig *c = &m->cfg;
    int V = c->vocab_size, rc = 0;
    KVPool pool;
    if (kvpool_init(&pool, c, 0, 256, 4, dt, err)) return -1;
    KVCache kv[8];
    ForwardState *s = forward_state_new(m, 64, 128, err);
    float *lg = malloc(sizeof(float) * 64 * V);
    int tok[8][4], ntok[8];
    if (!s || !lg) rc = -1;
    for (int i = 0; i < 8 && rc == 0; i++) {
        rc = kvcache_attach(&kv[i], &pool, 0, 128, err);
        int n = i == 0 ? n0 : 3 + 5 * i, p[64];
        for (int t = 0; t < n; t++) p[t] = i == 0 ? p0[t] : (t * 13 + i * 7) % V;
        if (rc == 0) rc = model_forward(m, s, &kv[i], p, n, ATTN_PLAIN, NULL, NULL, NULL, err);
        ntok[i] = i % 3 == 2 ? 3 : 1;  // sequences 2 and 5 verify 3 rows per step
        for (int t = 0; t < ntok[i]; t++) tok[i][t] = (i * 11 + t) % V;
    }
    tok[0][0] = p0[n0 - 1] % V;
    for (int step = 0; step < steps && rc == 0; step++) {
        DecodeSeq b[8];
        int nb = 0;
        // the order of the batch changes from step to step: sequence 0 is not always first
        for (int j = 0; j < 8; j++) {
            int i = (j + step * 3) % 8;
            b[nb++] = (DecodeSeq){.kv = &kv[i], .tokens = tok[i], .T = ntok[i]};
        }
        rc = model_decode(m, s, b, nb, lg, NULL, err);
        for (int j = 0, row = 0; j < nb && rc == 0; row += b[j].T, j++) {
            if (b[j].kv != &kv[0]) continue;
            memcpy(logits + (size_t)step * V, lg + (size_t)row * V, sizeof(float) * V);
            int best = 0;
            for (int v = 1; v < V; v++) best = lg[(size_t)row * V + v] > lg[(size_t)row * V + best] ? v : best;
            tok[0][0] = best;
        }
    }
    for (int i = 0; i < 8; i++) kvcache_free(&kv[i]);
    kvpool_free(&pool);
    forward_state_free(s);
    free(lg);
    return rc;
}

TEST(test_batch_invariance_bit_for_bit) {
    const char *models[] = {"tests/data/v3", "tests/data/v2lite", "tests/data/fp8"};
    int saved = omp_get_max_threads();
    for (int k = 0; k < 3; k++) {
        Model m;
        Error err = {0};
        CHECK_MSG(model_load(&m, models[k], 0, &err) == 0, "%s", err.msg);
        int V = m.cfg.vocab_size, p0[9] = {5, 17, 3, 9, 44, 2, 8, 1, 30};
        float *ref = malloc(sizeof(float) * STEPS * V), *got = malloc(sizeof(float) * STEPS * V);
        // fp32 compute with an F32 and a BF16 cache, then BF16 compute on the register tiles and,
        // where the CPU has them, on the AMX tiles (model_set_panel_tiles)
        for (int dt = 0; dt < 4; dt++) {
            DType type = dt == 1 ? DT_BF16 : DT_F32;
            if (dt == 2) CHECK_MSG(model_set_compute(&m, COMPUTE_BF16, &err) == 0, "%s", err.msg);
            if (dt == 3 && !model_set_panel_tiles(&m, MODEL_PANEL_TILES_ALL)) continue;
            omp_set_num_threads(1);
            CHECK_MSG(alone(&m, type, p0, 9, STEPS, ref, &err) == 0, "%s", err.msg);
            int threads[] = {1, 3};
            for (int ti = 0; ti < 2; ti++) {
                omp_set_num_threads(threads[ti]);
                CHECK_MSG(in_batch(&m, type, p0, 9, STEPS, got, &err) == 0, "%s", err.msg);
                for (int t = 0; t < STEPS; t++)
                    CHECK_MSG(memcmp(ref + (size_t)t * V, got + (size_t)t * V, sizeof(float) * V) == 0,
                              "%s %s, %d threads: step %d's logits differ from the sequence alone", models[k],
                              (const char *[]){"F32 cache", "BF16 cache", "BF16 compute", "BF16 compute on AMX tiles"}[dt],
                              threads[ti], t);
            }
        }
        omp_set_num_threads(saved);
        free(ref);
        free(got);
        model_free(&m);
    }
    omp_set_num_threads(saved);
}

// A random FP8 model written into dir (n bytes: the test directory's wide_experts) whose experts are
// 96 rows wide (three SHARE_UNITs of decode.c): the threads' cuts of a MoE step's gate/up rows fall
// inside an expert, which then has its down matrix's features split between them (decode.c's
// down_by_owner); the golden models' experts of 10-12 rows are always cut whole.
static int write_wide_experts(char *dir, size_t n, Error *err) {
    char path[600];
    snprintf(dir, n, "%s/wide_experts", test_tmpdir());
    if (make_dirs(dir, err)) return -1;
    snprintf(path, sizeof path, "%s/config.json", dir);
    test_write_text(path,
                    "{\"architectures\": [\"DeepseekV3ForCausalLM\"], \"model_type\": \"deepseek_v3\", \"vocab_size\": 64, "
                    "\"hidden_size\": 128, \"intermediate_size\": 192, \"moe_intermediate_size\": 96, \"num_hidden_layers\": 3, "
                    "\"num_attention_heads\": 2, \"num_key_value_heads\": 2, \"q_lora_rank\": 32, \"kv_lora_rank\": 32, "
                    "\"qk_nope_head_dim\": 16, \"qk_rope_head_dim\": 8, \"v_head_dim\": 16, \"n_routed_experts\": 8, "
                    "\"n_shared_experts\": 1, \"num_experts_per_tok\": 2, \"n_group\": 1, \"topk_group\": 1, "
                    "\"topk_method\": \"noaux_tc\", \"scoring_func\": \"sigmoid\", \"norm_topk_prob\": true, "
                    "\"routed_scaling_factor\": 2.5, \"first_k_dense_replace\": 1, \"moe_layer_freq\": 1, "
                    "\"num_nextn_predict_layers\": 0, \"max_position_embeddings\": 256, \"rope_theta\": 10000, "
                    "\"rms_norm_eps\": 1e-06, \"hidden_act\": \"silu\", \"initializer_range\": 0.05, "
                    "\"tie_word_embeddings\": false}");
    ModelConfig c;
    return config_load(&c, path, err) || model_write_random(&c, dir, 11, DT_F8_E4M3, (size_t)1 << 30, err) ? -1 : 0;
}

// The decode threads' shares of the products follow their measured speeds; skewed shares, fixed by
// hand, give the bits of one thread — fp32 and BF16 compute, an F32 and a BF16 cache — and a wrong
// set of shares is refused. (Where the last thread's share holds the shared experts' rows — the MoE
// layers of both golden models at 0.45/0.55, of tests/data/v3 at 0.15/0.6/0.25 — it computes them
// while thread 0 computes the router: decode.c's shared_first. The third model's cuts split
// experts.)
TEST(test_thread_shares_keep_bits) {
    char wide[400];
    Error werr = {0};
    CHECK_MSG(write_wide_experts(wide, sizeof wide, &werr) == 0, "%s", werr.msg);
    const char *models[] = {"tests/data/v3", "tests/data/fp8", wide};
    int saved = omp_get_max_threads();
    static const float two[2] = {0.8f, 0.2f}, three[3] = {0.15f, 0.6f, 0.25f}, near_even[2] = {0.45f, 0.55f};
    for (int k = 0; k < 3; k++) {
        Model m;
        Error err = {0};
        CHECK_MSG(model_load(&m, models[k], 0, &err) == 0, "%s", err.msg);
        int V = m.cfg.vocab_size, p0[9] = {5, 17, 3, 9, 44, 2, 8, 1, 30};
        float *ref = malloc(sizeof(float) * STEPS * V), *got = malloc(sizeof(float) * STEPS * V);
        for (int mode = 0; mode < 3; mode++) {
            DType type = mode == 1 ? DT_BF16 : DT_F32;
            if (mode == 2) CHECK_MSG(model_set_compute(&m, COMPUTE_BF16, &err) == 0, "%s", err.msg);
            omp_set_num_threads(1);
            CHECK_MSG(alone(&m, type, p0, 9, STEPS, ref, &err) == 0, "%s", err.msg);
            const float *shares[3] = {two, near_even, three};
            for (int i = 0; i < 3; i++) {
                int n = i < 2 ? 2 : 3;
                omp_set_num_threads(n);
                CHECK_MSG(alone_shared(&m, type, p0, 9, STEPS, shares[i], got, &err) == 0, "%s", err.msg);
                CHECK_MSG(memcmp(ref, got, sizeof(float) * STEPS * V) == 0, "%s mode %d: %d threads in shares %g/%g%s",
                          models[k], mode, n, shares[i][0], shares[i][1], n == 3 ? "/.." : "");
            }
        }
        omp_set_num_threads(2);
        ForwardState *s = forward_state_new(&m, 8, 16, &err);
        CHECK_MSG(s, "%s", err.msg);
        const float bad_sum[2] = {0.5f, 0.6f}, negative[2] = {1.5f, -0.5f};
        CHECK(forward_state_set_shares(s, three, 3, &err) == -1 && strstr(err.msg, "3 fractions"));
        CHECK(forward_state_set_shares(s, bad_sum, 2, &err) == -1 && strstr(err.msg, "sum"));
        CHECK(forward_state_set_shares(s, negative, 2, &err) == -1 && strstr(err.msg, "fraction"));
        CHECK(forward_state_set_shares(s, two, 2, &err) == 0 && forward_state_set_shares(s, NULL, 0, &err) == 0);
        forward_state_free(s);
        omp_set_num_threads(saved);
        free(ref);
        free(got);
        model_free(&m);
    }
    omp_set_num_threads(saved);
}

// The decode profile (DecodeProfile): profiled steps compute the same bits; it counts them, and each
// thread's parts — products, attention, meetings — lie within the steps' wall time (every part a
// span between two readings of one clock inside a step), with time in the products and in
// attention over the 9-position prompt. Taking it starts the sums again.
TEST(test_decode_profile_adds_up_and_keeps_bits) {
    Model m;
    Error err = {0};
    CHECK_MSG(model_load(&m, "tests/data/v3", 0, &err) == 0, "%s", err.msg);
    int V = m.cfg.vocab_size, p0[9] = {5, 17, 3, 9, 44, 2, 8, 1, 30};
    float *ref = malloc(sizeof(float) * STEPS * V), *got = malloc(sizeof(float) * STEPS * V);
    for (int mode = 0; mode < 2; mode++) {
        if (mode == 1) CHECK_MSG(model_set_compute(&m, COMPUTE_BF16, &err) == 0, "%s", err.msg);
        DecodeProfile pf;
        CHECK_MSG(alone(&m, DT_F32, p0, 9, STEPS, ref, &err) == 0, "%s", err.msg);
        CHECK_MSG(alone_profiled(&m, DT_F32, p0, 9, STEPS, NULL, &pf, got, &err) == 0, "%s", err.msg);
        CHECK_MSG(memcmp(ref, got, sizeof(float) * STEPS * V) == 0, "mode %d: profiled steps changed the logits", mode);
        CHECK_MSG(pf.steps == STEPS, "mode %d: %ld steps profiled, %d run", mode, pf.steps, STEPS);
        double parts = pf.products + pf.attention + pf.meetings;
        CHECK_MSG(pf.products > 0 && pf.attention > 0 && pf.meetings >= 0 && parts <= pf.seconds,
                  "mode %d: products %g + attention %g + meetings %g s against %g s of steps", mode, pf.products,
                  pf.attention, pf.meetings, pf.seconds);
    }
    ForwardState *s = forward_state_new(&m, 8, 16, &err);
    CHECK_MSG(s, "%s", err.msg);
    KVCache kv;
    CHECK_MSG(kvcache_init(&kv, &m.cfg, 0, 16, &err) == 0, "%s", err.msg);
    forward_state_profile(s, 1);
    DecodeSeq one = {.kv = &kv, .tokens = p0, .T = 2};
    CHECK_MSG(model_decode(&m, s, &one, 1, NULL, NULL, &err) == 0, "%s", err.msg);
    DecodeProfile a, b;
    forward_state_profile_take(s, &a);
    forward_state_profile_take(s, &b);
    CHECK(a.steps == 1 && a.seconds > 0 && b.steps == 0 && b.seconds == 0 && b.products == 0);
    forward_state_profile(s, 0);
    CHECK_MSG(model_decode(&m, s, &one, 1, NULL, NULL, &err) == 0, "%s", err.msg);
    forward_state_profile_take(s, &a);
    CHECK(a.steps == 0 && a.products == 0);
    kvcache_free(&kv);
    forward_state_free(s);
    free(ref);
    free(got);
    model_free(&m);
}

// A verify pass: K + 1 rows of one sequence in one model_decode give the bits of K + 1 steps —
// fp32 compute, BF16 compute, and BF16 compute on the AMX tiles where the CPU has them; on the
// golden model with the threads' measured shares, and on write_wide_experts' with 2 threads at
// shares whose cuts divide experts (a few-row step's down_by_owner over 4 rows).
TEST(test_verify_rows_equal_single_steps) {
    char wide[400];
    Error werr = {0};
    CHECK_MSG(write_wide_experts(wide, sizeof wide, &werr) == 0, "%s", werr.msg);
    const char *models[] = {"tests/data/v3", wide};
    static const float near_even[2] = {0.45f, 0.55f};
    int saved = omp_get_max_threads();
    for (int k = 0; k < 2; k++) {
        Model m;
        Error err = {0};
        CHECK_MSG(model_load(&m, models[k], 0, &err) == 0, "%s", err.msg);
        if (k == 1) omp_set_num_threads(2);
        for (int mode = 0; mode < 3; mode++) {
            if (mode == 1) CHECK_MSG(model_set_compute(&m, COMPUTE_BF16, &err) == 0, "%s", err.msg);
            if (mode == 2 && !model_set_panel_tiles(&m, MODEL_PANEL_TILES_ALL)) break;
            int V = m.cfg.vocab_size, p[6] = {3, 1, 4, 1, 5, 9}, rows[4] = {26, 5, 35, 8};
            KVCache a, b;
            CHECK(kvcache_init(&a, &m.cfg, 0, 16, &err) == 0 && kvcache_init(&b, &m.cfg, 0, 16, &err) == 0);
            ForwardState *s = forward_state_new(&m, 16, 16, &err);
            CHECK_MSG(s && (k == 0 || forward_state_set_shares(s, near_even, 2, &err) == 0), "%s", err.msg);
            float *one = malloc(sizeof(float) * 4 * V), *four = malloc(sizeof(float) * 4 * V);
            CHECK(s && model_forward(&m, s, &a, p, 6, ATTN_PLAIN, NULL, NULL, NULL, &err) == 0 &&
                  model_forward(&m, s, &b, p, 6, ATTN_PLAIN, NULL, NULL, NULL, &err) == 0);
            for (int t = 0; t < 4; t++) {
                DecodeSeq q = {.kv = &a, .tokens = rows + t, .T = 1};
                CHECK(model_decode(&m, s, &q, 1, one + (size_t)t * V, NULL, &err) == 0);
            }
            DecodeSeq q = {.kv = &b, .tokens = rows, .T = 4};
            CHECK_MSG(model_decode(&m, s, &q, 1, four, NULL, &err) == 0, "%s", err.msg);
            CHECK(a.len == 10 && b.len == 10);
            CHECK_MSG(memcmp(one, four, sizeof(float) * 4 * V) == 0,
                      "%s compute mode %d: a verify pass differs from single steps", models[k], mode);
            forward_state_free(s);
            kvcache_free(&a);
            kvcache_free(&b);
            free(one);
            free(four);
        }
        omp_set_num_threads(saved);
        model_free(&m);
    }
}

// A prompt prefilled in pieces beside other sequences (the engine's absorbed prefill): the rows
// are the bits of single decode steps, and only the rows past skip_logits get logits, packed.
TEST(test_prompt_pieces_equal_single_steps) {
    Model m;
    Error err = {0};
    CHECK_MSG(model_load(&m, "tests/data/v3", 0, &err) == 0, "%s", err.msg);
    int V = m.cfg.vocab_size, all[10] = {3, 1, 4, 1, 5, 9, 26, 5, 35, 8};
    KVCache r, x, y;
    CHECK(kvcache_init(&r, &m.cfg, 0, 16, &err) == 0 && kvcache_init(&x, &m.cfg, 0, 16, &err) == 0 &&
          kvcache_init(&y, &m.cfg, 0, 16, &err) == 0);
    ForwardState *s = forward_state_new(&m, 16, 16, &err);
    float *ref = malloc(sizeof(float) * 10 * V), *got = malloc(sizeof(float) * 10 * V);
    CHECK(s && ref && got);
    for (int t = 0; t < 10; t++) {
        DecodeSeq q = {.kv = &r, .tokens = all + t, .T = 1};
        CHECK(model_decode(&m, s, &q, 1, ref + (size_t)t * V, NULL, &err) == 0);
    }
    // x takes 4 rows without logits beside y's 6-row prompt, which wants its last row's
    DecodeSeq b1[2] = {{.kv = &x, .tokens = all, .T = 4, .skip_logits = 4}, {.kv = &y, .tokens = all, .T = 6, .skip_logits = 5}};
    CHECK_MSG(model_decode(&m, s, b1, 2, got, NULL, &err) == 0, "%s", err.msg);
    CHECK_MSG(memcmp(got, ref + (size_t)5 * V, sizeof(float) * V) == 0, "a piece's last row differs from a single step");
    // then x's other 6 rows, the last 4 with logits, beside one step of y
    DecodeSeq b2[2] = {{.kv = &y, .tokens = all + 6, .T = 1}, {.kv = &x, .tokens = all + 4, .T = 6, .skip_logits = 2}};
    CHECK_MSG(model_decode(&m, s, b2, 2, got, NULL, &err) == 0, "%s", err.msg);
    CHECK(x.len == 10 && y.len == 7);
    CHECK_MSG(memcmp(got, ref + (size_t)6 * V, sizeof(float) * V) == 0, "y's step differs");
    CHECK_MSG(memcmp(got + V, ref + (size_t)6 * V, sizeof(float) * 4 * V) == 0, "x's rows differ from single steps");
    DecodeSeq bad = {.kv = &y, .tokens = all, .T = 2, .skip_logits = 3};
    CHECK(model_decode(&m, s, &bad, 1, got, NULL, &err) == -1 && strstr(err.msg, "skips"));
    forward_state_free(s);
    kvcache_free(&r);
    kvcache_free(&x);
    kvcache_free(&y);
    free(ref);
    free(got);
    model_free(&m);
}

typedef struct {
    int tok[8][64], n[8];
    FinishReason why[8];
} Out;

static void collect(void *owner, int seq, const EngineToken *t) {
    Out *o = owner;
    if (t->token >= 0 && o->n[seq] < 64) o->tok[seq][o->n[seq]++] = t->token;
    if (t->finish != FINISH_NONE) o->why[seq] = t->finish;
}

static int run(Engine *e, Error *err) {
    int live;
    while ((live = engine_step(e, err)) > 0) {
    }
    return live;
}

// Sequences that grow over block boundaries (blocks of ENGINE_BLOCK_SIZE = 16), a cancellation
// whose blocks the next sequence reuses, and a pool too small for all: the one that cannot grow
// ends with FINISH_ERROR, the others finish as they would alone.
// The pool's pages are resident once it is made (bigmem_prefault), hold zeros, and a block larger
// than the free memory is left to fault in as used.
TEST(test_cache_pool_is_faulted_in_when_made) {
    ModelConfig c;
    Error err = {0};
    CHECK_MSG(config_load(&c, "tests/data/v3/config.json", &err) == 0, "%s", err.msg);
    KVPool pool;
    CHECK_MSG(kvpool_init(&pool, &c, 0, 64, ENGINE_BLOCK_SIZE, DT_F32, &err) == 0, "%s", err.msg);
    long page = sysconf(_SC_PAGESIZE);
    size_t pages = (pool.latent_bytes + (size_t)page - 1) / (size_t)page, resident = 0;
    unsigned char *in = malloc(pages);
    CHECK(in && mincore(pool.latent, pool.latent_bytes, in) == 0);
    for (size_t i = 0; i < pages; i++) resident += in[i] & 1;
    free(in);
    CHECK_MSG(resident == pages, "%zu of %zu pages of the latent pool resident", resident, pages);
    const float *lat = pool.latent;
    for (size_t i = 0; i < pool.latent_bytes / sizeof(float); i++) CHECK(lat[i] == 0.0f);
    // more than the machine has free — twice its memory, so that no freeing in between can make it
    // fit: not touched (the pool's own block stands in: nothing is read)
    size_t too_big = 2 * (size_t)sysconf(_SC_PHYS_PAGES) * (size_t)page;
    CHECK(bigmem_prefault(pool.latent, too_big) == 0);
    kvpool_free(&pool);
}

TEST(test_paged_cache_grows_reuses_and_runs_out_cleanly) {
    Model m;
    Error err = {0};
    CHECK_MSG(model_load(&m, "tests/data/v3", 0, &err) == 0, "%s", err.msg);
    static const int p0[] = {5, 17, 3, 9, 44}, p1[] = {7, 8}, p2[] = {11, 12, 13};
    SeqParams sp = seq_params_default();
    sp.max_new = 40;  // 45 positions: three blocks
    sp.stop_at_eos = 0;
    Out ref = {0};
    EngineOptions big = {.parallel = 1, .ctx = 64, .prefill_chunk = 8};
    Engine *e = engine_new(&m, &big, &err);
    CHECK_MSG(e, "%s", err.msg);
    CHECK(engine_add(e, p0, 5, &sp, collect, &ref, &err) == 0 && engine_add(e, p1, 2, &sp, collect, &ref, &err) == 1 &&
          engine_add(e, p2, 3, &sp, collect, &ref, &err) == 2);
    CHECK_MSG(run(e, &err) == 0, "%s", err.msg);
    CHECK(engine_stats(e)->cache_blocks_used == 0 && engine_stats(e)->cache_blocks_total == 4);
    engine_free(e);
    // a pool of 5 blocks for 3 sequences wanting 3 each: sequence 1 is cancelled after a few steps
    // (its blocks go back), then the pool runs out for one of the others
    EngineOptions small = {.parallel = 3, .ctx = 64, .prefill_chunk = 8, .cache_tokens = 5 * ENGINE_BLOCK_SIZE};
    e = engine_new(&m, &small, &err);
    CHECK_MSG(e, "%s", err.msg);
    Out got = {0};
    CHECK(engine_add(e, p0, 5, &sp, collect, &got, &err) == 0 && engine_add(e, p1, 2, &sp, collect, &got, &err) == 1 &&
          engine_add(e, p2, 3, &sp, collect, &got, &err) == 2);
    for (int i = 0; i < 4; i++) CHECK(engine_step(e, &err) == 3);
    CHECK(engine_stats(e)->cache_blocks_used == 3);
    CHECK(engine_cancel(e, 1) == 0 && got.why[1] == FINISH_CANCELLED);
    CHECK(engine_stats(e)->running == 2);
    CHECK_MSG(run(e, &err) == 0, "%s", err.msg);
    int errors = 0, complete = 0;
    for (int i = 0; i < 3; i += 2) {
        if (got.why[i] == FINISH_ERROR) errors++;
        if (got.why[i] == FINISH_LENGTH) {
            complete++;
            CHECK(got.n[i] == 40 && memcmp(got.tok[i], ref.tok[i], sizeof(int) * 40) == 0);
        }
        for (int t = 0; t < got.n[i]; t++) CHECK(got.tok[i][t] == ref.tok[i][t]);  // what it produced is right
    }
    CHECK_MSG(errors == 1 && complete == 1, "%d ran out, %d completed", errors, complete);
    CHECK(engine_stats(e)->cache_blocks_used == 0);
    // the freed pool serves a new sequence from the start
    Out again = {0};
    CHECK(engine_add(e, p1, 2, &sp, collect, &again, &err) == 3);
    CHECK_MSG(run(e, &err) == 0, "%s", err.msg);
    CHECK(again.n[3] == 40 && memcmp(again.tok[3], ref.tok[1], sizeof(int) * 40) == 0);
    engine_free(e);
    model_free(&m);
}

// Runs one prompt to completion in e; its tokens into o->tok[seq].
static int run_one(Engine *e, const int *p, int n, const SeqParams *sp, Out *o, Error *err) {
    int id = engine_add(e, p, n, sp, collect, o, err);
    if (id < 0 || run(e, err) != 0) return -1;
    return id;
}

// The prefix cache: a prompt that starts like an earlier one reuses its whole blocks (the hit
// counted), and the output is the one computed without the cache; a small pool evicts retained
// blocks for new work and stays correct; with speculative decoding the MTP rows are reused too.
TEST(test_prefix_cache_reuses_blocks_and_stays_correct) {
    const char *models[] = {"tests/data/v3", "tests/data/v3"};
    for (int mi = 0; mi < 2; mi++) {
        int K = mi;  // the second round: speculative decoding with K = 1
        Model m;
        Error err = {0};
        CHECK_MSG(model_load(&m, models[mi], 0, &err) == 0, "%s", err.msg);
        int V = m.cfg.vocab_size, sys[40], a[48], b[52];
        for (int t = 0; t < 40; t++) sys[t] = (t * 31 + 7) % V;  // a shared "system prompt"
        memcpy(a, sys, sizeof sys), memcpy(b, sys, sizeof sys);
        for (int t = 40; t < 48; t++) a[t] = (t * 5 + 1) % V;
        for (int t = 40; t < 52; t++) b[t] = (t * 9 + 2) % V;
        SeqParams sp = seq_params_default();
        sp.max_new = 20;
        sp.stop_at_eos = 0;
        // the reference: each alone, no cache
        Out ref = {0};
        EngineOptions plain = {.parallel = 1, .ctx = 80, .prefill_chunk = 64, .speculative = K};
        Engine *e = engine_new(&m, &plain, &err);
        CHECK_MSG(e, "%s", err.msg);
        CHECK(run_one(e, a, 48, &sp, &ref, &err) == 0 && run_one(e, b, 52, &sp, &ref, &err) == 1);
        CHECK(engine_stats(e)->prefix_hit_tokens == 0);
        engine_free(e);
        // with the cache: b reuses a's two full blocks of the system prompt (32 positions)
        EngineOptions cached = plain;
        cached.prefix_cache = 1;
        e = engine_new(&m, &cached, &err);
        CHECK_MSG(e, "%s", err.msg);
        Out got = {0};
        CHECK(run_one(e, a, 48, &sp, &got, &err) == 0);
        CHECK(engine_stats(e)->prefix_hit_tokens == 0);
        CHECK(run_one(e, b, 52, &sp, &got, &err) == 1);
        CHECK_MSG(engine_stats(e)->prefix_hit_tokens == 32 && engine_stats(e)->prefix_lookup_tokens == 100,
                  "hits %ld of %ld", engine_stats(e)->prefix_hit_tokens, engine_stats(e)->prefix_lookup_tokens);
        // the same prompt again: its own blocks, prompt and reply (all but the last block's worth)
        CHECK(run_one(e, b, 52, &sp, &got, &err) == 2);
        CHECK_MSG(engine_stats(e)->prefix_hit_tokens == 32 + 48, "hits %ld", engine_stats(e)->prefix_hit_tokens);
        for (int i = 0; i < 3; i++)
            CHECK_MSG(got.n[i] == 20 && memcmp(got.tok[i], ref.tok[i ? 1 : 0], sizeof(int) * 20) == 0,
                      "K=%d sequence %d: output with the prefix cache differs", K, i);
        CHECK(engine_stats(e)->cache_blocks_used == 0);
        engine_free(e);
        // a pool of 8 blocks: 6 different prompts of 3 blocks each evict what earlier ones left
        cached.cache_tokens = 8 * ENGINE_BLOCK_SIZE;
        e = engine_new(&m, &cached, &err);
        CHECK_MSG(e, "%s", err.msg);
        Out many = {0};
        for (int k = 0; k < 6; k++) {
            int p[48];
            for (int t = 0; t < 48; t++) p[t] = k % 2 ? a[t] : (t * 17 + k) % V;  // a returns every other time
            CHECK_MSG(run_one(e, p, 48, &sp, &many, &err) == k, "%s", err.msg);
            if (k % 2) CHECK(memcmp(many.tok[k], ref.tok[0], sizeof(int) * 20) == 0);
        }
        CHECK(engine_stats(e)->prefix_hit_tokens > 0);
        engine_free(e);
        model_free(&m);
    }
}
