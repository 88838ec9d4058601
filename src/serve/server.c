#define _GNU_SOURCE  // POLLRDHUP
#include <errno.h>
#include <math.h>
#include <jansson.h>
#include <microhttpd.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "infer/engine.h"
#include "model/model.h"
#include "serve/json_mode.h"
#include "serve/tool_calls.h"
#include "serve/request.h"
#include "serve/server.h"
#include "serve/stop_text.h"
#include "text/tokenizer.h"

#define PING_S 10.0            // an idle stream gets an SSE comment this often (default of --sse-ping)
#define WAIT_SLICE_MS 200      // how often a waiting connection looks whether its client left
#define PREFILL_CHUNK 512

typedef struct Server Server;
typedef struct Job Job;

// One answer of a request: a request has n per prompt.
typedef struct Choice {
    Job *job;
    int index;
    int prompt;          // its prompt in Job.prompts
    int echoed;          // echo: the prompt's text has gone out
    double sum_logprob;  // of the answer's tokens (best_of ranks the answers by its mean)
    int seq;             // the engine's id, -1 until added
    int live;            // the engine has it (added, not ended)
    int cancel;          // to be cancelled: its stop string appeared, or the request failed
    int cancel_sent;
    const char *finish;  // "stop" / "length" once the answer is complete
    int n_tokens;        // tokens the engine produced for it
    TokStream ts;
    StopText stop;
    ByteBuf text;        // the answer (not streaming)
    json_t *lp;          // log-probabilities not yet sent: chat, an array of entries; completions, parallel arrays
    long text_offset;    // completions' logprobs.text_offset: bytes of token text so far
    JsonMode json;       // JSON mode, or a forced tool call: the answer as a constraint
    TokenConstraint tc;  // its hook for the engine
    StopText tool_split; // tools: the answer's content ends where its tool calls begin
    int in_calls;        // the calls have begun: text goes to calls
    ByteBuf calls;       // the text after "<｜tool▁calls▁begin｜>"
    json_t *tool_calls;  // the calls read from it when the answer ends (NULL: none)
} Choice;

// A prompt of a request, as token ids, and its text when the answer echoes it.
typedef struct JobPrompt {
    int *ids, n;
    int max_new;         // the answer's tokens at most: max_tokens, or what the context leaves
    char *echo;          // (echo_n bytes) or NULL
    size_t echo_n;
} JobPrompt;

// A completion request: owned by its connection and by the engine thread (refs), guarded by
// Server.mu.
struct Job {
    Server *srv;
    Job *next;           // in the pending or the active list of the engine thread
    ApiKind kind;
    char id[48];
    long long created;
    JobPrompt *prompts;  // (n_prompts)
    int n_prompts;
    SeqParams sp;
    int *bias_ids;       // (sp.n_bias) the logit bias, owned
    float *bias_values;
    int stop_ids[1];
    char *stops[STOP_TEXT_MAX];  // the request's stop strings, which every choice's StopText points into
    int stream, include_usage;
    int n;               // answers drawn in all: per_prompt per prompt
    int per_prompt;      // best_of (n without it)
    int n_out;           // answers returned per prompt: n
    int report_logprobs; // the request asked for logprobs (best_of computes them anyway)
    int constrained;     // JSON mode (response_format json_object) or tool calls: Choice.json steers the answer
    int tools;           // chat with tools (tool_choice not "none"): answers may end in tool calls
    ToolFrame tf;        // forced or lazy: the format tool calls are held to
    JsonSchema *schema;  // response_format json_schema's (owned), or NULL
    Choice *ch;
    int n_finished;      // choices whose answer is complete
    int n_live;          // choices the engine still has
    int gone;            // the client left: cancel everything
    int complete;        // every answer complete, or failed
    ApiError failed;     // failed.status != 0: the error that ended it
    ByteBuf out;         // streaming: bytes not yet handed to the connection
    size_t out_sent;
    double last_write;
    int refs;
    int fd;              // the connection's socket, to see a client leave
    pthread_cond_t cv;
};

struct Server {
    ServeOptions o;
    char alias[256];
    Model m;
    int model_loaded;
    Tokenizer *tok;
    Engine *e;
    int vocab;                // the model's
    int tok_vocab;            // the tokenizer's (ids past it have no text)
    JsonVocab json_vocab;     // the constrained answers' view of the vocabulary (json_mode.h)
    pthread_mutex_t mu;       // guards what follows and every Job
    pthread_cond_t engine_cv; // the engine thread waits here for work
    pthread_mutex_t tok_mu;   // encoding uses the tokenizer's caches
    Job *pending, *active;
    int live_seqs;            // sequences admitted and not ended: queued, waiting or running
    int stopping;
    EngineStats st;           // the engine's figures after its latest step
    long status_count[600];
    long long started;
    unsigned long long next_id;
    int *cancel_buf;
    int cancel_cap;
};

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static json_t *error_json(const ApiError *e) {
    return json_pack("{s:{s:s, s:s, s:s?, s:s?}}", "error", "message", e->message, "type", api_error_type(e->status),
                     "param", e->param[0] ? e->param : NULL, "code", e->code[0] ? e->code : NULL);
}

static void count_status(Server *s, int status) {
    pthread_mutex_lock(&s->mu);
    if (status >= 0 && status < 600) s->status_count[status]++;
    pthread_mutex_unlock(&s->mu);
}

static enum MHD_Result send_body(Server *s, struct MHD_Connection *conn, int status, char *body, size_t n,
                                 const char *type, const char *hname, const char *hvalue) {
    struct MHD_Response *r = MHD_create_response_from_buffer(n, body, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, "Content-Type", type);
    if (hname) MHD_add_response_header(r, hname, hvalue);
    enum MHD_Result rc = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    count_status(s, status);
    return rc;
}

// Sends o (its reference is taken) as the body.
static enum MHD_Result send_json(Server *s, struct MHD_Connection *conn, int status, json_t *o, const char *hname,
                                 const char *hvalue) {
    char *text = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (!text) return MHD_NO;
    return send_body(s, conn, status, text, strlen(text), "application/json", hname, hvalue);
}

static enum MHD_Result send_error(Server *s, struct MHD_Connection *conn, const ApiError *e) {
    const char *hname = NULL, *hvalue = NULL;
    if (e->status == 503) hname = "Retry-After", hvalue = "1";
    if (e->status == 401) hname = "WWW-Authenticate", hvalue = "Bearer";
    return send_json(s, conn, e->status, error_json(e), hname, hvalue);
}

static void job_unref(Job *j) {
    if (--j->refs > 0) return;
    for (int i = 0; i < j->n; i++) {
        Choice *c = &j->ch[i];
        tok_stream_free(&c->ts);
        stop_text_free(&c->stop);
        bb_free(&c->text);
        json_decref(c->lp);
        json_mode_free(&c->json);
        stop_text_free(&c->tool_split);
        bb_free(&c->calls);
        json_decref(c->tool_calls);
    }
    for (int i = 0; i < STOP_TEXT_MAX; i++) free(j->stops[i]);
    free(j->ch);
    for (int i = 0; i < j->n_prompts; i++) {
        free(j->prompts[i].ids);
        free(j->prompts[i].echo);
    }
    free(j->prompts);
    free(j->bias_ids);
    free(j->bias_values);
    tool_frame_free(&j->tf);
    json_schema_free(j->schema);
    bb_free(&j->out);
    pthread_cond_destroy(&j->cv);
    free(j);
}

