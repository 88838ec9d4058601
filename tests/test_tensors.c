// The tensor table (model/tensors.h) is the one walk of a checkpoint's layout: it visits exactly
// the tensors of the checkpoints on disk, and `dsv3 info` and `dsv3 plan` count from it alike.
#include <glob.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/safetensors.h"
#include "model/config.h"
#include "model/init.h"
#include "model/model.h"
#include "model/tensors.h"
#include "plan/plan.h"
#include "test.h"

// Every configuration the project ships: the golden checkpoints', the benchmarks', and those of
// the shared benchmark folder next to the checkout when there is one.
static const char *const CONFIG_GLOBS[] = {"tests/data/*/config.json", "tests/data/*/*/config.json",
                                           "bench/configs/*.json", "../shared/bench/*.json"};

static int config_paths(glob_t *g) {
    memset(g, 0, sizeof *g);
    for (size_t i = 0; i < sizeof CONFIG_GLOBS / sizeof CONFIG_GLOBS[0]; i++)
        glob(CONFIG_GLOBS[i], i ? GLOB_APPEND : 0, NULL, g);
    return (int)g->gl_pathc;
}

// The directory of a config.json that sits beside a checkpoint, else 0.
static int checkpoint_dir(const char *config_path, char *dir, size_t n) {
    const char *slash = strrchr(config_path, '/');
    if (!slash || strcmp(slash, "/config.json") != 0) return 0;
    snprintf(dir, n, "%.*s", (int)(slash - config_path), config_path);
    char probe[600];
    snprintf(probe, sizeof probe, "%s/model.safetensors", dir);
    FILE *f = fopen(probe, "rb");
    if (!f) {
        snprintf(probe, sizeof probe, "%s/model.safetensors.index.json", dir);
        f = fopen(probe, "rb");
    }
    if (f) fclose(f);
    return f != NULL;
}

static long long json_count(json_t *o, const char *key) { return (long long)json_integer_value(json_object_get(o, key)); }

TEST(test_info_and_plan_count_alike) {
    glob_t g;
    int n = config_paths(&g), checkpoints = 0;
    CHECK_MSG(n >= 9, "only %d configurations found", n);
    for (int i = 0; i < n; i++) {
        const char *path = g.gl_pathv[i];
        Error err = {0};
        ModelConfig c;
        PlanArch a;
        PlanModel m;
        CHECK_MSG(config_load(&c, path, &err) == 0, "%s", err.msg);
        CHECK_MSG(plan_arch_from_file(&a, path, &err) == 0, "%s", err.msg);
        plan_model(&a, 4096, &m);
        ParamCounts p = tensor_count_params(&c);
        CHECK_MSG(p.total == m.total_params && p.active == m.active_params, "%s: total %lld / %lld, active %lld / %lld",
                  path, p.total, (long long)m.total_params, p.active, (long long)m.active_params);
        CHECK_MSG(p.mtp_total == m.total_params_mtp - m.total_params &&
                      p.mtp_active == m.active_params_mtp - m.active_params,
                  "%s: MTP total %lld / %lld, active %lld / %lld", path, p.mtp_total,
                  (long long)(m.total_params_mtp - m.total_params), p.mtp_active,
                  (long long)(m.active_params_mtp - m.active_params));
        CHECK_MSG(p.active < p.total && (c.num_nextn_predict_layers > 0) == (p.mtp_total > 0), "%s", path);
        // the command prints the same counts
        char dir[512], out[4096];
        if (!checkpoint_dir(path, dir, sizeof dir)) continue;
        checkpoints++;
        CHECK_MSG(test_run(out, sizeof out, "%s info --model %s --json", test_bin(), dir) == 0, "%s", out);
        json_error_t je;
        json_t *o = json_loads(out, 0, &je);
        CHECK_MSG(o, "%s: %s", dir, out);
        long long total = json_count(o, "total_params"), active = json_count(o, "active_params");
        long long mtp = json_count(o, "mtp_params"), mtp_active = json_count(o, "mtp_active_params");
        json_decref(o);
        CHECK_MSG(total == m.total_params && active == m.active_params && mtp == p.mtp_total &&
                      mtp_active == p.mtp_active,
                  "%s: info %lld/%lld/%lld/%lld", dir, total, active, mtp, mtp_active);
    }
    globfree(&g);
    CHECK_MSG(checkpoints >= 6, "only %d golden checkpoints found", checkpoints);
}

// What a walk over loaded tables saw: the names it visited and the slots it gave.
typedef struct Seen {
    const StModel *st;
    int n;
    char (*names)[128];
    void **slots;
    int scales;  // FP8 weights, each with its _scale_inv companion
    char bad[512];
} Seen;

