// DeepSeekMoE (SPEC §2.2): routing, and the MoE seam — route → dispatch → experts → combine —
// forward and backward, for every pass. The decode step runs the experts of its one token with a
// schedule of its own (decode.c) on the same route.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/matmul.h"
#include "kernels/ops.h"
#include "model/layer.h"
#include "model/moe.h"

// Index of the largest v[i] with allowed[i]; ties go to the lowest index, like a stable top-k.
static int argmax_masked(const float *v, const unsigned char *allowed, int n) {
    int best = -1;
    for (int i = 0; i < n; i++)
        if (allowed[i] && (best < 0 || v[i] > v[best])) best = i;
    return best;
}

void moe_scores(const ModelConfig *c, const float *logits, float *scores) {
    int N = c->n_routed_experts;
    if (c->scoring_func == SCORING_SIGMOID) {
        for (int i = 0; i < N; i++) scores[i] = sigmoidf_(logits[i]);
    } else {
        for (int i = 0; i < N; i++) scores[i] = logits[i];
        softmax_inplace(scores, N);
    }
}

void moe_gates(const ModelConfig *c, const float *scores, const int *idx, float *weight) {
    int K = c->num_experts_per_tok;
    float sum = 0;
    for (int k = 0; k < K; k++) {
        weight[k] = scores[idx[k]];
        sum += scores[idx[k]];
    }
    float norm = c->norm_topk_prob ? 1.0f / (sum + 1e-20f) : 1.0f;
    for (int k = 0; k < K; k++) weight[k] *= norm * c->routed_scaling_factor;
}

void moe_route(const ModelConfig *c, const float *logits, const float *bias, float *scores, int *idx, float *weight) {
    int N = c->n_routed_experts, K = c->num_experts_per_tok, G = c->n_group, per = N / G;
    moe_scores(c, logits, scores);
    // selection scores: the bias only steers selection; the gate weights use the unbiased score
    float sel[N];
    unsigned char allowed[N];
    for (int i = 0; i < N; i++) {
        sel[i] = scores[i] + (c->topk_method == TOPK_NOAUX_TC && bias ? bias[i] : 0.0f);
        allowed[i] = 1;
    }
    if (c->topk_method != TOPK_GREEDY && G > 1) {
        float gscore[G];
        unsigned char gkeep[G];
        for (int g = 0; g < G; g++) {
            const float *s = sel + g * per;
            if (c->topk_method == TOPK_NOAUX_TC) {  // sum of the two best in the group
                int a = 0;
                for (int i = 1; i < per; i++)
                    if (s[i] > s[a]) a = i;
                int b = a == 0 ? 1 : 0;
                for (int i = 0; i < per; i++)
                    if (i != a && s[i] > s[b]) b = i;
                gscore[g] = s[a] + s[b];
            } else {  // group_limited_greedy: the best in the group
                float m = s[0];
                for (int i = 1; i < per; i++) m = s[i] > m ? s[i] : m;
                gscore[g] = m;
            }
            gkeep[g] = 0;
        }
        unsigned char gfree[G];
        for (int g = 0; g < G; g++) gfree[g] = 1;
        for (int k = 0; k < c->topk_group; k++) {
            int g = argmax_masked(gscore, gfree, G);
            gkeep[g] = 1;
            gfree[g] = 0;
        }
        for (int i = 0; i < N; i++) allowed[i] = gkeep[i / per];
    }
    for (int k = 0; k < K; k++) {
        int e = argmax_masked(sel, allowed, N);
        allowed[e] = 0;
        idx[k] = e;
    }
    moe_gates(c, scores, idx, weight);
}

void moe_scores_backward(float *dlogits, const float *dscores, const float *scores, int N_r, ScoringFunc f) {
    if (f == SCORING_SIGMOID) {
        for (int i = 0; i < N_r; i++) dlogits[i] += dscores[i] * scores[i] * (1.0f - scores[i]);
        return;
    }
    float dot = 0;
    for (int i = 0; i < N_r; i++) dot += dscores[i] * scores[i];
    for (int i = 0; i < N_r; i++) dlogits[i] += scores[i] * (dscores[i] - dot);
}

void moe_gate_backward(float *dscores, const float *dweight, const float *scores, const int *idx,
                       const ModelConfig *c) {
    int K = c->num_experts_per_tok;
    float rsf = c->routed_scaling_factor;
    if (!c->norm_topk_prob) {
        for (int k = 0; k < K; k++) dscores[idx[k]] += rsf * dweight[k];
        return;
    }
    // w_k = rsf s_k / S with S = Σ_j s_j (+1e-20 as in moe_gates): ∂w_k/∂s_j = rsf (δ_kj − w_k/rsf) / S
    float S = 1e-20f, dot = 0;
    for (int k = 0; k < K; k++) S += scores[idx[k]];
    for (int k = 0; k < K; k++) dot += dweight[k] * scores[idx[k]];
    for (int k = 0; k < K; k++) dscores[idx[k]] += rsf * (dweight[k] - dot / S) / S;
}

