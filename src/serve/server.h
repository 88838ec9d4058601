// `dsv3 serve`: the OpenAI-compatible HTTP server over the engine (src/infer/engine.h).
//
// One engine thread owns the engine: it adds the sequences requests ask for, cancels those whose
// client left (or whose stop string appeared), and calls engine_step while anything is live, so up
// to `parallel` sequences advance together and new ones join at the next step. HTTP is
// libmicrohttpd with a thread per connection; a connection's thread parses the request, encodes
// the prompt, hands the sequences to the engine thread through a queue (one mutex, condition
// variables) and then waits: for the whole answer, or, streaming, for each piece of it. The engine
// thread's token callback decodes, applies the stop strings and writes the response's bytes.
#ifndef DSV3_SERVE_SERVER_H
#define DSV3_SERVE_SERVER_H

#include "base/dtype.h"
#include "base/error.h"

typedef struct ServeOptions {
    const char *model_dir;
    const char *host;        // an address to bind ("127.0.0.1", "::1", "0.0.0.0")
    int port;                // 0: any free port
    int parallel;            // sequences decoded at once
    int ctx;                 // positions per sequence (clamped to the model's max_position_embeddings)
    DType kv_dtype;
    int kv_auto;             // --kv-dtype auto: model_kv_dtype_auto once the compute is set
    int speculative;         // MTP draft tokens per step (the model needs an MTP module)
    int prefix_cache;        // reuse the cache blocks of a prompt prefix seen before
    const char *api_key;     // NULL: no authentication
    const char *alias;       // the model's name in the API; NULL: the directory's name
    int max_queue;           // sequences that may wait for a slot beyond the running ones
    int timeout_s;           // an idle connection is closed after this long
    long max_body;           // bytes a request body may have
    double ping_s;           // an idle stream gets an SSE comment (": ping") this often; 0: 10 s
    ComputeMode compute;     // --compute (model_set_compute)
    long decode_tile_rows;   // --decode-tiles: model_set_panel_tiles's rows (0: none on the AMX tiles)
    int profile;             // --profile: /metrics adds where the decode steps' time went (EngineOptions.profile)
} ServeOptions;

// Loads the model and its tokenizer, listens, prints "listening on http://HOST:PORT" on stderr and
// serves until SIGINT or SIGTERM; then ends the streams in flight and returns 0. -1 with err when
// it cannot start.
int serve_run(const ServeOptions *o, Error *err);

#endif
