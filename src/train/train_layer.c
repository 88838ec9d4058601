#include <string.h>

#include "kernels/ops.h"
#include "model/moe.h"
#include "train/train_layer.h"
#include "train/train_ops.h"

static void zero(float *p, size_t n) { memset(p, 0, sizeof(float) * n); }

static void mla_forward(TrainModel *m, const TrainLayer *w, TrainLayerActs *a) {
    const ModelConfig *c = &m->cfg;
    const TrainMla *at = &w->self_attn;
    int N = a->N, d = c->hidden_size, H = c->num_attention_heads, nope = c->qk_nope_head_dim;
    int r = c->qk_rope_head_dim, v = c->v_head_dim, L = c->kv_lora_rank, qr = c->q_lora_rank, qk = nope + r;
    float eps = c->rms_norm_eps;
    rmsnorm_rows_forward(a->ln1, a->ln1_rstd, a->x_in, w->input_layernorm, N, d, eps);
    if (qr > 0) {
        linear_forward(a->qa, a->ln1, at->q_a_proj, N, d, qr);
        rmsnorm_rows_forward(a->cq, a->cq_rstd, a->qa, at->q_a_layernorm, N, qr, eps);
        linear_forward(a->q, a->cq, at->q_b_proj, N, qr, H * qk);
    } else {
        linear_forward(a->q, a->ln1, at->q_proj, N, d, H * qk);
    }
    float *kva = m->a.tmp;  // (N, L + r): [c_kv | k_pe] before the norm and the rotation
    linear_forward(kva, a->ln1, at->kv_a_proj_with_mqa, N, d, L + r);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        memcpy(a->ckv_pre + (size_t)n * L, kva + (size_t)n * (L + r), sizeof(float) * L);
        memcpy(a->kpe + (size_t)n * r, kva + (size_t)n * (L + r) + L, sizeof(float) * r);
    }
    rmsnorm_rows_forward(a->ckv, a->ckv_rstd, a->ckv_pre, at->kv_a_layernorm, N, L, eps);
    rope_rows_forward(a->kpe, N, a->T, 1, r, r, m->rope_cos, m->rope_sin);
    rope_rows_forward(a->q + nope, N, a->T, H, qk, r, m->rope_cos, m->rope_sin);
    linear_forward(a->kv, a->ckv, at->kv_b_proj, N, L, H * (nope + v));
    mla_attention_forward(a->ao, a->att, a->q, a->kv, a->kpe, a->B, a->T, H, nope, r, v, m->softmax_scale);
    linear_forward(a->x_mid, a->ao, at->o_proj, N, H * v, d);
#pragma omp parallel for schedule(static)
    for (long i = 0; i < (long)N * d; i++) a->x_mid[i] += a->x_in[i];
}