static void sse_send(Job *j, json_t *o) {
    char *text = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (text && (bb_append(&j->out, "data: ", 6) || bb_append(&j->out, text, strlen(text)) || bb_append(&j->out, "\n\n", 2)))
        j->out.n = 0;  // out of memory: the client sees the stream end short
    free(text);
    pthread_cond_broadcast(&j->cv);
}

static json_t *chunk_new(Job *j, json_t *choices) {
    return json_pack("{s:s, s:s, s:I, s:s, s:o}", "id", j->id, "object",
                     j->kind == API_CHAT ? "chat.completion.chunk" : "text_completion", "created", (json_int_t)j->created,
                     "model", j->srv->alias, "choices", choices);
}

static json_t *usage_json(Job *j) {
    long done = 0, prompt = 0;
    for (int i = 0; i < j->n; i++) done += j->ch[i].n_tokens;
    for (int i = 0; i < j->n_prompts; i++) prompt += j->prompts[i].n;  // each prompt once, whatever n
    return json_pack("{s:I, s:I, s:I}", "prompt_tokens", (json_int_t)prompt, "completion_tokens", (json_int_t)done,
                     "total_tokens", (json_int_t)(prompt + done));
}

static json_t *lp_empty(ApiKind kind) {
    if (kind == API_CHAT) return json_array();
    return json_pack("{s:[], s:[], s:[], s:[]}", "tokens", "token_logprobs", "top_logprobs", "text_offset");
}

// The log-probabilities gathered so far in the shape the endpoint reports, and a fresh gatherer.
static json_t *lp_take(Job *j, Choice *c) {
    if (!c->lp) return json_null();
    json_t *lp = c->lp;
    c->lp = lp_empty(j->kind);
    return j->kind == API_CHAT ? json_pack("{s:o}", "content", lp) : lp;
}

// A streamed piece of choice c: text, and the finish reason when it is the last.
static void stream_piece(Job *j, Choice *c, const char *text, size_t n, const char *finish) {
    json_t *choice;
    if (j->kind == API_CHAT) {
        json_t *delta = finish && n == 0 ? json_object() : json_pack("{s:s%}", "content", text, n);
        choice = json_pack("{s:i, s:o, s:o, s:s?}", "index", c->index, "delta", delta, "logprobs", lp_take(j, c),
                           "finish_reason", finish);
    } else {
        choice = json_pack("{s:i, s:s%, s:o, s:s?}", "index", c->index, "text", text, n, "logprobs", lp_take(j, c),
                           "finish_reason", finish);
    }
    sse_send(j, chunk_new(j, json_pack("[o]", choice)));
}

// Settled text of choice c reaches the client (streaming) or its answer.
static void deliver(Job *j, Choice *c, const char *text, size_t n) {
    if (n == 0) return;
    if (j->stream) stream_piece(j, c, text, n, NULL);
    else if (bb_append(&c->text, text, n)) j->out.n = 0;
}

// Settled text of c with tools: content until the tool calls begin, then the calls' text.
static void route(Job *j, Choice *c, const char *text, size_t n) {
    if (!j->tools) {
        deliver(j, c, text, n);
        return;
    }
    if (c->in_calls) {
        if (bb_append(&c->calls, text, n)) j->out.n = 0;
        return;
    }
    ByteBuf content = {0};
    int rc = stop_text_push(&c->tool_split, text, n, &content);
    deliver(j, c, content.p, content.n);
    if (rc == 1) {
        size_t an;
        const char *after = stop_text_after(&c->tool_split, &an);
        c->in_calls = 1;
        if (bb_append(&c->calls, after, an)) j->out.n = 0;
    }
    bb_free(&content);
}

// The end of c's text with tools: held-back content released, the calls read. 1 when the answer
// has calls.
static int route_finish(Job *j, Choice *c) {
    if (!j->tools) return 0;
    if (!c->in_calls) {
        ByteBuf content = {0};
        stop_text_finish(&c->tool_split, &content);
        deliver(j, c, content.p, content.n);
        bb_free(&content);
        return 0;
    }
    ToolCallText *calls;
    int n = tool_calls_parse(c->calls.p ? c->calls.p : "", c->calls.n, &calls);
    if (n <= 0) return 0;
    c->tool_calls = json_array();
    for (int i = 0; i < n; i++) {
        char id[80];
        snprintf(id, sizeof id, "call_%s_%d_%d", j->id + strlen(j->id) - 16, c->index, i);
        json_array_append_new(c->tool_calls,
                              json_pack("{s:i, s:s, s:s, s:{s:s, s:s}}", "index", i, "id", id, "type", "function", "function",
                                        "name", calls[i].name, "arguments", calls[i].arguments));
    }
    tool_calls_free(calls, n);
    return 1;
}

static void job_complete(Job *j) {
    j->complete = 1;
    if (j->stream) {
        if (j->include_usage)
            sse_send(j, json_pack("{s:s, s:s, s:I, s:s, s:[], s:o}", "id", j->id, "object",
                                  j->kind == API_CHAT ? "chat.completion.chunk" : "text_completion", "created",
                                  (json_int_t)j->created, "model", j->srv->alias, "choices", "usage", usage_json(j)));
        if (!bb_append(&j->out, "data: [DONE]\n\n", 14)) pthread_cond_broadcast(&j->cv);
    }
    pthread_cond_broadcast(&j->cv);
}

// Ends the request with an error: every choice is to be cancelled; a stream gets the error as its
// last event.
static void job_fail(Job *j, int status, const char *msg) {
    if (j->complete) return;
    api_error(&j->failed, status, NULL, NULL, "%s", msg);
    for (int i = 0; i < j->n; i++) {
        if (!j->ch[i].finish) j->ch[i].finish = "error";
        j->ch[i].cancel = 1;
    }
    j->complete = 1;
    if (j->stream) sse_send(j, error_json(&j->failed));
    pthread_cond_broadcast(&j->cv);
}

static void choice_finish(Job *j, Choice *c, const char *reason) {
    if (route_finish(j, c) && !strcmp(reason, "stop")) reason = "tool_calls";
    c->finish = reason;
    c->cancel = 1;  // a stop string ends it before the engine does
    if (j->stream && c->tool_calls) {  // the calls whole, in one delta, before the finish
        json_t *choice = json_pack("{s:i, s:{s:O}, s:o, s:n}", "index", c->index, "delta", "tool_calls", c->tool_calls,
                                   "logprobs", lp_take(j, c), "finish_reason");
        sse_send(j, chunk_new(j, json_pack("[o]", choice)));
    }
    if (j->stream) stream_piece(j, c, "", 0, reason);
    if (++j->n_finished == j->n) job_complete(j);
}

// The text of one token for the logprobs (repaired to valid UTF-8) and its raw bytes.
static json_t *token_entry(Server *s, int id, float logprob, int with_bytes) {
    size_t n = 0, rn = 0;
    Error err;
    char *text = tok_decode(s->tok, &id, 1, 0, &n, &err);
    const char *raw = tok_token_bytes(s->tok, id, &rn);
    if (!raw) raw = text ? text : "", rn = text ? n : 0;
    json_t *o = json_pack("{s:s%, s:o}", "token", text ? text : "", text ? n : 0, "logprob",
                          isnan(logprob) ? json_null() : json_real(logprob));  // NAN: the prompt's first token
    if (o && with_bytes) {
        json_t *b = json_array();
        for (size_t i = 0; i < rn; i++) json_array_append_new(b, json_integer((unsigned char)raw[i]));
        json_object_set_new(o, "bytes", b);
    }
    free(text);
    return o;
}

