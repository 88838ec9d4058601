#include <stdlib.h>
#include <string.h>

#include "text/bpe.h"

// Words longer than this merge through the heap: the scan costs O(n) per merge.
#define BPE_SCAN_MAX 128
// The cache holds pieces shorter than this (long ones rarely repeat) and is emptied when full.
#define BPE_CACHE_PIECE_MAX 256
#define BPE_CACHE_ENTRIES (1u << 19)
#define BPE_CACHE_POOL (1u << 23)

int ids_push(TokIds *t, int id) {
    if (t->n == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 256;
        int *v = realloc(t->v, cap * sizeof *v);
        if (!v) return -1;
        t->v = v;
        t->cap = cap;
    }
    t->v[t->n++] = id;
    return 0;
}

int ids_append(TokIds *t, const int *ids, size_t n) {
    if (t->n + n > t->cap) {
        size_t cap = t->cap ? t->cap : 256;
        while (cap < t->n + n) cap *= 2;
        int *v = realloc(t->v, cap * sizeof *v);
        if (!v) return -1;
        t->v = v;
        t->cap = cap;
    }
    if (n) memcpy(t->v + t->n, ids, n * sizeof *ids);
    t->n += n;
    return 0;
}

void ids_free(TokIds *t) {
    free(t->v);
    *t = (TokIds){0};
}

void bpe_init(BpeModel *m) {
    memset(m, 0, sizeof *m);
    for (int i = 0; i < 256; i++) m->byte_id[i] = -1;
}

void bpe_free(BpeModel *m) {
    free(m->mkey);
    free(m->mrank);
    free(m->mnew);
    strmap_free(&m->whole);
    strmap_free(&m->cache);
    free(m->pool);
    memset(m, 0, sizeof *m);
}

static inline uint64_t pair_key(int32_t a, int32_t b) { return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b; }
static inline size_t pair_slot(uint64_t k, size_t cap) { return (size_t)((k * 0x9E3779B97F4A7C15ull) >> 17) & (cap - 1); }
#define EMPTY_KEY UINT64_MAX  // ids are below 2^31, so no real pair packs to this

static int merges_grow(BpeModel *m) {
    size_t cap = m->mcap ? m->mcap * 2 : 1024;
    uint64_t *key = malloc(cap * sizeof *key);
    int32_t *rank = malloc(cap * sizeof *rank), *nw = malloc(cap * sizeof *nw);
    if (!key || !rank || !nw) {
        free(key);
        free(rank);
        free(nw);
        return -1;
    }
    for (size_t i = 0; i < cap; i++) key[i] = EMPTY_KEY;
    for (size_t i = 0; i < m->mcap; i++) {
        if (m->mkey[i] == EMPTY_KEY) continue;
        size_t j = pair_slot(m->mkey[i], cap);
        while (key[j] != EMPTY_KEY) j = (j + 1) & (cap - 1);
        key[j] = m->mkey[i];
        rank[j] = m->mrank[i];
        nw[j] = m->mnew[i];
    }
    free(m->mkey);
    free(m->mrank);
    free(m->mnew);
    m->mkey = key;
    m->mrank = rank;
    m->mnew = nw;
    m->mcap = cap;
    return 0;
}

int bpe_add_merge(BpeModel *m, int32_t a, int32_t b, int32_t merged, int32_t rank) {
    if ((m->nmerges + 1) * 2 > m->mcap && merges_grow(m)) return -1;
    uint64_t k = pair_key(a, b);
    size_t i = pair_slot(k, m->mcap);
    while (m->mkey[i] != EMPTY_KEY && m->mkey[i] != k) i = (i + 1) & (m->mcap - 1);
    if (m->mkey[i] == EMPTY_KEY) m->nmerges++;
    m->mkey[i] = k;
    m->mrank[i] = rank;
    m->mnew[i] = merged;
    return 0;
}

int32_t bpe_pair_rank(const BpeModel *m, int32_t a, int32_t b, int32_t *merged) {
    if (!m->mcap) return INT32_MAX;
    uint64_t k = pair_key(a, b);
    size_t i = pair_slot(k, m->mcap);
    for (;;) {
        uint64_t s = m->mkey[i];
        if (s == k) {
            *merged = m->mnew[i];
            return m->mrank[i];
        }
        if (s == EMPTY_KEY) return INT32_MAX;
        i = (i + 1) & (m->mcap - 1);
    }
}

static int merge_scan(const BpeModel *m, int32_t *sym, int n) {
    int32_t rank[BPE_SCAN_MAX], mg[BPE_SCAN_MAX];
    for (int i = 0; i + 1 < n; i++) rank[i] = bpe_pair_rank(m, sym[i], sym[i + 1], &mg[i]);
    while (n > 1) {
        int best = 0;
        for (int i = 1; i + 1 < n; i++)
            if (rank[i] < rank[best]) best = i;
        if (rank[best] == INT32_MAX) break;
        sym[best] = mg[best];
        // drop symbol best+1 and pair best+1 (now pair best describes the merged symbol)
        memmove(sym + best + 1, sym + best + 2, (size_t)(n - best - 2) * sizeof *sym);
        memmove(rank + best + 1, rank + best + 2, (size_t)(n > best + 2 ? n - best - 3 : 0) * sizeof *rank);
        memmove(mg + best + 1, mg + best + 2, (size_t)(n > best + 2 ? n - best - 3 : 0) * sizeof *mg);
        n--;
        if (best > 0) rank[best - 1] = bpe_pair_rank(m, sym[best - 1], sym[best], &mg[best - 1]);
        if (best + 1 < n) rank[best] = bpe_pair_rank(m, sym[best], sym[best + 1], &mg[best]);
    }
    return n;
}