static void mla_backward(TrainModel *m, const TrainLayer *w, TrainLayer *g, TrainLayerActs *a, float *dres) {
    const ModelConfig *c = &m->cfg;
    TrainActs *s = &m->a;
    const TrainMla *at = &w->self_attn;
    TrainMla *gt = &g->self_attn;
    int N = a->N, d = c->hidden_size, H = c->num_attention_heads, nope = c->qk_nope_head_dim;
    int r = c->qk_rope_head_dim, v = c->v_head_dim, L = c->kv_lora_rank, qr = c->q_lora_rank, qk = nope + r;
    zero(s->dao, (size_t)N * H * v);
    linear_backward(s->dao, gt->o_proj, dres, a->ao, at->o_proj, N, H * v, d);
    zero(s->dq, (size_t)N * H * qk);
    zero(s->dkv, (size_t)N * H * (nope + v));
    zero(s->dkpe, (size_t)N * r);
    mla_attention_backward(s->dq, s->dkv, s->dkpe, s->dkpe_heads, s->datt, s->dao, a->att, a->q, a->kv, a->kpe, a->B, a->T, H, nope,
                           r, v, m->softmax_scale);
    rope_rows_backward(s->dq + nope, N, a->T, H, qk, r, m->rope_cos, m->rope_sin);
    rope_rows_backward(s->dkpe, N, a->T, 1, r, r, m->rope_cos, m->rope_sin);
    zero(s->dckv, (size_t)N * L);
    linear_backward(s->dckv, gt->kv_b_proj, s->dkv, a->ckv, at->kv_b_proj, N, L, H * (nope + v));
    zero(s->dckv_pre, (size_t)N * L);
    rmsnorm_rows_backward(s->dckv_pre, gt->kv_a_layernorm, s->dckv, a->ckv_pre, at->kv_a_layernorm, a->ckv_rstd, N, L);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        memcpy(s->dkva + (size_t)n * (L + r), s->dckv_pre + (size_t)n * L, sizeof(float) * L);
        memcpy(s->dkva + (size_t)n * (L + r) + L, s->dkpe + (size_t)n * r, sizeof(float) * r);
    }
    zero(s->dln, (size_t)N * d);
    linear_backward(s->dln, gt->kv_a_proj_with_mqa, s->dkva, a->ln1, at->kv_a_proj_with_mqa, N, d, L + r);
    if (qr > 0) {
        zero(s->dcq, (size_t)N * qr);
        linear_backward(s->dcq, gt->q_b_proj, s->dq, a->cq, at->q_b_proj, N, qr, H * qk);
        zero(s->dqa, (size_t)N * qr);
        rmsnorm_rows_backward(s->dqa, gt->q_a_layernorm, s->dcq, a->qa, at->q_a_layernorm, a->cq_rstd, N, qr);
        linear_backward(s->dln, gt->q_a_proj, s->dqa, a->ln1, at->q_a_proj, N, d, qr);
    } else {
        linear_backward(s->dln, gt->q_proj, s->dq, a->ln1, at->q_proj, N, d, H * qk);
    }
    rmsnorm_rows_backward(dres, g->input_layernorm, s->dln, a->x_in, w->input_layernorm, a->ln1_rstd, N, d);
}

// out (n, d) = SwiGLU FFN of inp (n, d) of width F; gate, up, h: (n, F) saved.
static void ffn_forward(const TrainFfn *f, const float *inp, float *gate, float *up, float *h, float *out, int n,
                        int d, int F) {
    linear_forward(gate, inp, f->gate_proj, n, d, F);
    linear_forward(up, inp, f->up_proj, n, d, F);
    swiglu_rows_forward(h, gate, up, (long)n * F);
    linear_forward(out, h, f->down_proj, n, F, d);
}

// dinp (n, d) += ..., gf += ... from dout (n, d); dgate, dup, dh: (n, F) scratch.
static void ffn_backward(const TrainFfn *f, TrainFfn *gf, const float *dout, const float *inp, const float *gate,
                         const float *up, const float *h, float *dinp, float *dgate, float *dup, float *dh, int n,
                         int d, int F) {
    zero(dh, (size_t)n * F);
    linear_backward(dh, gf->down_proj, dout, h, f->down_proj, n, F, d);
    swiglu_rows_backward(dgate, dup, dh, gate, up, (long)n * F);
    linear_backward(dinp, gf->gate_proj, dgate, inp, f->gate_proj, n, d, F);
    linear_backward(dinp, gf->up_proj, dup, inp, f->up_proj, n, d, F);
}

// y (N, d) = shared experts + Σ_k g_k E_k, every token reaching its K_r experts (none dropped).
static double moe_forward(TrainModel *m, const TrainMoe *w, TrainLayerActs *a, float *y, long long *load) {
    const ModelConfig *c = &m->cfg;
    int N = a->N, d = c->hidden_size, Nr = c->n_routed_experts, K = c->num_experts_per_tok;
    int Fm = c->moe_intermediate_size, Fs = c->n_shared_experts * Fm;
    linear_forward(a->router, a->ln2, w->gate, N, d, Nr);
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        const float *lg = a->router + (size_t)t * Nr;
        float *s = a->scores + (size_t)t * Nr, *wt = a->topk_w + (size_t)t * K;
        const int *idx = a->topk_idx + (size_t)t * K;
        if (!m->freeze_routing) {
            moe_route(c, lg, w->e_score_correction_bias, s, a->topk_idx + (size_t)t * K, wt);
            continue;
        }
        // the held choice idx, with scores and gates computed as moe_route computes them
        if (c->scoring_func == SCORING_SIGMOID) {
            for (int i = 0; i < Nr; i++) s[i] = sigmoidf_(lg[i]);
        } else {
            memcpy(s, lg, sizeof(float) * Nr);
            softmax_inplace(s, Nr);
        }
        float sum = 0;
        for (int k = 0; k < K; k++) sum += s[idx[k]];
        float norm = c->norm_topk_prob ? 1.0f / (sum + 1e-20f) : 1.0f;
        for (int k = 0; k < K; k++) wt[k] = s[idx[k]] * norm * c->routed_scaling_factor;
    }
    // slots sorted by expert, tokens in order within an expert: each expert is one GEMM
    int *off = a->expert_off;
    memset(off, 0, sizeof(int) * (Nr + 1));
    for (long i = 0; i < (long)N * K; i++) off[a->topk_idx[i] + 1]++;
    for (int e = 0; e < Nr; e++) {
        load[e] = off[e + 1];
        off[e + 1] += off[e];
    }
    int cursor[Nr];
    memcpy(cursor, off, sizeof(int) * Nr);
    for (long i = 0; i < (long)N * K; i++) {
        int slot = cursor[a->topk_idx[i]]++;
        a->slot_of[i] = slot;
        a->slot_tk[slot] = (int)i;
    }
    float *xg = m->a.xg;  // (N·K, d)