static void add_logprobs(Job *j, Choice *c, const EngineToken *t) {
    Server *s = j->srv;
    if (!c->lp) c->lp = lp_empty(j->kind);
    if (j->kind == API_CHAT) {
        json_t *e = token_entry(s, t->token, t->logprob, 1), *top = json_array();
        for (int k = 0; k < t->n_top; k++) json_array_append_new(top, token_entry(s, t->top_ids[k], t->top_logprobs[k], 1));
        json_object_set_new(e, "top_logprobs", top);
        json_array_append_new(c->lp, e);
        return;
    }
    json_t *e = token_entry(s, t->token, t->logprob, 0), *top = isnan(t->logprob) ? json_null() : json_object();
    for (int k = 0; k < t->n_top; k++) {
        json_t *a = token_entry(s, t->top_ids[k], t->top_logprobs[k], 0);
        json_object_set(top, json_string_value(json_object_get(a, "token")), json_object_get(a, "logprob"));
        json_decref(a);
    }
    json_array_append(json_object_get(c->lp, "tokens"), json_object_get(e, "token"));
    json_array_append(json_object_get(c->lp, "token_logprobs"), json_object_get(e, "logprob"));
    json_array_append_new(json_object_get(c->lp, "top_logprobs"), top);
    json_array_append_new(json_object_get(c->lp, "text_offset"), json_integer(c->text_offset));
    size_t rn = 0;
    if (tok_token_bytes(s->tok, t->token, &rn)) c->text_offset += (long)rn;
    json_decref(e);
}

// The end of c's answer: the text its decoder and stop strings still hold, settled into *settled;
// 1 when a stop string is completed there, 0, or -1 when memory runs out.
static int settle_rest(Choice *c, ByteBuf *settled) {
    const char *rest;
    size_t n;
    tok_stream_finish(&c->ts, &rest, &n);
    int rc = stop_text_push(&c->stop, rest, n, settled);
    return rc == 0 ? stop_text_finish(&c->stop, settled) : rc;
}

// The engine's callback (on the engine thread): decode, stop strings, deliver.
static void on_token(void *owner, int seq, const EngineToken *t) {
    Choice *c = owner;
    Job *j = c->job;
    Server *s = j->srv;
    (void)seq;
    pthread_mutex_lock(&s->mu);
    Error err;
    if (t->prompt) {  // echo with logprobs: the prompt's tokens come first
        if (j->report_logprobs && !c->finish) add_logprobs(j, c, t);
        pthread_mutex_unlock(&s->mu);
        return;
    }
    if (!c->echoed && !c->finish) {  // echo: the prompt's text (and log-probabilities) before the answer's
        const JobPrompt *p = &j->prompts[c->prompt];
        c->echoed = 1;
        if (j->stream) stream_piece(j, c, p->echo, p->echo_n, NULL);
        else if (bb_append(&c->text, p->echo, p->echo_n)) j->out.n = 0;
    }
    if (t->token >= 0 && !c->finish) {
        c->n_tokens++;
        if (j->report_logprobs) add_logprobs(j, c, t);
        if (j->sp.logprobs) c->sum_logprob += t->logprob;
        const char *text;
        size_t n;
        ByteBuf settled = {0};
        int rc = 0;
        // an id the tokenizer does not have (a model's vocabulary may be padded past it) has no text
        if (t->token < s->tok_vocab && tok_stream_push(&c->ts, t->token, &text, &n, &err)) rc = -1;
        else if (t->token < s->tok_vocab) rc = stop_text_push(&c->stop, text, n, &settled);
        if (rc < 0) {
            job_fail(j, 500, "out of memory decoding the answer");
        } else {
            if (rc == 0 && j->constrained && json_mode_complete(&c->json))
                rc = settle_rest(c, &settled) < 0 ? -1 : 1;  // the object is complete: the answer ends here
            route(j, c, settled.p, settled.n);
            if (rc == 1) choice_finish(j, c, "stop");
            // asked for logprobs, a stream has a chunk per token, even one whose text is not settled yet
            else if (j->stream && j->report_logprobs && settled.n == 0) stream_piece(j, c, "", 0, NULL);
        }
        bb_free(&settled);
    }
    if (t->finish != FINISH_NONE) {
        c->live = 0;
        j->n_live--;
        s->live_seqs--;
        if (!c->finish) {
            if (t->finish == FINISH_STOP || t->finish == FINISH_LENGTH) {
                ByteBuf settled = {0};
                int rc = settle_rest(c, &settled);
                route(j, c, settled.p, settled.n);
                bb_free(&settled);
                choice_finish(j, c, rc == 1 || t->finish == FINISH_STOP ? "stop" : "length");
            } else if (t->finish == FINISH_ERROR) {
                job_fail(j, 500, "the sequence could not go on: the cache ran out");
            } else {
                job_fail(j, 503, s->stopping ? "the server is shutting down" : "cancelled");
            }
        }
    }
    pthread_mutex_unlock(&s->mu);
}

static void *engine_main(void *arg) {
    Server *s = arg;
    Error err;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (s->pending) {  // new requests join at this step
            Job *j = s->pending;
            s->pending = j->next;
            int k = 0;
            if (!j->gone && !s->stopping && !j->complete)
                for (; k < j->n; k++) {
                    SeqParams sp = j->sp;
                    JobPrompt *p = &j->prompts[j->ch[k].prompt];
                    sp.seed += (unsigned long long)k;  // choice k draws with seed + k
                    sp.max_new = p->max_new;
                    if (j->constrained) sp.constraint = &j->ch[k].tc;
                    int id = engine_add(s->e, p->ids, p->n, &sp, on_token, &j->ch[k], &err);
                    if (id < 0) {
                        job_fail(j, 400, err.msg);
                        break;
                    }
                    j->ch[k].seq = id;
                    j->ch[k].live = 1;
                    j->n_live++;
                }
            if (k < j->n) {  // the client left, the server stops, or engine_add refused
                s->live_seqs -= j->n - k;
                job_fail(j, 503, "the server is shutting down");
            }
            j->next = s->active;
            s->active = j;
        }
        int nc = 0;
        for (Job *j = s->active; j; j = j->next)
            for (int k = 0; k < j->n; k++) {
                Choice *c = &j->ch[k];
                if (!c->live || c->cancel_sent || !(c->cancel || j->gone || s->stopping)) continue;
                if (nc == s->cancel_cap) {
                    int cap = s->cancel_cap ? 2 * s->cancel_cap : 64, *nb = realloc(s->cancel_buf, sizeof(int) * cap);
                    if (!nb) break;
                    s->cancel_buf = nb;
                    s->cancel_cap = cap;
                }
                s->cancel_buf[nc++] = c->seq;
                c->cancel_sent = 1;
            }
        if (nc) {  // engine_cancel reports through on_token, which takes the lock
            pthread_mutex_unlock(&s->mu);
            for (int i = 0; i < nc; i++) engine_cancel(s->e, s->cancel_buf[i]);
            pthread_mutex_lock(&s->mu);
            s->st = *engine_stats(s->e);
        }
        for (Job **p = &s->active; *p;) {  // the engine is done with these
            Job *j = *p;
            if (j->n_live > 0) {
                p = &j->next;
                continue;
            }
            *p = j->next;
            job_unref(j);
        }
        if (!s->active && !nc) {  // (after cancels one more step refreshes the engine's counts)
            if (s->stopping) break;
            if (!s->pending) pthread_cond_wait(&s->engine_cv, &s->mu);
            continue;
        }
        pthread_mutex_unlock(&s->mu);
        int live = engine_step(s->e, &err);
        pthread_mutex_lock(&s->mu);
        s->st = *engine_stats(s->e);
        if (live < 0) {
            fprintf(stderr, "dsv3 serve: engine: %s\n", err.msg);
            for (Job *j = s->active; j; j = j->next) job_fail(j, 500, err.msg);
        }
    }
    s->st = *engine_stats(s->e);
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

