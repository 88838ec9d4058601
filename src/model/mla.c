// Multi-head Latent Attention (SPEC §2.1), forward and backward, for every pass: prefill and
// training attend plainly (per-head keys and values expanded through kv_b_proj), decode and
// speculative verification absorbed (W_UK folded into the query, W_UV after the weighted sum);
// the attention itself is the backend's latent_attention (kernels/attention.h).
#include <string.h>

#include "model/layer.h"

const MatView *mla_w_uk_t(const MlaWeights *w) { return matmul_on_panels(&w->w_uk_t) ? &w->w_uk_t : NULL; }

LatentAttention mla_attention_call(const LayerPass *p, const MlaWeights *w, const float *q, float *out,
                                   float *kv_save, float *probs_save) {
    const ModelConfig *c = p->c;
    return (LatentAttention){.dtype = p->store,.B = p->B, .T = p->T, .pos0 = p->pos0, .H = c->num_attention_heads,
                             .nope = c->qk_nope_head_dim, .rope = c->qk_rope_head_dim, .v = c->v_head_dim,
                             .kv_lora = c->kv_lora_rank, .scale = p->softmax_scale,
                             .absorbed = p->mode == ATTN_ABSORBED, .q = q, .latent = p->latent, .kpe = p->kpe,
                             .ld = p->ld, .blocks = p->blocks, .block_size = p->block_size, .kv_b_proj = &w->kv_b_proj,
                             .w_uk_t = p->mode == ATTN_ABSORBED ? mla_w_uk_t(w) : NULL, .out = out, .kv_save = kv_save,
                             .probs_save = probs_save, .scratch = p->scratch, .per_thread = p->per_thread};
}

size_t attn_scratch_floats(const ModelConfig *c, int S) {
    LatentAttention shape = {.nope = c->qk_nope_head_dim, .rope = c->qk_rope_head_dim, .v = c->v_head_dim,
                             .kv_lora = c->kv_lora_rank};
    return latent_attention_scratch_floats(&shape, S);
}

int mla_forward(const LayerPass *p, const MlaWeights *w, const float *input_layernorm, LayerActs *a) {
    const ModelConfig *c = p->c;
    Backend *be = p->be;
    int B = p->B, T = p->T, N = B * T, d = c->hidden_size, H = c->num_attention_heads, nope = c->qk_nope_head_dim;
    int r = c->qk_rope_head_dim, L = c->kv_lora_rank, qr = c->q_lora_rank, qk = nope + r;
    float eps = c->rms_norm_eps;
    TRY(be->ops->rmsnorm(be, a->ln1, d, a->ln1_rstd, a->x_in, d, input_layernorm, N, d, eps));
    if (qr > 0) {
        TRY(be->ops->matmul(be, a->qa, a->ln1, &w->q_a_proj, N, p->recipe));
        TRY(be->ops->rmsnorm(be, a->cq, qr, a->cq_rstd, a->qa, qr, w->q_a_layernorm, N, qr, eps));
        TRY(be->ops->matmul(be, a->q, a->cq, &w->q_b_proj, N, p->recipe));
    } else {
        TRY(be->ops->matmul(be, a->q, a->ln1, &w->q_proj, N, p->recipe));
    }
    TRY(be->ops->matmul(be, a->kva, a->ln1, &w->kv_a_proj_with_mqa, N, p->recipe));
    if (a->ckv_pre)
        for (int n = 0; n < N; n++) memcpy(a->ckv_pre + (size_t)n * L, a->kva + (size_t)n * (L + r), sizeof(float) * L);
    // the new positions go into the store: normalised latents, rotated shared keys — normalised and
    // rotated in place in kva (not read again; all B sequences' rows in one call each: sequence b's
    // row t is row b·T + t, at table row t), then copied or rounded into the store row by row
    TRY(be->ops->rmsnorm(be, a->kva, L + r, a->ckv_rstd, a->kva, L + r, w->kv_a_layernorm, N, L, eps));
    TRY(be->ops->rope(be, a->kva + L, N, T, 1, L + r, r, p->rope_cos, p->rope_sin));
    for (int b = 0; b < B; b++) {
        float *kva = a->kva + (size_t)b * T * (L + r);
        for (int t = 0; t < T; t++) {
            size_t row = latent_store_row(p->blocks, p->block_size, p->ld, b, p->pos0 + t);
            const float *src = kva + (size_t)t * (L + r);
            if (p->store == DT_F32) {
                memcpy((float *)p->latent + row * L, src, sizeof(float) * L);
                memcpy((float *)p->kpe + row * r, src + L, sizeof(float) * r);
            } else {
                TRY(be->ops->to_bf16(be, (uint16_t *)p->latent + row * L, src, L));
                TRY(be->ops->to_bf16(be, (uint16_t *)p->kpe + row * r, src + L, r));
            }
        }
    }
    TRY(be->ops->rope(be, a->q + nope, N, T, H, qk, r, p->rope_cos, p->rope_sin));
    LatentAttention at = mla_attention_call(p, w, a->q, a->ao, p->save ? a->kv : NULL,
                                            p->save ? a->att : NULL);
    if (p->save && p->recipe) {
        // kv_b_proj is a linear layer of the recipe: expanded here, in one product over the window's
        // latents (its store, contiguous in training), rather than per head inside the attention
        TRY(be->ops->matmul(be, a->kv, (const float *)p->latent, &w->kv_b_proj, N, p->recipe));
        at.kv_in = a->kv;
        at.kv_save = NULL;
    }
    TRY(be->ops->latent_attention(be, &at));
    TRY(be->ops->matmul(be, a->y, a->ao, &w->o_proj, N, p->recipe));
    return be->ops->add(be, a->x_mid, a->x_in, a->y, (long)N * d);
}

