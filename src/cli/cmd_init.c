// dsv3 init: a randomly initialised checkpoint in the HuggingFace format.
#include <stdio.h>
#include <string.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/util.h"
#include "model/config.h"
#include "model/init.h"

static const char *const VALUED[] = {"config", "out", "seed", "dtype", "shard-mb", NULL};

int cmd_init(int argc, char **argv) {
    const char *cmd = "dsv3 init";
    Error err = {0};
    Args a;
    const char *cfg_path, *out;
    long seed, shard_mb;
    if (args_parse(&a, cmd, argc, argv, VALUED, NULL, &err) || args_require(&a, "config", &cfg_path, &err) ||
        args_require(&a, "out", &out, &err) || args_long(&a, "seed", 0, 0, 0x7fffffffL, &seed, &err) ||
        args_long(&a, "shard-mb", 4096, 1, 1 << 20, &shard_mb, &err))
        return cli_fail(cmd, &err);
    const char *dts = args_str(&a, "dtype", "bf16");
    DType dt;
    if (strcmp(dts, "bf16") == 0) dt = DT_BF16;
    else if (strcmp(dts, "fp8") == 0) dt = DT_F8_E4M3;
    else if (strcmp(dts, "f32") == 0) dt = DT_F32;
    else {
        err_set(&err, "--dtype: '%s' is not bf16, fp8 or f32", dts);
        return cli_fail(cmd, &err);
    }
    ModelConfig c;
    if (config_load(&c, cfg_path, &err) ||
        model_write_random(&c, out, (uint64_t)seed, dt, (size_t)shard_mb << 20, &err))
        return cli_fail(cmd, &err);
    return 0;
}
