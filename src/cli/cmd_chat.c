// dsv3 chat: a multi-turn conversation in the terminal. Each turn renders the history in the
// DeepSeek-V3 chat format (tokenizer.json of the model directory) and streams the reply; /reset
// clears the history (the system prompt stays), /exit or end of input ends the session, Ctrl-C
// stops a reply without ending the session.
//
// With --tools FILE (the OpenAI API's `tools` array) the functions are described to the model as
// `dsv3 serve` describes them, and its calls are held to DeepSeek-V3's format and the functions'
// parameters (serve/tool_calls.h's frame): a reply that calls tools prints each call as a line
// `[tool call] NAME ARGUMENTS`, then each following input line is the result of one call, in
// order (a "tool" message); once every result is in, the model goes on. --tool-choice auto (the
// default), none, required or a function's name, as the API's tool_choice; a forced choice holds
// the reply to a user's message, the replies after tool results are auto.
//
// Each turn prefills the whole conversation again (the engine does not yet keep a sequence's cache
// across turns).
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/util.h"
#include <jansson.h>

#include "base/file.h"
#include "infer/engine.h"
#include "model/model.h"
#include "serve/json_mode.h"
#include "serve/request.h"
#include "serve/stop_text.h"
#include "serve/tool_calls.h"
#include "text/tokenizer.h"
#include "text/utf8.h"

static const char *const VALUED[] = {"model", "system", "max-new", "temperature", "top-p", "top-k", "seed", "ctx",
                                     "kv-dtype", "speculative", "compute", "tools", "tool-choice", "decode-tiles", NULL};
static const char *const FLAGS[] = {"no-mmap", "verbose-prompt", NULL};

static volatile sig_atomic_t interrupted;
static void on_sigint(int sig) {
    (void)sig;
    interrupted = 1;
}

typedef struct {
    TokStream ts;
    StopText split;  // with tools: the reply's text ends where its calls begin
    ByteBuf reply;   // the reply's text, for the history
    ByteBuf calls;   // what follows the calls' opening marker
    Error *err;
    int failed;
} Turn;

// Text decoded: up to the calls' marker printed and kept, after it kept as the calls.
static int turn_text(Turn *t, const char *text, size_t n, int last) {
    if (t->split.matched) return bb_append(&t->calls, text, n);
    size_t before = t->reply.n;
    int rc = last ? stop_text_finish(&t->split, &t->reply) : stop_text_push(&t->split, text, n, &t->reply);
    if (rc < 0) return -1;
    if (t->reply.n > before) {
        fwrite(t->reply.p + before, 1, t->reply.n - before, stdout);
        fflush(stdout);
    }
    size_t an;
    const char *after = rc == 1 ? stop_text_after(&t->split, &an) : NULL;
    return after && an ? bb_append(&t->calls, after, an) : 0;
}

static void on_token(void *owner, int seq, const EngineToken *et) {
    int token = et->token;
    Turn *t = owner;
    (void)seq;
    const char *text;
    size_t n;
    if (token < 0 || t->failed) return;
    if (tok_stream_push(&t->ts, token, &text, &n, t->err) || turn_text(t, text, n, 0)) t->failed = 1;
}

// The functions the model may call (--tools), checked and described as the server does.
typedef struct {
    ServeRequest req;  // req.tools_prompt: their description; req.tool_names
    ToolFrame frame;   // the calls' format (forced or lazy)
    ToolFrame autof;   // after tool results: the lazy frame
    JsonVocab vocab;
    int active;
} Tools;

typedef struct {
    ChatMessage *m;  // contents and tool calls owned (malloc'd)
    int n, cap;
} History;

static int history_add(History *h, const char *role, const char *content, size_t len) {
    if (h->n == h->cap) {
        int cap = h->cap ? 2 * h->cap : 8;
        ChatMessage *nm = realloc(h->m, sizeof *nm * cap);
        if (!nm) return -1;
        h->m = nm;
        h->cap = cap;
    }
    char *c = malloc(len + 1);
    if (!c) return -1;
    memcpy(c, content, len);
    c[len] = '\0';
    h->m[h->n++] = (ChatMessage){.role = role, .content = c};
    return 0;
}

// Drops the messages from index keep on.
static void history_trim(History *h, int keep) {
    while (h->n > keep) {
        ChatMessage *m = &h->m[--h->n];
        for (int i = 0; i < m->n_tool_calls; i++) {
            free((char *)m->tool_calls[i].name);
            free((char *)m->tool_calls[i].arguments);
        }
        free((ChatToolCall *)m->tool_calls);
        free((char *)m->content);
    }
}

