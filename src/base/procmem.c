#include <stdio.h>
#include <string.h>

#include "base/procmem.h"

// A "Key:   N kB" line of /proc/self/status, in bytes (0: unknown).
static size_t status_kb(const char *key) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return 0;
    char line[256];
    size_t kb = 0, n = strlen(key);
    while (fgets(line, sizeof line, f))
        if (strncmp(line, key, n) == 0 && sscanf(line + n, "%zu", &kb) == 1) break;
    fclose(f);
    return kb * 1024;
}

size_t procmem_peak_bytes(void) { return status_kb("VmHWM:"); }
size_t procmem_resident_bytes(void) { return status_kb("VmRSS:"); }

int procmem_reset_peak(void) {
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (!f) return -1;
    int ok = fputs("5", f) >= 0;
    return fclose(f) == 0 && ok ? 0 : -1;
}
