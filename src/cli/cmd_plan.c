// dsv3 plan: the papers' cost figures for a configuration (docs/plan.md): parameters, weight and
// KV-cache memory, training FLOPs, the expert-parallel decode bound; pipeline bubbles; network cost.
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/util.h"
#include "dist/expert_parallel.h"
#include "plan/plan.h"

static const char *const VALUED[] = {"config", "preset", "seq", "ep-bandwidth", "tokens-per-device", "ep-hidden",
                                     "ep-ranks", "ranks-per-node", "a2a-dtype",
                                     "pipeline", "f", "b", "w", "fb", "radix", "planes", "df-groups",
                                     "switch-cost", "link-cost", "endpoint-cost", "local-link-cost", NULL};
static const char *const FLAGS[] = {"json", "network", "tables", NULL};

typedef struct ModelOpts {
    long seq, tokens, hidden;  // hidden 0: the model's hidden_size
    double bandwidth;
} ModelOpts;

// 1234567 -> "1,234,567"
static const char *grouped(char *buf, size_t n, long long v) {
    char digits[32];
    snprintf(digits, sizeof digits, "%lld", v < 0 ? -v : v);
    size_t len = strlen(digits), o = 0;
    if (v < 0 && o + 1 < n) buf[o++] = '-';
    for (size_t i = 0; i < len && o + 2 < n; i++) {
        if (i && (len - i) % 3 == 0) buf[o++] = ',';
        buf[o++] = digits[i];
    }
    buf[o] = 0;
    return buf;
}

static void describe_arch(const PlanArch *a, char *buf, size_t n) {
    int o;
    if (a->mla)
        o = snprintf(buf, n, "MLA (kv_lora %lld + rope %lld%s), %lld heads", (long long)a->kv_lora, (long long)a->qk_rope,
                     a->q_lora ? "" : ", no q_lora", (long long)a->heads);
    else
        o = snprintf(buf, n, "%s (%lld heads, %lld KV heads x %lld)", a->kv_heads == a->heads ? "MHA" : "GQA",
                     (long long)a->heads, (long long)a->kv_heads, (long long)a->head_dim);
    if (o < 0 || (size_t)o >= n) return;
    int64_t moe = plan_moe_layers(a);
    if (moe)
        o += snprintf(buf + o, n - o, ", %lld layers (%lld dense, %lld MoE: %lld routed + %lld shared, top-%lld)",
                      (long long)a->layers, (long long)(a->layers - moe), (long long)moe, (long long)a->n_routed,
                      (long long)a->n_shared, (long long)a->top_k);
    else
        o += snprintf(buf + o, n - o, ", %lld dense layers", (long long)a->layers);
    if (a->mtp && o >= 0 && (size_t)o < n) snprintf(buf + o, n - o, ", MTP %lld", (long long)a->mtp);
}

// v in the largest of units[0..3] (1e9, 1e6, 1e3, 1) that keeps it at least 1: "671.03 B".
static const char *scaled(char *buf, size_t n, double v, const char *const units[4]) {
    double div = 1e9;
    int u = 0;
    while (u < 3 && fabs(v) < div) div /= 1e3, u++;
    snprintf(buf, n, "%.2f %s", v / div, units[u]);
    return buf;
}

static const char *const PARAMS[4] = {"B", "M", "K", ""};
static const char *const BYTES[4] = {"GB", "MB", "KB", "B"};
static const char *const FLOPS[4] = {"GFLOPs", "MFLOPs", "KFLOPs", "FLOPs"};

