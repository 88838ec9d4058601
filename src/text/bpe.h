// The byte-level BPE model: every piece starts as its bytes (each a token of its own) and adjacent
// pairs are merged by rank, lowest first and leftmost among equals, until no listed pair remains.
#ifndef DSV3_TEXT_BPE_H
#define DSV3_TEXT_BPE_H

#include <stddef.h>
#include <stdint.h>

#include "text/strmap.h"

// A growable list of token ids.
typedef struct TokIds {
    int *v;
    size_t n, cap;
} TokIds;

// Return 0, or -1 when memory runs out.
int ids_push(TokIds *t, int id);
int ids_append(TokIds *t, const int *ids, size_t n);
void ids_free(TokIds *t);

typedef struct BpeModel {
    int32_t byte_id[256];  // the token of each single byte
    // merges: pair (a, b) -> (rank, merged id), open addressing on the packed pair
    uint64_t *mkey;
    int32_t *mrank, *mnew;
    size_t mcap, nmerges;
    int ignore_merges;  // a piece that is itself a token is taken whole (Llama-3 style)
    StrMap whole;       // piece bytes -> id, filled only when ignore_merges is set
    // the word cache: piece bytes -> (offset << 32 | count) into pool
    StrMap cache;
    int32_t *pool;
    size_t npool, cappool;
} BpeModel;

void bpe_init(BpeModel *m);
void bpe_free(BpeModel *m);
// Adds a merge; a pair listed twice keeps its later rank (as both HF libraries do). -1 on OOM.
int bpe_add_merge(BpeModel *m, int32_t a, int32_t b, int32_t merged, int32_t rank);
// The rank of pair (a, b) with its merged id, or INT32_MAX when the pair is not a merge.
int32_t bpe_pair_rank(const BpeModel *m, int32_t a, int32_t b, int32_t *merged);
// Merges sym[0, n) in place and returns the new length. Short words use a quadratic scan, long ones
// a heap (force_heap selects the heap for any length, for tests); both give the same result.
// Returns -1 when memory runs out.
int bpe_merge(const BpeModel *m, int32_t *sym, int n, int force_heap);
// Appends the tokens of one piece (raw bytes, n > 0) to out, through the cache. -1 on OOM.
int bpe_encode_piece(BpeModel *m, const uint8_t *s, size_t n, TokIds *out);

#endif
