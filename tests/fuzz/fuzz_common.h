// Shared by the fuzz targets (libFuzzer, `make fuzz`): the parsers that take a path get the input
// as a file of this process.
#ifndef DSV3_TESTS_FUZZ_COMMON_H
#define DSV3_TESTS_FUZZ_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

// Writes data to a file named after the process and suffix; returns its path (static storage).
static const char *fuzz_file(const uint8_t *data, size_t size, const char *suffix) {
    static char path[256];
    snprintf(path, sizeof path, "/tmp/dsv3-fuzz-%d%s", (int)getpid(), suffix);
    FILE *f = fopen(path, "wb");
    if (!f) abort();
    if (size && fwrite(data, 1, size, f) != size) abort();
    fclose(f);
    return path;
}

#endif