static void print_model(const PlanArch *a, const PlanModel *m, const PlanEp *e, PlanPaper paper) {
    char desc[256], x[4][48];
    describe_arch(a, desc, sizeof desc);
    printf("model                 %s\n", a->name);
    printf("architecture          %s\n", desc);
    printf("parameters            %s total, %s active per token\n", scaled(x[0], 48, m->total_params, PARAMS),
           scaled(x[1], 48, m->active_params, PARAMS));
    if (a->mtp)
        printf("  with MTP            %s total, %s active per token\n", scaled(x[0], 48, m->total_params_mtp, PARAMS),
               scaled(x[1], 48, m->active_params_mtp, PARAMS));
    printf("weights               %s BF16, %s FP8 (E4M3 linear layers, 128x128 block scales)\n",
           scaled(x[0], 48, m->weight_bytes_bf16, BYTES), scaled(x[1], 48, m->weight_bytes_fp8, BYTES));
    if (a->mtp)
        printf("  with MTP            %s BF16, %s FP8\n", scaled(x[0], 48, m->weight_bytes_bf16_mtp, BYTES),
               scaled(x[1], 48, m->weight_bytes_fp8_mtp, BYTES));
    // KB = 1000 B throughout, as in the paper
    printf("KV cache per token    %.3f KB BF16, %.3f KB FP8 (%lld numbers x %lld layers)\n",
           m->kv_bytes_per_token_bf16 / 1e3, m->kv_bytes_per_token_fp8 / 1e3,
           (long long)(m->kv_elems_per_token / a->layers), (long long)a->layers);
    if (paper.kv_bytes_per_token)
        printf("  paper               %.3f KB, residual %+.3f KB\n", paper.kv_bytes_per_token / 1e3,
               (m->kv_bytes_per_token_bf16 - paper.kv_bytes_per_token) / 1e3);
    printf("training FLOPs/token  %s at seq %lld = %s matmul (6 x %s) + %s attention\n",
           scaled(x[0], 48, m->train_flops_per_token, FLOPS), (long long)m->seq,
           scaled(x[1], 48, m->train_flops_matmul, FLOPS), scaled(x[2], 48, m->matmul_params, PARAMS),
           scaled(x[3], 48, m->train_flops_attention, FLOPS));
    if (paper.train_flops_per_token && m->seq == 4096)
        printf("  paper               %.0f GFLOPs, residual %+.2f GFLOPs (%+.1f%%)\n", paper.train_flops_per_token / 1e9,
               (m->train_flops_per_token - paper.train_flops_per_token) / 1e9,
               100.0 * (m->train_flops_per_token / paper.train_flops_per_token - 1));
    if (a->mtp) printf("  with MTP            %s\n", scaled(x[0], 48, m->train_flops_per_token_mtp, FLOPS));
    if (!e->applicable) {
        printf("EP all-to-all bound   n/a (dense model)\n");
        return;
    }
    printf("EP all-to-all         (1+2) B x %lld tokens x %lld experts x %lld / %g GB/s = %.2f us per layer\n",
           (long long)e->tokens_per_device, (long long)e->experts_per_token, (long long)e->hidden, e->bandwidth_gbps,
           e->alltoall_us);
    // the paper rounds tokens per second down (67.76 -> 67)
    printf("decode bound          TPOT %.2f ms (2 x %lld layers), %.0f tok/s\n", e->tpot_ms, (long long)a->layers,
           floor(e->tokens_per_s));
}

static void json_set(json_t *o, const char *key, json_t *v) { json_object_set_new(o, key, v); }

// --ep-ranks: plan_ep_traffic and the bytes dsv3's exchange puts on the wire for it.
typedef struct EpTraffic {
    PlanEpTraffic t;
    int64_t topk_group;
    const char *dtype;
    // bytes a token's rank sends per MoE layer: within its node and across, in training (forward and
    // backward), and across in the forward pass alone
    double intra_training, inter_training, inter_forward, intra_forward;
} EpTraffic;

static int ep_traffic(const PlanArch *a, long ranks, long per_node, A2aDtype dtype, EpTraffic *x, Error *err) {
    static const char *const names[] = {"fp32", "bf16", "fp8", "logfmt8", "logfmt10"};
    TRY(plan_ep_traffic(a, ranks, per_node, 100000, &x->t, err));
    x->topk_group = a->topk_group;
    x->dtype = names[dtype];
    double forward = (double)expert_parallel_pair_bytes((int)a->hidden, (int)a->top_k, dtype, 0);
    double training = (double)expert_parallel_pair_bytes((int)a->hidden, (int)a->top_k, dtype, 1);
    double within = x->t.rows_other_ranks - x->t.rows_other_nodes;  // rows to other ranks of the node
    x->intra_training = within * training, x->inter_training = x->t.rows_other_nodes * training;
    x->intra_forward = within * forward, x->inter_forward = x->t.rows_other_nodes * forward;
    return 0;
}

static void print_traffic(const EpTraffic *x) {
    const PlanEpTraffic *t = &x->t;
    printf("EP traffic            %lld ranks in nodes of %lld, routing uniform within its groups (100,000 tokens)\n",
           (long long)t->ranks, (long long)t->ranks_per_node);
    printf("  a token reaches     %.3f ranks, %.3f nodes (at most %lld; topk_group %lld)\n", t->ranks_reached,
           t->nodes_reached, (long long)t->max_nodes, (long long)x->topk_group);
    printf("  its rank sends      %.3f rows to other ranks, %.3f to other nodes, per MoE layer\n", t->rows_other_ranks,
           t->rows_other_nodes);
    printf("  bytes, %-12s %.0f within nodes, %.0f across nodes per token and MoE layer in training (forward %.0f, %.0f)\n",
           x->dtype, x->intra_training, x->inter_training, x->intra_forward, x->inter_forward);
}

