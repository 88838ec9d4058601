#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "base/bigmem.h"
#include "base/file.h"
#include "kernels/backend.h"
#include "kernels/ops.h"
#include "model/model.h"
#include "model/tensors.h"

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

static void panels_free(Model *m);

void model_free(Model *m) {
    panels_free(m);
    weights_free(&m->w, &m->cfg);
    st_model_close(&m->files);
    free(m->inv_freq);
    memset(m, 0, sizeof *m);
}

int kvpool_init(KVPool *p, const ModelConfig *c, int n_mtp, int n_blocks, int block_size, DType dtype, Error *err) {
    memset(p, 0, sizeof *p);
    if (dtype != DT_F32 && dtype != DT_BF16)
        return err_set(err, "KV cache: element type %s is not F32 or BF16", dtype_name(dtype));
    if (n_blocks < 1 || block_size < 1)
        return err_set(err, "KV cache: %d blocks of %d positions", n_blocks, block_size);
    p->n_layers = c->num_hidden_layers + n_mtp;
    p->block_size = block_size;
    p->n_blocks = n_blocks;
    p->dtype = dtype;
    size_t es = dtype_size(dtype), rows = (size_t)p->n_layers * n_blocks * block_size;
    p->latent_bytes = es * rows * c->kv_lora_rank;
    p->kpe_bytes = es * rows * (c->qk_rope_head_dim ? c->qk_rope_head_dim : 1);
    p->latent = bigmem_alloc(p->latent_bytes, "the KV cache's latents", err);
    p->k_pe = p->latent ? bigmem_alloc(p->kpe_bytes, "the KV cache's rotary keys", err) : NULL;
    p->free_ids = xmalloc(err, sizeof(int) * n_blocks, "KV cache block list");
    p->ref = xcalloc(err, n_blocks, sizeof(int), "KV cache block list");
    p->retained = xcalloc(err, n_blocks, sizeof(int), "KV cache block list");
    p->released = xcalloc(err, n_blocks, sizeof(long), "KV cache block list");
    if (!p->latent || !p->k_pe || !p->free_ids || !p->ref || !p->retained || !p->released) {
        kvpool_free(p);
        return -1;
    }
    // together at most what is free now: faulted in here rather than during decode steps
    if (bigmem_prefault(p->latent, p->latent_bytes)) bigmem_prefault(p->k_pe, p->kpe_bytes);
    for (int i = 0; i < n_blocks; i++) p->free_ids[i] = n_blocks - 1 - i;  // block 0 is handed out first
    p->n_free = n_blocks;
    return 0;
}

void kvpool_free(KVPool *p) {
    bigmem_free(p->latent, p->latent_bytes);
    bigmem_free(p->k_pe, p->kpe_bytes);
    free(p->free_ids);
    free(p->ref);
    free(p->retained);
    free(p->released);
    memset(p, 0, sizeof *p);
}

size_t kvpool_block_bytes(const KVPool *p, const ModelConfig *c) {
    return (size_t)p->n_layers * p->block_size * (c->kv_lora_rank + c->qk_rope_head_dim) * dtype_size(p->dtype);
}

int kvcache_attach(KVCache *kv, KVPool *pool, int n_mtp, int capacity, Error *err) {
    memset(kv, 0, sizeof *kv);
    if (capacity < 1) return err_set(err, "KV cache: capacity %d", capacity);
    kv->pool = pool;
    kv->dtype = pool->dtype;
    kv->n_mtp = n_mtp;
    kv->max_blocks = (capacity + pool->block_size - 1) / pool->block_size;
    kv->capacity = capacity;
    kv->blocks = xmalloc(err, sizeof(int) * kv->max_blocks, "KV cache block table");
    kv->mtp_len = xcalloc(err, n_mtp > 0 ? n_mtp : 1, sizeof(int), "KV cache MTP lengths");
    if (!kv->blocks || !kv->mtp_len) {
        kvcache_free(kv);
        return -1;
    }
    return 0;
}

int kvcache_init(KVCache *kv, const ModelConfig *c, int n_mtp, int capacity, Error *err) {
    return kvcache_init_as(kv, c, n_mtp, capacity, DT_F32, err);
}

