#include <stdlib.h>
#include <string.h>

#include "text/strmap.h"

uint64_t strmap_hash(const void *k, size_t n) {
    const uint8_t *p = k;
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xC2B2AE3D27D4EB4Full);
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 0xFF51AFD7ED558CCDull;
        h ^= h >> 29;
        p += 8;
        n -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, p, n);
    h = (h ^ w) * 0xC4CEB9FE1A85EC53ull;
    h ^= h >> 32;
    h *= 0x9E3779B97F4A7C15ull;
    h ^= h >> 29;
    return h ? h : 1;  // 0 marks empty slots
}

static size_t probe(const StrMap *m, uint64_t h, const void *k, size_t n, int *found) {
    size_t mask = m->cap - 1, i = (size_t)h & mask;
    for (;;) {
        if (m->hash[i] == 0) {
            *found = 0;
            return i;
        }
        if (m->hash[i] == h && m->klen[i] == n && memcmp(m->keys.p + m->koff[i], k, n) == 0) {
            *found = 1;
            return i;
        }
        i = (i + 1) & mask;
    }
}

uint64_t *strmap_find(const StrMap *m, const void *k, size_t n) {
    if (!m->cap) return NULL;
    int found;
    size_t i = probe(m, strmap_hash(k, n), k, n, &found);
    return found ? &m->val[i] : NULL;
}

static int grow(StrMap *m) {
    size_t cap = m->cap ? m->cap * 2 : 1024;
    uint64_t *hash = calloc(cap, sizeof *hash), *val = malloc(cap * sizeof *val);
    uint32_t *koff = malloc(cap * sizeof *koff), *klen = malloc(cap * sizeof *klen);
    if (!hash || !val || !koff || !klen) {
        free(hash);
        free(val);
        free(koff);
        free(klen);
        return -1;
    }
    for (size_t i = 0; i < m->cap; i++) {
        if (!m->hash[i]) continue;
        size_t j = (size_t)m->hash[i] & (cap - 1);
        while (hash[j]) j = (j + 1) & (cap - 1);
        hash[j] = m->hash[i];
        val[j] = m->val[i];
        koff[j] = m->koff[i];
        klen[j] = m->klen[i];
    }
    free(m->hash);
    free(m->val);
    free(m->koff);
    free(m->klen);
    m->hash = hash;
    m->val = val;
    m->koff = koff;
    m->klen = klen;
    m->cap = cap;
    return 0;
}

uint64_t *strmap_insert(StrMap *m, const void *k, size_t n, int *is_new) {
    if ((m->count + 1) * 2 > m->cap && grow(m)) return NULL;
    uint64_t h = strmap_hash(k, n);
    int found;
    size_t i = probe(m, h, k, n, &found);
    if (found) {
        *is_new = 0;
        return &m->val[i];
    }
    if (m->keys.n + n > UINT32_MAX) return NULL;
    uint32_t off = (uint32_t)m->keys.n;
    if (bb_append(&m->keys, k, n)) return NULL;
    m->hash[i] = h;
    m->koff[i] = off;
    m->klen[i] = (uint32_t)n;
    m->val[i] = 0;
    m->count++;
    *is_new = 1;
    return &m->val[i];
}

const uint8_t *strmap_key(const StrMap *m, size_t i, size_t *n) {
    *n = m->klen[i];
    return (const uint8_t *)m->keys.p + m->koff[i];
}

void strmap_clear(StrMap *m) {
    if (m->cap) memset(m->hash, 0, m->cap * sizeof *m->hash);
    m->count = 0;
    m->keys.n = 0;
}

void strmap_free(StrMap *m) {
    free(m->hash);
    free(m->val);
    free(m->koff);
    free(m->klen);
    bb_free(&m->keys);
    *m = (StrMap){0};
}