// A candidate merge of node `left` with node `right`, valid while both nodes still hold the
// symbols they had when it was pushed (their versions) and are still neighbours.
typedef struct HeapEnt {
    int32_t rank, left, right, merged;
    uint32_t vl, vr;
} HeapEnt;

static inline int ent_less(const HeapEnt *a, const HeapEnt *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->left < b->left);
}

static void heap_push(HeapEnt *h, int *hn, HeapEnt e) {
    int i = (*hn)++;
    while (i > 0) {
        int p = (i - 1) / 2;
        if (!ent_less(&e, &h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = e;
}

static HeapEnt heap_pop(HeapEnt *h, int *hn) {
    HeapEnt top = h[0], last = h[--*hn];
    int i = 0, n = *hn;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && ent_less(&h[c + 1], &h[c])) c++;
        if (!ent_less(&h[c], &last)) break;
        h[i] = h[c];
        i = c;
    }
    if (n) h[i] = last;
    return top;
}

static int merge_heap(const BpeModel *m, int32_t *sym, int n) {
    // each merge pushes at most two entries, so 3n bounds the heap
    int32_t *prev = malloc((size_t)n * sizeof *prev), *next = malloc((size_t)n * sizeof *next);
    uint32_t *ver = calloc((size_t)n, sizeof *ver);
    uint8_t *dead = calloc((size_t)n, 1);
    HeapEnt *h = malloc((size_t)n * 3 * sizeof *h);
    int hn = 0, rc = -1;
    if (!prev || !next || !ver || !dead || !h) goto done;
    for (int i = 0; i < n; i++) {
        prev[i] = i - 1;
        next[i] = i + 1 < n ? i + 1 : -1;
    }
    for (int i = 0; i + 1 < n; i++) {
        HeapEnt e = {0, i, i + 1, 0, 0, 0};
        e.rank = bpe_pair_rank(m, sym[i], sym[i + 1], &e.merged);
        if (e.rank != INT32_MAX) heap_push(h, &hn, e);
    }
    while (hn) {
        HeapEnt e = heap_pop(h, &hn);
        int L = e.left, R = e.right;
        if (dead[L] || dead[R] || next[L] != R || ver[L] != e.vl || ver[R] != e.vr) continue;
        sym[L] = e.merged;
        ver[L]++;
        dead[R] = 1;
        next[L] = next[R];
        if (next[R] >= 0) prev[next[R]] = L;
        if (prev[L] >= 0) {
            int P = prev[L];
            HeapEnt p = {0, P, L, 0, ver[P], ver[L]};
            p.rank = bpe_pair_rank(m, sym[P], sym[L], &p.merged);
            if (p.rank != INT32_MAX) heap_push(h, &hn, p);
        }
        if (next[L] >= 0) {
            int N = next[L];
            HeapEnt q = {0, L, N, 0, ver[L], ver[N]};
            q.rank = bpe_pair_rank(m, sym[L], sym[N], &q.merged);
            if (q.rank != INT32_MAX) heap_push(h, &hn, q);
        }
    }
    // node 0 is always a left side, so it survives and starts the list
    rc = 0;
    for (int i = 0; i >= 0; i = next[i]) sym[rc++] = sym[i];
done:
    free(prev);
    free(next);
    free(ver);
    free(dead);
    free(h);
    return rc;
}

int bpe_merge(const BpeModel *m, int32_t *sym, int n, int force_heap) {
    if (n < 2) return n;
    if (n <= BPE_SCAN_MAX && !force_heap) return merge_scan(m, sym, n);
    return merge_heap(m, sym, n);
}

int bpe_encode_piece(BpeModel *m, const uint8_t *s, size_t n, TokIds *out) {
    if (n == 1) return ids_push(out, m->byte_id[s[0]]);
    if (m->ignore_merges) {
        uint64_t *w = strmap_find(&m->whole, s, n);
        if (w) return ids_push(out, (int)*w);
    }
    int cacheable = n < BPE_CACHE_PIECE_MAX;
    if (cacheable) {
        uint64_t *c = strmap_find(&m->cache, s, n);
        if (c) return ids_append(out, (const int *)m->pool + (*c >> 32), (size_t)(*c & 0xFFFFFFFFu));
    }
    int32_t stackbuf[BPE_CACHE_PIECE_MAX];
    int32_t *sym = cacheable ? stackbuf : malloc(n * sizeof *sym);
    if (!sym || n > INT32_MAX) return -1;
    for (size_t i = 0; i < n; i++) sym[i] = m->byte_id[s[i]];
    int k = bpe_merge(m, sym, (int)n, 0);
    int rc = k < 0 ? -1 : ids_append(out, (const int *)sym, (size_t)k);
    if (rc == 0 && cacheable) {
        if (m->cache.count >= BPE_CACHE_ENTRIES || m->npool + (size_t)k > BPE_CACHE_POOL) {
            strmap_clear(&m->cache);
            m->npool = 0;
        }
        if (m->npool + (size_t)k > m->cappool) {
            size_t cap = m->cappool ? m->cappool : 4096;
            while (cap < m->npool + (size_t)k) cap *= 2;
            int32_t *p = realloc(m->pool, cap * sizeof *p);
            if (!p) return 0;  // the cache is an optimisation: go on without it
            m->pool = p;
            m->cappool = cap;
        }
        int is_new;
        uint64_t *slot = strmap_insert(&m->cache, s, n, &is_new);
        if (slot) {
            memcpy(m->pool + m->npool, sym, (size_t)k * sizeof *sym);
            *slot = ((uint64_t)m->npool << 32) | (uint32_t)k;
            m->npool += (size_t)k;
        }
    }
    if (!cacheable) free(sym);
    return rc;
}