int kvcache_init_as(KVCache *kv, const ModelConfig *c, int n_mtp, int capacity, DType dtype, Error *err) {
    memset(kv, 0, sizeof *kv);
    KVPool *pool = xcalloc(err, 1, sizeof *pool, "KV cache");
    if (!pool) return -1;
    if (kvpool_init(pool, c, n_mtp, 1, capacity, dtype, err) || kvcache_attach(kv, pool, n_mtp, capacity, err) ||
        kvcache_reserve(kv, capacity, err)) {
        kvpool_free(pool);
        free(pool);
        kvcache_free(kv);
        return -1;
    }
    kv->owns_pool = 1;
    return 0;
}

void kvpool_retain(KVPool *p, int b) { p->retained[b] = 1; }

// A block for a new user: a free one, or else the retained block released longest ago; -1 when
// every block is in use.
static int pool_take(KVPool *p) {
    int b = -1;
    if (p->n_free > 0) {
        b = p->free_ids[--p->n_free];
    } else {
        for (int i = 0; i < p->n_blocks; i++)
            if (p->ref[i] == 0 && p->retained[i] && (b < 0 || p->released[i] < p->released[b])) b = i;
        if (b < 0) return -1;
        p->retained[b] = 0;
        if (p->on_evict) p->on_evict(p->evict_ctx, b);
    }
    p->ref[b] = 1;
    p->n_used++;
    return b;
}

int kvcache_reserve(KVCache *kv, int positions, Error *err) {
    if (positions > kv->capacity)
        return err_set(err, "KV cache: %d positions exceed the sequence's capacity %d", positions, kv->capacity);
    KVPool *p = kv->pool;
    while (kv->n_blocks * p->block_size < positions) {
        int b = pool_take(p);
        if (b < 0)
            return err_set(err, "KV cache: the pool's %d blocks of %d positions are all in use", p->n_blocks,
                           p->block_size);
        kv->blocks[kv->n_blocks++] = b;
    }
    return 0;
}

int kvcache_share(KVCache *kv, int b, Error *err) {
    KVPool *p = kv->pool;
    if (kv->n_blocks == kv->max_blocks) return err_set(err, "KV cache: the block table is full");
    if (p->ref[b]++ == 0) p->n_used++;
    kv->blocks[kv->n_blocks++] = b;
    return 0;
}

void kvcache_clear(KVCache *kv) {
    KVPool *p = kv->pool;
    while (kv->n_blocks > 0) {
        int b = kv->blocks[--kv->n_blocks];
        if (--p->ref[b] > 0) continue;
        p->n_used--;
        if (p->retained[b]) p->released[b] = ++p->clock;  // stays filled, evictable
        else p->free_ids[p->n_free++] = b;
    }
    kv->len = 0;
    for (int k = 0; k < kv->n_mtp; k++) kv->mtp_len[k] = 0;
}

void kvcache_free(KVCache *kv) {
    if (kv->pool && kv->blocks) kvcache_clear(kv);
    if (kv->owns_pool) {
        kvpool_free(kv->pool);
        free(kv->pool);
    }
    free(kv->blocks);
    free(kv->mtp_len);
    memset(kv, 0, sizeof *kv);
}

void *kvcache_latent(const KVCache *kv, const ModelConfig *c, int l) {
    const KVPool *p = kv->pool;
    return (char *)p->latent + (size_t)l * p->n_blocks * p->block_size * c->kv_lora_rank * dtype_size(p->dtype);
}

void *kvcache_kpe(const KVCache *kv, const ModelConfig *c, int l) {
    const KVPool *p = kv->pool;
    return (char *)p->k_pe + (size_t)l * p->n_blocks * p->block_size * c->qk_rope_head_dim * dtype_size(p->dtype);
}

size_t kvcache_bytes_per_token(const ModelConfig *c, DType dtype) {
    return (size_t)(c->kv_lora_rank + c->qk_rope_head_dim) * c->num_hidden_layers * dtype_size(dtype);
}

