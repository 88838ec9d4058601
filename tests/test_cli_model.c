// The command-line contract of logits/generate/init/info, and bad input: each gets a one-line
// error naming the file and the tensor or key, a non-zero exit, no crash, no partial output.
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/safetensors.h"
#include "model/config.h"
#include "model/model.h"
#include "test.h"

static const char *TINY_CONFIG =
    "{\"model_type\":\"deepseek_v3\",\"vocab_size\":96,\"hidden_size\":48,\"intermediate_size\":80,"
    "\"moe_intermediate_size\":24,\"num_hidden_layers\":2,\"num_attention_heads\":3,\"q_lora_rank\":32,"
    "\"kv_lora_rank\":24,\"qk_nope_head_dim\":8,\"qk_rope_head_dim\":8,\"v_head_dim\":12,"
    "\"n_routed_experts\":8,\"n_shared_experts\":1,\"num_experts_per_tok\":2,\"n_group\":4,\"topk_group\":2,"
    "\"topk_method\":\"noaux_tc\",\"scoring_func\":\"sigmoid\",\"norm_topk_prob\":true,"
    "\"routed_scaling_factor\":2.5,\"first_k_dense_replace\":1,\"num_nextn_predict_layers\":1,"
    "\"rope_theta\":10000,\"rope_scaling\":{\"type\":\"yarn\",\"factor\":40,\"original_max_position_embeddings\":4096,"
    "\"beta_fast\":32,\"beta_slow\":1,\"mscale\":1.0,\"mscale_all_dim\":1.0},\"rms_norm_eps\":1e-6,"
    "\"initializer_range\":0.2,\"bos_token_id\":0,\"eos_token_id\":1,\"max_position_embeddings\":1024}";

// Writes the tiny config and a random checkpoint of it into tmp/name; returns 0 on success.
static int make_tiny(const char *name, const char *dtype, char *dir, size_t n) {
    snprintf(dir, n, "%s/%s", test_tmpdir(), name);
    char cfg[600];
    snprintf(cfg, sizeof cfg, "%s/%s.json", test_tmpdir(), name);
    FILE *f = fopen(cfg, "w");
    if (!f) return -1;
    fputs(TINY_CONFIG, f);
    fclose(f);
    char out[2048];
    return test_run(out, sizeof out, "%s init --config %s --out %s --dtype %s --seed 7", test_bin(), cfg, dir, dtype);
}

// A failing command: non-zero exit, exactly one line naming `needle`, no output file left.
#define CHECK_FAILS(needle, outfile, ...)                                                                  \
    do {                                                                                                   \
        char o_[4096];                                                                                     \
        int rc_ = test_run(o_, sizeof o_, __VA_ARGS__);                                                    \
        CHECK_MSG(rc_ != 0 && rc_ < 128, "exit %d (want a clean non-zero exit): %s", rc_, o_);             \
        CHECK_MSG(strstr(o_, needle) != NULL, "error does not name '%s': %s", needle, o_);                  \
        CHECK_MSG(test_count_lines(o_) == 1, "want a one-line error, got: %s", o_);                             \
        CHECK_MSG(outfile == NULL || fopen(outfile, "rb") == NULL, "partial output %s left behind", outfile); \
    } while (0)

