// Pipeline-parallel bubbles and memory (DeepSeek-V3 report, Table 2): 1F1B, zero-bubble ZB1P and
// DualPipe, which feeds micro-batches from both ends and overlaps a forward with a backward chunk.
#include <stdio.h>
#include <string.h>

#include "plan/plan.h"

int plan_pipeline(int64_t pp, double f, double b, double w, double fb, PlanPipe out[3], Error *err) {
    if (pp < 2) return err_set(err, "pipeline: PP is %lld; a pipeline needs at least 2 stages", (long long)pp);
    if (!(f > 0) || !(b > 0) || !(fb > 0) || !(w >= 0))
        return err_set(err, "pipeline: F, B and F&B must be positive and W not negative (F %g, B %g, W %g, F&B %g)",
                       f, b, w, fb);
    // W is the weight-gradient part of the full backward chunk B
    if (w > b) return err_set(err, "pipeline: W %g exceeds B %g, the full backward chunk it is part of", w, b);
    double zb = f + b - 2 * w, dual = fb + b - 3 * w;
    if (zb < 0 || dual < 0)
        return err_set(err, "pipeline: W %g is too large for F %g, B %g, F&B %g: a bubble would be negative",
                       w, f, b, fb);
    out[0] = (PlanPipe){"1F1B", "(PP-1)(F+B)", 1, (double)(pp - 1) * (f + b), 1, pp};
    out[1] = (PlanPipe){"ZB1P", "(PP-1)(F+B-2W)", 1, (double)(pp - 1) * zb, 1, pp};
    // DualPipe places two stages (one per direction) on each device, hence 2x parameters
    out[2] = (PlanPipe){"DualPipe", "(PP/2-1)(F&B+B-3W)", pp % 2 == 0, 0, 2, pp + 1};
    if (out[2].defined) out[2].bubble = (double)(pp / 2 - 1) * dual;
    return 0;
}