// Whether the client of fd has closed its end (nothing is read from the socket).
static int peer_closed(int fd) {
    if (fd < 0) return 0;
    struct pollfd p = {.fd = fd, .events = POLLIN | POLLRDHUP};
    if (poll(&p, 1, 0) <= 0) return 0;
    if (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) return 1;
    char b;
    return (p.revents & POLLIN) && recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
}

static void wait_slice(Job *j) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += WAIT_SLICE_MS * 1000000L;
    ts.tv_sec += ts.tv_nsec / 1000000000L;
    ts.tv_nsec %= 1000000000L;
    pthread_cond_timedwait(&j->cv, &j->srv->mu, &ts);
}

static void job_left(Job *j) {
    if (j->complete) return;
    j->gone = 1;
    pthread_cond_signal(&j->srv->engine_cv);
}

// The streamed body: blocks (this connection has its own thread) until bytes are ready; a
// comment line keeps an idle stream alive.
static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max) {
    Job *j = cls;
    Server *s = j->srv;
    (void)pos;
    ssize_t rc;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        size_t avail = j->out.n - j->out_sent;
        if (avail > 0) {
            size_t k = avail < max ? avail : max;
            memcpy(buf, j->out.p + j->out_sent, k);
            j->out_sent += k;
            if (j->out_sent == j->out.n) j->out.n = j->out_sent = 0;
            j->last_write = now_s();
            rc = (ssize_t)k;
            break;
        }
        if (j->complete) {
            rc = MHD_CONTENT_READER_END_OF_STREAM;
            break;
        }
        if (peer_closed(j->fd)) {
            job_left(j);
            rc = MHD_CONTENT_READER_END_WITH_ERROR;
            break;
        }
        if (now_s() - j->last_write >= (s->o.ping_s > 0 ? s->o.ping_s : PING_S) && max >= 8) {
            memcpy(buf, ": ping\n\n", 8);
            j->last_write = now_s();
            rc = 8;
            break;
        }
        wait_slice(j);
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

static void stream_free(void *cls) {
    Job *j = cls;
    Server *s = j->srv;
    pthread_mutex_lock(&s->mu);
    job_left(j);
    job_unref(j);
    pthread_mutex_unlock(&s->mu);
}

static double mean_logprob(const Choice *c) { return c->sum_logprob / (c->n_tokens > 0 ? c->n_tokens : 1); }

// The whole answer of a request that does not stream (Server.mu held, the job complete).
static json_t *answer_json(Job *j) {
    json_t *choices = json_array();
    int per = j->per_prompt, order[SERVE_MAX_N];
    for (int i = 0; i < j->n; i += per) {
        // best_of: the prompt's answers by mean log-probability per token, best first (ties: drawn first)
        for (int k = 0; k < per; k++) order[k] = i + k;
        for (int a = 1; per > j->n_out && a < per; a++)
            for (int b = a; b > 0 && mean_logprob(&j->ch[order[b]]) > mean_logprob(&j->ch[order[b - 1]]); b--) {
                int t = order[b - 1];
                order[b - 1] = order[b];
                order[b] = t;
            }
        for (int k = 0; k < j->n_out; k++) {
            Choice *c = &j->ch[order[k]];
            int index = i / per * j->n_out + k;
            const char *text = c->text.p ? c->text.p : "";
            json_t *lp = lp_take(j, c), *o;
            if (j->kind == API_CHAT && c->tool_calls) {  // content null when the answer is only calls
                json_t *msg = json_pack("{s:s, s:o, s:O}", "role", "assistant", "content",
                                        c->text.n ? json_stringn(text, c->text.n) : json_null(), "tool_calls", c->tool_calls);
                o = json_pack("{s:i, s:o, s:o, s:s}", "index", index, "message", msg, "logprobs", lp, "finish_reason", c->finish);
            } else if (j->kind == API_CHAT)
                o = json_pack("{s:i, s:{s:s, s:s%}, s:o, s:s}", "index", index, "message", "role", "assistant", "content",
                              text, c->text.n, "logprobs", lp, "finish_reason", c->finish);
            else
                o = json_pack("{s:i, s:s%, s:o, s:s}", "index", index, "text", text, c->text.n, "logprobs", lp,
                              "finish_reason", c->finish);
            json_array_append_new(choices, o);
        }
    }
    return json_pack("{s:s, s:s, s:I, s:s, s:o, s:o}", "id", j->id, "object",
                     j->kind == API_CHAT ? "chat.completion" : "text_completion", "created", (json_int_t)j->created,
                     "model", j->srv->alias, "choices", choices, "usage", usage_json(j));
}

// Prompt i's ids (the chat rendered and encoded, the text encoded, or the ids checked), refused
// when empty or when it leaves no room in the context.
static int prompt_ids(Server *s, ServeRequest *r, int i, TokIds *ids, ApiError *e) {
    Error err;
    char param[32];
    if (r->kind == API_CHAT) snprintf(param, sizeof param, "messages");
    else if (r->n_prompts > 1) snprintf(param, sizeof param, "prompt[%d]", i);
    else snprintf(param, sizeof param, "prompt");
    const char *field = r->kind == API_CHAT ? "messages" : "prompt";
    const ServePrompt *p = r->kind == API_COMPLETION ? &r->prompts[i] : NULL;
    if (p && p->ids) {
        for (int k = 0; k < p->n_ids; k++)
            if (p->ids[k] >= s->vocab)
                return api_error(e, 400, field, "invalid_value", "'%s[%d]' = %d is outside the vocabulary [0, %d)", param, k,
                                 p->ids[k], s->vocab);
        if (ids_append(ids, p->ids, p->n_ids)) return api_error(e, 500, NULL, NULL, "out of memory");
    } else {
        pthread_mutex_lock(&s->tok_mu);
        int rc = r->kind == API_CHAT ? tok_chat_encode_tools(s->tok, r->msgs, r->n_msgs, r->tools_prompt, 1, ids, &err)
                 : r->suffix ? tok_fim_encode(s->tok, p->text, strlen(p->text), r->suffix, strlen(r->suffix), ids, &err)
                             : tok_encode(s->tok, p->text, strlen(p->text), TOK_ADD_SPECIAL, ids, &err);
        pthread_mutex_unlock(&s->tok_mu);
        if (rc) return api_error(e, 400, r->suffix ? "suffix" : field, "invalid_value", "%s", err.msg);
        for (size_t k = 0; k < ids->n; k++)
            if (ids->v[k] >= s->vocab)
                return api_error(e, 400, field, "invalid_value",
                                 "the tokenizer gives id %d, outside the model's vocabulary [0, %d)", ids->v[k], s->vocab);
    }
    if (ids->n == 0) return api_error(e, 400, field, "invalid_value", "'%s' encodes to no tokens", param);
    if ((long)ids->n >= s->o.ctx)
        return api_error(e, 400, field, "context_length_exceeded",
                         "'%s' is %zu tokens and the context %d positions: it leaves no room for an answer", param, ids->n,
                         s->o.ctx);
    return 0;
}

// The text an echo starts with: the prompt as given, or its ids decoded.
static int echo_text(Server *s, const ServeRequest *r, int i, const TokIds *ids, JobPrompt *p) {
    const ServePrompt *q = &r->prompts[i];
    if (q->text) {
        p->echo_n = strlen(q->text);
        p->echo = strdup(q->text);
        return p->echo ? 0 : -1;
    }
    Error err;
    pthread_mutex_lock(&s->tok_mu);
    p->echo = tok_decode(s->tok, ids->v, ids->n, 0, &p->echo_n, &err);
    pthread_mutex_unlock(&s->tok_mu);
    return p->echo ? 0 : -1;
}

// A job for the request's np prompts (ids, whose buffers it takes, as it takes the request's logit
// bias), r->best_of answers each (r->n for chat).
static Job *job_new(Server *s, ServeRequest *r, TokIds *ids, int np, int fd) {
    Job *j = calloc(1, sizeof *j);
    if (!j) return NULL;
    j->per_prompt = r->kind == API_COMPLETION ? r->best_of : r->n;
    j->n_out = r->n;
    j->n = np * j->per_prompt;
    j->ch = calloc(j->n, sizeof *j->ch);
    j->prompts = calloc(np, sizeof *j->prompts);
    int oom = !j->ch || !j->prompts;
    for (int i = 0; i < r->n_stop; i++) oom |= !(j->stops[i] = strdup(r->stop[i]));
    j->bias_ids = r->bias_ids;  // the request's arrays become the job's
    j->bias_values = r->bias_values;
    r->bias_ids = NULL;
    r->bias_values = NULL;
    pthread_cond_init(&j->cv, NULL);
    j->refs = 1;
    for (int i = 0; i < np && !oom; i++) {
        JobPrompt *p = &j->prompts[i];
        if (r->kind == API_COMPLETION && r->echo && echo_text(s, r, i, &ids[i], p)) oom = 1;
        p->ids = ids[i].v;  // the list's buffer becomes the job's
        p->n = (int)ids[i].n;
        ids[i] = (TokIds){0};
        j->n_prompts = i + 1;
        int room = s->o.ctx - p->n;
        p->max_new = r->max_tokens < 0 || r->max_tokens > room ? room : r->max_tokens;
    }
    if (oom) {
        j->n = 0;  // no choice is set up yet
        job_unref(j);
        return NULL;
    }
    j->srv = s;
    j->kind = r->kind;
    j->tools = r->tool_choice != TOOL_NONE;
    j->schema = r->json_schema;  // the job's now
    r->json_schema = NULL;
    if (tool_frame_build(&j->tf, r)) {
        job_unref(j);
        return NULL;
    }
    j->constrained = r->json_mode || j->tf.force || j->tf.lazy;
    j->stream = r->stream;
    j->include_usage = r->stream && r->include_usage;
    j->fd = fd;
    j->last_write = now_s();
    j->created = (long long)time(NULL);
    SeqParams *sp = &j->sp;
    *sp = seq_params_default();
    sp->temperature = r->temperature;
    sp->top_k = r->top_k;
    sp->top_p = r->top_p;
    sp->min_p = r->min_p;
    sp->presence_penalty = r->presence_penalty;
    sp->frequency_penalty = r->frequency_penalty;
    sp->stop_at_eos = !r->ignore_eos;
    int eos = tok_eos_id(s->tok);
    if (!r->ignore_eos && eos >= 0 && eos != s->m.cfg.eos_token_id) {  // the chat format's end of a turn
        j->stop_ids[0] = eos;
        sp->stop_ids = j->stop_ids;
        sp->n_stop_ids = 1;
    }
    sp->bias_ids = j->bias_ids;
    sp->bias_values = j->bias_values;
    sp->n_bias = r->n_bias;
    sp->logprobs = r->logprobs || j->per_prompt > j->n_out;  // best_of ranks by them
    j->report_logprobs = r->logprobs;
    sp->top_logprobs = r->top_logprobs;
    sp->prompt_logprobs = r->kind == API_COMPLETION && r->echo && r->logprobs;
    pthread_mutex_lock(&s->mu);
    unsigned long long serial = ++s->next_id;
    pthread_mutex_unlock(&s->mu);
    unsigned long long mix = (serial * 0x9E3779B97F4A7C15ULL) ^ (unsigned long long)s->started * 0xBF58476D1CE4E5B9ULL;
    sp->seed = r->has_seed ? r->seed : mix ^ (unsigned long long)(now_s() * 1e9);
    snprintf(j->id, sizeof j->id, "%s-%016llx", r->kind == API_CHAT ? "chatcmpl" : "cmpl", mix);
    for (int i = 0; i < j->n; i++) {
        Choice *c = &j->ch[i];
        c->job = j;
        c->index = i;
        c->prompt = i / j->per_prompt;
        c->seq = -1;
        c->echoed = !j->prompts[c->prompt].echo;
        if (j->constrained) {
            int ends[2] = {s->m.cfg.eos_token_id, sp->n_stop_ids > 0 ? sp->stop_ids[0] : -1};
            JsonFrame f = tool_frame_view(&j->tf);
            if (json_mode_init(&c->json, &s->json_vocab, ends, 2, j->schema) || (j->tf.n && json_mode_frame(&c->json, &f)))
                oom = 1;
            c->tc = json_mode_constraint(&c->json);
        }
        const char *marker = CHAT_TOOL_CALLS_BEGIN;
        stop_text_init(&c->tool_split, &marker, j->tools ? 1 : 0);
        tok_stream_init(&c->ts, s->tok, TOK_SKIP_SPECIAL);
        stop_text_init(&c->stop, (const char *const *)j->stops, r->n_stop);
    }
    if (oom) {
        job_unref(j);
        return NULL;
    }
    return j;
}

static int connection_fd(struct MHD_Connection *conn) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    return ci ? ci->connect_fd : -1;
}