TEST(test_cli_logits_prefill_decode_agree) {
    char dir[512], a[600], b[600], am[600], bm[600], o[4096];
    CHECK(make_tiny("cli_ok", "bf16", dir, sizeof dir) == 0);
    snprintf(a, sizeof a, "%s/a.f32", test_tmpdir());
    snprintf(b, sizeof b, "%s/b.f32", test_tmpdir());
    snprintf(am, sizeof am, "%s/am.f32", test_tmpdir());
    snprintf(bm, sizeof bm, "%s/bm.f32", test_tmpdir());
    int rc = test_run(o, sizeof o, "%s logits --model %s --tokens 5,17,3,90,2,44,8 --out %s --mtp-out %s", test_bin(), dir, a, am);
    CHECK_MSG(rc == 0, "%s", o);
    rc = test_run(o, sizeof o, "%s logits --model %s --tokens 5,17,3,90,2,44,8 --out %s --mtp-out %s --decode", test_bin(), dir, b, bm);
    CHECK_MSG(rc == 0, "%s", o);
    size_t la, lb, lam, lbm;
    float *x = test_read_file(a, &la), *y = test_read_file(b, &lb), *xm = test_read_file(am, &lam), *ym = test_read_file(bm, &lbm);
    CHECK(x && y && xm && ym);
    CHECK_MSG(la == 7 * 96 * 4 && lb == la, "logits file is %zu bytes, want %d", la, 7 * 96 * 4);
    CHECK_MSG(lam == 6 * 96 * 4 && lbm == lam, "MTP logits file is %zu bytes, want %d", lam, 6 * 96 * 4);
    float mx = 0, md = 0;
    for (int i = 0; i < 7 * 96; i++) {
        mx = fmaxf(mx, fabsf(x[i]));
        md = fmaxf(md, test_absdiff(x[i], y[i]));
    }
    for (int i = 0; i < 6 * 96; i++) md = fmaxf(md, test_absdiff(xm[i], ym[i]));
    CHECK_MSG(mx > 0.1f, "logits are degenerate (max %g)", mx);
    printf("    decode vs prefill: max|diff| %.2g of max|logit| (tol 1e-5)\n", md / mx);
    CHECK_MSG(md <= 1e-5f * mx, "decode differs from prefill by %g (max %g)", md, mx);
    // --no-mmap reads the same bytes into private memory: the same logits, bit for bit
    rc = test_run(o, sizeof o, "%s logits --model %s --tokens 5,17,3,90,2,44,8 --out %s --mtp-out %s --decode --no-mmap",
                  test_bin(), dir, a, am);
    CHECK_MSG(rc == 0, "%s", o);
    free(x);
    free(xm);
    x = test_read_file(a, &la), xm = test_read_file(am, &lam);
    CHECK(x && xm && la == lb && lam == lbm);
    CHECK_MSG(memcmp(x, y, la) == 0 && memcmp(xm, ym, lam) == 0, "--no-mmap changes the logits");
    free(x);
    free(y);
    free(xm);
    free(ym);
}

// `dsv3 logits` on golden checkpoints (tests/data, tools/ref_model.py) writes the reference's
// logits, main and MTP, by prefill and by --decode, to 1e-5 of the largest logit — the engine's
// precision (tests/test_model.c); what the command adds (parsing, the file format) is exact.
static void check_cli_golden(const char *name) {
    char dir[300], path[600], ids[1024], lf[600], mf[600], o[4096];
    snprintf(dir, sizeof dir, "%s/%s", test_datadir(), name);
    int T = test_golden_ids(name, ids, sizeof ids);
    CHECK_MSG(T > 0, "%s/tokens.txt missing", dir);
    snprintf(lf, sizeof lf, "%s/cli_golden.f32", test_tmpdir());
    snprintf(mf, sizeof mf, "%s/cli_golden_mtp.f32", test_tmpdir());
    size_t ng, nmg;
    snprintf(path, sizeof path, "%s/logits.f32", dir);
    float *g = test_read_file(path, &ng);
    snprintf(path, sizeof path, "%s/mtp_logits.f32", dir);
    float *gm = test_read_file(path, &nmg);
    CHECK(g && gm && ng % T == 0);
    long V = (long)(ng / sizeof(float) / T);
    CHECK(nmg == sizeof(float) * (T - 1) * V);
    for (int decode = 0; decode < 2; decode++) {
        int rc = test_run(o, sizeof o, "%s logits --model %s --tokens %s --out %s --mtp-out %s%s", test_bin(), dir, ids,
                          lf, mf, decode ? " --decode" : "");
        CHECK_MSG(rc == 0, "%s", o);
        size_t nl, nm;
        float *l = test_read_file(lf, &nl), *lm = test_read_file(mf, &nm);
        CHECK(l && lm && nl == ng && nm == nmg);
        double md = 0, mx = 0, mdm = 0, mxm = 0;
        for (long i = 0; i < T * V; i++) {
            md = fmax(md, test_absdiff(l[i], g[i]));
            mx = fmax(mx, fabs(g[i]));
        }
        for (long i = 0; i < (T - 1) * V; i++) {
            mdm = fmax(mdm, test_absdiff(lm[i], gm[i]));
            mxm = fmax(mxm, fabs(gm[i]));
        }
        free(l);
        free(lm);
        printf("    dsv3 logits%s %s: max|diff| %.2g, MTP %.2g of max|logit| (tol 1e-5)\n", decode ? " --decode" : "",
               name, md / mx, mdm / mxm);
        CHECK_MSG(md <= 1e-5 * mx && mdm <= 1e-5 * mxm, "%s%s: max |diff| %.3g (max %.3g), MTP %.3g (max %.3g)", name,
                  decode ? " --decode" : "", md, mx, mdm, mxm);
    }
    free(g);
    free(gm);
}