#pragma omp parallel for schedule(static)
    for (long sl = 0; sl < (long)N * K; sl++)
        memcpy(xg + sl * d, a->ln2 + (size_t)(a->slot_tk[sl] / K) * d, sizeof(float) * d);
    for (int e = 0; e < Nr; e++) {
        int n = off[e + 1] - off[e];
        if (n == 0) continue;
        size_t o = off[e];
        ffn_forward(&w->experts[e], xg + o * d, a->e_gate + o * Fm, a->e_up + o * Fm, a->e_h + o * Fm,
                    a->e_out + o * d, n, d, Fm);
    }
    if (Fs > 0) ffn_forward(&w->shared_experts, a->ln2, a->ffn_gate, a->ffn_up, a->ffn_h, y, N, d, Fs);
    else zero(y, (size_t)N * d);
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++)
        for (int k = 0; k < K; k++) {
            float gk = a->topk_w[(size_t)t * K + k];
            const float *eo = a->e_out + (size_t)a->slot_of[(size_t)t * K + k] * d;
            float *yt = y + (size_t)t * d;
            for (int j = 0; j < d; j++) yt[j] += gk * eo[j];
        }
    if (m->obj.seq_aux_alpha <= 0) return 0;
    double bal = 0;
    for (int b = 0; b < a->B; b++)
        bal += moe_balance_forward(a->bal_f + (size_t)b * Nr, a->scores + (size_t)b * a->T * Nr,
                                   a->topk_idx + (size_t)b * a->T * K, a->T, Nr, K, m->obj.seq_aux_alpha);
    return bal / a->B;
}

// dln2 (N, d) += the MoE's input gradient from dy (N, d); balance_dloss weighs each sequence's
// balance loss.
static void moe_backward(TrainModel *m, const TrainMoe *w, TrainMoe *g, TrainLayerActs *a, const float *dy,
                         float balance_dloss) {
    const ModelConfig *c = &m->cfg;
    TrainActs *s = &m->a;
    int N = a->N, d = c->hidden_size, Nr = c->n_routed_experts, K = c->num_experts_per_tok;
    int Fm = c->moe_intermediate_size, Fs = c->n_shared_experts * Fm;
    // y_t = Σ_k g_tk E_k(x_t): ∂g_tk = dy_t · E_k(x_t), ∂E_k(x_t) = g_tk dy_t
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++)
        for (int k = 0; k < K; k++) {
            size_t sl = a->slot_of[(size_t)t * K + k];
            const float *eo = a->e_out + sl * d, *dyt = dy + (size_t)t * d;
            float *deo = s->de_out + sl * d, gk = a->topk_w[(size_t)t * K + k], dot = 0;
            for (int j = 0; j < d; j++) {
                dot += dyt[j] * eo[j];
                deo[j] = gk * dyt[j];
            }
            s->dtopk_w[(size_t)t * K + k] = dot;
        }
    float *xg = s->xg;
