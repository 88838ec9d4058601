#include "base/bufplan.h"

void *bufplan_take(BufPlan *p, size_t count, size_t elem) {
    size_t off = (p->used + 63) & ~(size_t)63;
    p->used = off + count * elem;
    return p->base ? p->base + off : NULL;
}

size_t bufplan_size(void (*lay)(BufPlan *p, void *ctx), void *ctx) {
    BufPlan p = {NULL, 0};
    lay(&p, ctx);
    return p.used;
}

void bufplan_lay(void (*lay)(BufPlan *p, void *ctx), void *ctx, void *block) {
    BufPlan p = {block, 0};
    lay(&p, ctx);
}
