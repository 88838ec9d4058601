// The training loop behind `dsv3 train`: micro-batches with gradient accumulation, AdamW with
// clipping and the schedule, the loss-free bias update, evaluation, metrics, checkpoints, resume.
//
// A run directory holds metrics.jsonl (one JSON object per step, appended a whole line at a
// time), metrics.svg (loss and MaxVio curves, rewritten at the end) and checkpoints step-N/:
// config.json + model.safetensors (F32 by default; --save-dtype bf16|fp8 stores it so, the FP8
// one in the released block-scaled format, with the F32 master weights beside it in master/;
// loadable by `dsv3 logits` / `dsv3 generate`), the data's
// tokenizer.json when there is one, optimizer.safetensors (AdamW moments) and trainer_state.json
// (step, data position, and every option saved with the run). A checkpoint is written into step-N.tmp and
// renamed into place when complete, so an existing good checkpoint is never damaged.
//
// Resuming from a checkpoint continues the run bit for bit: the weights (router biases included),
// moments, step and data position are restored exactly, and the arithmetic is deterministic for a
// given machine and thread count.
#ifndef DSV3_TRAIN_TRAINER_H
#define DSV3_TRAIN_TRAINER_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "base/error.h"
#include "kernels/backend.h"

// The options of a run. Every field is one row of trainer_options[] (trainer.c), which gives its
// command-line name, its trainer_state.json key, default, bounds and help; read the rows there.
typedef struct TrainerOptions {
    char config[4096], init[4096], data[4096], out[4096];
    char precision[32], fp8_grad[32], fp8_scaling[32], fp8_promotion[32], fp8_scale_format[32], moments[32];  // "": the default
    char head_precision[32];  // the output heads' GEMMs: "fp32" (also when empty) or "bf16"
    int fp8_accum_bits;
    long steps;
    int batch, seq, accum;
    float lr;
    long warmup, decay_steps;
    float lr_final_frac, weight_decay, grad_clip, bias_update_speed, seq_aux_alpha, mtp_lambda;
    long eval_every, eval_batches, save_every, stop_at;
    uint64_t seed;
    char save_dtype[32];  // "f32" (also when empty), "bf16" or "fp8"
    int progress;  // a live progress line on stderr (the library's default: none)
    int profile;   // time each step's backend operations by kind into TrainerResult.profile
    int data_parallel;    // copies of each routed expert (0: the processes of the run / expert_parallel)
    int expert_parallel;  // ranks that split the routed experts (1: none)
    char a2a_dtype[32];   // their exchanges' payloads: fp32 (also when empty), bf16, fp8
    int ranks_per_node;   // consecutive ranks that share a node (0: as the launcher placed them)
    char ep_overlap[32];  // "on" (also when empty): a layer's tokens in two chunks, one's exchange in flight
                          // while the other's experts run; "off"
} TrainerOptions;

// The C type of an option's field. A flag takes no value on the command line: giving it stores lo.
typedef enum { TOPT_INT, TOPT_LONG, TOPT_UINT64, TOPT_FLOAT, TOPT_STRING, TOPT_FLAG } TrainerOptionType;

// One option of `dsv3 train`. Adding an option is adding a field above and a row to the table
// (the compiler checks the row's type against the field): the defaults, trainer_state.json
// (written and read), the command line and its --help all walk the table.
typedef struct TrainerOption {
    const char *name;  // on the command line: --name
    const char *key;   // in trainer_state.json's "options"; NULL: not saved with the run, so a resumed
                       // run starts from the default (or the command line) again
    TrainerOptionType type;
    size_t offset, size;  // of the field in TrainerOptions
    double dflt;          // numbers and flags; strings start empty
    double lo, hi;        // the accepted range of a number (a stored default may lie outside it: −1 = auto)
    const char *arg;      // the value's placeholder in --help: "N", "FILE"
    const char *help;     // one line
} TrainerOption;

// The table, ended by a row whose name is NULL.
extern const TrainerOption trainer_options[];

// Set one option's field: a number (integer types and flags, or TOPT_FLOAT), or a string, which
// returns -1 without changing the field when it does not fit.
void trainer_option_set_integer(TrainerOptions *o, const TrainerOption *t, long long v);
void trainer_option_set_real(TrainerOptions *o, const TrainerOption *t, double v);
int trainer_option_set_string(TrainerOptions *o, const TrainerOption *t, const char *v);