// The last message (an assistant's reply) gets the calls it made (taking their strings).
static int history_calls(History *h, ToolCallText *calls, int n) {
    ChatToolCall *tc = calloc((size_t)n, sizeof *tc);
    if (!tc) return -1;
    for (int i = 0; i < n; i++) {
        tc[i].name = calls[i].name, tc[i].arguments = calls[i].arguments;
        calls[i].name = calls[i].arguments = NULL;
    }
    h->m[h->n - 1].tool_calls = tc;
    h->m[h->n - 1].n_tool_calls = n;
    return 0;
}

// One turn: the history (ending in the user's message or the tools' results) in, the reply
// streamed and added. The session's engine keeps the conversation's cache blocks (its prefix
// cache), so a turn computes only what the previous turns did not: the reply's tail and the new
// message. With tools, frame (or NULL) holds the reply's calls to their format; returns the
// number of calls the reply made (each printed), or -1.
static int reply(Engine *e, Tokenizer *tok, History *h, const SeqParams *sp, int ctx, int verbose, Tools *tools,
                 const ToolFrame *frame, int eos, Error *err) {
    const char *described = tools && tools->active ? tools->req.tools_prompt : NULL;
    if (verbose) {
        char *text = tok_chat_render_tools(tok, h->m, h->n, described, 1, err);
        if (!text) return -1;
        fprintf(stderr, "%s\n", text);
        free(text);
    }
    TokIds ids = {0};
    if (tok_chat_encode_tools(tok, h->m, h->n, described, 1, &ids, err)) return -1;
    int rc = -1, id = -1, n_calls = 0;
    Turn t = {.err = err};
    const char *marker = CHAT_TOOL_CALLS_BEGIN;
    stop_text_init(&t.split, &marker, described ? 1 : 0);
    tok_stream_init(&t.ts, tok, TOK_SKIP_SPECIAL);
    JsonMode jm = {0};
    TokenConstraint tc;
    if ((int)ids.n >= ctx) {
        err_set(err, "the conversation is %zu tokens, the context %d: /reset to start again", ids.n, ctx);
        goto done;
    }
    SeqParams p = *sp;
    if (p.max_new > ctx - (int)ids.n) p.max_new = ctx - (int)ids.n;
    if (frame && frame->n) {  // the calls held to the format and the functions' parameters
        int ends[2] = {eos, tok_eos_id(tok)};
        JsonFrame f = tool_frame_view(frame);
        if (json_mode_init(&jm, &tools->vocab, ends, 2, NULL) || json_mode_frame(&jm, &f)) {
            err_set(err, "out of memory");
            goto done;
        }
        tc = json_mode_constraint(&jm);
        p.constraint = &tc;
    }
    if ((id = engine_add(e, ids.v, (int)ids.n, &p, on_token, &t, err)) < 0) goto done;
    int live;
    while ((live = engine_step(e, err)) > 0 && !t.failed) {
        if (interrupted) {  // Ctrl-C: this reply stops, the session goes on
            engine_cancel(e, id);
            break;
        }
    }
    if (live < 0 || t.failed) goto done;
    const char *tail;
    size_t n;
    tok_stream_finish(&t.ts, &tail, &n);
    if (turn_text(&t, tail, n, 0) || turn_text(&t, NULL, 0, 1)) goto oom;
    printf("\n");
    ToolCallText *calls = NULL;
    n_calls = t.calls.n ? tool_calls_parse(t.calls.p, t.calls.n, &calls) : 0;
    if (n_calls < 0) goto oom;
    for (int i = 0; i < n_calls; i++) {  // the arguments on one line (compact), as the model wrote them otherwise
        json_t *args = json_loads(calls[i].arguments, 0, NULL);
        char *line = args ? json_dumps(args, JSON_COMPACT) : NULL;
        printf("[tool call] %s %s\n", calls[i].name, line ? line : calls[i].arguments);
        free(line);
        json_decref(args);
    }
    fflush(stdout);
    if (history_add(h, "assistant", t.reply.p ? t.reply.p : "", t.reply.n) || (n_calls && history_calls(h, calls, n_calls))) {
        tool_calls_free(calls, n_calls);
        goto oom;
    }
    tool_calls_free(calls, n_calls);
    rc = n_calls;
    goto done;
oom:
    err_set(err, "out of memory");
done:
    interrupted = 0;
    if (id >= 0) engine_cancel(e, id);  // (a no-op once it has finished)
    tok_stream_free(&t.ts);
    stop_text_free(&t.split);
    json_mode_free(&jm);
    bb_free(&t.reply);
    bb_free(&t.calls);
    ids_free(&ids);
    return rc;
}

