#include "base/bigmem.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
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

long long bigmem_huge_bytes(const void *const *ps, int n, long long *resident) {
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f) return -1;
    char line[512], found[n > 0 ? n : 1];
    memset(found, 0, sizeof found);
    int in = 0;
    long long rss = 0, huge = 0;
    while (fgets(line, sizeof line, f)) {  // (one pass over the mappings, however many pointers)
        unsigned long long lo, hi, kb;
        char key[64];
        // a mapping's header starts with its lowercase hex range, its fields with a capitalised key
        if (line[0] && strchr("0123456789abcdef", line[0]) && sscanf(line, "%llx-%llx ", &lo, &hi) == 2) {
            in = 0;
            for (int i = 0; i < n; i++)
                if ((uintptr_t)ps[i] >= lo && (uintptr_t)ps[i] < hi) found[i] = in = 1;
        } else if (in && sscanf(line, "%63[^:]: %llu kB", key, &kb) == 2) {
            if (strcmp(key, "Rss") == 0) rss += (long long)kb << 10;
            if (strcmp(key, "AnonHugePages") == 0 || strcmp(key, "FilePmdMapped") == 0) huge += (long long)kb << 10;
        }
    }
    fclose(f);
    for (int i = 0; i < n; i++)
        if (!found[i]) return -1;
    if (resident) *resident = rss;
    return huge;
}
