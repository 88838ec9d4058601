// The inference engine: a loaded model, a pool of latent-cache blocks, and the sequences it
// advances. The contract the command line and the server use: add a sequence (its prompt, sampler,
// stop conditions and a callback for its tokens), step the engine, cancel a sequence; each new
// token reaches its owner through the callback as it is produced.
//
// Up to `parallel` sequences run at once; more wait, oldest first. A running sequence takes cache
// blocks as it grows and gives them back when it ends; running out of blocks ends that sequence
// (FINISH_ERROR), never the others. One step: a prompt whose next chunk is long runs it alone with
// plain attention (model_forward); then ONE batched forward (model_decode) advances every decoding
// sequence — by one token, or with speculative decoding by K drafts of the MTP module verified at
// once, plus the model's own next token — and takes pieces of the prompts whose next chunk is
// short (≤ 128 positions, absorbed attention), so short prompts share the step's weight reads with
// the decoding rows and each other. At most prefill_chunk prompt positions per step.
//
// Batch invariance: a sequence's logits are the same bits whatever else runs (decode.c), so its
// tokens never depend on the load; greedy speculative decoding emits exactly what plain decoding
// does, and speculative sampling draws from the same distribution as plain sampling.
#ifndef DSV3_INFER_ENGINE_H
#define DSV3_INFER_ENGINE_H

#include "base/error.h"
#include "model/model.h"

typedef enum {
    FINISH_NONE,       // still running
    FINISH_LENGTH,     // max_new tokens, or ctx positions
    FINISH_STOP,       // the model's EOS or one of the stop ids (the stop token is reported)
    FINISH_CANCELLED,  // engine_cancel
    FINISH_ERROR,      // the sequence could not go on (the cache pool ran out); the others run on
} FinishReason;

// A constraint on what a sequence may say (the server's JSON mode): before each choice the engine
// hands it the logits to mask (set to -INFINITY the ids that may not come next; the reported
// log-probabilities stay the model's own), and each token the sequence takes to advance its state.
// Drafts of speculative decoding are judged against the masked logits, so the output is the one
// plain decoding gives under the same constraint. Its calls come from engine_step, on the
// caller's thread.
typedef struct TokenConstraint {
    void *ctx;
    void (*mask)(void *ctx, float *logits, int vocab);
    void (*accept)(void *ctx, int token);
} TokenConstraint;

typedef struct SeqParams {
    int max_new;                // tokens to generate at most (0: the prompt only, for its log-probabilities)
    float temperature;          // 0: greedy
    int top_k;                  // 0: off
    float top_p;                // 1: off
    float min_p;                // 0: off; keeps ids at least min_p × the most likely one's probability
    float presence_penalty;     // 0: off; logit − presence·[count > 0] − frequency·count over the
    float frequency_penalty;    // tokens generated so far (OpenAI's definition)
    unsigned long long seed;
    int stop_at_eos;            // the model's eos_token_id ends the sequence
    const int *stop_ids;        // further ids that end it (copied at engine_add)
    int n_stop_ids;
    const int *bias_ids;        // OpenAI's logit_bias: bias_values[i] is added to the logit of
    const float *bias_values;   // bias_ids[i] before the choice (ids in the vocabulary, values
    int n_bias;                 // finite; copied at engine_add)
    int logprobs;               // report each token's log-probability
    int top_logprobs;           // and this many most likely alternatives (0 .. ENGINE_MAX_TOP_LOGPROBS)
    const TokenConstraint *constraint;  // or NULL (copied at engine_add; ctx must outlive the sequence)
    int prompt_logprobs;        // report the prompt's tokens too, each with its log-probability given
                                // the ones before (and top_logprobs alternatives): the whole prompt
                                // is then run absorbed in pieces that keep every row's logits, and
                                // the prefix cache is not used for it
} SeqParams;

#define ENGINE_MAX_TOP_LOGPROBS 20
// Cache positions per block of the pool.
#define ENGINE_BLOCK_SIZE 16
// Draft tokens per step at most.
#define ENGINE_MAX_SPECULATIVE 8

// What a sequence's owner receives per new token. Log-probabilities are those of the model's
// distribution (log-softmax of the logits, before temperature and filtering), as vLLM reports.
typedef struct EngineToken {
    int token;              // -1 when a sequence ends without one (cancelled, failed, max_new 0)
    int prompt;             // 1: a token of the prompt (SeqParams.prompt_logprobs), in order; the
                            // first has no log-probability (NAN, no alternatives)
    FinishReason finish;    // FINISH_NONE while more follow; the last token carries the reason
    float logprob;          // log p(token), when SeqParams.logprobs
    int n_top;              // alternatives below, most likely first
    int top_ids[ENGINE_MAX_TOP_LOGPROBS];
    float top_logprobs[ENGINE_MAX_TOP_LOGPROBS];
} EngineToken;

SeqParams seq_params_default(void);

// A new token of sequence seq, or its end (see EngineToken). Called from engine_step (or
// engine_cancel) on the caller's thread; it may call engine_cancel (a stop string was seen), but
// not engine_add or engine_step.
typedef void (*EngineTokenFn)(void *owner, int seq, const EngineToken *t);

typedef struct EngineOptions {
    int parallel;       // sequences decoded at once
    int ctx;            // positions per sequence at most: prompt + generated tokens
    int cache_tokens;   // positions the cache pool holds in all (0: parallel · ctx)
    int prefill_chunk;  // prompt positions a step takes at most (a plain chunk is this long)
    DType kv_dtype;     // the cache's element type: DT_F32 (0, the default) or DT_BF16
    int speculative;    // MTP draft tokens per step (0: off; needs a model with MTP layers)
    int prefix_cache;   // keep filled blocks of finished and running sequences for later prompts
                        // that start the same way (prefix_cache.h); a hit skips their prefill
    int profile;        // time the decode steps' phases into EngineStats.decode_profile (model.h:
                        // DecodeProfile; ~1% of a step)
} EngineOptions;

typedef struct EngineStats {
    long prompt_tokens, generated_tokens;
    long decode_tokens;                 // tokens produced by decode steps (a prefill produces the first)
    double prefill_s, decode_s;         // wall time of the prefill and the decode forward passes
    long draft_tokens, accepted_tokens; // speculative decoding (0 while it is off)
    int running, waiting;               // sequences now
    long cache_blocks_used, cache_blocks_total;  // the latent cache pool, in blocks of positions
    long prefix_lookup_tokens, prefix_hit_tokens;  // prompt positions looked up in / served by the prefix cache
    DecodeProfile decode_profile;       // EngineOptions.profile: the steps that only decode (no prompt
                                        // piece among their rows), MTP drafts and verification included
} EngineStats;

typedef struct Engine Engine;

Engine *engine_new(const Model *m, const EngineOptions *o, Error *err);
void engine_free(Engine *e);
// Queues a sequence; returns its id (0, 1, ... in order of adding) or -1 with err naming what is
// wrong (an id outside the vocabulary, a prompt longer than ctx, bad parameters).
int engine_add(Engine *e, const int *prompt, int n, const SeqParams *p, EngineTokenFn fn, void *owner, Error *err);
// Ends a waiting or running sequence and gives its cache blocks back; 0, or -1 when seq is not live.
int engine_cancel(Engine *e, int seq);
// One step (see above); finished sequences make room for waiting ones. Returns how many sequences
// are still live (running or waiting), or -1 with err (a failure of the model, not of a sequence).
int engine_step(Engine *e, Error *err);
const EngineStats *engine_stats(const Engine *e);

#endif
