// dsv3 init: a randomly initialised checkpoint in the HuggingFace format.
#include <stdio.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/util.h"
#include "model/config.h"
#include "model/convert_checkpoint.h"
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
    DType dt;
    if (ckpt_dtype_parse(args_str(&a, "dtype", "bf16"), "--dtype", &dt, &err)) return cli_fail(cmd, &err);
    ModelConfig c;
    if (config_load(&c, cfg_path, &err) ||
        model_write_random(&c, out, (uint64_t)seed, dt, (size_t)shard_mb << 20, &err))
        return cli_fail(cmd, &err);
    return 0;
}
