#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "infer/prefix_cache.h"

int prefix_init(PrefixCache *pc, int n_blocks, int width, Error *err) {
    memset(pc, 0, sizeof *pc);
    pc->n_blocks = n_blocks;
    pc->width = width;
    pc->cap = 16;
    while (pc->cap < 2 * n_blocks) pc->cap *= 2;
    pc->tokens = xmalloc(err, sizeof(int) * (size_t)n_blocks * width, "prefix cache");
    pc->how = xmalloc(err, sizeof(unsigned) * n_blocks, "prefix cache");
    pc->parent = xmalloc(err, sizeof(int) * n_blocks, "prefix cache");
    pc->parent_gen = xcalloc(err, n_blocks, sizeof(unsigned), "prefix cache");
    pc->gen = xcalloc(err, n_blocks, sizeof(unsigned), "prefix cache");
    pc->indexed = xcalloc(err, n_blocks, sizeof(int), "prefix cache");
    pc->slots = xmalloc(err, sizeof(int) * pc->cap, "prefix cache");
    if (!pc->tokens || !pc->how || !pc->parent || !pc->parent_gen || !pc->gen || !pc->indexed || !pc->slots) {
        prefix_free(pc);
        return -1;
    }
    for (int i = 0; i < pc->cap; i++) pc->slots[i] = -1;
    return 0;
}

void prefix_free(PrefixCache *pc) {
    free(pc->tokens);
    free(pc->how);
    free(pc->parent);
    free(pc->parent_gen);
    free(pc->gen);
    free(pc->indexed);
    free(pc->slots);
    memset(pc, 0, sizeof *pc);
}

static uint64_t key_of(const PrefixCache *pc, int parent, unsigned pgen, const int *tok, unsigned how) {
    uint64_t h = 1469598103934665603ull;  // FNV-1a over the parent, its generation, how and the tokens
    uint32_t v[3] = {(uint32_t)parent, pgen, how};
    for (int i = 0; i < 3; i++) h = (h ^ v[i]) * 1099511628211ull;
    for (int i = 0; i < pc->width; i++) h = (h ^ (uint32_t)tok[i]) * 1099511628211ull;
    return h ^ (h >> 29);
}

static int same(const PrefixCache *pc, int b, int parent, unsigned pgen, const int *tok, unsigned how) {
    return pc->parent[b] == parent && pc->parent_gen[b] == pgen && pc->how[b] == how &&
           memcmp(pc->tokens + (size_t)b * pc->width, tok, sizeof(int) * pc->width) == 0;
}

int prefix_find(const PrefixCache *pc, int parent, const int *tok, unsigned how) {
    unsigned pgen = parent >= 0 ? pc->gen[parent] : 0;
    uint64_t i = key_of(pc, parent, pgen, tok, how);
    for (int probe = 0; probe < pc->cap; probe++, i++) {
        int b = pc->slots[i & (pc->cap - 1)];
        if (b == -1) return -1;
        if (b >= 0 && same(pc, b, parent, pgen, tok, how)) return b;
    }
    return -1;
}

// Places block b (indexed) in the first free or deleted slot of its probe sequence.
static void place(PrefixCache *pc, int b) {
    uint64_t i = key_of(pc, pc->parent[b], pc->parent_gen[b], pc->tokens + (size_t)b * pc->width, pc->how[b]);
    while (pc->slots[i & (pc->cap - 1)] >= 0) i++;
    if (pc->slots[i & (pc->cap - 1)] == -2) pc->n_dead--;
    pc->slots[i & (pc->cap - 1)] = b;
}

int prefix_insert(PrefixCache *pc, int parent, const int *tok, unsigned how, int b) {
    int have = prefix_find(pc, parent, tok, how);
    if (have >= 0) return have;
    if (pc->indexed[b]) prefix_evict(pc, b);  // (not expected: a block in use is not indexed twice)
    pc->parent[b] = parent;
    pc->parent_gen[b] = parent >= 0 ? pc->gen[parent] : 0;
    memcpy(pc->tokens + (size_t)b * pc->width, tok, sizeof(int) * pc->width);
    pc->how[b] = how;
    pc->indexed[b] = 1;
    place(pc, b);
    return b;
}

void prefix_evict(PrefixCache *pc, int b) {
    if (!pc->indexed[b]) return;
    for (uint64_t i = key_of(pc, pc->parent[b], pc->parent_gen[b], pc->tokens + (size_t)b * pc->width, pc->how[b]);; i++) {
        int *s = &pc->slots[i & (pc->cap - 1)];
        if (*s == -1) break;
        if (*s == b) {
            *s = -2;
            pc->n_dead++;
            break;
        }
    }
    pc->indexed[b] = 0;
    pc->gen[b]++;  // its children no longer match
    if (pc->n_dead > pc->cap / 4) {  // too many deleted slots lengthen every probe: rebuild
        for (int j = 0; j < pc->cap; j++) pc->slots[j] = -1;
        pc->n_dead = 0;
        for (int j = 0; j < pc->n_blocks; j++)
            if (pc->indexed[j]) place(pc, j);
    }
}
