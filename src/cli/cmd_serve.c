// dsv3 serve: the OpenAI-compatible server (src/serve/server.h); this file only reads the options.
#include <stdio.h>

#include "base/safetensors.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "cli/util.h"
#include "serve/server.h"

static const char *const VALUED[] = {"model", "host", "port", "parallel", "ctx", "kv-dtype", "speculative", "api-key",
                                     "alias", "max-queue", "timeout", "max-body", "sse-ping", "compute", "decode-tiles", NULL};
static const char *const FLAGS[] = {"no-mmap", "no-prefix-cache", "profile", NULL};

int cmd_serve(int argc, char **argv) {
    const char *cmd = "dsv3 serve";
    Error err = {0};
    Args a;
    ServeOptions o = {0};
    long port, parallel, ctx, spec, queue, timeout, max_body, ping;
    if (args_parse(&a, cmd, argc, argv, VALUED, FLAGS, &err) || args_require(&a, "model", &o.model_dir, &err) ||
        args_long(&a, "port", 8080, 0, 65535, &port, &err) || args_long(&a, "parallel", 4, 1, 1024, &parallel, &err) ||
        args_long(&a, "ctx", 4096, 2, 1 << 24, &ctx, &err) || args_long(&a, "speculative", 0, 0, ENGINE_MAX_SPECULATIVE, &spec, &err) ||
        args_long(&a, "max-queue", 64, 0, 1 << 20, &queue, &err) || args_long(&a, "timeout", 600, 1, 86400, &timeout, &err) ||
        args_long(&a, "max-body", 8L << 20, 1024, 1L << 30, &max_body, &err) ||
        args_long(&a, "sse-ping", 10, 1, 3600, &ping, &err) || parse_kv_dtype(&a, "auto", &o.kv_dtype, &o.kv_auto, &err) ||
        parse_compute(&a, "auto", &o.compute, &err) || parse_decode_tiles(&a, parallel, &o.decode_tile_rows, &err))
        return cli_fail(cmd, &err);
    if (a.npos > 0) {
        err_set(&err, "unexpected argument '%s'", a.pos[0]);
        return cli_fail(cmd, &err);
    }
    if (args_flag(&a, "no-mmap")) st_set_load_mode(ST_READ);
    o.host = args_str(&a, "host", "127.0.0.1");
    o.port = (int)port;
    o.parallel = (int)parallel;
    o.ctx = (int)ctx;
    o.speculative = (int)spec;
    o.prefix_cache = !args_flag(&a, "no-prefix-cache");
    o.profile = args_flag(&a, "profile");
    o.api_key = args_str(&a, "api-key", NULL);
    o.alias = args_str(&a, "alias", NULL);
    o.max_queue = (int)queue;
    o.timeout_s = (int)timeout;
    o.max_body = max_body;
    o.ping_s = (double)ping;
    if (serve_run(&o, &err)) return cli_fail(cmd, &err);
    return 0;
}
