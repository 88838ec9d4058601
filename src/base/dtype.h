// Element types of tensors on disk and in memory, with the safetensors spelling of each.
#ifndef DSV3_BASE_DTYPE_H
#define DSV3_BASE_DTYPE_H

#include <stddef.h>

typedef enum DType {
    DT_F32 = 0,
    DT_BF16,
    DT_F16,
    DT_F8_E4M3,
    DT_I32,
    DT_I64,
    DT_COUNT
} DType;

size_t dtype_size(DType t);
const char *dtype_name(DType t);       // "F32", "BF16", "F16", "F8_E4M3", "I32", "I64"
int dtype_from_name(const char *name);  // DType, or -1 when unknown

#endif