static json_t *traffic_json(const EpTraffic *x) {
    const PlanEpTraffic *t = &x->t;
    json_t *o = json_object();
    json_set(o, "ranks", json_integer(t->ranks));
    json_set(o, "ranks_per_node", json_integer(t->ranks_per_node));
    json_set(o, "a2a_dtype", json_string(x->dtype));
    json_set(o, "ranks_reached", json_real(t->ranks_reached));
    json_set(o, "nodes_reached", json_real(t->nodes_reached));
    json_set(o, "max_nodes", json_integer(t->max_nodes));
    json_set(o, "rows_other_ranks", json_real(t->rows_other_ranks));
    json_set(o, "rows_other_nodes", json_real(t->rows_other_nodes));
    json_set(o, "intra_node_bytes_training", json_real(x->intra_training));
    json_set(o, "inter_node_bytes_training", json_real(x->inter_training));
    json_set(o, "inter_node_bytes_forward", json_real(x->inter_forward));
    return o;
}

static json_t *model_json(const PlanArch *a, const PlanModel *m, const PlanEp *e, PlanPaper paper) {
    json_t *o = json_object();
    json_set(o, "model", json_string(a->name));
    json_set(o, "total_params", json_integer(m->total_params));
    json_set(o, "active_params", json_integer(m->active_params));
    json_set(o, "total_params_with_mtp", json_integer(m->total_params_mtp));
    json_set(o, "active_params_with_mtp", json_integer(m->active_params_mtp));
    json_set(o, "kv_bytes_per_token", json_integer(m->kv_bytes_per_token_bf16));
    json_set(o, "kv_bytes_per_token_fp8", json_integer(m->kv_bytes_per_token_fp8));
    json_set(o, "seq", json_integer(m->seq));
    json_set(o, "train_flops_per_token", json_integer((json_int_t)m->train_flops_per_token));
    json_set(o, "train_flops_per_token_with_mtp", json_integer((json_int_t)m->train_flops_per_token_mtp));
    json_set(o, "weight_bytes_bf16", json_integer(m->weight_bytes_bf16));
    json_set(o, "weight_bytes_fp8", json_integer(m->weight_bytes_fp8));
    json_set(o, "weight_bytes_bf16_with_mtp", json_integer(m->weight_bytes_bf16_mtp));
    json_set(o, "weight_bytes_fp8_with_mtp", json_integer(m->weight_bytes_fp8_mtp));
    json_set(o, "ep_bandwidth_gbps", json_real(e->bandwidth_gbps));
    json_set(o, "ep_tokens_per_device", json_integer(e->tokens_per_device));
    json_set(o, "ep_hidden", json_integer(e->hidden));
    json_set(o, "ep_alltoall_us", e->applicable ? json_real(e->alltoall_us) : json_null());
    json_set(o, "ep_tpot_ms", e->applicable ? json_real(e->tpot_ms) : json_null());
    json_set(o, "ep_tokens_per_s", e->applicable ? json_real(e->tokens_per_s) : json_null());
    if (paper.kv_bytes_per_token || paper.train_flops_per_token) {
        json_t *p = json_object();
        json_set(p, "kv_bytes_per_token", paper.kv_bytes_per_token ? json_integer((json_int_t)paper.kv_bytes_per_token) : json_null());
        json_set(p, "train_flops_per_token",
                 paper.train_flops_per_token ? json_integer((json_int_t)paper.train_flops_per_token) : json_null());
        json_set(o, "paper", p);
    }
    return o;
}

static void compute_model(const PlanArch *a, const ModelOpts *opt, PlanModel *m, PlanEp *e) {
    plan_model(a, opt->seq, m);
    plan_ep(a, opt->bandwidth, opt->tokens, opt->hidden ? opt->hidden : a->hidden, e);
}