// Does mode compute the products of this linear layer or embedding (its view w) in BF16?
static int bf16_under_mat(const MatView *w, ComputeMode mode) {
    DType dt = w->dtype;
    // (auto: FP8 only in the release's 128 x 128 blocks, which the BF16-compute kernels take)
    return mode == COMPUTE_BF16 || (mode == COMPUTE_AUTO && matmul_bf16c_fast() &&
                                    (dt == DT_BF16 || (dt == DT_F8_E4M3 && w->block == 128)));
}

static int bf16_under(const TensorSpec *t, ComputeMode mode) { return bf16_under_mat(t->mat, mode); }

static int set_compute(const TensorSpec *t, void *ctx) {
    if (!t->mat || (t->kind != TENSOR_LINEAR && t->kind != TENSOR_EMBED)) return 0;
    t->mat->compute_bf16 = bf16_under(t, *(const ComputeMode *)ctx);
    t->mat->panels_tiles = 0;  // (model_set_panel_tiles, after)
    return 0;
}

#define PANELS_ALIGN 64

static size_t panels_aligned(size_t bytes) { return (bytes + PANELS_ALIGN - 1) / PANELS_ALIGN * PANELS_ALIGN; }

// Absorbed attention's W_UK,hᵀ q_nope as an x · Wᵀ product of the BF16-compute kernels, as
// DeepSeek's reference computes it in BF16: each head's W_UK rows of kv_b_proj transposed, the
// heads stacked (H·kv_lora rows of nope columns), packed into weight panels and kept only as
// those (the transposed rows are read by nothing else). Rather than x · W over kv_b_proj's
// stored rows, which took ~8% of a one-sequence FP8 decode step of v3-108m for 0.2% of its
// bytes. Possible where each head's rows start on a panel (kv_lora a multiple of 32; FP8: of
// 128, the block rows of the regridded scales) and, FP8, every 128-column chunk of a head's nope
// rows lies in one block row of kv_b_proj (heads of nope + v a multiple of 128, as released).
// The shape of the stacked view for kvb (0), or -1 where it cannot be made.
static int wuk_view(const ModelConfig *c, const MatView *kvb, MatView *t) {
    int H = c->num_attention_heads, nope = c->qk_nope_head_dim, v = c->v_head_dim, L = c->kv_lora_rank;
    int fp8 = kvb->dtype == DT_F8_E4M3;
    if (nope <= 0 || L <= 0 || L % (fp8 ? 128 : 32) || kvb->rows != H * (nope + v) || kvb->cols != L) return -1;
    if (fp8) {
        if (kvb->block != 128 || kvb->row0 != 0) return -1;
        for (int h = 0; h < H; h++)
            for (int k = 0; k < nope; k += 128) {
                int last = k + 127 < nope - 1 ? k + 127 : nope - 1;
                if ((h * (nope + v) + k) / 128 != (h * (nope + v) + last) / 128) return -1;
            }
    }
    *t = (MatView){.dtype = kvb->dtype, .rows = H * L, .cols = nope, .compute_bf16 = 1, .block = fp8 ? 128 : 0,
                   .scale_cols = fp8 ? (nope + 127) / 128 : 0};
    return 0;
}

// Bytes of kvb's W_UKᵀ panels and, FP8, its scale grid after them, when its products are
// BF16-compute (bf16; 0: none).
static size_t wuk_bytes(const ModelConfig *c, const MatView *kvb, int bf16) {
    MatView t;
    if (!bf16 || wuk_view(c, kvb, &t)) return 0;
    size_t grid = t.dtype == DT_F8_E4M3 ? sizeof(float) * (t.rows / 128) * t.scale_cols : 0;
    if (grid) t.scale_inv = (const float *)kvb->scale_inv;  // (weight_panels_bytes asks for one)
    size_t pb = weight_panels_bytes(&t);
    return pb ? panels_aligned(pb) + panels_aligned(grid) : 0;
}