TEST(test_cli_logits_match_golden_v3) { check_cli_golden("v3"); }
TEST(test_cli_logits_match_golden_fp8) { check_cli_golden("fp8"); }

TEST(test_cli_info_json) {
    char dir[512], o[4096];
    CHECK(make_tiny("cli_info", "fp8", dir, sizeof dir) == 0);
    int rc = test_run(o, sizeof o, "%s info --model %s --json", test_bin(), dir);
    CHECK_MSG(rc == 0, "%s", o);
    // (kv_lora 24 + rope 8) x 2 layers x 4 bytes
    CHECK_MSG(strstr(o, "\"kv_bytes_per_token\": 256"), "%s", o);
    CHECK_MSG(strstr(o, "\"kv_cache_dtype\": \"f32\""), "%s", o);
    CHECK_MSG(strstr(o, "\"weight_dtype\": \"F8_E4M3\""), "%s", o);
    // embed 96*48 + head 96*48 + norm 48 + dense layer + MoE layer, counted by hand:
    // attention per layer: norms 2*48 + kv_a_layernorm 24 + q_a 32*48 + q_a_norm 32 + q_b 3*16*32
    //   + kv_a 32*48 + kv_b 3*20*24 + o 48*36 = 96+24+1536+32+1536+1536+1440+1728 = 7928
    // dense FFN 3*48*80 = 11520; MoE: router 8*48 + bias 8 + 9 experts * 3*48*24 = 392 + 31104
    // total = 4608 + 4608 + 48 + (7928 + 11520) + (7928 + 392 + 31104) = 68136
    // active (no embedding table: a token reads one row of it) = 4608 + 48 + 19448 + 7928 + 392 + 3 * 3456 = 42792
    CHECK_MSG(strstr(o, "\"total_params\": 68136"), "%s", o);
    CHECK_MSG(strstr(o, "\"active_params\": 42792"), "%s", o);
}

TEST(test_cli_generate_greedy_matches_logits) {
    char dir[512], o[4096], lf[600];
    CHECK(make_tiny("cli_gen", "f32", dir, sizeof dir) == 0);
    int rc = test_run(o, sizeof o, "%s generate --model %s --tokens 5,17,3 --max-new 4", test_bin(), dir);
    CHECK_MSG(rc == 0, "%s", o);
    int g[4], n = sscanf(o, "%d %d %d %d", &g[0], &g[1], &g[2], &g[3]);
    CHECK_MSG(n >= 1, "no ids printed: %s", o);
    // every greedy step is the argmax of the logits of the sequence so far
    char toks[256] = "5,17,3";
    for (int i = 0; i < n; i++) {
        snprintf(lf, sizeof lf, "%s/gen.f32", test_tmpdir());
        rc = test_run(o, sizeof o, "%s logits --model %s --tokens %s --out %s", test_bin(), dir, toks, lf);
        CHECK_MSG(rc == 0, "%s", o);
        size_t len;
        float *l = test_read_file(lf, &len);
        CHECK(l && len % (96 * 4) == 0);
        const float *last = l + len / 4 - 96;
        int best = 0;
        for (int v = 1; v < 96; v++)
            if (last[v] > last[best]) best = v;
        free(l);
        CHECK_MSG(best == g[i], "step %d: generated %d, argmax %d", i, g[i], best);
        if (g[i] == 1) break;  // eos
        size_t k = strlen(toks);
        snprintf(toks + k, sizeof toks - k, ",%d", g[i]);
    }
    // --stats adds lines on stderr: what was generated, and the pages the weights sit on; stdout is unchanged
    rc = test_run(o, sizeof o, "%s generate --model %s --tokens 5,17,3 --max-new 4 --stats 2>&1 >/dev/null", test_bin(), dir);
    char want[64];
    snprintf(want, sizeof want, "generated %d tokens", n);
    CHECK_MSG(rc == 0 && strstr(o, "prompt: 3 tokens in ") && strstr(o, want), "%s", o);
    CHECK_MSG(strstr(o, "MB of the checkpoint resident, ") && strstr(o, "% of them mapped 2 MB at a time"), "%s", o);
    // and where the decode steps' time went (the prompt's step has its piece: not among them)
    const char *pl = strstr(o, "decode steps (profiled, ~1% of a step): the products ");
    int pr = -1, at = -1, mt = -1;
    CHECK_MSG(n < 2 || (pl && sscanf(pl, "decode steps (profiled, ~1%% of a step): the products %d%%, absorbed attention "
                                         "%d%%, waiting at the threads' meetings %d%%", &pr, &at, &mt) == 3 &&
                        pr > 0 && at >= 0 && mt >= 0 && pr + at + mt >= 99 && pr + at + mt <= 101),
              "%s", o);
}

