// The JSON-object prefix automaton of JSON mode (src/text/json_prefix.h) on any bytes: fed whole
// and fed in two pieces it says the same; what it calls a complete object, jansson (with its
// defaults) parses as one.
#include <jansson.h>
#include <stdlib.h>

#include "text/json_prefix.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    JsonPrefix whole, split;
    json_prefix_init(&whole);
    json_prefix_init(&split);
    int a = json_prefix_feed(&whole, (const char *)data, size);
    size_t cut = size ? data[0] % (size + 1) : 0;
    int b = json_prefix_feed(&split, (const char *)data, cut);
    if (b == 0) b = json_prefix_feed(&split, (const char *)data + cut, size - cut);
    if (a != b || (a == 0 && json_prefix_complete(&whole) != json_prefix_complete(&split))) abort();
    if (a == 0 && json_prefix_complete(&whole)) {
        json_t *o = json_loadb((const char *)data, size, 0, NULL);
        if (!o || !json_is_object(o)) abort();
        json_decref(o);
    }
    return 0;
}
