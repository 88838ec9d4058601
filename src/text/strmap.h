// A hash map from byte strings to 64-bit values (open addressing, keys copied into one arena):
// the BPE word cache, whole-word lookup, and the trainer's word counts.
#ifndef DSV3_TEXT_STRMAP_H
#define DSV3_TEXT_STRMAP_H

#include <stddef.h>
#include <stdint.h>

#include "text/utf8.h"

// One slot, kept together so a probe touches one cache line before the key compare.
typedef struct StrSlot {
    uint64_t hash;  // 0 marks an empty slot
    uint64_t val;
    uint32_t koff, klen;
} StrSlot;

typedef struct StrMap {
    StrSlot *slots;
    size_t cap, count;  // cap is 0 or a power of two
    ByteBuf keys;
} StrMap;

uint64_t strmap_hash(const void *k, size_t n);
// The value slot of key k, or NULL when absent.
uint64_t *strmap_find(const StrMap *m, const void *k, size_t n);
// The value slot of key k, inserted (value 0, *is_new = 1) when absent; NULL when memory runs out.
uint64_t *strmap_insert(StrMap *m, const void *k, size_t n, int *is_new);
// The key stored in slot i (for iterating the slots with slots[i].hash != 0).
const uint8_t *strmap_key(const StrMap *m, size_t i, size_t *n);
void strmap_clear(StrMap *m);
void strmap_free(StrMap *m);

#endif
