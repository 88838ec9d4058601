// dsv3 convert: a checkpoint into another storage dtype (the released FP8 format, BF16 or F32).
#include <stdio.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/util.h"
#include "model/convert_checkpoint.h"

static const char *const VALUED[] = {"model", "out", "dtype", "shard-mb", NULL};
static const char *const FLAGS[] = {"force", NULL};

int cmd_convert(int argc, char **argv) {
    const char *cmd = "dsv3 convert";
    Error err = {0};
    Args a;
    const char *in, *out, *dts;
    long shard_mb;
    DType dt;
    if (args_parse(&a, cmd, argc, argv, VALUED, FLAGS, &err) || args_require(&a, "model", &in, &err) ||
        args_require(&a, "out", &out, &err) || args_require(&a, "dtype", &dts, &err) ||
        ckpt_dtype_parse(dts, "--dtype", &dt, &err) || args_long(&a, "shard-mb", 0, 1, 1 << 20, &shard_mb, &err))
        return cli_fail(cmd, &err);
    if (a.npos > 0) {
        err_set(&err, "unexpected argument '%s'", a.pos[0]);
        return cli_fail(cmd, &err);
    }
    ConvertStats st;
    size_t shard_bytes = shard_mb > 0 ? (size_t)shard_mb << 20 : (size_t)-1;
    if (checkpoint_convert(in, out, dt, shard_bytes, args_flag(&a, "force"), &st, &err)) return cli_fail(cmd, &err);
    printf("%s: %d tensors, %zu bytes of data", out, st.tensors, st.bytes);
    if (st.fp8) printf(" (%d F8_E4M3 weights with 128x128 block scales)", st.fp8);
    printf("\n");
    return 0;
}