double moe_balance_forward(float *f, const float *scores, const int *idx, int T, int N_r, int K_r, float alpha) {
    double P[N_r];
    for (int i = 0; i < N_r; i++) {
        f[i] = 0;
        P[i] = 0;
    }
    for (int t = 0; t < T; t++) {
        for (int k = 0; k < K_r; k++) f[idx[(size_t)t * K_r + k]] += 1.0f;
        const float *s = scores + (size_t)t * N_r;
        double S = 0;
        for (int i = 0; i < N_r; i++) S += s[i];
        for (int i = 0; i < N_r; i++) P[i] += s[i] / S;
    }
    double loss = 0;
    for (int i = 0; i < N_r; i++) {
        f[i] *= (float)N_r / ((float)K_r * T);
        loss += (double)f[i] * P[i] / T;
    }
    return alpha * loss;
}

void moe_balance_backward(float *dscores, const float *f, const float *scores, int T, int N_r, float alpha,
                          float dloss) {
    float g[N_r];
    for (int i = 0; i < N_r; i++) g[i] = alpha * dloss * f[i] / T;
    for (int t = 0; t < T; t++) {
        const float *s = scores + (size_t)t * N_r;
        float *ds = dscores + (size_t)t * N_r;
        float S = 0, c = 0;
        for (int i = 0; i < N_r; i++) S += s[i];
        for (int i = 0; i < N_r; i++) c += g[i] * s[i];
        c /= S;
        for (int i = 0; i < N_r; i++) ds[i] += (g[i] - c) / S;
    }
}

// ---- the seam ----

int moe_route_rows(const LayerPass *p, const MoeWeights *w, LayerActs *a, int N) {
    const ModelConfig *c = p->c;
    int Nr = c->n_routed_experts, K = c->num_experts_per_tok;
    TRY(p->be->ops->matmul(p->be, a->router, a->ln2, &w->gate, N, NULL));  // the router stays fp32
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        const float *lg = a->router + (size_t)t * Nr;
        float *s = a->scores + (size_t)t * Nr, *wt = a->topk_w + (size_t)t * K;
        int *idx = a->topk_idx + (size_t)t * K;
        if (!p->freeze_routing) {
            moe_route(c, lg, w->e_score_correction_bias, s, idx, wt);
        } else {  // the held choice, with scores and gates as moe_route computes them
            moe_scores(c, lg, s);
            moe_gates(c, s, idx, wt);
        }
    }
    return 0;
}

void moe_dispatch(const ModelConfig *c, LayerActs *a, int N, long long *load) {
    int Nr = c->n_routed_experts, K = c->num_experts_per_tok;
    // slots sorted by expert, tokens in order within an expert: each expert is one product
    int *off = a->expert_off;
    memset(off, 0, sizeof(int) * (Nr + 1));
    for (long i = 0; i < (long)N * K; i++) off[a->topk_idx[i] + 1]++;
    for (int e = 0; e < Nr; e++) {
        if (load) load[e] = off[e + 1];
        off[e + 1] += off[e];
    }
    int cursor[Nr];
    memcpy(cursor, off, sizeof(int) * Nr);
    for (long i = 0; i < (long)N * K; i++) {
        int slot = cursor[a->topk_idx[i]]++;
        a->slot_of[i] = slot;
        a->slot_tk[slot] = (int)i;
    }
}

// xg (N·K, d): each slot's token input, gathered from ln2; rows (N·K) is scratch for the indices.
static int moe_gather(const LayerPass *p, const LayerActs *a, int N) {
    int K = p->c->num_experts_per_tok;
    long NK = (long)N * K;
    for (long sl = 0; sl < NK; sl++) a->slot_tk_token[sl] = a->slot_tk[sl] / K;
    return p->be->ops->gather_rows(p->be, a->xg, a->ln2, a->slot_tk_token, NK, p->c->hidden_size);
}

int moe_experts_forward(const LayerPass *p, const MoeWeights *w, LayerActs *a, int N) {
    int Nr = p->c->n_routed_experts;
    TRY(moe_gather(p, a, N));
    const MatView **views = malloc(sizeof *views * 3 * (Nr + 1));
    if (!views) return err_set(&p->be->err, "out of memory for the experts' weight list (%d experts)", Nr);
    for (int e = 0; e < Nr; e++) ffn_views(&w->experts[e], views + 3 * e);
    int rc = p->be->ops->experts(p->be, a->e_out, a->e_gate, a->e_up, a->e_h, a->xg, views, Nr, a->expert_off, p->recipe);
    free(views);
    return rc;
}

int moe_combine(const LayerPass *p, const LayerActs *a, float *y, int N) {
    const ModelConfig *c = p->c;
    return p->be->ops->combine(p->be, y, a->e_out, a->slot_of, a->topk_w, N, c->num_experts_per_tok, c->hidden_size);
}