// The linear layers' recipe of --precision, --fp8-grad and --fp8-scaling: *lowp is NULL for fp32,
// else recipe. An unknown value (of these or --moments), or an fp8 option without --precision fp8,
// is an error.
int trainer_recipe(const TrainerOptions *o, LinearRecipe *recipe, const LinearRecipe **lowp, Error *err);

// The defaults of `dsv3 train` (SPEC §4, scaled to small runs).
TrainerOptions trainer_defaults(void);

// Finds the checkpoint to resume from: dir itself when it holds trainer_state.json, else the
// newest complete step-N/ inside it. out gets its path.
int trainer_find_checkpoint(const char *dir, char *out, size_t n, Error *err);
// The "options" object of trainer_state.json: every saved option under its key. NULL with err
// filled when a string is not valid UTF-8.
json_t *trainer_options_json(const TrainerOptions *o, Error *err);
// Reads the options a checkpoint's run was saved with. A key the file lacks (an option added
// after the run was saved) keeps its default; a value of the wrong type or out of range is an
// error naming the file and the key.
int trainer_read_options(const char *ckpt, TrainerOptions *o, Error *err);

// What a run reports at its end, for the caller to print.
typedef struct TrainerResult {
    long step;          // the step the run stopped at; its checkpoint is out/step-N
    long steps;         // the run's total (step < steps: stopped early by stop_at)
    long long tokens;   // tokens trained on since step 0
    double loss;        // the last step's training loss
    double val_loss;    // of the last evaluation after a step of this invocation, NAN if none ran
    size_t peak_bytes;  // the process's peak resident memory (0: unknown)
    // Several processes (dist.h): ranks = data_parallel × expert_parallel; the gradient sum's bytes
    // sent per step by a rank, its time alone (a blocking sum of the whole gradient, the fastest of
    // three) and its mean time per step spent in it (waiting for other ranks included).
    int ranks, data_parallel, expert_parallel;
    double sync_bytes, sync_alone_s, sync_exposed_s;
    // Expert parallelism, per step and rank: bytes sent by dispatch and combine (forward and
    // backward), time in those all-to-alls, and the ranks a routed token reached on average.
    double a2a_dispatch_bytes, a2a_combine_bytes, a2a_s, a2a_wait_s, ranks_per_token;
    long long params_held, params_total;  // parameters in this rank's memory, and in the model
    // Nodes (--ranks-per-node): the mean and most nodes one token's routed experts lay on (over all
    // ranks), and the bytes a rank sent within its node and to other nodes per routed token and
    // MoE layer (dispatch and combine, forward and backward).
    double nodes_per_token, intra_node_bytes_per_token, inter_node_bytes_per_token;
    int max_nodes, ranks_per_node;
    // TrainerOptions.profile: this rank's steps of this invocation (from zeroing the gradients to the
    // bias update; not the evaluations, metrics and checkpoints), their seconds and operations
    long profile_steps;
    double profile_s;
    BackendProfile profile;
    // On failure: the rank that reports the error (the lowest that failed, agreed by all ranks,
    // which all return -1), or -1 when a rank failed alone in the middle of a step, where the others
    // may be waiting for it: the caller then ends the run (dist_abort).
    int failed_rank;
} TrainerResult;

// Runs (or, with resume non-NULL, continues from that checkpoint) until o->steps.
// Prints nothing on stdout; with o->progress a live line on stderr. res gets the summary.
//
// Data parallel (o->data_parallel ranks of dist_world(), after dist_init): every rank holds the
// whole model and optimiser; each micro-batch of o->batch sequences is split into equal shares
// (rank r takes sequences r·B/D .. (r+1)·B/D − 1 of it), each rank's gradients are scaled by 1/D and
// summed over the ranks in buckets (TrainGradGroup) as the backward pass completes them, in rank
// order, so every rank applies the same update; losses and expert loads are summed the same way.
// Rank 0 alone writes the run directory and reports progress.
int trainer_run(const TrainerOptions *o, const char *resume, TrainerResult *res, Error *err);

// Draws metrics.jsonl as an SVG: training and validation loss, MaxVio (mean and worst layer).
int trainer_plot(const char *metrics_jsonl, const char *svg, Error *err);

#define TRAINER_PLOT_MAX_RUNS 10
// Draws n runs' metrics.jsonl side by side (n ≤ TRAINER_PLOT_MAX_RUNS): validation loss,
// training main loss and MaxVio (mean of layers), the last two as trailing means over `smooth`
// steps (1: raw), from step `from` on.
int trainer_plot_compare(const char *const *metrics_jsonl, const char *const *labels, int n, int smooth, long from,
                         const char *svg, Error *err);

#endif
