// One allocation plan: the sizes of a set of buffers are computed by the same function that lays
// pointers over the block, run twice — first over no memory to measure, then over the block.
//
//   static void lay(BufPlan *p, void *ctx) { S *s = ctx; s->x = PLAN_F(p, T * d);  // (T, d) ... }
//   size_t bytes = bufplan_size(lay, s);  ...allocate bytes (64-byte aligned)...  bufplan_lay(lay, s, block);
#ifndef DSV3_BASE_BUFPLAN_H
#define DSV3_BASE_BUFPLAN_H

#include <stddef.h>

typedef struct BufPlan {
    char *base;   // NULL while measuring
    size_t used;  // bytes laid so far
} BufPlan;

// count elements of elem bytes, 64-byte aligned; NULL while measuring.
void *bufplan_take(BufPlan *p, size_t count, size_t elem);
#define PLAN_F(p, n) ((float *)bufplan_take((p), (size_t)(n), sizeof(float)))
#define PLAN_I(p, n) ((int *)bufplan_take((p), (size_t)(n), sizeof(int)))

// The bytes the plan lays out (lay run over no memory), and the plan laid over a block of that
// size (64-byte aligned; whoever owns the memory allocates it — a backend, for activations).
size_t bufplan_size(void (*lay)(BufPlan *p, void *ctx), void *ctx);
void bufplan_lay(void (*lay)(BufPlan *p, void *ctx), void *ctx, void *block);

#endif