// Packs kvb's W_UKᵀ into dst (wuk_bytes of it) and sets *out to the panels' view. -1: out of memory
// for the transposed copy.
static int wuk_pack(const ModelConfig *c, const MatView *kvb, char *dst, MatView *out) {
    MatView t;
    if (wuk_view(c, kvb, &t)) return -1;
    int H = c->num_attention_heads, nope = c->qk_nope_head_dim, v = c->v_head_dim, L = c->kv_lora_rank;
    size_t es = dtype_size(t.dtype);
    char *data = malloc((size_t)t.rows * t.cols * es);  // (H·L, nope): row h·L + c is column c of head h's rows
    if (!data) return -1;
    for (int h = 0; h < H; h++)
        for (int k = 0; k < nope; k++) {
            const char *src = (const char *)kvb->data + ((size_t)h * (nope + v) + k) * L * es;
            for (int col = 0; col < L; col++) memcpy(data + (((size_t)h * L + col) * nope + k) * es, src + col * es, es);
        }
    t.data = data;
    if (t.dtype == DT_F8_E4M3) {  // block (h·L/128 + col/128, k/128): kvb's block (row of h's k, col/128)
        t.scale_inv = (const float *)kvb->scale_inv;  // (for the size)
        float *grid = (float *)(dst + panels_aligned(weight_panels_bytes(&t)));
        for (int h = 0; h < H; h++)
            for (int cb = 0; cb < L / 128; cb++)
                for (int kb = 0; kb < t.scale_cols; kb++)
                    grid[((size_t)h * (L / 128) + cb) * t.scale_cols + kb] =
                        kvb->scale_inv[(size_t)((h * (nope + v) + 128 * kb) / 128) * kvb->scale_cols + cb];
        t.scale_inv = grid;
    }
    weight_panels_pack(dst, &t);
    free(data);
    t.data = NULL;
    t.panels = dst;
    *out = t;
    return 0;
}

// Layer i's attention weights: the main layers, then the MTP modules' (num_hidden_layers + n_mtp).
static MlaWeights *attention_of(Model *m, int i) {
    return i < m->cfg.num_hidden_layers ? &m->w.layers[i].self_attn : &m->w.mtp[i - m->cfg.num_hidden_layers].layer.self_attn;
}

// An FP8 matrix's block scales, copied after its panels: the products on the panels read them at
// every step, and in the mmapped file they lie one small tensor beside each matrix, on a page of
// their own — where the page cache holds the file in 4 KB pages (a checkpoint freshly written or
// downloaded), a TLB miss per matrix and step: v3-deep FP8 decode 8% faster with the copies (10 of
// 10 rounds taking turns, bench/configs/v3-deep.json at 512-768 positions).
static size_t scale_bytes(const MatView *w) {
    if (w->dtype != DT_F8_E4M3 || !w->scale_inv) return 0;
    return sizeof(float) * (size_t)((w->row0 + w->rows + w->block - 1) / w->block) * w->scale_cols;
}

// The bytes t's weight panels take when its products are BF16-compute (bf16), FP8 scales' copy
// included: the linear layers and the output heads (not an embedding only looked up); 0 for the
// rest and where the CPU takes none.
static size_t panel_bytes_of(const TensorSpec *t, int bf16) {
    if (!bf16 || !(t->kind == TENSOR_LINEAR || (t->kind == TENSOR_EMBED && t->head))) return 0;
    size_t pb = weight_panels_bytes(t->mat);
    return pb ? panels_aligned(pb) + panels_aligned(scale_bytes(t->mat)) : 0;
}

typedef struct {
    int plan;          // 1: under mode (model_panels_bytes); 0: as the views are marked now
    ComputeMode mode;
    const MoeParallel *mp;  // routed experts split over ranks: only this rank's get panels
    size_t bytes;      // the total
    int n;             // matrices
    MatView **mats;    // (n) the matrices in walk order, once counted (model_set_compute)
    size_t *at;        // (n) their panels' offsets
    char *release;     // (n) 1: its stored bytes are read by nothing but its products (not an
                       // embedding's look-ups, not kv_b_proj's x · W_UK in absorbed attention)
    int wuk;           // 1: absorbed attention's W_UKᵀ gets panels of its own (wuk_view), not kv_b_proj's rows
} PanelWalk;

static int count_panels(const TensorSpec *t, void *ctx) {
    PanelWalk *p = ctx;
    size_t b = t->mat ? panel_bytes_of(t, p->plan ? bf16_under(t, p->mode) : t->mat->compute_bf16) : 0;
    if (!b || (p->mp && t->expert >= 0 && !p->mp->ops->holds(p->mp, t->expert))) return 0;
    if (p->mats) {
        p->mats[p->n] = t->mat;
        p->at[p->n] = p->bytes;
        p->release[p->n] = t->kind == TENSOR_LINEAR && (!strstr(t->name, "kv_b_proj") || p->wuk);
    }
    p->bytes += b;
    p->n++;
    return 0;
}

