// The prefix cache's index: which retained cache blocks hold which token prefixes, so a prompt
// that starts like an earlier one (a system prompt, a chat's history) reuses those blocks instead
// of computing them again (vLLM's automatic prefix caching, in blocks of the KV pool).
//
// A block is known exactly — no hash is trusted — by its parent (the indexed block before it in
// the sequence, with the parent's generation, bumped when a block is evicted so its old children
// can no longer match), its `width` tokens: the block_size tokens it holds, plus the token after
// them when the MTP module's rows are cached (the module's row t depends on token t + 1), and how
// its positions were computed (`how`, the caller's: a bit per position), since rows computed
// another way hold other bits and a prompt reusing them would answer differently than alone.
#ifndef DSV3_INFER_PREFIX_CACHE_H
#define DSV3_INFER_PREFIX_CACHE_H

#include "base/error.h"

typedef struct PrefixCache {
    int n_blocks, width;
    int *tokens;        // (n_blocks, width) what each indexed block holds
    unsigned *how;      // (n_blocks) how its positions were computed
    int *parent;        // (n_blocks) the indexed parent, -1 for a sequence's first block
    unsigned *parent_gen;
    unsigned *gen;      // (n_blocks)
    int *indexed;       // (n_blocks) 0 / 1
    int *slots;         // (cap) open addressing: a block id, -1 empty, -2 deleted
    int cap, n_dead;    // slots, deleted slots (the table is rebuilt when they pass cap / 4)
} PrefixCache;

int prefix_init(PrefixCache *pc, int n_blocks, int width, Error *err);
void prefix_free(PrefixCache *pc);
// The indexed block whose parent is `parent` (-1: a first block), that holds tok[0 .. width) and
// whose positions were computed as `how` says, or -1.
int prefix_find(const PrefixCache *pc, int parent, const int *tok, unsigned how);
// Indexes block b as that child of parent; returns b, or the block already indexed with that
// content (b is then not indexed).
int prefix_insert(PrefixCache *pc, int parent, const int *tok, unsigned how, int b);
// Block b's content is gone (the pool evicted it): it leaves the index.
void prefix_evict(PrefixCache *pc, int b);

#endif
