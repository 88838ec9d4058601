#include "base/bigmem.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

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

int bigmem_prefault(void *p, size_t n) {
    long page = sysconf(_SC_PAGESIZE), free_pages = sysconf(_SC_AVPHYS_PAGES);
    if (!p || page <= 0 || free_pages <= 0 || n / (size_t)page >= (size_t)free_pages) return 0;
    // one write a page: the kernel zero-fills it (a huge page at a time where THP gives one), and a
    // block fresh from mmap holds zeros already
    volatile char *c = p;
    for (size_t i = 0; i < n; i += (size_t)page) c[i] = 0;
    return 1;
}
