// One allocation plan: the sizes of a set of buffers are computed by the same function that lays
// pointers over the block, run twice — first over no memory to measure, then over the block.
//
//   static void lay(BufPlan *p, void *ctx) { S *s = ctx; s->x = PLAN_F(p, T * d);  // (T, d) ... }
//   s->block = bufplan_alloc(lay, s, &bytes, err, "forward activations");
#ifndef DSV3_BASE_BUFPLAN_H
#define DSV3_BASE_BUFPLAN_H

#include <stddef.h>

#include "base/error.h"

typedef struct BufPlan {
    char *base;   // NULL while measuring
    size_t used;  // bytes laid so far
} BufPlan;

// count elements of elem bytes, 64-byte aligned; NULL while measuring.
void *bufplan_take(BufPlan *p, size_t count, size_t elem);
#define PLAN_F(p, n) ((float *)bufplan_take((p), (size_t)(n), sizeof(float)))
#define PLAN_I(p, n) ((int *)bufplan_take((p), (size_t)(n), sizeof(int)))

// Runs lay once to measure, allocates the block (zeroed) and runs lay again over it. Returns the
// block (free() it) or NULL with err naming `what` and the size; *bytes gets the size.
void *bufplan_alloc(void (*lay)(BufPlan *p, void *ctx), void *ctx, size_t *bytes, Error *err, const char *what);

#endif
