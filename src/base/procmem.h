// The process's memory as Linux reports it (/proc/self): the peak resident set, for the training
// log and the benchmarks' "peak memory" figures.
#ifndef DSV3_BASE_PROCMEM_H
#define DSV3_BASE_PROCMEM_H

#include <stddef.h>

// Peak resident set size (VmHWM) in bytes since the start or the last procmem_reset_peak; 0 when
// /proc is not readable.
size_t procmem_peak_bytes(void);
// The resident set size now (VmRSS), in bytes; 0 when unknown.
size_t procmem_resident_bytes(void);
// Starts a new peak measurement (writes 5 to /proc/self/clear_refs); -1 when the kernel refuses.
int procmem_reset_peak(void);

#endif
