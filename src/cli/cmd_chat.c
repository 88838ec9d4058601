// dsv3 chat: a multi-turn conversation in the terminal. Each turn renders the history in the
// DeepSeek-V3 chat format (tokenizer.json of the model directory) and streams the reply; /reset
// clears the history (the system prompt stays), /exit or end of input ends the session, Ctrl-C
// stops a reply without ending the session.
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
#include "infer/engine.h"
#include "model/model.h"
#include "text/tokenizer.h"
#include "text/utf8.h"

static const char *const VALUED[] = {"model", "system", "max-new", "temperature", "top-p", "top-k", "seed", "ctx",
                                     "kv-dtype", "speculative", "compute", NULL};
static const char *const FLAGS[] = {"no-mmap", "verbose-prompt", NULL};

static volatile sig_atomic_t interrupted;
static void on_sigint(int sig) {
    (void)sig;
    interrupted = 1;
}

typedef struct {
    TokStream ts;
    ByteBuf reply;  // the reply's text, for the history
    Error *err;
    int failed;
} Turn;

static void on_token(void *owner, int seq, const EngineToken *et) {
    int token = et->token;
    Turn *t = owner;
    (void)seq;
    const char *text;
    size_t n;
    if (token < 0 || t->failed) return;
    if (tok_stream_push(&t->ts, token, &text, &n, t->err) || bb_append(&t->reply, text, n)) {
        t->failed = 1;
        return;
    }
    fwrite(text, 1, n, stdout);
    fflush(stdout);
}

typedef struct {
    ChatMessage *m;  // contents owned (malloc'd)
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
    while (h->n > keep) free((char *)h->m[--h->n].content);
}

// One turn: the history (ending in the user's message) in, the reply streamed and added.
// The session's engine keeps the conversation's cache blocks (its prefix cache), so a turn
// computes only what the previous turns did not: the reply's tail and the new message.
static int reply(Engine *e, Tokenizer *tok, History *h, const SeqParams *sp, int ctx, int verbose, Error *err) {
    if (verbose) {
        char *text = tok_chat_render(tok, h->m, h->n, 1, err);
        if (!text) return -1;
        fprintf(stderr, "%s\n", text);
        free(text);
    }
    TokIds ids = {0};
    if (tok_chat_encode(tok, h->m, h->n, 1, &ids, err)) return -1;
    int rc = -1, id = -1;
    Turn t = {.err = err};
    tok_stream_init(&t.ts, tok, TOK_SKIP_SPECIAL);
    if ((int)ids.n >= ctx) {
        err_set(err, "the conversation is %zu tokens, the context %d: /reset to start again", ids.n, ctx);
        goto done;
    }
    SeqParams p = *sp;
    if (p.max_new > ctx - (int)ids.n) p.max_new = ctx - (int)ids.n;
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
    fwrite(tail, 1, n, stdout);
    printf("\n");
    fflush(stdout);
    if (bb_append(&t.reply, tail, n) || history_add(h, "assistant", t.reply.p ? t.reply.p : "", t.reply.n)) {
        err_set(err, "out of memory");
        goto done;
    }
    rc = 0;
done:
    interrupted = 0;
    if (id >= 0) engine_cancel(e, id);  // (a no-op once it has finished)
    tok_stream_free(&t.ts);
    bb_free(&t.reply);
    ids_free(&ids);
    return rc;
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
    long spec;
    ComputeMode cmode;
    if (parse_kv_dtype(&a, &kv_dtype, &err) || args_long(&a, "speculative", 0, 0, ENGINE_MAX_SPECULATIVE, &spec, &err) ||
        parse_compute(&a, "auto", &cmode, &err))
        return cli_fail(cmd, &err);
    EngineOptions eo = {.parallel = 1, .prefill_chunk = 512, .kv_dtype = kv_dtype, .speculative = (int)spec};
    Tokenizer *tok = tok_load_dir(dir, &err);
    if (!tok) return cli_fail(cmd, &err);
    Model m;
    if (args_flag(&a, "no-mmap")) st_set_load_mode(ST_READ);
    if (model_load(&m, dir, 0, &err)) {
        tok_free(tok);
        return cli_fail(cmd, &err);
    }
    model_set_compute(&m, cmode);
    if (ctx > m.cfg.max_position_embeddings) ctx = m.cfg.max_position_embeddings;
    eo.ctx = (int)ctx;
    eo.prefix_cache = 1;
    Engine *e = engine_new(&m, &eo, &err);
    if (!e) {
        model_free(&m);
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
    for (long turn = 0;;) {
        if (tty) fputs("> ", stderr);
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
            fputs("(conversation cleared)\n", stderr);
            continue;
        }
        if (history_add(&h, "user", line, (size_t)len)) goto oom;
        SeqParams st = sp;
        st.seed = sp.seed + (unsigned long long)turn++;  // each turn its own draws
        if (reply(e, tok, &h, &st, (int)ctx, args_flag(&a, "verbose-prompt"), &err)) {
            history_trim(&h, h.n - 1);  // the turn did not happen
            cli_fail(cmd, &err);
            err = (Error){0};
        }
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