static enum MHD_Result handle_completion(Server *s, struct MHD_Connection *conn, ApiKind kind, const char *body, size_t n) {
    ServeRequest r;
    ApiError e;
    if (serve_request_parse(&r, kind, body, n, &e)) return send_error(s, conn, &e);
    int np = kind == API_CHAT ? 1 : r.n_prompts;
    TokIds *ids = calloc(np, sizeof *ids);
    Job *j = NULL;
    if (!ids) {
        api_error(&e, 500, NULL, NULL, "out of memory");
        goto fail;
    }
    if (r.model && strcmp(r.model, s->alias)) {
        api_error(&e, 404, "model", "model_not_found", "the model '%.100s' does not exist: this server serves '%s'", r.model, s->alias);
        goto fail;
    }
    for (int i = 0; i < r.n_bias; i++)
        if (r.bias_ids[i] >= s->vocab) {
            api_error(&e, 400, "logit_bias", "invalid_value", "'logit_bias' has id %d, outside the vocabulary [0, %d)",
                      r.bias_ids[i], s->vocab);
            goto fail;
        }
    for (int i = 0; i < np; i++)
        if (prompt_ids(s, &r, i, &ids[i], &e)) goto fail;
    int drawn = kind == API_COMPLETION ? r.best_of : r.n;
    if (np * drawn > s->o.parallel + s->o.max_queue) {  // could never be admitted: not a matter of retrying
        api_error(&e, 400, drawn > r.n ? "best_of" : "n", "invalid_value",
                  "%d prompts × %d answers drawn; this server holds %d sequences at once (--parallel + --max-queue)", np,
                  drawn, s->o.parallel + s->o.max_queue);
        goto fail;
    }
    j = job_new(s, &r, ids, np, connection_fd(conn));
    if (!j) {
        api_error(&e, 500, NULL, NULL, "out of memory");
        goto fail;
    }
    free(ids);  // the job has the lists' buffers
    ids = NULL;
    pthread_mutex_lock(&s->mu);
    if (s->stopping || s->live_seqs + j->n > s->o.parallel + s->o.max_queue) {
        api_error(&e, 503, NULL, s->stopping ? "shutting_down" : "queue_full",
                  s->stopping ? "the server is shutting down"
                              : "the server is busy: %d sequences running or queued, room for %d; retry later",
                  s->live_seqs, s->o.parallel + s->o.max_queue);
        j->refs = 1;
        job_unref(j);
        pthread_mutex_unlock(&s->mu);
        j = NULL;
        goto fail;
    }
    s->live_seqs += j->n;
    j->refs = 2;  // this connection and the engine thread
    if (j->stream && j->kind == API_CHAT)  // the role comes first, in a delta of its own
        for (int i = 0; i < j->n; i++) {
            json_t *choice = json_pack("{s:i, s:{s:s, s:s}, s:n, s:n}", "index", i, "delta", "role", "assistant", "content",
                                       "", "logprobs", "finish_reason");
            sse_send(j, chunk_new(j, json_pack("[o]", choice)));
        }
    Job **tail = &s->pending;  // first come, first served
    while (*tail) tail = &(*tail)->next;
    *tail = j;
    pthread_cond_signal(&s->engine_cv);
    pthread_mutex_unlock(&s->mu);
    serve_request_free(&r);
    if (j->stream) {
        struct MHD_Response *resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, stream_read, j, stream_free);
        if (!resp) {
            stream_free(j);
            return MHD_NO;
        }
        MHD_add_response_header(resp, "Content-Type", "text/event-stream");
        MHD_add_response_header(resp, "Cache-Control", "no-cache");
        enum MHD_Result rc = MHD_queue_response(conn, 200, resp);
        MHD_destroy_response(resp);
        count_status(s, 200);
        return rc;
    }
    pthread_mutex_lock(&s->mu);
    while (!j->complete) {
        if (peer_closed(j->fd)) {
            job_left(j);
            break;
        }
        wait_slice(j);
    }
    int gone = j->gone, status = j->failed.status ? j->failed.status : 200;
    e = j->failed;
    json_t *answer = !gone && status == 200 ? answer_json(j) : NULL;
    job_unref(j);
    pthread_mutex_unlock(&s->mu);
    if (gone) return MHD_NO;  // nobody to answer: close the connection
    if (status != 200) return send_error(s, conn, &e);
    return send_json(s, conn, 200, answer, NULL, NULL);
