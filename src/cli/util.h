// Helpers shared by the subcommands.
#ifndef DSV3_CLI_UTIL_H
#define DSV3_CLI_UTIL_H

#include "base/dtype.h"
#include "base/error.h"
#include "cli/args.h"
#include "infer/engine.h"

// "5,17,3" → malloc'd ids; an empty list or a malformed id is an error naming the item.
int parse_token_list(const char *s, int **out, int *n, Error *err);
// --max-new, --temperature, --top-p, --top-k and --seed into *sp, whose fields on entry are the
// command's defaults; an error names the option.
int parse_sampling(const Args *a, SeqParams *sp, Error *err);
// --kv-dtype f32|bf16 (default f32) as the KV cache's element type; an error names the option.
int parse_kv_dtype(const Args *a, DType *out, Error *err);
// Monotonic wall-clock seconds, for the commands' --stats lines.
double cli_now(void);
// Prints "dsv3 CMD: message" to stderr and returns 1 (the exit status).
int cli_fail(const char *cmd, const Error *err);

#endif
