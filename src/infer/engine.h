// The inference engine: a loaded model, the KV-cache memory of up to `parallel` sequences, and the
// sequences it advances. The contract the command line (and later the server) uses: add a
// sequence (its prompt, sampler, stop conditions and a callback for its tokens), step the engine,
// cancel a sequence; each new token reaches its owner through the callback as it is produced.
//
// A sequence waits until a slot (a cache of ctx positions) is free, then runs: its first steps
// prefill the prompt in chunks of at most prefill_chunk positions, every later step decodes one
// token; when it finishes (length, a stop id, cancelled) its slot takes the next waiting one.
//
// Today a step advances each running sequence in turn, one forward pass each, with the same
// kernels as a sequence run alone — so a sequence's tokens never depend on what else runs. The
// batched forward over all running sequences and the paged cache are the engine's next steps.
#ifndef DSV3_INFER_ENGINE_H
#define DSV3_INFER_ENGINE_H

#include "base/error.h"
#include "model/model.h"

typedef enum {
    FINISH_NONE,       // still running
    FINISH_LENGTH,     // max_new tokens, or the slot's cache is full
    FINISH_STOP,       // the model's EOS or one of the stop ids (the stop token is reported)
    FINISH_CANCELLED,  // engine_cancel
    FINISH_ERROR,      // the sequence could not go on (the cache pool ran out); the others run on
} FinishReason;

typedef struct SeqParams {
    int max_new;                // tokens to generate at most (≥ 1)
    float temperature;          // 0: greedy
    int top_k;                  // 0: off
    float top_p;                // 1: off
    unsigned long long seed;
    int stop_at_eos;            // the model's eos_token_id ends the sequence
    const int *stop_ids;        // further ids that end it (copied at engine_add)
    int n_stop_ids;
    int logprobs;               // report each token's log-probability
    int top_logprobs;           // and this many most likely alternatives (0 .. ENGINE_MAX_TOP_LOGPROBS)
} SeqParams;

#define ENGINE_MAX_TOP_LOGPROBS 20

// What a sequence's owner receives per new token. Log-probabilities are those of the model's
// distribution (log-softmax of the logits, before temperature and filtering), as vLLM reports.
typedef struct EngineToken {
    int token;              // -1 when a sequence ends without one (cancelled, failed)
    FinishReason finish;    // FINISH_NONE while more follow; the last token carries the reason
    float logprob;          // log p(token), when SeqParams.logprobs
    int n_top;              // alternatives below, most likely first
    int top_ids[ENGINE_MAX_TOP_LOGPROBS];
    float top_logprobs[ENGINE_MAX_TOP_LOGPROBS];
} EngineToken;

SeqParams seq_params_default(void);

// A new token of sequence seq, or its end (see EngineToken). Called from engine_step (or
// engine_cancel) on the caller's thread.
typedef void (*EngineTokenFn)(void *owner, int seq, const EngineToken *t);

typedef struct EngineOptions {
    int parallel;       // sequences decoded at once (slots)
    int ctx;            // positions per slot: prompt + generated tokens
    int prefill_chunk;  // positions a prefill forward pass takes at most
    DType kv_dtype;     // the cache's element type: DT_F32 (0, the default) or DT_BF16
    int speculative;    // MTP draft tokens per step (0: off; needs a model with MTP layers)
} EngineOptions;

typedef struct EngineStats {
    long prompt_tokens, generated_tokens;
    long decode_tokens;                 // tokens produced by decode steps (a prefill produces the first)
    double prefill_s, decode_s;         // wall time of the prefill and the decode forward passes
    long draft_tokens, accepted_tokens; // speculative decoding (0 while it is off)
    int running, waiting;               // sequences now
    long cache_blocks_used, cache_blocks_total;  // the latent cache pool, in blocks of positions
} EngineStats;

typedef struct Engine Engine;

Engine *engine_new(const Model *m, const EngineOptions *o, Error *err);
void engine_free(Engine *e);
// Queues a sequence; returns its id (0, 1, ... in order of adding) or -1 with err naming what is
// wrong (an id outside the vocabulary, a prompt longer than a slot, bad parameters).
int engine_add(Engine *e, const int *prompt, int n, const SeqParams *p, EngineTokenFn fn, void *owner, Error *err);
// Ends a waiting or running sequence and frees its slot; 0, or -1 when seq is not live.
int engine_cancel(Engine *e, int seq);
// One step: every running sequence advances by one forward pass, freed slots take waiting
// sequences. Returns how many sequences are still live (running or waiting), or -1 with err.
int engine_step(Engine *e, Error *err);
const EngineStats *engine_stats(const Engine *e);

#endif
