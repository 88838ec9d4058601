#include "base/bigmem.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>

void *bigmem_alloc(size_t n, const char *what, Error *err) {
    void *p = mmap(NULL, n ? n : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        err_set(err, "cannot allocate %zu bytes for %s: %s", n, what, strerror(errno));
        return NULL;
    }
    madvise(p, n ? n : 1, MADV_HUGEPAGE);  // advice only
    return p;
}

void bigmem_free(void *p, size_t n) {
    if (p) munmap(p, n ? n : 1);
}
