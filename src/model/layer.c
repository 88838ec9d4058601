// The decoder layer (MLA, then the dense FFN or the MoE) and the MTP module's input, forward and
// backward; MLA lives in mla.c, the MoE seam in moe.c. Every product runs on the pass's backend.
#include <string.h>

#include "model/layer.h"

void ffn_views(const FfnWeights *f, const MatView **v) {
    v[0] = &f->gate_proj, v[1] = &f->up_proj, v[2] = &f->down_proj;
}

int ffn_forward(Backend *be, const LinearRecipe *recipe, const FfnWeights *f, const float *x, float *gate, float *up,
                float *h, float *out, int n) {
    long F = f->gate_proj.rows;
    TRY(be->ops->matmul(be, gate, x, &f->gate_proj, n, recipe));
    TRY(be->ops->matmul(be, up, x, &f->up_proj, n, recipe));
    TRY(be->ops->swiglu(be, h, gate, up, (long)n * F));
    return be->ops->matmul(be, out, h, &f->down_proj, n, recipe);
}

int ffn_backward(Backend *be, const LinearRecipe *recipe, const FfnWeights *f, FfnWeights *gf, const float *dout, const float *x,
                 const float *gate, const float *up, const float *h, float *dx, float *dgate, float *dup, float *dh,
                 int n) {
    // one expert of n rows: the experts' backward, its products on all the threads
    const MatView *w[3], *dw[3];
    ffn_views(f, w);
    ffn_views(gf, dw);
    int off[2] = {0, n};
    return be->ops->experts_backward(be, dx, dw, dout, x, gate, up, h, dgate, dup, dh, w, 1, off, recipe);
}

int layer_forward(const LayerPass *p, const LayerWeights *w, LayerActs *a, long long *load, double *balance) {
    const ModelConfig *c = p->c;
    Backend *be = p->be;
    int N = p->B * p->T, d = c->hidden_size;
    *balance = 0;
    TRY(mla_forward(p, &w->self_attn, w->input_layernorm, a));
    TRY(be->ops->rmsnorm(be, a->ln2, d, a->ln2_rstd, a->x_mid, d, w->post_attention_layernorm, N, d,
                         c->rms_norm_eps));
    if (w->is_moe) TRY(moe_forward(p, &w->moe, a, a->y, load, balance));
    else TRY(ffn_forward(be, p->recipe, &w->mlp, a->ln2, a->ffn_gate, a->ffn_up, a->ffn_h, a->y, N));
    return be->ops->add(be, a->x_out, a->x_mid, a->y, (long)N * d);
}

int layer_backward(const LayerPass *p, const LayerWeights *w, LayerWeights *g, LayerActs *a, LayerGradScratch *s,
                   float *dres, float balance_dloss) {
    const ModelConfig *c = p->c;
    Backend *be = p->be;
    int N = p->B * p->T, d = c->hidden_size;
    TRY(be->ops->zero(be, s->dln, (long)N * d));
    if (w->is_moe) TRY(moe_backward(p, &w->moe, &g->moe, a, s, dres, balance_dloss));
    else
        TRY(ffn_backward(be, p->recipe, &w->mlp, &g->mlp, dres, a->ln2, a->ffn_gate, a->ffn_up, a->ffn_h, s->dln, s->dffn_gate,
                         s->dffn_up, s->dffn_h, N));
    TRY(be->ops->rmsnorm_backward(be, dres, g->post_attention_layernorm, s->dln, a->x_mid,
                                  w->post_attention_layernorm, a->ln2_rstd, N, d));
    return mla_backward(p, &w->self_attn, &g->self_attn, w->input_layernorm, g->input_layernorm, a, s, dres);
}

int mtp_input_forward(Backend *be, const LinearRecipe *recipe, const ModelConfig *c, const MtpWeights *w, const float *emb, const float *h,
                      float *cat, float *en_rstd, float *hn_rstd, float *x, int N) {
    int d = c->hidden_size;
    TRY(be->ops->rmsnorm(be, cat, 2 * d, en_rstd, emb, d, w->enorm, N, d, c->rms_norm_eps));
    TRY(be->ops->rmsnorm(be, cat + d, 2 * d, hn_rstd, h, d, w->hnorm, N, d, c->rms_norm_eps));
    return be->ops->matmul(be, x, cat, &w->eh_proj, N, recipe);
}

int mtp_input_backward(Backend *be, const LinearRecipe *recipe, const ModelConfig *c, const MtpWeights *w, MtpWeights *g, const float *emb,
                       const float *h, const float *cat, const float *en_rstd, const float *hn_rstd, const float *dx,
                       float *dcat, float *den, float *dhn, float *demb, float *dh, int N) {
    int d = c->hidden_size;
    TRY(be->ops->zero(be, dcat, (long)N * 2 * d));
    TRY(be->ops->matmul_backward(be, dcat, &g->eh_proj, dx, cat, &w->eh_proj, N, recipe));
    for (int n = 0; n < N; n++) {
        memcpy(den + (size_t)n * d, dcat + (size_t)n * 2 * d, sizeof(float) * d);
        memcpy(dhn + (size_t)n * d, dcat + (size_t)n * 2 * d + d, sizeof(float) * d);
    }
    TRY(be->ops->rmsnorm_backward(be, demb, g->enorm, den, emb, w->enorm, en_rstd, N, d));
    return be->ops->rmsnorm_backward(be, dh, g->hnorm, dhn, h, w->hnorm, hn_rstd, N, d);
}