// The papers' comparison tables (SPEC §7), computed from the presets.
static void print_tables(const ModelOpts *opt) {
    printf("KV cache per token, BF16 (KB = 1000 B)\n");
    printf("  %-18s %10s %10s\n", "model", "computed", "paper");
    for (int i = 0; i < plan_preset_count(); i++) {
        PlanArch a;
        PlanModel m;
        PlanEp e;
        plan_arch_preset(&a, plan_preset_name(i), NULL);
        compute_model(&a, opt, &m, &e);
        PlanPaper p = plan_preset_paper(a.name);
        char paper[32] = "-";
        if (p.kv_bytes_per_token) snprintf(paper, sizeof paper, "%.3f", p.kv_bytes_per_token / 1e3);
        printf("  %-18s %10.3f %10s\n", a.name, m.kv_bytes_per_token_bf16 / 1e3, paper);
    }
    printf("\nTraining GFLOPs per token at seq %ld\n", opt->seq);
    printf("  %-18s %10s %10s %10s %10s\n", "model", "params", "computed", "paper", "residual");
    for (int i = 0; i < plan_preset_count(); i++) {
        PlanArch a;
        PlanModel m;
        PlanEp e;
        plan_arch_preset(&a, plan_preset_name(i), NULL);
        compute_model(&a, opt, &m, &e);
        PlanPaper p = plan_preset_paper(a.name);
        char paper[32] = "-", resid[32] = "-";
        if (p.train_flops_per_token && opt->seq == 4096) {
            snprintf(paper, sizeof paper, "%.0f", p.train_flops_per_token / 1e9);
            snprintf(resid, sizeof resid, "%+.1f%%", 100.0 * (m.train_flops_per_token / p.train_flops_per_token - 1));
        }
        printf("  %-18s %9.1fB %10.2f %10s %10s\n", a.name, m.total_params / 1e9, m.train_flops_per_token / 1e9, paper,
               resid);
    }
}

static json_t *tables_json(const ModelOpts *opt) {
    json_t *arr = json_array();
    for (int i = 0; i < plan_preset_count(); i++) {
        PlanArch a;
        PlanModel m;
        PlanEp e;
        plan_arch_preset(&a, plan_preset_name(i), NULL);
        compute_model(&a, opt, &m, &e);
        json_array_append_new(arr, model_json(&a, &m, &e, plan_preset_paper(a.name)));
    }
    return arr;
}

static void print_pipeline(long pp, double f, double b, double w, double fb, const PlanPipe s[3]) {
    printf("Pipeline bubbles, PP = %ld (F %g, B %g, W %g, F&B %g)\n", pp, f, b, w, fb);
    printf("  %-9s %-20s %10s %10s %12s\n", "method", "bubble", "= time", "params", "activations");
    for (int i = 0; i < 3; i++) {
        char bubble[32] = "n/a (odd PP)", acts[32];
        if (s[i].defined) snprintf(bubble, sizeof bubble, "%g", s[i].bubble);
        snprintf(acts, sizeof acts, "%s = %lld", i == 2 ? "PP+1" : "PP", (long long)s[i].activation_mult);
        printf("  %-9s %-20s %10s %9gx %12s\n", s[i].name, s[i].formula, bubble, s[i].param_mult, acts);
    }
}

static json_t *pipeline_json(long pp, double f, double b, double w, double fb, const PlanPipe s[3]) {
    json_t *o = json_object(), *arr = json_array();
    json_set(o, "pp", json_integer(pp));
    json_set(o, "f", json_real(f));
    json_set(o, "b", json_real(b));
    json_set(o, "w", json_real(w));
    json_set(o, "fb", json_real(fb));
    for (int i = 0; i < 3; i++) {
        json_t *x = json_object();
        json_set(x, "name", json_string(s[i].name));
        json_set(x, "formula", json_string(s[i].formula));
        json_set(x, "bubble", s[i].defined ? json_real(s[i].bubble) : json_null());
        json_set(x, "param_mult", json_real(s[i].param_mult));
        json_set(x, "activation_mult", json_integer(s[i].activation_mult));
        json_array_append_new(arr, x);
    }
    json_set(o, "schedules", arr);
    return o;
}