TEST(test_bad_token_and_paths) {
    char dir[512], out[600];
    CHECK(make_tiny("cli_bad", "bf16", dir, sizeof dir) == 0);
    snprintf(out, sizeof out, "%s/never.f32", test_tmpdir());
    CHECK_FAILS("token 96", out, "%s logits --model %s --tokens 5,96 --out %s", test_bin(), dir, out);
    CHECK_FAILS("--tokens", out, "%s logits --model %s --tokens 5,x --out %s", test_bin(), dir, out);
    CHECK_FAILS("does not exist", out, "%s logits --model %s/nope --tokens 5 --out %s", test_bin(), dir, out);
    CHECK_FAILS("--model", out, "%s logits --tokens 5 --out %s", test_bin(), out);
    CHECK_FAILS("unknown option", out, "%s logits --model %s --tokens 5 --out %s --bogus", test_bin(), dir, out);
}

// `dsv3 COMMAND --help` prints the command's usage line, and every option that line names is one
// the command's parser takes (given alone, each fails on what is missing, never as unknown).
TEST(test_cli_help_names_accepted_options) {
    const char *cmds[] = {"logits", "generate", "chat", "serve", "init", "convert", "info", "plan",
                          "tokenize", "detokenize", "tokenizer train", "prepare", "plot"};
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++) {
        char help[4096], o[4096], want[64];
        int rc = test_run(help, sizeof help, "%s %s --help", test_bin(), cmds[i]);
        snprintf(want, sizeof want, "usage: dsv3 %s ", cmds[i]);
        CHECK_MSG(rc == 0 && strncmp(help, want, strlen(want)) == 0, "%s --help: exit %d, %s", cmds[i], rc, help);
        int options = 0;
        for (const char *p = strstr(help, "--"); p; p = strstr(p + 2, "--")) {
            char name[64];
            size_t k = 0;
            while (k + 1 < sizeof name && (p[2 + k] == '-' || islower((unsigned char)p[2 + k]) || isdigit((unsigned char)p[2 + k])))
                name[k] = p[2 + k], k++;
            name[k] = 0;
            if (!k) continue;
            options++;
            test_run(o, sizeof o, "%s %s --%s < /dev/null", test_bin(), cmds[i], name);
            CHECK_MSG(strstr(o, "unknown option") == NULL, "%s --help names --%s, which it does not take: %s", cmds[i],
                      name, o);
        }
        CHECK_MSG(options > 0 || strcmp(cmds[i], "detokenize") == 0, "%s --help names no option: %s", cmds[i], help);
    }
}

// Copies the tiny model into tmp/name and returns its directory.
static int copy_model(const char *src, const char *name, char *dst, size_t n) {
    snprintf(dst, n, "%s/%s", test_tmpdir(), name);
    return test_run(NULL, 0, "rm -rf %s && cp -r %s %s", dst, src, dst);
}

