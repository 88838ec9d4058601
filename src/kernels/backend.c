// What every backend shares: the names and the report of a BackendProfile.
#include <stdio.h>

#include "kernels/backend.h"

const char *const backend_kind_names[BACKEND_KINDS] = {"bf16/fp8 products", "fp32 products", "attention core",
                                                        "cross-entropy", "optimizer", "element-wise and the rest"};

int backend_profile_summary(char *buf, size_t n, const BackendProfile *p, double seconds, long steps) {
    if (steps < 1 || seconds <= 0) return snprintf(buf, n, "no step was timed");
    double in_ops = 0, flops = 0;
    size_t at = 0;
    for (int k = 0; k < BACKEND_KINDS && at < n; k++) {
        in_ops += p->seconds[k], flops += p->flops[k];
        at += snprintf(buf + at, n - at, "%s%s %.1f ms (%.0f%%", k ? ", " : "", backend_kind_names[k],
                       1e3 * p->seconds[k] / steps, 100 * p->seconds[k] / seconds);
        if (at < n && p->flops[k] > 0 && p->seconds[k] > 0)
            at += snprintf(buf + at, n - at, ", %.0f GFLOP/s", p->flops[k] / p->seconds[k] / 1e9);
        if (at < n) at += snprintf(buf + at, n - at, ")");
    }
    if (at < n)
        at += snprintf(buf + at, n - at, ", outside the backend %.1f ms (%.0f%%); the FLOPs counted %.0f GFLOP/s over it all",
                       1e3 * (seconds - in_ops) / steps, 100 * (seconds - in_ops) / seconds, flops / seconds / 1e9);
    return (int)at;
}