static void print_network(long radix, long planes, const PlanPrices *p, const PlanTopo t[PLAN_NTOPO]) {
    char b[PLAN_NTOPO][32];
    printf("Networks from %ld-port switches, MPFT with %ld planes\n", radix, planes);
    printf("(prices: switch $%g, link $%g, endpoint $%g, Dragonfly local link $%g)\n", p->switch_usd, p->link_usd,
           p->endpoint_usd, p->local_link_usd);
    printf("  %-20s", "metric");
    for (int i = 0; i < PLAN_NTOPO; i++) printf(" %10s", t[i].name);
    printf("\n");
    const char *rows[] = {"endpoints", "switches", "links"};
    for (int r = 0; r < 3; r++) {
        printf("  %-20s", rows[r]);
        for (int i = 0; i < PLAN_NTOPO; i++) {
            int64_t v = r == 0 ? t[i].endpoints : r == 1 ? t[i].switches : t[i].links;
            printf(" %10s", grouped(b[i], sizeof b[i], v));
        }
        printf("\n");
    }
    printf("  %-20s", "cost [M$]");
    for (int i = 0; i < PLAN_NTOPO; i++) printf(" %10s", grouped(b[i], sizeof b[i], llround(t[i].cost_usd / 1e6)));
    printf("\n  %-20s", "cost/endpoint [k$]");
    for (int i = 0; i < PLAN_NTOPO; i++) printf(" %10.2f", t[i].cost_per_endpoint_usd / 1e3);
    printf("\n");
}

static json_t *network_json(long radix, long planes, const PlanPrices *p, const PlanTopo t[PLAN_NTOPO]) {
    json_t *o = json_object(), *pr = json_object(), *arr = json_array();
    json_set(o, "radix", json_integer(radix));
    json_set(o, "planes", json_integer(planes));
    json_set(pr, "switch_usd", json_real(p->switch_usd));
    json_set(pr, "link_usd", json_real(p->link_usd));
    json_set(pr, "endpoint_usd", json_real(p->endpoint_usd));
    json_set(pr, "local_link_usd", json_real(p->local_link_usd));
    json_set(o, "prices", pr);
    for (int i = 0; i < PLAN_NTOPO; i++) {
        json_t *x = json_object();
        json_set(x, "name", json_string(t[i].name));
        json_set(x, "endpoints", json_integer(t[i].endpoints));
        json_set(x, "switches", json_integer(t[i].switches));
        json_set(x, "links", json_integer(t[i].links));
        json_set(x, "cost_usd", json_real(t[i].cost_usd));
        json_set(x, "cost_per_endpoint_usd", json_real(t[i].cost_per_endpoint_usd));
        json_array_append_new(arr, x);
    }
    json_set(o, "topologies", arr);
    return o;
}

// An option that only means something in one mode is an error elsewhere, not silently ignored.
static int only_with(const Args *a, const char *const *opts, int mode_on, const char *mode, Error *err) {
    for (; *opts; opts++)
        if (!mode_on && args_flag(a, *opts)) return err_set(err, "--%s needs %s", *opts, mode);
    return 0;
}

