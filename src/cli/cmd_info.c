// dsv3 info: what a model is — parameters, active parameters, KV cache per token, bytes mapped.
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/util.h"
#include "kernels/matmul.h"
#include "model/model.h"
#include "model/tensors.h"

static const char *const VALUED[] = {"model", NULL};
static const char *const FLAGS[] = {"json", NULL};

int cmd_info(int argc, char **argv) {
    const char *cmd = "dsv3 info";
    Error err = {0};
    Args a;
    const char *dir;
    if (args_parse(&a, cmd, argc, argv, VALUED, FLAGS, &err) || args_require(&a, "model", &dir, &err))
        return cli_fail(cmd, &err);
    Model m;
    if (model_load(&m, dir, 0, &err)) return cli_fail(cmd, &err);
    const ModelConfig *c = &m.cfg;
    ParamCounts p = tensor_count_params(c);
    size_t kvb = kvcache_bytes_per_token(c, DT_F32), kvb16 = kvcache_bytes_per_token(c, DT_BF16);
    int panel_matrices;
    size_t panels = model_panels_bytes(&m, COMPUTE_AUTO, &panel_matrices);
    if (args_flag(&a, "json")) {
        json_t *o = json_pack("{s:s,s:I,s:I,s:I,s:I,s:I,s:I,s:s,s:I,s:I,s:i,s:i,s:s,s:s}", "model_type", c->model_type,
                              "total_params", (json_int_t)p.total, "active_params", (json_int_t)p.active,
                              "mtp_params", (json_int_t)p.mtp_total, "mtp_active_params", (json_int_t)p.mtp_active,
                              "kv_bytes_per_token", (json_int_t)kvb, "kv_bytes_per_token_bf16", (json_int_t)kvb16,
                              "kv_cache_dtype", "f32", "mapped_bytes",
                              (json_int_t)m.files.mapped_bytes, "panel_bytes", (json_int_t)panels, "layers",
                              c->num_hidden_layers, "mtp_modules",
                              m.w.n_mtp, "weight_dtype", dtype_name(m.w.layers[0].self_attn.o_proj.dtype), "isa",
                              kernels_isa());
        char *s = json_dumps(o, JSON_INDENT(2));
        printf("%s\n", s);
        free(s);
        json_decref(o);
    } else {
        printf("model            %s (%s)\n", dir, c->model_type);
        printf("parameters       %.2fM total, %.2fM active per token (main model)\n", p.total / 1e6, p.active / 1e6);
        printf("MTP modules      %d loaded (%.2fM parameters, %.2fM active)\n", m.w.n_mtp, p.mtp_total / 1e6,
               p.mtp_active / 1e6);
        printf("layers           %d (%d dense), %d heads, MLA kv_lora %d + rope %d\n", c->num_hidden_layers,
               c->n_routed_experts ? c->first_k_dense_replace : c->num_hidden_layers, c->num_attention_heads,
               c->kv_lora_rank, c->qk_rope_head_dim);
        if (c->n_routed_experts)
            printf("experts          %d routed (top-%d, %s, %s), %d shared\n", c->n_routed_experts,
                   c->num_experts_per_tok, config_topk_method_name(c->topk_method),
                   c->scoring_func == SCORING_SIGMOID ? "sigmoid" : "softmax", c->n_shared_experts);
        printf("KV cache         %zu bytes per token in f32, %zu in bf16 (--kv-dtype): (%d + %d) x %d layers\n", kvb,
               kvb16, c->kv_lora_rank, c->qk_rope_head_dim, c->num_hidden_layers);
        printf("weights          %s, %zu bytes mapped from %d file(s)\n",
               dtype_name(m.w.layers[0].self_attn.o_proj.dtype), m.files.mapped_bytes, m.files.nfiles);
        printf("kernels          %s\n", kernels_isa());
        if (panels)
            printf("weight panels    %.1f MB for %d matrices under --compute auto (the BF16-compute matrices packed at\n"
                   "                 load by generate, chat and serve; the mmapped originals read only through\n"
                   "                 them go back to the page cache)\n",
                   panels / 1e6, panel_matrices);
        else
            printf("weight panels    none under --compute auto\n");
    }
    model_free(&m);
    return 0;
}
