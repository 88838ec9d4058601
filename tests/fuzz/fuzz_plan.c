// A configuration for `dsv3 plan` of any bytes (HF config.json of DeepSeek, LLaMA, Qwen, ...):
// parsed or refused with an error; a parsed one's cost model is computed.
#include <string.h>

#include "plan/plan.h"
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *text = malloc(size + 1);
    if (!text) return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    PlanArch a;
    Error err;
    if (plan_arch_from_json(&a, text, "fuzz", &err) == 0 && plan_moe_layers(&a) < 100000) {
        PlanModel m;
        plan_model(&a, 4096, &m);
    }
    free(text);
    return 0;
}