// Layer i's W_UKᵀ panel bytes: under mode (plan), or as its kv_b_proj is marked now.
static size_t wuk_bytes_of(const Model *m, int i, int plan, ComputeMode mode) {
    const MatView *kvb = &attention_of((Model *)m, i)->kv_b_proj;
    return wuk_bytes(&m->cfg, kvb, plan ? bf16_under_mat(kvb, mode) : kvb->compute_bf16);
}

size_t model_panels_bytes(const Model *m, ComputeMode mode, int *matrices) {
    PanelWalk p = {.plan = 1, .mode = mode, .mp = m->moe_parallel};
    tensor_walk(&m->cfg, m->w.n_mtp, (ModelWeights *)&m->w, count_panels, &p);
    for (int i = 0; i < m->cfg.num_hidden_layers + m->w.n_mtp; i++) {
        size_t b = wuk_bytes_of(m, i, 1, mode);
        p.bytes += b, p.n += b > 0;
    }
    if (matrices) *matrices = p.n;
    return p.bytes;
}

static int drop_panels(const TensorSpec *t, void *ctx) {
    const Model *m = ctx;
    if (!t->mat) return 0;
    const char *sc = (const char *)t->mat->scale_inv, *lo = m->panels;
    if (sc && sc >= lo && sc < lo + m->panels_bytes) {  // the file's scales again, as bound at load
        char name[sizeof t->name + 16];
        snprintf(name, sizeof name, "%s_scale_inv", t->name);
        const StTensor *st = st_model_find(&m->files, name);
        t->mat->scale_inv = st ? st->data : NULL;
    }
    t->mat->panels = NULL;
    return 0;
}

static void panels_free(Model *m) {
    if (m->panels) tensor_walk(&m->cfg, m->w.n_mtp, &m->w, drop_panels, m);
    for (int i = 0; m->w.layers && i < m->cfg.num_hidden_layers + m->w.n_mtp; i++)
        attention_of(m, i)->w_uk_t = (MatView){0};
    bigmem_free(m->panels, m->panels_bytes);
    m->panels = NULL;
    m->panels_bytes = 0;
}

// The matrices whose products go on the tiles: the dense ones (attention, shared experts, dense
// FFN, heads: every row of a step) from PANEL_TILES_ROWS rows on, the routed experts' where a step's
// rows give each of them PANEL_TILES_ROWS on average (16 sequences, top-4 of 32: 2 rows per expert,
// where the register tiles stream faster).
enum { PANEL_TILES_ROWS = 4 };
typedef struct TilesWalk {
    int dense, experts, n;
} TilesWalk;

static int set_panel_tiles(const TensorSpec *t, void *ctx) {
    TilesWalk *w = ctx;
    if (!t->mat) return 0;
    t->mat->panels_tiles = t->mat->panels && (t->expert < 0 ? w->dense : w->experts);
    w->n += t->mat->panels_tiles;
    return 0;
}

int model_set_panel_tiles(Model *m, long rows) {
    const ModelConfig *c = &m->cfg;
    int ok = weight_panels_tiles() && m->panels;
    TilesWalk w = {.dense = ok && rows >= PANEL_TILES_ROWS,
                   .experts = ok && c->n_routed_experts > 0 &&
                              (double)rows * c->num_experts_per_tok / c->n_routed_experts >= PANEL_TILES_ROWS};
    tensor_walk(c, m->w.n_mtp, &m->w, set_panel_tiles, &w);
    for (int i = 0; m->w.layers && i < c->num_hidden_layers + m->w.n_mtp; i++) {
        MatView *t = &attention_of(m, i)->w_uk_t;
        t->panels_tiles = t->panels && w.dense;
        w.n += t->panels_tiles;
    }
    return w.n;
}

DType model_kv_dtype_auto(const Model *m) {
    return m->cfg.num_hidden_layers > 0 && m->w.layers[0].self_attn.kv_a_proj_with_mqa.compute_bf16 ? DT_BF16 : DT_F32;
}

