// dsv3 generate: prefill the prompt, then decode token by token through the latent KV cache,
// stopping at eos_token_id. A --tokens prompt prints ids as they come; a --prompt (text, with the
// model directory's tokenizer.json) streams decoded text.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/util.h"
#include "infer/sampler.h"
#include "model/model.h"
#include "text/tokenizer.h"

static const char *const VALUED[] = {"model", "tokens", "prompt", "system", "max-new", "temperature", "top-p",
                                     "top-k", "seed", NULL};
static const char *const FLAGS[] = {"chat", "no-mmap", "stats", NULL};

// The prompt's ids: --tokens as given, or --prompt encoded (BOS as tokenizer_config.json says;
// with --chat in the DeepSeek-V3 chat format ending in the generation prompt).
static int prompt_ids(const Args *a, const char *dir, Tokenizer **tok, int **ids, int *n, Error *err) {
    const char *tokens = args_str(a, "tokens", NULL), *text = args_str(a, "prompt", NULL);
    if (!!tokens == !!text) return err_set(err, "give exactly one of --tokens IDS and --prompt TEXT");
    if ((args_flag(a, "chat") || args_str(a, "system", NULL)) && !text)
        return err_set(err, "--chat and --system need --prompt");
    if (tokens) return parse_token_list(tokens, ids, n, err);
    *tok = tok_load_dir(dir, err);
    if (!*tok) return -1;
    TokIds v = {0};
    int rc;
    if (args_flag(a, "chat") || args_str(a, "system", NULL)) {
        ChatMessage msgs[2];
        int nm = 0;
        if (args_str(a, "system", NULL)) msgs[nm++] = (ChatMessage){"system", args_str(a, "system", NULL)};
        msgs[nm++] = (ChatMessage){"user", text};
        rc = tok_chat_encode(*tok, msgs, nm, 1, &v, err);
    } else {
        rc = tok_encode(*tok, text, strlen(text), TOK_ADD_SPECIAL, &v, err);
    }
    if (rc == 0 && v.n == 0) rc = err_set(err, "--prompt: the text encodes to no tokens");
    if (rc) {
        ids_free(&v);
        return -1;
    }
    *ids = v.v;  // the list's buffer becomes the caller's (freed with free())
    *n = (int)v.n;
    return 0;
}

int cmd_generate(int argc, char **argv) {
    const char *cmd = "dsv3 generate";
    Error err = {0};
    Args a;
    const char *dir;
    long max_new, top_k, seed;
    double temp, top_p;
    if (args_parse(&a, cmd, argc, argv, VALUED, FLAGS, &err) || args_require(&a, "model", &dir, &err) ||
        args_long(&a, "max-new", 32, 1, 1 << 20, &max_new, &err) || args_long(&a, "top-k", 0, 0, 1 << 30, &top_k, &err) ||
        args_long(&a, "seed", 0, 0, 0x7fffffffL, &seed, &err) ||
        args_double(&a, "temperature", 0.0, 0.0, 100.0, &temp, &err) ||
        args_double(&a, "top-p", 1.0, 0.0, 1.0, &top_p, &err))
        return cli_fail(cmd, &err);
    Tokenizer *tok = NULL;
    int *prompt = NULL, T = 0;
    if (prompt_ids(&a, dir, &tok, &prompt, &T, &err)) {
        tok_free(tok);
        return cli_fail(cmd, &err);
    }
    Model m;
    if (args_flag(&a, "no-mmap")) st_set_load_mode(ST_READ);
    if (model_load(&m, dir, 0, &err)) {
        free(prompt);
        tok_free(tok);
        return cli_fail(cmd, &err);
    }
    int rc = 1, V = m.cfg.vocab_size;
    KVCache kv = {0};
    ForwardState *s = NULL;
    Sampler sm = {0};
    TokStream ts;
    if (tok) tok_stream_init(&ts, tok, TOK_SKIP_SPECIAL);
    float *logits = xmalloc(&err, sizeof(float) * V, "logits");
    if (!logits || kvcache_init(&kv, &m.cfg, 0, T + (int)max_new, &err)) goto done;
    s = forward_state_new(&m, T, T + (int)max_new, &err);
    if (!s) goto done;
    if (sampler_init(&sm, V, (float)temp, (int)top_k, (float)top_p, (unsigned long long)seed)) {
        err_set(&err, "out of memory");
        goto done;
    }
    double t0 = cli_now();
    if (model_forward(&m, s, &kv, prompt, T, ATTN_PLAIN, NULL, logits, NULL, &err)) goto done;
    double t1 = cli_now();
    long generated = 0;
    for (long i = 0; i < max_new; i++) {
        int next = sampler_sample(&sm, logits);
        if (tok) {
            const char *text;
            size_t n;
            if (tok_stream_push(&ts, next, &text, &n, &err)) goto done;
            fwrite(text, 1, n, stdout);
        } else {
            printf(i ? " %d" : "%d", next);
        }
        fflush(stdout);
        generated++;
        if (next == m.cfg.eos_token_id || i + 1 == max_new) break;
        if (model_forward(&m, s, &kv, &next, 1, ATTN_ABSORBED, NULL, logits, NULL, &err)) goto done;
    }
    if (tok) {
        const char *text;
        size_t n;
        tok_stream_finish(&ts, &text, &n);
        fwrite(text, 1, n, stdout);
    }
    printf("\n");
    if (args_flag(&a, "stats")) {
        // decode steps: every generated token but the last needed one forward pass
        double t2 = cli_now(), dt = t2 - t1;
        fprintf(stderr, "prompt: %d tokens in %.3f s (%.1f tokens/s); generated %ld tokens in %.3f s (%.1f tokens/s)\n", T,
                t1 - t0, T / (t1 - t0 > 1e-9 ? t1 - t0 : 1e-9), generated, dt,
                generated > 1 ? (generated - 1) / (dt > 1e-9 ? dt : 1e-9) : 0.0);
    }
    rc = 0;
done:
    if (rc) {
        fflush(stdout);
        cli_fail(cmd, &err);
    }
    if (tok) tok_stream_free(&ts);
    tok_free(tok);
    sampler_free(&sm);
    forward_state_free(s);
    kvcache_free(&kv);
    free(logits);
    free(prompt);
    model_free(&m);
    return rc;
}