TEST(test_bad_checkpoints) {
    char dir[512], d[600], out[700];
    CHECK(make_tiny("ck_src", "bf16", dir, sizeof dir) == 0);
    snprintf(out, sizeof out, "%s/never.f32", test_tmpdir());
    const char *bin = test_bin();

    CHECK(copy_model(dir, "ck_trunc", d, sizeof d) == 0);
    CHECK(test_run(NULL, 0, "truncate -s -1000 %s/model.safetensors", d) == 0);
    CHECK_FAILS("model.safetensors", out, "%s logits --model %s --tokens 1 --out %s", bin, d, out);
    CHECK_FAILS("past the end", out, "%s logits --model %s --tokens 1 --out %s", bin, d, out);
    CHECK_FAILS("past the end", out, "%s logits --model %s --tokens 1 --out %s --no-mmap", bin, d, out);

    CHECK(copy_model(dir, "ck_hlen", d, sizeof d) == 0);  // header length larger than the file
    CHECK(test_run(NULL, 0, "printf '\\377\\377\\377\\000' | dd of=%s/model.safetensors bs=1 seek=0 conv=notrunc 2>/dev/null", d) == 0);
    CHECK_FAILS("header length", out, "%s logits --model %s --tokens 1 --out %s", bin, d, out);

    CHECK(copy_model(dir, "ck_json", d, sizeof d) == 0);
    CHECK(test_run(NULL, 0, "printf '{\"vocab_size\": 96,' > %s/config.json", d) == 0);
    CHECK_FAILS("config.json", out, "%s logits --model %s --tokens 1 --out %s", bin, d, out);

    CHECK(copy_model(dir, "ck_key", d, sizeof d) == 0);
    CHECK(test_run(NULL, 0, "sed -i 's/\"kv_lora_rank\": 24,//' %s/config.json", d) == 0);
    CHECK_FAILS("kv_lora_rank", out, "%s logits --model %s --tokens 1 --out %s", bin, d, out);

    CHECK(copy_model(dir, "ck_range", d, sizeof d) == 0);
    CHECK(test_run(NULL, 0, "sed -i 's/\"num_experts_per_tok\": 2/\"num_experts_per_tok\": 9/' %s/config.json", d) == 0);
    CHECK_FAILS("num_experts_per_tok", out, "%s logits --model %s --tokens 1 --out %s", bin, d, out);

    CHECK(copy_model(dir, "ck_shape", d, sizeof d) == 0);
    CHECK(test_run(NULL, 0, "sed -i 's/\"intermediate_size\": 80/\"intermediate_size\": 81/' %s/config.json", d) == 0);
    CHECK_FAILS("model.layers.0.mlp.gate_proj.weight", out, "%s logits --model %s --tokens 1 --out %s", bin, d, out);

    // a lying header: offsets that point past the data, and an unknown dtype
    CHECK(copy_model(dir, "ck_lie", d, sizeof d) == 0);
    CHECK(test_run(NULL, 0, "sed -i '1s/\"F32\",\"shape\":\\[8\\]/\"F99\",\"shape\":[8]/' %s/model.safetensors", d) == 0);
    CHECK_FAILS("F99", out, "%s logits --model %s --tokens 1 --out %s", bin, d, out);

    // a missing tensor: rewrite the file without one
    CHECK(copy_model(dir, "ck_missing", d, sizeof d) == 0);
    {
        char path[800];
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        StFile f;
        Error err = {0};
        CHECK_MSG(st_open(&f, path, &err) == 0, "%s", err.msg);
        StTensorDesc *desc = calloc(f.n, sizeof *desc);
        int n = 0;
        for (int i = 0; i < f.n; i++) {
            if (strcmp(f.tensors[i].name, "model.layers.1.self_attn.kv_b_proj.weight") == 0) continue;
            desc[n] = (StTensorDesc){f.tensors[i].name, f.tensors[i].dtype, f.tensors[i].ndim, {0}, f.tensors[i].data};
            memcpy(desc[n].shape, f.tensors[i].shape, sizeof desc[n].shape);
            n++;
        }
        snprintf(path, sizeof path, "%s/model.safetensors", d);
        int rc = st_write(path, desc, n, &err);
        free(desc);
        st_close(&f);
        CHECK_MSG(rc == 0, "%s", err.msg);
    }
    CHECK_FAILS("model.layers.1.self_attn.kv_b_proj.weight", out, "%s logits --model %s --tokens 1 --out %s", bin, d, out);
}