// A chat request holding the functions and tool_choice (NULL: the default), parsed by the server's
// own parser: the same checks, the same description. 0, or -1 with ae set.
static int tools_request(ServeRequest *r, json_t *list, const char *choice, ApiError *ae) {
    json_t *body = json_pack("{s:[{s:s, s:s}], s:O}", "messages", "role", "user", "content", ".", "tools", list);
    if (body && choice) {
        int named = strcmp(choice, "auto") && strcmp(choice, "none") && strcmp(choice, "required");
        json_object_set_new(body, "tool_choice", named ? json_pack("{s:s, s:{s:s}}", "type", "function", "function", "name", choice)
                                                       : json_string(choice));
    }
    char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
    json_decref(body);
    memset(r, 0, sizeof *r);
    if (!text) return api_error(ae, 500, NULL, NULL, "out of memory");
    int rc = serve_request_parse(r, API_CHAT, text, strlen(text), ae);
    free(text);
    if (rc) memset(r, 0, sizeof *r);  // (freed by the parser: nothing to free again)
    return rc;
}

// --tools FILE and --tool-choice: the request's checks and description, the frames of the calls
// (forced: and the lazy one for the replies after tool results). tools->active 0 without --tools
// or with --tool-choice none. (The mask's vocabulary is the model's: made once it is loaded.)
static int tools_load(Tools *tools, const Args *a, Error *err) {
    memset(tools, 0, sizeof *tools);
    const char *path = args_str(a, "tools", NULL), *choice = args_str(a, "tool-choice", NULL);
    if (!path) return choice ? err_set(err, "--tool-choice needs --tools") : 0;
    json_t *list = file_read_json(path, 0, err);
    if (!list) return -1;
    ApiError ae;
    ServeRequest later = {0};
    int rc = tools_request(&tools->req, list, choice, &ae);
    if (rc == 0) {
        tools->active = tools->req.tool_choice != TOOL_NONE;
        rc = tool_frame_build(&tools->frame, &tools->req) ? -1 : 0;
        if (rc) api_error(&ae, 500, NULL, NULL, "out of memory");
    }
    if (rc == 0 && tools->frame.force) {  // after the tools' results the model answers or calls again: auto
        rc = tools_request(&later, list, "auto", &ae);
        if (rc == 0 && (rc = tool_frame_build(&tools->autof, &later)) != 0) api_error(&ae, 500, NULL, NULL, "out of memory");
        serve_request_free(&later);
    }
    json_decref(list);
    return rc ? err_set(err, "%s: %s", path, ae.message) : 0;
}

static void tools_free(Tools *tools) {
    serve_request_free(&tools->req);
    tool_frame_free(&tools->frame);
    tool_frame_free(&tools->autof);
    if (tools->vocab.text) json_vocab_free(&tools->vocab);
}