fail:
    for (int i = 0; ids && i < np; i++) ids_free(&ids[i]);
    free(ids);
    serve_request_free(&r);
    return send_error(s, conn, &e);
}

// The body of /tokenize or /detokenize as a JSON object, or NULL with e set.
static json_t *body_object(const char *body, size_t n, ApiError *e) {
    json_error_t je;
    json_t *o = json_loadb(body, n, 0, &je);
    if (!o) api_error(e, 400, NULL, "invalid_json", "the body is not valid JSON: %s (at byte %d)", je.text, je.position);
    else if (!json_is_object(o)) {
        api_error(e, 400, NULL, "invalid_json", "the body must be a JSON object");
        json_decref(o);
        o = NULL;
    }
    return o;
}

// POST /tokenize {"content": TEXT (or "prompt"), "add_special": true} -> {"tokens", "count", "max_model_len"}
static enum MHD_Result handle_tokenize(Server *s, struct MHD_Connection *conn, const char *body, size_t n) {
    ApiError e;
    json_t *o = body_object(body, n, &e);
    if (!o) return send_error(s, conn, &e);
    json_t *text = json_object_get(o, "content");
    const char *key = "content";
    if (!text) text = json_object_get(o, "prompt"), key = "prompt";
    json_t *special = json_object_get(o, "add_special");
    if (!json_is_string(text)) {
        api_error(&e, 400, "content", "invalid_type", "'content' must be a string");
    } else if (special && !json_is_boolean(special)) {
        api_error(&e, 400, "add_special", "invalid_type", "'add_special' must be true or false");
    } else {
        TokIds ids = {0};
        Error err;
        pthread_mutex_lock(&s->tok_mu);
        int rc = tok_encode(s->tok, json_string_value(text), json_string_length(text),
                            !special || json_is_true(special) ? TOK_ADD_SPECIAL : 0, &ids, &err);
        pthread_mutex_unlock(&s->tok_mu);
        if (rc) {
            api_error(&e, 400, key, "invalid_value", "%s", err.msg);
        } else {
            json_t *list = json_array();
            for (size_t i = 0; i < ids.n; i++) json_array_append_new(list, json_integer(ids.v[i]));
            ids_free(&ids);
            json_decref(o);
            return send_json(s, conn, 200,
                             json_pack("{s:o, s:I, s:i}", "tokens", list, "count", (json_int_t)json_array_size(list),
                                       "max_model_len", s->o.ctx),
                             NULL, NULL);
        }
    }
    json_decref(o);
    return send_error(s, conn, &e);
}

// POST /detokenize {"tokens": [ids]} -> {"content": TEXT}
static enum MHD_Result handle_detokenize(Server *s, struct MHD_Connection *conn, const char *body, size_t n) {
    ApiError e;
    json_t *o = body_object(body, n, &e);
    if (!o) return send_error(s, conn, &e);
    json_t *list = json_object_get(o, "tokens");
    int *ids = NULL;
    size_t k = 0, i;
    json_t *v;
    if (!json_is_array(list)) {
        api_error(&e, 400, "tokens", "invalid_type", "'tokens' must be an array of token ids");
        goto fail;
    }
    ids = malloc(sizeof(int) * (json_array_size(list) + 1));
    if (!ids) {
        api_error(&e, 500, NULL, NULL, "out of memory");
        goto fail;
    }
    json_array_foreach(list, i, v) {
        json_int_t id = json_is_integer(v) ? json_integer_value(v) : -1;
        if (id < 0 || id >= s->vocab) {
            api_error(&e, 400, "tokens", "invalid_value", "'tokens[%zu]' is not a token id in [0, %d)", i, s->vocab);
            goto fail;
        }
        ids[k++] = (int)id;
    }
    size_t len;
    Error err;
    char *text = tok_decode(s->tok, ids, k, 0, &len, &err);
    if (!text) {
        api_error(&e, 400, "tokens", "invalid_value", "%s", err.msg);
        goto fail;
    }
    free(ids);
    json_decref(o);
    json_t *r = json_pack("{s:s%}", "content", text, len);
    free(text);
    return send_json(s, conn, 200, r, NULL, NULL);
fail:
    free(ids);
    json_decref(o);
    return send_error(s, conn, &e);
}

