// Large buffers that live as long as a model or an engine (weights read into memory, the latent
// cache pool): anonymous mappings advised for transparent huge pages, so that first touching them
// costs one page fault per 2 MB instead of one per 4 KB (a fault is microseconds on the VMs here:
// an engine's fresh pool faulting in during its first decode steps cost ~3 us per cached row of
// bench/configs' v3-108m) and streaming them misses the TLB less. Advice only: without THP they are
// ordinary pages.
#ifndef DSV3_BASE_BIGMEM_H
#define DSV3_BASE_BIGMEM_H

#include <stddef.h>

#include "base/error.h"

// n bytes, zero-filled, readable and writable; NULL with err set (naming what) when it fails.
void *bigmem_alloc(size_t n, const char *what, Error *err);
// Touches every page of [p, p + n) of a fresh bigmem_alloc block, so that its first use does not
// fault, when the machine has that much memory free now (else leaves it to fault in as used: a
// pool sized for more than the machine holds still works while it is not all used). Returns 1 when
// it touched them. (An engine's fresh cache pool faulting in during its first decode steps cost a
// v3-108m FP8 step of one sequence ~5%, of 16 sequences ~1.4%.)
int bigmem_prefault(void *p, size_t n);
// Frees what bigmem_alloc returned for the same n (NULL: nothing).
void bigmem_free(void *p, size_t n);
// The bytes of the mappings holding ps[0 .. n) that are resident (*resident) and, returned, how
// many of them are mapped 2 MB at a time (anonymous: AnonHugePages; a file's: FilePmdMapped), each
// mapping counted once, from /proc/self/smaps; -1 where that cannot be read or lists no mapping
// holding one of them.
long long bigmem_huge_bytes(const void *const *ps, int n, long long *resident);

#endif
