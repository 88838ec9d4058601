// dsv3 logits: raw float32 logits of every position, by prefill or one token at a time.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/file.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "cli/util.h"
#include "dist/expert_parallel.h"
#include "model/model.h"

static const char *const VALUED[] = {"model", "tokens", "out", "mtp-out", "routes-out", "kv-dtype", "expert-parallel", "compute",
                                     "decode-tiles", NULL};
static const char *const FLAGS[] = {"decode", "absorbed", "no-mmap", NULL};

// Main logits (T, V), when mtp is non-NULL the first MTP module's logits (T-1, V), and when routes
// is non-NULL (prefill only) the routed experts (layers, T, K_r).
static int compute(const Model *m, const int *tok, int T, int decode, AttnMode mode, DType kv_dtype, float *logits,
                   float *mtp, int *routes, Error *err) {
    const ModelConfig *c = &m->cfg;
    int d = c->hidden_size, V = c->vocab_size, n_mtp = mtp ? 1 : 0, rc = -1;
    KVCache kv;
    if (kvcache_init_as(&kv, c, n_mtp, T, kv_dtype, err)) return -1;
    ForwardState *s = forward_state_new(m, decode ? 1 : T, T, err);
    float *hidden = xmalloc(err, sizeof(float) * T * d, "hidden states");
    if (!s || !hidden) goto done;
    if (!decode) {
        forward_state_record_routes(s, routes);
        if (model_forward(m, s, &kv, tok, T, mode, logits, NULL, hidden, err)) goto done;
        forward_state_record_routes(s, NULL);
        if (mtp && T > 1 && model_mtp_forward(m, s, &kv, 0, tok + 1, hidden, T - 1, mode, mtp, NULL, err)) goto done;
    } else {
        for (int t = 0; t < T; t++) {
            if (model_forward(m, s, &kv, tok + t, 1, ATTN_ABSORBED, NULL, logits + (size_t)t * V, hidden + (size_t)t * d, err))
                goto done;
            // MTP row t-1 needs h_{t-1} and token t: it can run as soon as token t is known
            if (mtp && t > 0 &&
                model_mtp_forward(m, s, &kv, 0, tok + t, hidden + (size_t)(t - 1) * d, 1, ATTN_ABSORBED,
                                  mtp + (size_t)(t - 1) * V, NULL, err))
                goto done;
        }
    }
    rc = 0;
done:
    free(hidden);
    forward_state_free(s);
    kvcache_free(&kv);
    return rc;
}

// Under mpirun (main.c starts MPI for this command) every rank runs the same prompt with its share
// of the routed experts; a failure they all meet alike is reported by rank 0; rank 0 writes.
int cmd_logits(int argc, char **argv) {
    const char *cmd = "dsv3 logits";
    Error err = {0};
    Args a;
    const char *dir, *tokens_s;
    if (args_parse(&a, cmd, argc, argv, VALUED, FLAGS, &err) || args_require(&a, "model", &dir, &err) ||
        args_require(&a, "tokens", &tokens_s, &err))
        return cli_fail_once(cmd, &err);
    DType kv_dtype;
    int kv_auto;
    long tile_rows;  // (--decode-tiles: a server's kernels, to compare its numbers with; auto: one row's)
    if (parse_kv_dtype(&a, "f32", &kv_dtype, &kv_auto, &err) || parse_decode_tiles(&a, 1, &tile_rows, &err))
        return cli_fail_once(cmd, &err);
    const char *out = args_str(&a, "out", NULL), *mtp_out = args_str(&a, "mtp-out", NULL);
    const char *routes_out = args_str(&a, "routes-out", NULL);
    if (!out && !mtp_out && !routes_out) {
        err_set(&err, "give --out FILE, --mtp-out FILE, --routes-out FILE or several");
        return cli_fail_once(cmd, &err);
    }
    if (routes_out && args_flag(&a, "decode")) {
        err_set(&err, "--routes-out: recorded by the prefill pass, not with --decode");
        return cli_fail_once(cmd, &err);
    }
    long E;
    int root = dist_rank(dist_world()) == 0;
    ComputeMode cmode;
    if (cli_expert_parallel_size(&a, &E, &err) || parse_compute(&a, "f32", &cmode, &err)) return cli_fail_once(cmd, &err);
    int *tok = NULL, T = 0;
    if (parse_token_list(tokens_s, &tok, &T, &err)) return cli_fail_once(cmd, &err);
    Model m;
    if (args_flag(&a, "no-mmap")) st_set_load_mode(ST_READ);
    if (model_load(&m, dir, mtp_out != NULL, &err)) {
        free(tok);
        return cli_fail_once(cmd, &err);
    }
    int rc = 1, V = m.cfg.vocab_size, *routes = NULL;
    size_t n_routes = (size_t)m.cfg.num_hidden_layers * T * (m.cfg.num_experts_per_tok > 0 ? m.cfg.num_experts_per_tok : 1);
    float *logits = NULL, *mtp = NULL;
    ExpertParallel *ep = NULL;
    // (the experts split first: a rank packs weight panels for its own experts only)
    if ((E > 1 && cli_expert_parallel_start(&m, &ep, &err)) || model_set_compute(&m, cmode, &err)) goto done;
    model_set_panel_tiles(&m, tile_rows);
    if (kv_auto) kv_dtype = model_kv_dtype_auto(&m);
    if (mtp_out && m.w.n_mtp == 0) {
        err_set(&err, "%s: --mtp-out: the model has no MTP module (num_nextn_predict_layers is 0)", dir);
        goto done;
    }
    if (mtp_out && T < 2) {
        err_set(&err, "--mtp-out needs at least 2 tokens");
        goto done;
    }
    logits = xmalloc(&err, sizeof(float) * (size_t)T * V, "logits");
    if (mtp_out) mtp = xmalloc(&err, sizeof(float) * (size_t)(T - 1) * V, "MTP logits");
    if (routes_out) routes = xmalloc(&err, sizeof(int) * n_routes, "routes");
    if (!logits || (mtp_out && !mtp) || (routes_out && !routes)) goto done;
    AttnMode mode = args_flag(&a, "absorbed") ? ATTN_ABSORBED : ATTN_PLAIN;
    if (compute(&m, tok, T, args_flag(&a, "decode"), mode, kv_dtype, logits, mtp, routes, &err)) goto done;
    if (ep && cli_report_expert_ranks(ep, &m, &err)) goto done;
    if (root && out && file_write_all(out, logits, sizeof(float) * (size_t)T * V, &err)) goto done;
    if (root && mtp_out && file_write_all(mtp_out, mtp, sizeof(float) * (size_t)(T - 1) * V, &err)) goto done;
    if (root && routes_out && file_write_all(routes_out, routes, sizeof(int) * n_routes, &err)) goto done;
    rc = 0;
done:
    if (rc) cli_fail_once(cmd, &err);  // the ranks compute the same: they fail alike
    expert_parallel_free(ep);
    free(logits);
    free(mtp);
    free(routes);
    free(tok);
    model_free(&m);
    return rc;
}
