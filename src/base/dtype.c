#include <string.h>

#include "base/dtype.h"

static const struct {
    const char *name;
    size_t size;
} dtype_table[DT_COUNT] = {
    [DT_F32] = {"F32", 4},  [DT_BF16] = {"BF16", 2}, [DT_F16] = {"F16", 2},
    [DT_F8_E4M3] = {"F8_E4M3", 1}, [DT_I32] = {"I32", 4}, [DT_I64] = {"I64", 8},
};

size_t dtype_size(DType t) { return (unsigned)t < DT_COUNT ? dtype_table[t].size : 0; }

const char *dtype_name(DType t) { return (unsigned)t < DT_COUNT ? dtype_table[t].name : "?"; }

int dtype_from_name(const char *name) {
    for (int i = 0; i < DT_COUNT; i++)
        if (strcmp(name, dtype_table[i].name) == 0) return i;
    return -1;
}