int cmd_plan(int argc, char **argv) {
    const char *cmd = "dsv3 plan";
    Error err = {0};
    Args a;
    if (args_parse(&a, cmd, argc, argv, VALUED, FLAGS, &err)) return cli_fail(cmd, &err);
    if (a.npos) {
        err_set(&err, "unexpected argument '%s'", a.pos[0]);
        return cli_fail(cmd, &err);
    }
    const char *config = args_str(&a, "config", NULL), *preset = args_str(&a, "preset", NULL);
    int tables = args_flag(&a, "tables"), network = args_flag(&a, "network"), pipeline = args_flag(&a, "pipeline");
    int json = args_flag(&a, "json"), model = config || preset;
    static const char *const model_opts[] = {"seq", "ep-bandwidth", "tokens-per-device", "ep-hidden", "ep-ranks",
                                             "ranks-per-node", "a2a-dtype", NULL};
    static const char *const pipe_opts[] = {"f", "b", "w", "fb", NULL};
    static const char *const net_opts[] = {"radix", "planes", "df-groups", "switch-cost", "link-cost",
                                           "endpoint-cost", "local-link-cost", NULL};
    if (config && preset) err_set(&err, "--config and --preset are exclusive");
    else if (!model && !tables && !network && !pipeline)
        err_set(&err, "one of --config, --preset, --tables, --pipeline or --network is needed");
    if (err.msg[0] || only_with(&a, model_opts, model || tables, "--config, --preset or --tables", &err) ||
        only_with(&a, pipe_opts, pipeline, "--pipeline", &err) || only_with(&a, net_opts, network, "--network", &err))
        return cli_fail(cmd, &err);

    ModelOpts mo;
    long pp = 0, radix, planes, df_groups;
    double f, b, w, fb;
    PlanPrices prices = plan_prices_default();
    if (args_long(&a, "seq", 4096, 1, 1L << 24, &mo.seq, &err) ||
        args_double(&a, "ep-bandwidth", 50, 1e-6, 1e9, &mo.bandwidth, &err) ||
        args_long(&a, "tokens-per-device", 32, 1, 1L << 24, &mo.tokens, &err) ||
        args_long(&a, "ep-hidden", 0, 1, 1L << 24, &mo.hidden, &err) ||
        args_long(&a, "pipeline", 0, 2, 1 << 20, &pp, &err) || args_double(&a, "f", 1, 0, 1e12, &f, &err) ||
        args_double(&a, "b", 2, 0, 1e12, &b, &err) || args_double(&a, "w", 1, 0, 1e12, &w, &err) ||
        args_double(&a, "fb", f + b, 0, 1e12, &fb, &err) || args_long(&a, "radix", 64, 4, 4096, &radix, &err) ||
        args_long(&a, "planes", 8, 1, 1024, &planes, &err) || args_long(&a, "df-groups", 0, 2, 1L << 24, &df_groups, &err) ||
        args_double(&a, "switch-cost", prices.switch_usd, 0, 1e12, &prices.switch_usd, &err) ||
        args_double(&a, "link-cost", prices.link_usd, 0, 1e12, &prices.link_usd, &err) ||
        args_double(&a, "endpoint-cost", prices.endpoint_usd, 0, 1e12, &prices.endpoint_usd, &err) ||
        args_double(&a, "local-link-cost", prices.local_link_usd, 0, 1e12, &prices.local_link_usd, &err))
        return cli_fail(cmd, &err);

    PlanArch arch;
    PlanModel m;
    PlanEp e;
    PlanPaper paper = {0, 0};
    long ep_ranks = 0, per_node = 0;
    A2aDtype a2a = A2A_FP32;
    if (args_long(&a, "ep-ranks", 0, 1, 1 << 20, &ep_ranks, &err) ||
        args_long(&a, "ranks-per-node", 0, 1, 1 << 20, &per_node, &err))
        return cli_fail(cmd, &err);
    const char *a2a_s = args_str(&a, "a2a-dtype", NULL);
    if (a2a_s && a2a_dtype_parse(a2a_s, &a2a)) {
        err_set(&err, "--a2a-dtype: unknown value '%s' (fp32, bf16, fp8, logfmt8 or logfmt10)", a2a_s);
        return cli_fail(cmd, &err);
    }
    if ((per_node || a2a_s) && !ep_ranks) {
        err_set(&err, "--%s needs --ep-ranks", per_node ? "ranks-per-node" : "a2a-dtype");
        return cli_fail(cmd, &err);
    }
    EpTraffic traffic = {0};
    if (model) {
        if (config ? plan_arch_from_file(&arch, config, &err) : plan_arch_preset(&arch, preset, &err))
            return cli_fail(cmd, &err);
        if (preset) paper = plan_preset_paper(preset);
        compute_model(&arch, &mo, &m, &e);
        if (ep_ranks && ep_traffic(&arch, ep_ranks, per_node ? per_node : ep_ranks, a2a, &traffic, &err))
            return cli_fail(cmd, &err);
    }
    PlanPipe pipe[3];
    if (pipeline && plan_pipeline(pp, f, b, w, fb, pipe, &err)) return cli_fail(cmd, &err);
    PlanTopo topo[PLAN_NTOPO];
    if (network && plan_network(radix, planes, df_groups, &prices, topo, &err)) return cli_fail(cmd, &err);

    if (json) {
        json_t *o = model ? model_json(&arch, &m, &e, paper) : json_object();
        if (model && ep_ranks) json_set(o, "ep_traffic", traffic_json(&traffic));
        if (tables) json_set(o, "presets", tables_json(&mo));
        if (pipeline) json_set(o, "pipeline", pipeline_json(pp, f, b, w, fb, pipe));
        if (network) json_set(o, "network", network_json(radix, planes, &prices, topo));
        char *s = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(10));
        json_decref(o);
        if (!s) {
            err_set(&err, "out of memory writing JSON");
            return cli_fail(cmd, &err);
        }
        printf("%s\n", s);
        free(s);
        return 0;
    }
    int sections = 0;  // a blank line between sections
    if (model) print_model(&arch, &m, &e, paper), sections++;
    if (model && ep_ranks) print_traffic(&traffic);
    if (tables) {
        if (sections++) putchar('\n');
        print_tables(&mo);
    }
    if (pipeline) {
        if (sections++) putchar('\n');
        print_pipeline(pp, f, b, w, fb, pipe);
    }
    if (network) {
        if (sections++) putchar('\n');
        print_network(radix, planes, &prices, topo);
    }
    return 0;
}