int moe_forward(const LayerPass *p, const MoeWeights *w, LayerActs *a, float *y, long long *load, double *balance) {
    const ModelConfig *c = p->c;
    int N = p->B * p->T, Nr = c->n_routed_experts, K = c->num_experts_per_tok;
    *balance = 0;
    TRY(moe_route_rows(p, w, a, N));
    moe_dispatch(c, a, N, load);  // the slots serve the local experts; the loads are this rank's tokens'
    if (!p->moe_parallel) TRY(moe_experts_forward(p, w, a, N));
    if (c->n_shared_experts > 0)
        TRY(ffn_forward(p->be, p->recipe, &w->shared_experts, a->ln2, a->ffn_gate, a->ffn_up, a->ffn_h, y, N));
    else memset(y, 0, sizeof(float) * N * c->hidden_size);
    if (p->moe_parallel) TRY(p->moe_parallel->ops->forward(p->moe_parallel, p, w, a, N, y));
    else TRY(moe_combine(p, a, y, N));
    if (p->seq_aux_alpha <= 0 || !a->bal_f) return 0;
    double bal = 0;
    for (int b = 0; b < p->B; b++)
        bal += moe_balance_forward(a->bal_f + (size_t)b * Nr, a->scores + (size_t)b * p->T * Nr,
                                   a->topk_idx + (size_t)b * p->T * K, p->T, Nr, K, p->seq_aux_alpha);
    *balance = bal / p->B;
    return 0;
}

int moe_backward(const LayerPass *p, const MoeWeights *w, MoeWeights *g, LayerActs *a, LayerGradScratch *s,
                 const float *dy, float balance_dloss) {
    const ModelConfig *c = p->c;
    Backend *be = p->be;
    int N = p->B * p->T, d = c->hidden_size, Nr = c->n_routed_experts, K = c->num_experts_per_tok;
    if (p->moe_parallel) {
        TRY(p->moe_parallel->ops->backward(p->moe_parallel, p, w, g, a, s, dy, N));
    } else {
        // combine: y_t = Σ_k g_tk E_k(x_t), so ∂g_tk = dy_t · E_k(x_t) and ∂E_k(x_t) = g_tk dy_t
        TRY(be->ops->combine_backward(be, s->de_out, s->dtopk_w, dy, a->e_out, a->slot_of, a->topk_w, N, K, d));
        // the experts (their inputs are gathered again: xg is shared scratch)
        TRY(moe_gather(p, a, N));
        TRY(be->ops->zero(be, s->dxg, (long)N * K * d));
        const MatView **views = malloc(sizeof *views * 6 * (Nr + 1)), **grads = views + 3 * (Nr + 1);
        if (!views) return err_set(&be->err, "out of memory for the experts' weight list (%d experts)", Nr);
        for (int e = 0; e < Nr; e++) ffn_views(&w->experts[e], views + 3 * e), ffn_views(&g->experts[e], grads + 3 * e);
        int rc = be->ops->experts_backward(be, s->dxg, grads, s->de_out, a->xg, a->e_gate, a->e_up, a->e_h, s->de_gate,
                                           s->de_up, s->de_h, views, Nr, a->expert_off, p->recipe);
        free(views);
        TRY(rc);
        // dispatch: each slot's input gradient goes back to its token
        TRY(be->ops->scatter_add_rows(be, s->dln, s->dxg, a->slot_tk_token, (long)N * K, d));
    }
    if (c->n_shared_experts > 0)
        TRY(ffn_backward(be, p->recipe, &w->shared_experts, &g->shared_experts, dy, a->ln2, a->ffn_gate, a->ffn_up, a->ffn_h,
                         s->dln, s->dffn_gate, s->dffn_up, s->dffn_h, N));
    // the route: gates and the balance loss are functions of the scores
    memset(s->dscores, 0, sizeof(float) * N * Nr);
    for (int t = 0; t < N; t++)
        moe_gate_backward(s->dscores + (size_t)t * Nr, s->dtopk_w + (size_t)t * K, a->scores + (size_t)t * Nr,
                          a->topk_idx + (size_t)t * K, c);
    if (p->seq_aux_alpha > 0)
        for (int b = 0; b < p->B; b++)
            moe_balance_backward(s->dscores + (size_t)b * p->T * Nr, a->bal_f + (size_t)b * Nr,
                                 a->scores + (size_t)b * p->T * Nr, p->T, Nr, p->seq_aux_alpha, balance_dloss / p->B);
    memset(s->drouter, 0, sizeof(float) * N * Nr);
    for (int t = 0; t < N; t++)
        moe_scores_backward(s->drouter + (size_t)t * Nr, s->dscores + (size_t)t * Nr, a->scores + (size_t)t * Nr, Nr,
                            c->scoring_func);
    return be->ops->matmul_backward(be, s->dln, &g->gate, s->drouter, a->ln2, &w->gate, N, NULL);
}