int model_set_compute(Model *m, ComputeMode mode, Error *err) {
    panels_free(m);
    tensor_walk(&m->cfg, m->w.n_mtp, &m->w, set_compute, &mode);
    PanelWalk pw = {.mp = m->moe_parallel};
    tensor_walk(&m->cfg, m->w.n_mtp, &m->w, count_panels, &pw);
    if (pw.bytes == 0) return 0;
    // each layer's W_UKᵀ after the matrices' panels: wuk_at[i] .. wuk_at[i + 1]
    int layers = m->cfg.num_hidden_layers + m->w.n_mtp, failed = 0;
    size_t n = (size_t)pw.n, *wuk_at = xcalloc(err, layers + 1, sizeof *wuk_at, "the list of weight panels");
    pw = (PanelWalk){.mp = m->moe_parallel,
                     .mats = xcalloc(err, n, sizeof *pw.mats, "the list of weight panels"),
                     .at = xcalloc(err, n, sizeof *pw.at, "the list of weight panels"),
                     .release = xcalloc(err, n, 1, "the list of weight panels")};
    if (!wuk_at || !pw.mats || !pw.at || !pw.release) goto fail;
    for (int i = 0; i < layers; i++) wuk_at[i + 1] = wuk_at[i] + wuk_bytes_of(m, i, 0, mode);
    size_t wuk = wuk_at[layers];
    pw.wuk = wuk > 0;
    tensor_walk(&m->cfg, m->w.n_mtp, &m->w, count_panels, &pw);
    m->panels = bigmem_alloc(pw.bytes + wuk, "the BF16-compute weight panels", err);
    if (!m->panels) goto fail;
    m->panels_bytes = pw.bytes + wuk;
    // the W_UKᵀ panels packed from the stored rows, before any release
#pragma omp parallel for schedule(dynamic) reduction(| : failed) if (wuk)
    for (int i = 0; i < layers; i++) {
        MlaWeights *a = attention_of(m, i);
        if (wuk_at[i + 1] > wuk_at[i])
            failed |= wuk_pack(&m->cfg, &a->kv_b_proj, (char *)m->panels + pw.bytes + wuk_at[i], &a->w_uk_t) != 0;
    }
    if (failed) {
        err_set(err, "out of memory for a transposed copy of kv_b_proj (the W_UK panels)");
        goto fail;
    }
    // The matrices packed in parallel, each by one thread (a team per matrix spent more time forking
    // than packing: ~800 matrices in a 100M model). A mmapped matrix whose every read is now its
    // panels' gives its pages back to the page cache: the process holds one copy, not two
    // (v3-108m BF16, `generate --compute bf16`: peak resident 422 -> 233 MB; FP8 229 -> 136).
    const int release = weight_panels_only();
#pragma omp parallel for schedule(dynamic)
    for (size_t i = 0; i < n; i++) {
        MatView *w = pw.mats[i];
        char *at = (char *)m->panels + pw.at[i];
        size_t sb = scale_bytes(w), pb = panels_aligned(weight_panels_bytes(w));
        weight_panels_pack(at, w);
        w->panels = at;
        if (sb) w->scale_inv = memcpy(at + pb, w->scale_inv, sb);
        if (release && pw.release[i]) st_model_release(&m->files, w->data, tensor_view_bytes(w));
    }
    free(wuk_at), free(pw.mats), free(pw.at), free(pw.release);
    return 0;
fail:
    free(wuk_at), free(pw.mats), free(pw.at), free(pw.release);
    panels_free(m);
    mode = COMPUTE_F32;
    tensor_walk(&m->cfg, m->w.n_mtp, &m->w, set_compute, &mode);
    return -1;
}

static int find_fp32_product(const TensorSpec *t, void *ctx) {
    (void)ctx;
    return t->mat && (t->kind == TENSOR_LINEAR || t->kind == TENSOR_EMBED) && !t->mat->compute_bf16;
}

int model_rows_independent(const Model *m) {
    return tensor_walk(&m->cfg, m->w.n_mtp, (ModelWeights *)&m->w, find_fp32_product, NULL) == 0;
}
