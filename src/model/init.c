#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/file.h"
#include "base/rng.h"
#include "base/safetensors.h"
#include "kernels/convert.h"
#include "kernels/fp8_quant.h"
#include "model/init.h"
#include "model/tensors.h"

int model_write_random(const ModelConfig *cfg, const char *dir, uint64_t seed, DType dtype, size_t shard_bytes,
                       Error *err) {
    if (dtype != DT_F32 && dtype != DT_BF16 && dtype != DT_F8_E4M3)
        return err_set(err, "init: dtype %s is not f32, bf16 or fp8", dtype_name(dtype));
    ModelConfig c = *cfg;
    c.fp8 = dtype == DT_F8_E4M3;
    if (c.fp8) c.fp8_block[0] = c.fp8_block[1] = 128;
    snprintf(c.torch_dtype, sizeof c.torch_dtype, "%s", dtype == DT_F32 ? "float32" : "bfloat16");
    TensorSpec *specs;
    int n;
    if (tensor_specs(&c, &specs, &n, err)) return -1;
    // every tensor plus a scale tensor per FP8 weight
    StTensorDesc *desc = xcalloc(err, 2 * n, sizeof *desc, "tensor list");
    void **bufs = xcalloc(err, 2 * n, sizeof *bufs, "tensor buffers");
    char **names = xcalloc(err, n, sizeof *names, "tensor names");
    int nd = 0, rc = -1;
    float *w = NULL;
    if (!desc || !bufs || !names || make_dirs(dir, err)) goto done;
    Rng rng;
    rng_seed(&rng, seed);
    const void *embed = NULL, *head = NULL;
    for (int i = 0; i < n; i++) {
        const TensorSpec *t = &specs[i];
        long numel = (long)t->shape[0] * (t->ndim == 2 ? t->shape[1] : 1);
        // only the decoder layers' linear weights take dtype; the rest is BF16, the router bias F32
        DType dt = t->kind == TENSOR_BIAS || dtype == DT_F32 ? DT_F32 : t->fp8 ? dtype : DT_BF16;
        StTensorDesc *d = &desc[nd];
        d->name = t->name;
        d->dtype = dt;
        d->ndim = t->ndim;
        d->shape[0] = t->shape[0];
        d->shape[1] = t->shape[1];
        if (t->mtp_copy) {  // byte-identical copies, filled in below
            d->data = NULL;
            nd++;
            continue;
        }
        free(w);
        w = xmalloc(err, sizeof(float) * numel, t->name);
        if (!w) goto done;
        float std = c.initializer_range;
        for (long j = 0; j < numel; j++)
            w[j] = t->kind == TENSOR_NORM ? 1.0f : t->kind == TENSOR_BIAS ? 0.0f : std * rng_normal(&rng);
        void *buf = xmalloc(err, numel * dtype_size(dt), t->name);
        if (!buf) goto done;
        bufs[nd] = buf;
        d->data = buf;
        if (dt == DT_F32) memcpy(buf, w, sizeof(float) * numel);
        else if (dt == DT_BF16) bf16_from_f32_n(buf, w, numel);
        else {
            int rows = (int)t->shape[0], cols = (int)t->shape[1];
            int sr = (rows + 127) / 128, sc = (cols + 127) / 128;
            float *scale = xmalloc(err, sizeof(float) * sr * sc, t->name);
            names[i] = malloc(strlen(t->name) + 16);
            if (!scale || !names[i]) {
                free(scale);
                err_set(err, "out of memory");
                goto done;
            }
            if (fp8_quantize_blocks(buf, scale, w, rows, cols)) {
                free(scale);
                err_set(err, "tensor %s: out of memory quantising it", t->name);
                goto done;
            }
            sprintf(names[i], "%s_scale_inv", t->name);
            nd++;
            desc[nd] = (StTensorDesc){names[i], DT_F32, 2, {sr, sc}, scale};
            bufs[nd] = scale;
        }
        if (t->kind == TENSOR_EMBED && t->layer < 0) {  // model.embed_tokens (first; the head too when tied), lm_head
            if (!embed) embed = buf;
            if (t->head) head = buf;
        }
        nd++;
    }
    // the MTP modules' copies of the embedding and head, in the same order as their specs
    for (int i = 0, j = 0; i < n; i++)
        if (specs[i].mtp_copy) {
            while (desc[j].name != specs[i].name) j++;
            desc[j].data = specs[i].head ? head : embed;
        }
    {
        char path[4096];
        if (st_write_model(dir, desc, nd, shard_bytes, err) || path_join(path, sizeof path, dir, "config.json", err) ||
            config_save(&c, path, err))
            goto done;
    }
    rc = 0;
done:
    free(w);
    if (bufs)
        for (int i = 0; i < 2 * n; i++) free(bufs[i]);
    if (names)
        for (int i = 0; i < n; i++) free(names[i]);
    free(bufs);
    free(names);
    free(desc);
    free(specs);
    return rc;
}