static enum MHD_Result handle_metrics(Server *s, struct MHD_Connection *conn) {
    ByteBuf b = {0};
    char line[256];
#define EMIT(...) (snprintf(line, sizeof line, __VA_ARGS__), bb_append(&b, line, strlen(line)))
    pthread_mutex_lock(&s->mu);
    EngineStats st = s->st;
    int queued = 0;
    for (Job *j = s->pending; j; j = j->next) queued += j->n;
    EMIT("# HELP dsv3_requests_total HTTP requests answered, by status.\n# TYPE dsv3_requests_total counter\n");
    for (int i = 0; i < 600; i++)
        if (s->status_count[i]) EMIT("dsv3_requests_total{status=\"%d\"} %ld\n", i, s->status_count[i]);
    int live = s->live_seqs;
    pthread_mutex_unlock(&s->mu);
    EMIT("# TYPE dsv3_prompt_tokens_total counter\ndsv3_prompt_tokens_total %ld\n", st.prompt_tokens);
    EMIT("# TYPE dsv3_generation_tokens_total counter\ndsv3_generation_tokens_total %ld\n", st.generated_tokens);
    EMIT("# HELP dsv3_decode_tokens_per_second Tokens per second of the decode passes so far.\n"
         "# TYPE dsv3_decode_tokens_per_second gauge\ndsv3_decode_tokens_per_second %.3f\n",
         st.decode_s > 0 ? st.decode_tokens / st.decode_s : 0.0);
    EMIT("# TYPE dsv3_prefill_tokens_per_second gauge\ndsv3_prefill_tokens_per_second %.3f\n",
         st.prefill_s > 0 ? st.prompt_tokens / st.prefill_s : 0.0);
    EMIT("# HELP dsv3_sequences_running Sequences in the engine's slots.\n# TYPE dsv3_sequences_running gauge\n"
         "dsv3_sequences_running %d\n", st.running);
    EMIT("# HELP dsv3_sequences_waiting Sequences waiting for a slot (in the engine, or not yet handed to it).\n"
         "# TYPE dsv3_sequences_waiting gauge\ndsv3_sequences_waiting %d\n", st.waiting + queued);
    EMIT("# HELP dsv3_sequences_live Sequences admitted and not ended.\n# TYPE dsv3_sequences_live gauge\n"
         "dsv3_sequences_live %d\n", live);
    EMIT("# TYPE dsv3_cache_blocks_used gauge\ndsv3_cache_blocks_used %ld\n", st.cache_blocks_used);
    EMIT("# TYPE dsv3_cache_blocks_free gauge\ndsv3_cache_blocks_free %ld\n", st.cache_blocks_total - st.cache_blocks_used);
    EMIT("# HELP dsv3_prefix_cache_lookup_tokens_total Prompt positions looked up in the prefix cache.\n"
         "# TYPE dsv3_prefix_cache_lookup_tokens_total counter\ndsv3_prefix_cache_lookup_tokens_total %ld\n",
         st.prefix_lookup_tokens);
    EMIT("# HELP dsv3_prefix_cache_hit_tokens_total Prompt positions served from cached blocks (not prefilled).\n"
         "# TYPE dsv3_prefix_cache_hit_tokens_total counter\ndsv3_prefix_cache_hit_tokens_total %ld\n",
         st.prefix_hit_tokens);
    EMIT("# TYPE dsv3_prefix_cache_hit_rate gauge\ndsv3_prefix_cache_hit_rate %.4f\n",
         st.prefix_lookup_tokens > 0 ? (double)st.prefix_hit_tokens / st.prefix_lookup_tokens : 0.0);
    EMIT("# TYPE dsv3_speculative_draft_tokens_total counter\ndsv3_speculative_draft_tokens_total %ld\n", st.draft_tokens);
    EMIT("# TYPE dsv3_speculative_accepted_tokens_total counter\ndsv3_speculative_accepted_tokens_total %ld\n",
         st.accepted_tokens);
    EMIT("# TYPE dsv3_speculative_acceptance_rate gauge\ndsv3_speculative_acceptance_rate %.4f\n",
         st.draft_tokens > 0 ? (double)st.accepted_tokens / st.draft_tokens : 0.0);
    if (s->o.profile) {  // (model.h: DecodeProfile)
        const DecodeProfile *pf = &st.decode_profile;
        EMIT("# HELP dsv3_decode_step_seconds_total The decode-only steps' time by part, each thread's seconds averaged "
             "over the threads (--profile).\n# TYPE dsv3_decode_step_seconds_total counter\n");
        EMIT("dsv3_decode_step_seconds_total{part=\"products\"} %.6f\n", pf->products);
        EMIT("dsv3_decode_step_seconds_total{part=\"attention\"} %.6f\n", pf->attention);
        EMIT("dsv3_decode_step_seconds_total{part=\"meetings\"} %.6f\n", pf->meetings);
        EMIT("# TYPE dsv3_decode_passes_total counter\ndsv3_decode_passes_total %ld\n", pf->steps);
    }
#undef EMIT
    if (!b.p) return MHD_NO;
    return send_body(s, conn, 200, b.p, b.n, "text/plain; version=0.0.4", NULL, NULL);
}

static enum MHD_Result handle_models(Server *s, struct MHD_Connection *conn) {
    return send_json(s, conn, 200,
                     json_pack("{s:s, s:[{s:s, s:s, s:I, s:s, s:i}]}", "object", "list", "data", "id", s->alias, "object",
                               "model", "created", (json_int_t)s->started, "owned_by", "dsv3", "max_model_len", s->o.ctx),
                     NULL, NULL);
}

// A request's body as it arrives (MHD's per-request pointer).
typedef struct Upload {
    ByteBuf body;
    int too_large;
} Upload;

typedef enum { R_CHAT, R_COMPLETIONS, R_MODELS, R_HEALTH, R_METRICS, R_TOKENIZE, R_DETOKENIZE } Route;
static const struct {
    const char *path, *method;
    Route route;
} ROUTES[] = {
    {"/v1/chat/completions", "POST", R_CHAT}, {"/v1/completions", "POST", R_COMPLETIONS},
    {"/v1/models", "GET", R_MODELS},          {"/health", "GET", R_HEALTH},
    {"/metrics", "GET", R_METRICS},           {"/tokenize", "POST", R_TOKENIZE},
    {"/detokenize", "POST", R_DETOKENIZE},
};

static int authorized(Server *s, struct MHD_Connection *conn) {
    if (!s->o.api_key) return 1;
    const char *h = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization");
    if (!h || strncmp(h, "Bearer ", 7)) return 0;
    const char *k = h + 7, *want = s->o.api_key;
    size_t n = strlen(k), m = strlen(want);
    unsigned diff = n != m;
    for (size_t i = 0; i < n && i < m; i++) diff |= (unsigned char)(k[i] ^ want[i]);  // no early exit
    return diff == 0;
}