static int see(const TensorSpec *t, void *ctx) {
    Seen *s = ctx;
    const StTensor *f = st_model_find(s->st, t->name);
    if (!f) return snprintf(s->bad, sizeof s->bad, "%s: listed, not in the files", t->name), 1;
    int shape_ok = f->ndim == t->ndim && f->shape[0] == t->shape[0] && (t->ndim == 1 || f->shape[1] == t->shape[1]);
    if (!shape_ok) return snprintf(s->bad, sizeof s->bad, "%s: shape differs from the files'", t->name), 1;
    if (!t->mat == !t->vec || (t->mat != NULL) != (t->ndim == 2))
        return snprintf(s->bad, sizeof s->bad, "%s: no slot, or the wrong kind", t->name), 1;
    if (f->dtype == DT_F8_E4M3) {
        char sname[160];
        snprintf(sname, sizeof sname, "%s_scale_inv", t->name);
        if (!t->fp8 || !st_model_find(s->st, sname))
            return snprintf(s->bad, sizeof s->bad, "%s: FP8 in the files, not in the table", t->name), 1;
        s->scales++;
    }
    snprintf(s->names[s->n], sizeof s->names[s->n], "%s", t->name);
    s->slots[s->n++] = t->mat ? (void *)t->mat : (void *)t->vec;
    return 0;
}

static int cmp_name(const void *a, const void *b) { return strcmp(a, b); }

static int cmp_ptr(const void *a, const void *b) {
    const char *x = *(void *const *)a, *y = *(void *const *)b;
    return (x > y) - (x < y);
}

TEST(test_walk_visits_exactly_the_checkpoint) {
    glob_t g;
    int n = config_paths(&g), checkpoints = 0;
    for (int i = 0; i < n; i++) {
        char dir[512];
        if (!checkpoint_dir(g.gl_pathv[i], dir, sizeof dir)) continue;
        checkpoints++;
        Error err = {0};
        ModelConfig c;
        StModel st;
        ModelWeights w;
        CHECK_MSG(config_load(&c, g.gl_pathv[i], &err) == 0 && st_model_open(&st, dir, &err) == 0, "%s", err.msg);
        int in_files = 0;
        for (int f = 0; f < st.nfiles; f++) in_files += st.files[f].n;
        CHECK_MSG(weights_alloc_tables(&w, &c, c.num_nextn_predict_layers, &err) == 0, "%s", err.msg);
        Seen s = {&st, 0, calloc(in_files, sizeof *s.names), calloc(in_files, sizeof *s.slots), 0, ""};
        CHECK(s.names && s.slots);
        int rc = tensor_walk(&c, c.num_nextn_predict_layers, &w, see, &s);
        CHECK_MSG(rc == 0, "%s: %s", dir, s.bad);
        // every tensor of the files once: the table's, and the scales of its FP8 weights
        CHECK_MSG(s.n + s.scales == in_files, "%s: %d listed + %d scales, %d in the files", dir, s.n, s.scales, in_files);
        qsort(s.names, s.n, sizeof *s.names, cmp_name);
        qsort(s.slots, s.n, sizeof *s.slots, cmp_ptr);
        for (int k = 1; k < s.n; k++) {
            CHECK_MSG(strcmp(s.names[k - 1], s.names[k]) != 0, "%s: %s listed twice", dir, s.names[k]);
            CHECK_MSG(s.slots[k - 1] != s.slots[k], "%s: two tensors share a slot", dir);
        }
        free(s.names);
        free(s.slots);
        weights_free(&w, &c);
        st_model_close(&st);
    }
    globfree(&g);
    CHECK(checkpoints >= 6);
}

// The table's own fields on a small V3 layout: places, MTP copies, FP8 policy, active experts.
typedef struct Census {
    const ModelConfig *c;
    int tensors, experts_active, experts, copies, heads, fp8, linear;
    long long params;
} Census;

static int census(const TensorSpec *t, void *ctx) {
    Census *x = ctx;
    TensorCost k = tensor_cost(x->c, t);
    x->tensors++;
    x->params += k.params;
    if (t->expert >= 0) x->experts++, x->experts_active += k.active > 0;
    x->copies += t->mtp_copy;
    x->heads += t->head;
    x->fp8 += t->fp8;
    x->linear += t->kind == TENSOR_LINEAR;
    if (t->mtp >= 0 && t->layer != x->c->num_hidden_layers + t->mtp) return 1;
    if (t->kind == TENSOR_EMBED && t->mtp < 0 && t->layer != -1) return 1;
    if (t->kind == TENSOR_NORM && (k.matmul || !k.active)) return 1;
    if (t->kind == TENSOR_EMBED && !t->head && k.active) return 1;  // an embedding table: a lookup
    if (strstr(t->name, "eh_proj") && (t->fp8 || !k.matmul)) return 1;
    return 0;
}

