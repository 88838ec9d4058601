// The training loop behind `dsv3 train`: micro-batches with gradient accumulation, AdamW with
// clipping and the schedule, the loss-free bias update, evaluation, metrics, checkpoints, resume.
//
// A run directory holds metrics.jsonl (one JSON object per step, appended a whole line at a
// time), metrics.svg (loss and MaxVio curves, rewritten at the end) and checkpoints step-N/:
// config.json + model.safetensors (F32, loadable by `dsv3 logits` / `dsv3 generate`), the data's
// tokenizer.json when there is one, optimizer.safetensors (AdamW moments) and trainer_state.json
// (step, data position, and every option of the run). A checkpoint is written into step-N.tmp and
// renamed into place when complete, so an existing good checkpoint is never damaged.
//
// Resuming from a checkpoint continues the run bit for bit: the weights (router biases included),
// moments, step and data position are restored exactly, and the arithmetic is deterministic for a
// given machine and thread count.
#ifndef DSV3_TRAIN_TRAINER_H
#define DSV3_TRAIN_TRAINER_H

#include <stdint.h>

#include "base/error.h"

typedef struct TrainerOptions {
    char config[4096];  // model config.json of a new run (a resumed run has its checkpoint's)
    char init[4096];    // or "": a model directory whose config and weights (any stored dtype) start
                        // a new run instead of random weights
    char data[4096];    // data directory from `dsv3 prepare`
    char out[4096];     // run directory
    long steps;         // optimiser steps in all (a resumed run counts from its checkpoint)
    int batch;          // sequences per micro-batch
    int seq;            // positions per sequence
    int accum;          // micro-batches per step
    float lr;           // peak learning rate
    long warmup;        // linear warmup steps
    long decay_steps;   // cosine decay over the last decay_steps steps (to lr_final_frac · lr)
    float lr_final_frac;
    float weight_decay, grad_clip;
    float bias_update_speed;  // γ of the loss-free balancing
    float seq_aux_alpha;      // α of the sequence-wise balance loss
    float mtp_lambda;         // λ of the MTP loss
    long eval_every, eval_batches, save_every;  // 0: never (the last step always evaluates and saves)
    long stop_at;             // end this invocation after this step with a checkpoint (0: run to steps);
                              // not saved with the run: a resumed run goes on to `steps`
    uint64_t seed;            // weight init and data order
    int progress;             // live progress line on stderr
} TrainerOptions;

// The defaults of `dsv3 train` (SPEC §4, scaled to small runs).
TrainerOptions trainer_defaults(void);

// Finds the checkpoint to resume from: dir itself when it holds trainer_state.json, else the
// newest complete step-N/ inside it. out gets its path.
int trainer_find_checkpoint(const char *dir, char *out, size_t n, Error *err);
// Reads the options a checkpoint's run was started with.
int trainer_read_options(const char *ckpt, TrainerOptions *o, Error *err);

// Runs (or, with resume non-NULL, continues from that checkpoint) until o->steps.
int trainer_run(const TrainerOptions *o, const char *resume, Error *err);

// Draws metrics.jsonl as an SVG: training and validation loss, MaxVio (mean and worst layer).
int trainer_plot(const char *metrics_jsonl, const char *svg, Error *err);

#define TRAINER_PLOT_MAX_RUNS 10
// Draws n runs' metrics.jsonl side by side (n ≤ TRAINER_PLOT_MAX_RUNS): validation loss,
// training main loss and MaxVio (mean of layers), the last two as trailing means over `smooth`
// steps (1: raw), from step `from` on.
int trainer_plot_compare(const char *const *metrics_jsonl, const char *const *labels, int n, int smooth, long from,
                         const char *svg, Error *err);

#endif