static enum MHD_Result send_too_large(Server *s, struct MHD_Connection *conn) {
    ApiError e;
    api_error(&e, 413, NULL, "request_too_large", "the body is over the limit of %ld bytes", s->o.max_body);
    return send_error(s, conn, &e);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                  const char *version, const char *upload, size_t *upload_size, void **req) {
    Server *s = cls;
    Upload *u = *req;
    (void)version;
    if (!u) {  // the headers: a body declared over the limit is refused now, before it is sent
        const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl && strtoull(cl, NULL, 10) > (unsigned long long)s->o.max_body) return send_too_large(s, conn);
        u = calloc(1, sizeof *u);
        if (!u) return MHD_NO;
        *req = u;
        return MHD_YES;
    }
    if (*upload_size) {
        if (!u->too_large && u->body.n + *upload_size > (size_t)s->o.max_body) {
            u->too_large = 1;
            bb_free(&u->body);
        }
        if (!u->too_large && bb_append(&u->body, upload, *upload_size)) return MHD_NO;
        *upload_size = 0;
        return MHD_YES;
    }
    ApiError e;
    int found = -1, path_known = 0;
    for (size_t i = 0; i < sizeof ROUTES / sizeof ROUTES[0]; i++)
        if (!strcmp(url, ROUTES[i].path)) {
            path_known = 1;
            if (!strcmp(method, ROUTES[i].method) || (!strcmp(method, "HEAD") && !strcmp(ROUTES[i].method, "GET")))
                found = (int)i;
        }
    if (!path_known) {
        api_error(&e, 404, NULL, "unknown_url", "no such endpoint: %s %.200s", method, url);
        return send_error(s, conn, &e);
    }
    if (found < 0) {
        const char *allow = NULL;
        for (size_t i = 0; i < sizeof ROUTES / sizeof ROUTES[0]; i++)
            if (!strcmp(url, ROUTES[i].path)) allow = ROUTES[i].method;
        api_error(&e, 405, NULL, "method_not_allowed", "%s takes %s, not %.20s", url, allow, method);
        return send_json(s, conn, 405, error_json(&e), "Allow", allow);
    }
    Route route = ROUTES[found].route;
    if (route != R_HEALTH && !authorized(s, conn)) {
        api_error(&e, 401, NULL, "invalid_api_key", "a valid API key is needed: Authorization: Bearer KEY");
        return send_error(s, conn, &e);
    }
    if (u->too_large) return send_too_large(s, conn);  // (a chunked body, its length said nowhere)
    const char *body = u->body.p ? u->body.p : "";
    switch (route) {
    case R_CHAT: return handle_completion(s, conn, API_CHAT, body, u->body.n);
    case R_COMPLETIONS: return handle_completion(s, conn, API_COMPLETION, body, u->body.n);
    case R_MODELS: return handle_models(s, conn);
    case R_HEALTH: return send_json(s, conn, 200, json_pack("{s:s}", "status", "ok"), NULL, NULL);
    case R_METRICS: return handle_metrics(s, conn);
    case R_TOKENIZE: return handle_tokenize(s, conn, body, u->body.n);
    case R_DETOKENIZE: return handle_detokenize(s, conn, body, u->body.n);
    }
    return MHD_NO;
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **req, enum MHD_RequestTerminationCode why) {
    Upload *u = *req;
    (void)cls;
    (void)conn;
    (void)why;
    if (u) {
        bb_free(&u->body);
        free(u);
        *req = NULL;
    }
}

static void server_free(Server *s) {
    if (s->e) engine_free(s->e);
    if (s->model_loaded) model_free(&s->m);
    json_vocab_free(&s->json_vocab);
    tok_free(s->tok);
    free(s->cancel_buf);
    free(s);
}

static int stop_pipe[2] = {-1, -1};
static void on_stop_signal(int sig) {
    (void)sig;
    char b = 1;
    ssize_t rc = write(stop_pipe[1], &b, 1);  // a full pipe already holds a stop
    (void)rc;
}

int serve_run(const ServeOptions *o, Error *err) {
    Server *s = calloc(1, sizeof *s);
    if (!s) return err_set(err, "out of memory");
    s->o = *o;
    s->started = (long long)time(NULL);
    if (o->alias) {
        snprintf(s->alias, sizeof s->alias, "%s", o->alias);
    } else {  // the directory's name
        char dir[256];
        snprintf(dir, sizeof dir, "%s", o->model_dir);
        size_t n = strlen(dir);
        while (n > 1 && dir[n - 1] == '/') dir[--n] = '\0';
        const char *base = strrchr(dir, '/');
        snprintf(s->alias, sizeof s->alias, "%s", base && base[1] ? base + 1 : dir);
    }
    s->tok = tok_load_dir(o->model_dir, err);
    if (!s->tok || model_load(&s->m, o->model_dir, 0, err)) {
        server_free(s);
        return -1;
    }
    s->model_loaded = 1;
    if (model_set_compute(&s->m, o->compute, err)) {
        server_free(s);
        return -1;
    }
    model_set_panel_tiles(&s->m, o->decode_tile_rows);
    s->vocab = s->m.cfg.vocab_size;
    s->tok_vocab = tok_vocab_size(s->tok);
    if (json_vocab_init(&s->json_vocab, s->tok, s->vocab)) {
        err_set(err, "out of memory for the vocabulary's JSON tables");
        server_free(s);
        return -1;
    }
    if (s->o.ctx > s->m.cfg.max_position_embeddings) s->o.ctx = s->m.cfg.max_position_embeddings;
    EngineOptions eo = {.parallel = o->parallel, .ctx = s->o.ctx, .prefill_chunk = PREFILL_CHUNK,
                        .kv_dtype = o->kv_auto ? model_kv_dtype_auto(&s->m) : o->kv_dtype,
                        .speculative = o->speculative, .prefix_cache = o->prefix_cache, .profile = o->profile};
    s->e = engine_new(&s->m, &eo, err);
    if (!s->e) {
        server_free(s);
        return -1;
    }
    s->st = *engine_stats(s->e);

    struct addrinfo hints = {.ai_flags = AI_NUMERICHOST | AI_PASSIVE, .ai_socktype = SOCK_STREAM}, *ai = NULL;
    char port[16];
    snprintf(port, sizeof port, "%d", o->port);
    if (getaddrinfo(o->host, port, &hints, &ai) || !ai) {
        server_free(s);
        return err_set(err, "--host %s: not a numeric IPv4 or IPv6 address", o->host);
    }
    int v6 = ai->ai_family == AF_INET6;

    // Signals: SIGINT and SIGTERM write a byte to a pipe the main thread waits on (a handler, not
    // sigwait: threads made before this point — OpenBLAS's, OpenMP's — would take a blocked signal's
    // default action); a client that vanishes must not kill the process with SIGPIPE.
    if (pipe(stop_pipe)) {
        freeaddrinfo(ai);
        server_free(s);
        return err_set(err, "cannot make a pipe");
    }
    struct sigaction sa = {0};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    pthread_mutex_init(&s->mu, NULL);
    pthread_mutex_init(&s->tok_mu, NULL);
    pthread_cond_init(&s->engine_cv, NULL);
    pthread_t engine_thread;
    if (pthread_create(&engine_thread, NULL, engine_main, s)) {
        freeaddrinfo(ai);
        server_free(s);
        return err_set(err, "cannot start the engine thread");
    }
    unsigned limit = (unsigned)(o->parallel + o->max_queue + 64);
    struct MHD_Daemon *d = MHD_start_daemon(
        MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION | MHD_USE_POLL | (v6 ? MHD_USE_IPv6 : 0),
        (uint16_t)o->port, NULL, NULL, on_request, s, MHD_OPTION_SOCK_ADDR, ai->ai_addr, MHD_OPTION_CONNECTION_TIMEOUT,
        (unsigned)o->timeout_s, MHD_OPTION_CONNECTION_LIMIT, limit, MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
        MHD_OPTION_END);
    freeaddrinfo(ai);
    int rc = 0;
    if (!d) {
        rc = err_set(err, "cannot listen on %s port %d (in use, or not an address of this machine)", o->host, o->port);
    } else {
        const union MHD_DaemonInfo *di = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
        fprintf(stderr, v6 ? "listening on http://[%s]:%d\n" : "listening on http://%s:%d\n", o->host,
                di ? di->port : o->port);
        fflush(stderr);
        char b;
        while (read(stop_pipe[0], &b, 1) < 0 && errno == EINTR) {
        }
    }
    // Stop: the engine thread ends every sequence (their streams end with an error event), the
    // connections finish sending and MHD joins their threads.
    pthread_mutex_lock(&s->mu);
    s->stopping = 1;
    pthread_cond_signal(&s->engine_cv);
    pthread_mutex_unlock(&s->mu);
    pthread_join(engine_thread, NULL);
    if (d) MHD_stop_daemon(d);
    pthread_cond_destroy(&s->engine_cv);
    pthread_mutex_destroy(&s->tok_mu);
    pthread_mutex_destroy(&s->mu);
    server_free(s);
    return rc;
}
