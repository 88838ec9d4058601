#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "base/file.h"
#include "kernels/backend.h"
#include "kernels/ops.h"
#include "model/model.h"

int model_load(Model *m, const char *dir, int need_mtp, Error *err) {
    memset(m, 0, sizeof *m);
    if (!path_is_dir(dir)) return err_set(err, "%s: model directory does not exist", dir);
    char path[4096];
    if (path_join(path, sizeof path, dir, "config.json", err) || config_load(&m->cfg, path, err)) return -1;
    if (st_model_open(&m->files, dir, err)) return -1;
    if (weights_bind(&m->w, &m->cfg, &m->files, need_mtp, err)) {
        st_model_close(&m->files);
        return -1;
    }
    m->be = backend_cpu();
    const ModelConfig *c = &m->cfg;
    int r = c->qk_rope_head_dim;
    m->inv_freq = xcalloc(err, r / 2 + 1, sizeof(double), "RoPE frequencies");
    if (!m->inv_freq) {
        model_free(m);
        return -1;
    }
    rope_inv_freq(m->inv_freq, r, c->rope_theta, c->rope_yarn, c->rope_factor, c->rope_original_max_position,
                  c->rope_beta_fast, c->rope_beta_slow);
    m->rope_mscale = (float)(config_yarn_mscale(c, c->rope_mscale) / config_yarn_mscale(c, c->rope_mscale_all_dim));
    m->softmax_scale = config_softmax_scale(c);
    return 0;
}

void model_free(Model *m) {
    weights_free(&m->w, &m->cfg);
    st_model_close(&m->files);
    free(m->inv_freq);
    memset(m, 0, sizeof *m);
}

int kvcache_init(KVCache *kv, const ModelConfig *c, int n_mtp, int capacity, Error *err) {
    return kvcache_init_as(kv, c, n_mtp, capacity, DT_F32, err);
}

int kvcache_init_as(KVCache *kv, const ModelConfig *c, int n_mtp, int capacity, DType dtype, Error *err) {
    memset(kv, 0, sizeof *kv);
    if (dtype != DT_F32 && dtype != DT_BF16) return err_set(err, "KV cache: element type %s is not F32 or BF16", dtype_name(dtype));
    kv->n_layers = c->num_hidden_layers + n_mtp;
    kv->n_mtp = n_mtp;
    kv->capacity = capacity;
    kv->dtype = dtype;
    size_t es = dtype_size(dtype);
    kv->latent = xmalloc(err, es * kv->n_layers * capacity * c->kv_lora_rank, "KV cache latents");
    kv->k_pe = xmalloc(err, es * kv->n_layers * capacity * (c->qk_rope_head_dim ? c->qk_rope_head_dim : 1),
                       "KV cache rotary keys");
    kv->mtp_len = xcalloc(err, n_mtp, sizeof(int), "KV cache MTP lengths");
    if (!kv->latent || !kv->k_pe || !kv->mtp_len) {
        kvcache_free(kv);
        return -1;
    }
    return 0;
}

void kvcache_free(KVCache *kv) {
    free(kv->latent);
    free(kv->k_pe);
    free(kv->mtp_len);
    memset(kv, 0, sizeof *kv);
}

void *kvcache_latent(const KVCache *kv, const ModelConfig *c, int l) {
    return (char *)kv->latent + (size_t)l * kv->capacity * c->kv_lora_rank * dtype_size(kv->dtype);
}

void *kvcache_kpe(const KVCache *kv, const ModelConfig *c, int l) {
    return (char *)kv->k_pe + (size_t)l * kv->capacity * c->qk_rope_head_dim * dtype_size(kv->dtype);
}

size_t kvcache_bytes_per_token(const ModelConfig *c, DType dtype) {
    return (size_t)(c->kv_lora_rank + c->qk_rope_head_dim) * c->num_hidden_layers * dtype_size(dtype);
}
