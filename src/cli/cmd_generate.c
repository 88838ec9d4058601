// dsv3 generate: prefill the prompt, then decode token by token through the latent KV cache,
// printing ids as they come and stopping at eos_token_id.
#include <stdio.h>
#include <stdlib.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/util.h"
#include "infer/sampler.h"
#include "model/model.h"

static const char *const VALUED[] = {"model", "tokens", "max-new", "temperature", "top-p", "top-k", "seed", NULL};

int cmd_generate(int argc, char **argv) {
    const char *cmd = "dsv3 generate";
    Error err = {0};
    Args a;
    const char *dir, *tokens_s;
    long max_new, top_k, seed;
    double temp, top_p;
    if (args_parse(&a, cmd, argc, argv, VALUED, NULL, &err) || args_require(&a, "model", &dir, &err) ||
        args_require(&a, "tokens", &tokens_s, &err) || args_long(&a, "max-new", 32, 1, 1 << 20, &max_new, &err) ||
        args_long(&a, "top-k", 0, 0, 1 << 30, &top_k, &err) || args_long(&a, "seed", 0, 0, 0x7fffffffL, &seed, &err) ||
        args_double(&a, "temperature", 0.0, 0.0, 100.0, &temp, &err) ||
        args_double(&a, "top-p", 1.0, 0.0, 1.0, &top_p, &err))
        return cli_fail(cmd, &err);
    int *prompt = NULL, T = 0;
    if (parse_token_list(tokens_s, &prompt, &T, &err)) return cli_fail(cmd, &err);
    Model m;
    if (model_load(&m, dir, 0, &err)) {
        free(prompt);
        return cli_fail(cmd, &err);
    }
    int rc = 1, V = m.cfg.vocab_size;
    KVCache kv = {0};
    ForwardState *s = NULL;
    Sampler sm = {0};
    float *logits = xmalloc(&err, sizeof(float) * V, "logits");
    if (!logits || kvcache_init(&kv, &m.cfg, 0, T + (int)max_new, &err)) goto done;
    s = forward_state_new(&m, T, T + (int)max_new, &err);
    if (!s) goto done;
    if (sampler_init(&sm, V, (float)temp, (int)top_k, (float)top_p, (unsigned long long)seed)) {
        err_set(&err, "out of memory");
        goto done;
    }
    if (model_forward(&m, s, &kv, prompt, T, ATTN_PLAIN, NULL, logits, NULL, &err)) goto done;
    for (long i = 0; i < max_new; i++) {
        int next = sampler_sample(&sm, logits);
        printf(i ? " %d" : "%d", next);
        fflush(stdout);
        if (next == m.cfg.eos_token_id || i + 1 == max_new) break;
        if (model_forward(&m, s, &kv, &next, 1, ATTN_ABSORBED, NULL, logits, NULL, &err)) goto done;
    }
    printf("\n");
    rc = 0;
done:
    if (rc) cli_fail(cmd, &err);
    sampler_free(&sm);
    forward_state_free(s);
    kvcache_free(&kv);
    free(logits);
    free(prompt);
    model_free(&m);
    return rc;
}
