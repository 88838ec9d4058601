// Errors carry their context up: a function that can fail takes an Error*, fills it with one
// line ("file: tensor X: what is wrong") and returns -1 (or NULL). The outermost caller prints it.
#ifndef DSV3_BASE_ERROR_H
#define DSV3_BASE_ERROR_H

#include <stdarg.h>
#include <stddef.h>

typedef struct Error {
    char msg[1024];
} Error;

// Sets err (if non-NULL) and returns -1, so callers can write `return err_set(err, ...)`.
int err_set(Error *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
// Prepends "prefix: " to an existing message; returns -1.
int err_prefix(Error *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

// Returns -1 from the calling function when x, a call that can fail, did (its error already set).
#define TRY(x)                   \
    do {                         \
        if ((x) != 0) return -1; \
    } while (0)

// Allocation that reports failure through err instead of returning NULL silently.
void *xmalloc(Error *err, size_t n, const char *what);
void *xcalloc(Error *err, size_t count, size_t size, const char *what);

#endif
