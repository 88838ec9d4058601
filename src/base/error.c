#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/error.h"

int err_set(Error *err, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return -1;
}

int err_prefix(Error *err, const char *fmt, ...) {
    if (!err) return -1;
    char prefix[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    char joined[sizeof prefix + sizeof err->msg + 2];
    snprintf(joined, sizeof joined, "%s: %s", prefix, err->msg);
    memcpy(err->msg, joined, sizeof err->msg - 1);
    err->msg[sizeof err->msg - 1] = 0;
    return -1;
}

void *xmalloc(Error *err, size_t n, const char *what) {
    void *p = malloc(n ? n : 1);
    if (!p) err_set(err, "out of memory allocating %zu bytes for %s", n, what);
    return p;
}

void *xcalloc(Error *err, size_t count, size_t size, const char *what) {
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) err_set(err, "out of memory allocating %zu x %zu bytes for %s", count, size, what);
    return p;
}
