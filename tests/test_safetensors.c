#include <stdio.h>
#include <string.h>

#include "base/safetensors.h"
#include "test.h"

TEST(test_safetensors_round_trip) {
    char path[512];
    snprintf(path, sizeof path, "%s/rt.safetensors", test_tmpdir());
    float a[6] = {1, 2, 3, 4, 5, 6};
    uint16_t b[3] = {0x3f80, 0x4000, 0xc040};
    StTensorDesc d[2] = {{"a.weight", DT_F32, 2, {2, 3}, a}, {"b", DT_BF16, 1, {3}, b}};
    Error err = {0};
    CHECK_MSG(st_write(path, d, 2, &err) == 0, "%s", err.msg);
    StFile f;
    CHECK_MSG(st_open(&f, path, &err) == 0, "%s", err.msg);
    const StTensor *t = st_find(&f, "a.weight");
    CHECK(t && t->dtype == DT_F32 && t->ndim == 2 && t->shape[0] == 2 && t->shape[1] == 3);
    CHECK(memcmp(t->data, a, sizeof a) == 0);
    t = st_find(&f, "b");
    CHECK(t && t->dtype == DT_BF16 && memcmp(t->data, b, sizeof b) == 0);
    CHECK(st_find(&f, "missing") == NULL);
    st_close(&f);
}