int mla_backward(const LayerPass *p, const MlaWeights *w, MlaWeights *g, const float *input_layernorm,
                 float *dinput_layernorm, LayerActs *a, LayerGradScratch *s, float *dres) {
    const ModelConfig *c = p->c;
    Backend *be = p->be;
    int N = p->B * p->T, T = p->T, d = c->hidden_size, H = c->num_attention_heads, nope = c->qk_nope_head_dim;
    int r = c->qk_rope_head_dim, v = c->v_head_dim, L = c->kv_lora_rank, qr = c->q_lora_rank, qk = nope + r;
    const float *ckv = p->latent;  // (N, L): a training window's latents are its store (always F32)
    TRY(be->ops->zero(be, s->dao, (long)N * H * v));
    TRY(be->ops->matmul_backward(be, s->dao, &g->o_proj, dres, a->ao, &w->o_proj, N, p->recipe));
    TRY(be->ops->zero(be, s->dq, (long)N * H * qk));
    TRY(be->ops->zero(be, s->dkv, (long)N * H * (nope + v)));
    TRY(be->ops->zero(be, s->dkpe, (long)N * r));
    LatentAttention at = mla_attention_call(p, w, a->q, a->ao, a->kv, a->att);
    TRY(be->ops->latent_attention_backward(be, &at, s->dao, s->dq, s->dkv, s->dkpe, s->dkpe_heads));
    TRY(be->ops->rope_backward(be, s->dq + nope, N, T, H, qk, r, p->rope_cos, p->rope_sin));
    TRY(be->ops->rope_backward(be, s->dkpe, N, T, 1, r, r, p->rope_cos, p->rope_sin));
    TRY(be->ops->zero(be, s->dckv, (long)N * L));
    TRY(be->ops->matmul_backward(be, s->dckv, &g->kv_b_proj, s->dkv, ckv, &w->kv_b_proj, N, p->recipe));
    TRY(be->ops->zero(be, s->dckv_pre, (long)N * L));
    TRY(be->ops->rmsnorm_backward(be, s->dckv_pre, g->kv_a_layernorm, s->dckv, a->ckv_pre, w->kv_a_layernorm,
                                  a->ckv_rstd, N, L));
    for (int n = 0; n < N; n++) {
        memcpy(s->dkva + (size_t)n * (L + r), s->dckv_pre + (size_t)n * L, sizeof(float) * L);
        memcpy(s->dkva + (size_t)n * (L + r) + L, s->dkpe + (size_t)n * r, sizeof(float) * r);
    }
    TRY(be->ops->zero(be, s->dln, (long)N * d));
    TRY(be->ops->matmul_backward(be, s->dln, &g->kv_a_proj_with_mqa, s->dkva, a->ln1, &w->kv_a_proj_with_mqa, N, p->recipe));
    if (qr > 0) {
        TRY(be->ops->zero(be, s->dcq, (long)N * qr));
        TRY(be->ops->matmul_backward(be, s->dcq, &g->q_b_proj, s->dq, a->cq, &w->q_b_proj, N, p->recipe));
        TRY(be->ops->zero(be, s->dqa, (long)N * qr));
        TRY(be->ops->rmsnorm_backward(be, s->dqa, g->q_a_layernorm, s->dcq, a->qa, w->q_a_layernorm, a->cq_rstd, N,
                                      qr));
        TRY(be->ops->matmul_backward(be, s->dln, &g->q_a_proj, s->dqa, a->ln1, &w->q_a_proj, N, p->recipe));
    } else {
        TRY(be->ops->matmul_backward(be, s->dln, &g->q_proj, s->dq, a->ln1, &w->q_proj, N, p->recipe));
    }
    return be->ops->rmsnorm_backward(be, dres, dinput_layernorm, s->dln, a->x_in, input_layernorm, a->ln1_rstd, N, d);
}
