// Helpers shared by the subcommands.
#ifndef DSV3_CLI_UTIL_H
#define DSV3_CLI_UTIL_H

#include "base/dtype.h"
#include "base/error.h"
#include "cli/args.h"
#include "dist/expert_parallel.h"
#include "infer/engine.h"
#include "model/model.h"

// "5,17,3" → malloc'd ids; an empty list or a malformed id is an error naming the item.
int parse_token_list(const char *s, int **out, int *n, Error *err);
// --max-new, --temperature, --top-p, --top-k and --seed into *sp, whose fields on entry are the
// command's defaults; an error names the option.
int parse_sampling(const Args *a, SeqParams *sp, Error *err);
// --logit-bias ID=BIAS[,ID=BIAS...] (OpenAI's logit_bias: BIAS in [-100, 100] added to that id's
// logit): *ids and *values allocated (free them), *n pairs; none when the option is absent.
int parse_logit_bias(const Args *a, int **ids, float **values, int *n, Error *err);
// --kv-dtype f32|bf16|auto (default dflt) as the KV cache's element type: *out, or *is_auto set
// for auto (model_kv_dtype_auto once the model's compute is set); an error names the option.
int parse_kv_dtype(const Args *a, const char *dflt, DType *out, int *is_auto, Error *err);
// Monotonic wall-clock seconds, for the commands' --stats lines.
double cli_now(void);
// --compute f32|bf16|auto (default dflt) as model_set_compute's mode; an error names the option.
int parse_compute(const Args *a, const char *dflt, ComputeMode *mode, Error *err);
// --decode-tiles auto|on|off: which products on weight panels run on the AMX tiles
// (model_set_panel_tiles): auto those that win at steps of `parallel` sequences, on every one, off
// none. *rows: what to pass it.
int parse_decode_tiles(const Args *a, long parallel, long *rows, Error *err);
// --expert-parallel E (default 1), which must be the run's number of processes (mpirun -np E).
int cli_expert_parallel_size(const Args *a, long *E, Error *err);
// Splits m's routed experts over the world's ranks, every rank running the same tokens
// (expert_parallel_seam_replicated): m->moe_parallel is set; *ep to free after the model's use.
int cli_expert_parallel_start(Model *m, ExpertParallel **ep, Error *err);
// Rank 0 prints every rank's weight bytes — what it reads of the weights (its experts only) — and
// its resident memory. Collective.
int cli_report_expert_ranks(const ExpertParallel *ep, Model *m, Error *err);
// cli_fail for a failure every rank of the run meets alike: rank 0 alone prints it. Returns 1.
int cli_fail_once(const char *cmd, const Error *err);
// Prints "dsv3 CMD: message" to stderr and returns 1 (the exit status).
int cli_fail(const char *cmd, const Error *err);

#endif