int cmd_chat(int argc, char **argv) {
    const char *cmd = "dsv3 chat";
    Error err = {0};
    Args a;
    const char *dir;
    long ctx;
    SeqParams sp = seq_params_default();
    sp.max_new = 512;  // a chat's defaults: replies sampled, as people expect of a chat
    sp.temperature = 0.7f;
    sp.top_p = 0.95f;
    if (args_parse(&a, cmd, argc, argv, VALUED, FLAGS, &err) || args_require(&a, "model", &dir, &err) ||
        parse_sampling(&a, &sp, &err) || args_long(&a, "ctx", 4096, 2, 1 << 24, &ctx, &err))
        return cli_fail(cmd, &err);
    if (a.npos > 0) {
        err_set(&err, "unexpected argument '%s'", a.pos[0]);
        return cli_fail(cmd, &err);
    }
    DType kv_dtype;
    int kv_auto;
    long spec;
    ComputeMode cmode;
    long tile_rows;
    if (parse_kv_dtype(&a, "auto", &kv_dtype, &kv_auto, &err) || args_long(&a, "speculative", 0, 0, ENGINE_MAX_SPECULATIVE, &spec, &err) ||
        parse_compute(&a, "auto", &cmode, &err) || parse_decode_tiles(&a, 1, &tile_rows, &err))
        return cli_fail(cmd, &err);
    EngineOptions eo = {.parallel = 1, .prefill_chunk = 512, .kv_dtype = kv_dtype, .speculative = (int)spec};
    Tokenizer *tok = tok_load_dir(dir, &err);
    if (!tok) return cli_fail(cmd, &err);
    Tools tools;
    if (tools_load(&tools, &a, &err)) {
        tools_free(&tools);
        tok_free(tok);
        return cli_fail(cmd, &err);
    }
    Model m;
    if (args_flag(&a, "no-mmap")) st_set_load_mode(ST_READ);
    if (model_load(&m, dir, 0, &err)) {
        tools_free(&tools);
        tok_free(tok);
        return cli_fail(cmd, &err);
    }
    if (tools.active && json_vocab_init(&tools.vocab, tok, m.cfg.vocab_size)) {
        err_set(&err, "out of memory");
        model_free(&m);
        tools_free(&tools);
        tok_free(tok);
        return cli_fail(cmd, &err);
    }
    if (model_set_compute(&m, cmode, &err)) {
        model_free(&m);
        tools_free(&tools);
        tok_free(tok);
        return cli_fail(cmd, &err);
    }
    model_set_panel_tiles(&m, tile_rows);  // (one conversation: auto takes none)
    if (kv_auto) eo.kv_dtype = model_kv_dtype_auto(&m);
    if (ctx > m.cfg.max_position_embeddings) ctx = m.cfg.max_position_embeddings;
    eo.ctx = (int)ctx;
    eo.prefix_cache = 1;
    Engine *e = engine_new(&m, &eo, &err);
    if (!e) {
        model_free(&m);
        tools_free(&tools);
        tok_free(tok);
        return cli_fail(cmd, &err);
    }
    History h = {0};
    const char *system = args_str(&a, "system", NULL);
    int rc = 1, keep = 0, tty = isatty(STDIN_FILENO) && isatty(STDERR_FILENO);
    if (system && history_add(&h, "system", system, strlen(system))) goto oom;
    keep = h.n;
    struct sigaction sa = {0};
    sa.sa_handler = on_sigint;  // no SA_RESTART: Ctrl-C at the prompt interrupts the read
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    char *line = NULL;
    size_t cap = 0;
    int due = 0, asked = 0;  // tool results still due for the last reply's calls, and how many it made
    for (long turn = 0;;) {
        if (tty) {
            if (due) fprintf(stderr, "(result of %s)> ", h.m[h.n - 1 - (asked - due)].tool_calls[asked - due].name);
            else fputs("> ", stderr);
        }
        errno = 0;
        ssize_t len = getline(&line, &cap, stdin);
        if (len < 0) {
            if (errno == EINTR) {  // Ctrl-C at the prompt
                interrupted = 0;
                clearerr(stdin);
                fputs("\n(/exit or Ctrl-D to leave)\n", stderr);
                continue;
            }
            break;  // end of input
        }
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = '\0';
        if (len == 0) continue;
        if (!strcmp(line, "/exit")) break;
        if (!strcmp(line, "/reset")) {
            history_trim(&h, keep);
            due = 0;
            fputs("(conversation cleared)\n", stderr);
            continue;
        }
        if (history_add(&h, due ? "tool" : "user", line, (size_t)len)) goto oom;
        int after_tools = due > 0;
        if (due && --due) continue;  // more results due
        SeqParams st = sp;
        st.seed = sp.seed + (unsigned long long)turn++;  // each turn its own draws
        const ToolFrame *frame = !tools.active ? NULL : after_tools && tools.frame.force ? &tools.autof : &tools.frame;
        int before = h.n;
        int calls = reply(e, tok, &h, &st, (int)ctx, args_flag(&a, "verbose-prompt"), &tools, frame, m.cfg.eos_token_id, &err);
        if (calls < 0) {
            history_trim(&h, after_tools ? before : before - 1);  // the turn did not happen (the results stay)
            cli_fail(cmd, &err);
            err = (Error){0};
        }
        due = asked = calls > 0 ? calls : 0;
    }
    rc = 0;
    goto done;
oom:
    err_set(&err, "out of memory");
    cli_fail(cmd, &err);
done:
    free(line);
    history_trim(&h, 0);
    free(h.m);
    engine_free(e);
    model_free(&m);
    tok_free(tok);
    return rc;
}
