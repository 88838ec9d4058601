// config.json of any bytes: loaded or refused with an error, and a loaded one's layers and tensor
// table can be walked.
#include "model/config.h"
#include "model/tensors.h"
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    ModelConfig c;
    Error err;
    if (config_load(&c, fuzz_file(data, size, ".json"), &err) == 0) {
        // the walk of a loaded config (bounded: a huge config is valid but slow to list)
        if ((long long)c.num_hidden_layers * (c.n_routed_experts + 8) < 100000) {
            ParamCounts p = tensor_count_params(&c);
            (void)p;
        }
    }
    return 0;
}