TEST(test_bad_safetensors_offsets) {
    char path[600];
    snprintf(path, sizeof path, "%s/lying.safetensors", test_tmpdir());
    // a header whose tensor claims 16 bytes at [8, 24) in a file with 8 bytes of data
    const char *hdr = "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}}";
    FILE *f = fopen(path, "wb");
    CHECK(f);
    unsigned long long n = strlen(hdr);
    unsigned char len[8];
    for (int i = 0; i < 8; i++) len[i] = (unsigned char)(n >> (8 * i));
    fwrite(len, 1, 8, f);
    fwrite(hdr, 1, n, f);
    fwrite("12345678", 1, 8, f);
    fclose(f);
    StFile st;
    Error err = {0};
    CHECK(st_open(&st, path, &err) != 0);
    CHECK_MSG(strstr(err.msg, "lying.safetensors") && strstr(err.msg, "tensor w") && strstr(err.msg, "past the end"), "%s", err.msg);
    // size mismatch between shape and offsets
    f = fopen(path, "wb");
    hdr = "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,8]}}";
    n = strlen(hdr);
    for (int i = 0; i < 8; i++) len[i] = (unsigned char)(n >> (8 * i));
    fwrite(len, 1, 8, f);
    fwrite(hdr, 1, n, f);
    fwrite("12345678", 1, 8, f);
    fclose(f);
    CHECK(st_open(&st, path, &err) != 0);
    CHECK_MSG(strstr(err.msg, "tensor w") && strstr(err.msg, "needs 16"), "%s", err.msg);
}

TEST(test_init_fp8_block_edges) {
    char dir[512];
    CHECK(make_tiny("init_fp8", "fp8", dir, sizeof dir) == 0);
    Model m;
    Error err = {0};
    CHECK_MSG(model_load(&m, dir, 1, &err) == 0, "%s", err.msg);
    const MatView *kvb = &m.w.layers[0].self_attn.kv_b_proj;  // 60 x 24: one partial block
    CHECK(kvb->dtype == DT_F8_E4M3 && kvb->scale_inv && kvb->scale_cols == 1 && kvb->block == 128);
    CHECK(m.w.embed_tokens.dtype == DT_BF16 && m.w.n_mtp == 1);
    // the MTP module's embedding is a byte-identical copy of the main one
    CHECK(memcmp(m.w.mtp[0].embed_tokens.data, m.w.embed_tokens.data, 96 * 48 * 2) == 0);
    CHECK(memcmp(m.w.mtp[0].shared_head_head.data, m.w.lm_head.data, 96 * 48 * 2) == 0);
    model_free(&m);
}

// A model written into a directory that holds an earlier one replaces its weight files whatever
// either's layout: no index, shard or model.safetensors of the earlier model is left to be read
// (st_model_open prefers an index: the earlier model's weights had been loaded), and the
// directory's other files stay. (v3-10m-train: ~25 MB of BF16, seven shards of 4 MB.)
TEST(test_init_over_an_earlier_model) {
    const char *cfg = "bench/configs/v3-10m-train.json";
    char dir[512], fresh[512], out[4096], a[700], b[700];
    snprintf(dir, sizeof dir, "%s/init_again", test_tmpdir());
    snprintf(fresh, sizeof fresh, "%s/init_fresh", test_tmpdir());
    int rc = test_run(out, sizeof out,
                      "rm -rf %s %s && %s init --config %s --out %s --seed 7 && %s init --config %s --out %s --seed 3 "
                      "--shard-mb 4 && touch %s/notes.txt && ls %s | grep -c of-",
                      dir, fresh, test_bin(), cfg, fresh, test_bin(), cfg, dir, dir, dir);
    CHECK_MSG(rc == 0 && atoi(out) > 1, "%s", out);
    rc = test_run(out, sizeof out, "%s init --config %s --out %s --seed 7 && ls %s | tr '\\n' ' '", test_bin(), cfg, dir, dir);
    CHECK_MSG(rc == 0 && !strcmp(out, "config.json model.safetensors notes.txt "), "left: %s", out);
    snprintf(a, sizeof a, "%s/model.safetensors", dir);
    snprintf(b, sizeof b, "%s/model.safetensors", fresh);
    size_t na, nb;
    char *wa = test_read_file(a, &na), *wb = test_read_file(b, &nb);
    CHECK(wa && wb && na == nb && memcmp(wa, wb, na) == 0);
    free(wa);
    free(wb);
    // and back: shards over one file leave no model.safetensors
    rc = test_run(out, sizeof out, "%s init --config %s --out %s --seed 3 --shard-mb 4 && ls %s | grep -c -v of-", test_bin(),
                  cfg, dir, dir);
    CHECK_MSG(rc == 0 && atoi(out) == 3, "%s", out);  // config.json, the index, notes.txt
    rc = test_run(out, sizeof out, "rm -rf %s %s", dir, fresh);
}
