#include <stdlib.h>
#include <string.h>

#include "base/bufplan.h"

void *bufplan_take(BufPlan *p, size_t count, size_t elem) {
    size_t off = (p->used + 63) & ~(size_t)63;
    p->used = off + count * elem;
    return p->base ? p->base + off : NULL;
}

void *bufplan_alloc(void (*lay)(BufPlan *p, void *ctx), void *ctx, size_t *bytes, Error *err, const char *what) {
    BufPlan p = {NULL, 0};
    lay(&p, ctx);
    size_t n = (p.used + 63) & ~(size_t)63;
    void *block = aligned_alloc(64, n ? n : 64);
    if (!block) {
        err_set(err, "out of memory for %s (%.1f MB)", what, n / 1e6);
        return NULL;
    }
    memset(block, 0, n);
    p = (BufPlan){block, 0};
    lay(&p, ctx);
    if (bytes) *bytes = n;
    return block;
}
