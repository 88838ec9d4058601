// A safetensors file of any bytes: st_open accepts it only if every tensor's header entry and data
// lie inside the file, so reading each tensor's first and last byte must stay in bounds.
#include "base/safetensors.h"
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    StFile f;
    Error err;
    if (st_open(&f, fuzz_file(data, size, ".safetensors"), &err) == 0) {
        volatile uint8_t sink = 0;
        for (int i = 0; i < f.n; i++)
            if (f.tensors[i].nbytes) {
                const uint8_t *p = f.tensors[i].data;
                sink ^= p[0] ^ p[f.tensors[i].nbytes - 1];
            }
        (void)sink;
        st_close(&f);
    }
    return 0;
}
