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
        const StrSlot *s = &m->slots[i];
        if (s->hash == 0) {
            *found = 0;
            return i;
        }
        if (s->hash == h && s->klen == n && memcmp(m->keys.p + s->koff, k, n) == 0) {
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
    return found ? &m->slots[i].val : NULL;
}

static int grow(StrMap *m) {
    size_t cap = m->cap ? m->cap * 2 : 1024;
    StrSlot *slots = calloc(cap, sizeof *slots);
    if (!slots) return -1;
    for (size_t i = 0; i < m->cap; i++) {
        if (!m->slots[i].hash) continue;
        size_t j = (size_t)m->slots[i].hash & (cap - 1);
        while (slots[j].hash) j = (j + 1) & (cap - 1);
        slots[j] = m->slots[i];
    }
    free(m->slots);
    m->slots = slots;
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
        return &m->slots[i].val;
    }
    if (m->keys.n + n > UINT32_MAX) return NULL;
    uint32_t off = (uint32_t)m->keys.n;
    if (bb_append(&m->keys, k, n)) return NULL;
    m->slots[i] = (StrSlot){h, 0, off, (uint32_t)n};
    m->count++;
    *is_new = 1;
    return &m->slots[i].val;
}

const uint8_t *strmap_key(const StrMap *m, size_t i, size_t *n) {
    *n = m->slots[i].klen;
    return (const uint8_t *)m->keys.p + m->slots[i].koff;
}

void strmap_clear(StrMap *m) {
    if (m->cap) memset(m->slots, 0, m->cap * sizeof *m->slots);
    m->count = 0;
    m->keys.n = 0;
}

void strmap_free(StrMap *m) {
    free(m->slots);
    bb_free(&m->keys);
    *m = (StrMap){0};
}