TEST(test_tensor_table_fields) {
    Error err = {0};
    ModelConfig c;
    CHECK_MSG(config_load(&c, "tests/data/v3/config.json", &err) == 0, "%s", err.msg);
    // 3 layers (1 dense), 16 routed experts top-4, 1 shared, one MTP module
    CHECK(c.num_hidden_layers == 3 && c.n_routed_experts == 16 && c.num_experts_per_tok == 4 &&
          c.num_nextn_predict_layers == 1 && !c.tie_word_embeddings);
    Census x = {.c = &c};
    CHECK(tensor_walk(&c, 1, NULL, census, &x) == 0);
    // per layer: 2 norms + q_a, q_a_norm, q_b, kv_a, kv_a_norm, kv_b, o = 9; dense 3; MoE gate, bias,
    // 16 x 3 experts, 3 shared = 53; MTP: embed, enorm, hnorm, eh_proj, norm, head = 6; main 3
    CHECK_MSG(x.tensors == 3 + 3 * 9 + 3 + 2 * 53 + 6 + 9 + 53, "%d tensors", x.tensors);
    CHECK(x.experts == 3 * 16 * 3 && x.experts_active == 3 * 4 * 3);
    CHECK(x.copies == 2 && x.heads == 2);
    CHECK(x.linear == x.fp8 + 1);  // every linear weight but eh_proj
    ParamCounts p = tensor_count_params(&c);
    CHECK(x.params == p.total + p.mtp_total);
    // the whole list, in the same order, is what tensor_specs returns
    TensorSpec *specs;
    int n;
    CHECK(tensor_specs(&c, &specs, &n, &err) == 0);
    CHECK(n == x.tensors && strcmp(specs[0].name, "model.embed_tokens.weight") == 0 &&
          strcmp(specs[n - 1].name, "lm_head.weight") == 0 && !specs[0].mat && !specs[0].vec);
    free(specs);

    // tied: no lm_head; the embedding is the head, so it is active
    c.tie_word_embeddings = 1;
    ParamCounts t = tensor_count_params(&c);
    long long V = c.vocab_size, d = c.hidden_size;
    CHECK(t.total == p.total - V * d && t.active == p.active && t.mtp_total == p.mtp_total);
    x = (Census){.c = &c};
    CHECK(tensor_walk(&c, 0, NULL, census, &x) == 0);
    CHECK(x.heads == 1 && x.tensors == 3 + 3 * 9 + 3 + 2 * 53 - 1);
}

TEST(test_plan_config_of_presets) {
    // the MLA presets become configs whose table gives plan's figures; GQA ones have none
    for (int i = 0; i < plan_preset_count(); i++) {
        PlanArch a;
        PlanModel m;
        ModelConfig c;
        Error err = {0};
        CHECK(plan_arch_preset(&a, plan_preset_name(i), &err) == 0);
        plan_model(&a, 4096, &m);
        if (plan_model_config(&a, &c)) {
            CHECK(!a.mla);
            continue;
        }
        ParamCounts p = tensor_count_params(&c);
        CHECK_MSG(p.total == m.total_params && p.active == m.active_params &&
                      p.total + p.mtp_total == m.total_params_mtp,
                  "%s", a.name);
    }
}

// `dsv3 init` writes what the table lists, in the released dtypes: with tied embeddings and an MTP
// module, whose head copy is then a copy of the embedding (this once wrote no data at all).
TEST(test_init_writes_the_table) {
    Error err = {0};
    ModelConfig c;
    CHECK_MSG(config_load(&c, "tests/data/v3/config.json", &err) == 0, "%s", err.msg);
    c.tie_word_embeddings = 1;
    char dir[512];
    snprintf(dir, sizeof dir, "%s/init_tied_mtp", test_tmpdir());
    CHECK_MSG(model_write_random(&c, dir, 3, DT_F8_E4M3, (size_t)1 << 30, &err) == 0, "%s", err.msg);
    Model m;
    CHECK_MSG(model_load(&m, dir, 1, &err) == 0, "%s", err.msg);
    size_t emb = (size_t)c.vocab_size * c.hidden_size * 2;
    CHECK(m.w.lm_head.data == m.w.embed_tokens.data && m.w.n_mtp == 1);
    CHECK(memcmp(m.w.mtp[0].shared_head_head.data, m.w.embed_tokens.data, emb) == 0);
    CHECK(memcmp(m.w.mtp[0].embed_tokens.data, m.w.embed_tokens.data, emb) == 0);
    CHECK(m.w.mtp[0].eh_proj.dtype == DT_BF16 && m.w.mtp[0].layer.self_attn.o_proj.dtype == DT_F8_E4M3);
    CHECK(m.w.layers[1].moe.gate.dtype == DT_BF16 && m.w.layers[1].moe.experts[15].down_proj.dtype == DT_F8_E4M3);
    model_free(&m);
}
