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

int backend_profile_ops(char *buf, size_t n, const BackendProfile *p, long steps, int top) {
    if (steps < 1 || p->n_ops < 1) return snprintf(buf, n, "no operation was timed");
    int order[BACKEND_PROFILE_OPS], k = p->n_ops;
    for (int i = 0; i < k; i++) order[i] = i;
    for (int i = 1; i < k; i++)  // (longest first; ties in the order they first ran)
        for (int j = i; j > 0 && p->op_seconds[order[j]] > p->op_seconds[order[j - 1]]; j--) {
            int t = order[j];
            order[j] = order[j - 1], order[j - 1] = t;
        }
    size_t at = 0;
    for (int i = 0; i < k && i < top && at < n; i++) {
        int o = order[i];
        at += snprintf(buf + at, n - at, "%s%s %.2f ms (%.0f calls)", i ? ", " : "", p->op_name[o],
                       1e3 * p->op_seconds[o] / steps, (double)p->op_calls[o] / steps);
    }
    return (int)at;
}
