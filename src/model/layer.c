// The decoder layer (MLA, then the dense FFN or the MoE) and the MTP module's input, forward and
// backward; MLA lives in mla.c, the MoE seam in moe.c.
#include <string.h>

#include "kernels/matmul.h"
#include "kernels/ops.h"
#include "model/layer.h"

void ffn_forward(const FfnWeights *f, const float *x, float *gate, float *up, float *h, float *out, int n) {
    long F = f->gate_proj.rows;
    matmul_nt(gate, x, &f->gate_proj, n);
    matmul_nt(up, x, &f->up_proj, n);
    swiglu_rows_forward(h, gate, up, (long)n * F);
    matmul_nt(out, h, &f->down_proj, n);
}

void ffn_backward(const FfnWeights *f, FfnWeights *gf, const float *dout, const float *x, const float *gate,
                  const float *up, const float *h, float *dx, float *dgate, float *dup, float *dh, int n) {
    long F = f->gate_proj.rows;
    memset(dh, 0, sizeof(float) * n * F);
    matmul_backward(dh, &gf->down_proj, dout, h, &f->down_proj, n);
    swiglu_rows_backward(dgate, dup, dh, gate, up, (long)n * F);
    matmul_backward(dx, &gf->gate_proj, dgate, x, &f->gate_proj, n);
    matmul_backward(dx, &gf->up_proj, dup, x, &f->up_proj, n);
}

double layer_forward(const LayerPass *p, const LayerWeights *w, LayerActs *a, long long *load) {
    const ModelConfig *c = p->c;
    int N = p->B * p->T, d = c->hidden_size;
    mla_forward(p, &w->self_attn, w->input_layernorm, a);
    rmsnorm_rows_forward(a->ln2, a->ln2_rstd, a->x_mid, w->post_attention_layernorm, N, d, c->rms_norm_eps);
    double bal = 0;
    if (w->is_moe) bal = moe_forward(p, &w->moe, a, a->y, load);
    else ffn_forward(&w->mlp, a->ln2, a->ffn_gate, a->ffn_up, a->ffn_h, a->y, N);
#pragma omp parallel for schedule(static) if (N > 1)
    for (long i = 0; i < (long)N * d; i++) a->x_out[i] = a->x_mid[i] + a->y[i];
    return bal;
}

void layer_backward(const LayerPass *p, const LayerWeights *w, LayerWeights *g, LayerActs *a, LayerGradScratch *s,
                    float *dres, float balance_dloss) {
    const ModelConfig *c = p->c;
    int N = p->B * p->T, d = c->hidden_size;
    memset(s->dln, 0, sizeof(float) * N * d);
    if (w->is_moe) moe_backward(p, &w->moe, &g->moe, a, s, dres, balance_dloss);
    else
        ffn_backward(&w->mlp, &g->mlp, dres, a->ln2, a->ffn_gate, a->ffn_up, a->ffn_h, s->dln, s->dffn_gate,
                     s->dffn_up, s->dffn_h, N);
    rmsnorm_rows_backward(dres, g->post_attention_layernorm, s->dln, a->x_mid, w->post_attention_layernorm,
                          a->ln2_rstd, N, d);
    mla_backward(p, &w->self_attn, &g->self_attn, w->input_layernorm, g->input_layernorm, a, s, dres);
}

void mtp_input_forward(const ModelConfig *c, const MtpWeights *w, const float *emb, const float *h, float *cat,
                       float *en_rstd, float *hn_rstd, float *x, int N) {
    int d = c->hidden_size;
#pragma omp parallel for schedule(static) if (N > 1)
    for (int n = 0; n < N; n++) {
        float *row = cat + (size_t)n * 2 * d;
        rmsnorm_forward(row, en_rstd ? en_rstd + n : NULL, emb + (size_t)n * d, w->enorm, 1, d, c->rms_norm_eps);
        rmsnorm_forward(row + d, hn_rstd ? hn_rstd + n : NULL, h + (size_t)n * d, w->hnorm, 1, d, c->rms_norm_eps);
    }
    matmul_nt(x, cat, &w->eh_proj, N);
}

void mtp_input_backward(const ModelConfig *c, const MtpWeights *w, MtpWeights *g, const float *emb, const float *h,
                        const float *cat, const float *en_rstd, const float *hn_rstd, const float *dx, float *dcat,
                        float *den, float *dhn, float *demb, float *dh, int N) {
    int d = c->hidden_size;
    memset(dcat, 0, sizeof(float) * N * 2 * d);
    matmul_backward(dcat, &g->eh_proj, dx, cat, &w->eh_proj, N);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        memcpy(den + (size_t)n * d, dcat + (size_t)n * 2 * d, sizeof(float) * d);
        memcpy(dhn + (size_t)n * d, dcat + (size_t)n * 2 * d + d, sizeof(float) * d);
    }
    rmsnorm_rows_backward(demb, g->enorm, den, emb, w->enorm, en_rstd, N, d);
    rmsnorm_rows_backward(dh, g->hnorm, dhn, h, w->hnorm, hn_rstd, N, d);
}