#pragma omp parallel for schedule(static)
    for (long sl = 0; sl < (long)N * K; sl++)
        memcpy(xg + sl * d, a->ln2 + (size_t)(a->slot_tk[sl] / K) * d, sizeof(float) * d);
    zero(s->dxg, (size_t)N * K * d);
    for (int e = 0; e < Nr; e++) {
        int n = a->expert_off[e + 1] - a->expert_off[e];
        if (n == 0) continue;
        size_t o = a->expert_off[e];
        ffn_backward(&w->experts[e], &g->experts[e], s->de_out + o * d, xg + o * d, a->e_gate + o * Fm,
                     a->e_up + o * Fm, a->e_h + o * Fm, s->dxg + o * d, s->de_gate + o * Fm, s->de_up + o * Fm,
                     s->de_h + o * Fm, n, d, Fm);
    }
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++)
        for (int k = 0; k < K; k++) {
            const float *src = s->dxg + (size_t)a->slot_of[(size_t)t * K + k] * d;
            float *dst = s->dln + (size_t)t * d;
            for (int j = 0; j < d; j++) dst[j] += src[j];
        }
    if (Fs > 0)
        ffn_backward(&w->shared_experts, &g->shared_experts, dy, a->ln2, a->ffn_gate, a->ffn_up, a->ffn_h, s->dln,
                     s->dffn_gate, s->dffn_up, s->dffn_h, N, d, Fs);
    // the router: gates and the balance loss are functions of the scores
    zero(s->dscores, (size_t)N * Nr);
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++)
        moe_gate_backward(s->dscores + (size_t)t * Nr, s->dtopk_w + (size_t)t * K, a->scores + (size_t)t * Nr,
                          a->topk_idx + (size_t)t * K, c);
    if (m->obj.seq_aux_alpha > 0)
#pragma omp parallel for schedule(static)
        for (int b = 0; b < a->B; b++)
            moe_balance_backward(s->dscores + (size_t)b * a->T * Nr, a->bal_f + (size_t)b * Nr,
                                 a->scores + (size_t)b * a->T * Nr, a->T, Nr, m->obj.seq_aux_alpha,
                                 balance_dloss / a->B);
    zero(s->drouter, (size_t)N * Nr);
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++)
        moe_scores_backward(s->drouter + (size_t)t * Nr, s->dscores + (size_t)t * Nr, a->scores + (size_t)t * Nr, Nr,
                            c->scoring_func);
    linear_backward(s->dln, g->gate, s->drouter, a->ln2, w->gate, N, d, Nr);
}

double train_layer_forward(TrainModel *m, const TrainLayer *w, TrainLayerActs *a, long long *load) {
    const ModelConfig *c = &m->cfg;
    int N = a->N, d = c->hidden_size;
    mla_forward(m, w, a);
    rmsnorm_rows_forward(a->ln2, a->ln2_rstd, a->x_mid, w->post_attention_layernorm, N, d, c->rms_norm_eps);
    double bal = 0;
    float *y = a->x_out;  // the FFN output lands in x_out, then the residual is added
    if (w->is_moe) bal = moe_forward(m, &w->moe, a, y, load);
    else ffn_forward(&w->mlp, a->ln2, a->ffn_gate, a->ffn_up, a->ffn_h, y, N, d, c->intermediate_size);
#pragma omp parallel for schedule(static)
    for (long i = 0; i < (long)N * d; i++) a->x_out[i] += a->x_mid[i];
    return bal;
}

void train_layer_backward(TrainModel *m, const TrainLayer *w, TrainLayer *g, TrainLayerActs *a, float *dres,
                          float balance_dloss) {
    const ModelConfig *c = &m->cfg;
    TrainActs *s = &m->a;
    int N = a->N, d = c->hidden_size;
    zero(s->dln, (size_t)N * d);
    if (w->is_moe) moe_backward(m, &w->moe, &g->moe, a, dres, balance_dloss);
    else
        ffn_backward(&w->mlp, &g->mlp, dres, a->ln2, a->ffn_gate, a->ffn_up, a->ffn_h, s->dln, s->dffn_gate,
                     s->dffn_up, s->dffn_h, N, d, c->intermediate_size);
    rmsnorm_rows_backward(dres, g->post_attention_layernorm, s->dln, a->x_mid, w->post_attention_layernorm,
                          a->ln2_rstd, N, d);
    mla_backward(m, w, g, a, dres);
}
