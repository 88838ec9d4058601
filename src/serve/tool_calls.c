#define _GNU_SOURCE  // memmem
#include <stdlib.h>
#include <string.h>

#include "serve/tool_calls.h"
#include "text/tokenizer.h"
#include "text/utf8.h"

static const char *find(const char *p, const char *end, const char *what) {
    return p <= end ? memmem(p, (size_t)(end - p), what, strlen(what)) : NULL;
}

static int space(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }

static char *dup_trimmed(const char *a, const char *b) {
    while (a < b && space(*a)) a++;
    while (b > a && space(b[-1])) b--;
    char *s = malloc((size_t)(b - a) + 1);
    if (s) {
        memcpy(s, a, (size_t)(b - a));
        s[b - a] = '\0';
    }
    return s;
}

// The arguments of a V3 call: a body "NAME\n```json\nARGS\n```" without its name line, fence removed.
static char *unfenced(const char *a, const char *b) {
    while (a < b && space(*a)) a++;
    if (b - a >= 3 && !memcmp(a, "```", 3)) {  // "```" or "```json" up to the end of the line
        const char *nl = memchr(a, '\n', (size_t)(b - a));
        a = nl ? nl + 1 : b;
        while (b > a && space(b[-1])) b--;
        if (b - a >= 3 && !memcmp(b - 3, "```", 3)) b -= 3;
    }
    return dup_trimmed(a, b);
}

int tool_calls_parse(const char *text, size_t n, ToolCallText **out) {
    const char *p = text, *end = text + n;
    int count = 0, cap = 0;
    *out = NULL;
    const char *cb;
    while ((cb = find(p, end, CHAT_TOOL_CALL_BEGIN))) {
        const char *head = cb + strlen(CHAT_TOOL_CALL_BEGIN);
        const char *ce = find(head, end, CHAT_TOOL_CALL_END);
        if (!ce) break;  // unfinished
        const char *sep = find(head, ce, CHAT_TOOL_SEP);
        if (!sep) {
            p = ce + strlen(CHAT_TOOL_CALL_END);
            continue;
        }
        const char *body = sep + strlen(CHAT_TOOL_SEP);
        const char *nl = memchr(body, '\n', (size_t)(ce - body)), *fence = nl ? nl + 1 : NULL;
        while (fence && fence < ce && space(*fence)) fence++;
        if (fence && ce - fence >= 3 && !memcmp(fence, "```", 3)) {
            // V3's fenced arguments end at the closing fence and the call's end: the end marker alone
            // may be text inside a JSON string (with DeepSeek-V3's tokenizer it is one token, which a
            // string may hold), a line break then the fence cannot. Not past the next call's opening
            // (a call that never closed its fence ends at its first end marker, as before).
            const char *next = find(ce, end, CHAT_TOOL_CALL_BEGIN), *lim = next ? next : end;
            const char *close = find(fence + 3, lim, "\n```" CHAT_TOOL_CALL_END);
            if (!close) close = find(fence + 3, lim, "```" CHAT_TOOL_CALL_END);
            if (close) ce = find(close, lim, CHAT_TOOL_CALL_END);
        }
        p = ce + strlen(CHAT_TOOL_CALL_END);
        char *name, *args;
        if (nl && memmem(nl, (size_t)(ce - nl), "```", 3)) {  // V3: TYPE <sep> NAME \n fenced arguments
            name = dup_trimmed(body, nl);
            args = unfenced(nl + 1, ce);
        } else {  // V3.1: NAME <sep> ARGUMENTS
            name = dup_trimmed(head, sep);
            args = dup_trimmed(body, ce);
        }
        if (!name || !args || !name[0]) {
            int oom = !name || !args;
            free(name);
            free(args);
            if (oom) goto fail;
            continue;
        }
        if (count == cap) {
            cap = cap ? 2 * cap : 4;
            ToolCallText *nb = realloc(*out, sizeof **out * (size_t)cap);
            if (!nb) {
                free(name);
                free(args);
                goto fail;
            }
            *out = nb;
        }
        (*out)[count++] = (ToolCallText){name, args};
    }
    return count;
fail:
    tool_calls_free(*out, count);
    *out = NULL;
    return -1;
}

void tool_calls_free(ToolCallText *calls, int n) {
    for (int i = 0; i < n; i++) {
        free(calls[i].name);
        free(calls[i].arguments);
    }
    free(calls);
}

// A call: its opening (then the function's name, "\n```json\n", the arguments) and its end; a
// forced answer opens the calls and closes them after one.
#define TOOL_CALL_HEAD CHAT_TOOL_CALL_BEGIN "function" CHAT_TOOL_SEP
#define TOOL_CALL_TAIL "\n```" CHAT_TOOL_CALL_END
#define TOOL_FORCED_HEAD CHAT_TOOL_CALLS_BEGIN TOOL_CALL_HEAD
#define TOOL_FORCED_TAIL TOOL_CALL_TAIL CHAT_TOOL_CALLS_END

int tool_frame_build(ToolFrame *f, ServeRequest *r) {
    memset(f, 0, sizeof *f);
    f->force = r->tool_choice == TOOL_REQUIRED || r->tool_choice == TOOL_NAMED;
    f->lazy = r->tool_choice == TOOL_AUTO && !r->json_mode;
    if (!f->force && !f->lazy) return 0;
    int one_call = f->force || !r->parallel_tool_calls;
    int first = r->tool_choice == TOOL_NAMED ? r->tool_named : 0, last = r->tool_choice == TOOL_NAMED ? first + 1 : r->n_tools;
    f->heads = calloc((size_t)(last - first), sizeof *f->heads);
    f->again = f->lazy && !one_call ? calloc((size_t)(last - first), sizeof *f->again) : NULL;
    f->schemas = calloc((size_t)(last - first), sizeof *f->schemas);
    for (int i = first; f->heads && f->schemas && (f->again || one_call) && i < last; i++) {
        ByteBuf b = {0}, a = {0};
        if (bb_puts(&b, f->lazy ? TOOL_CALL_HEAD : TOOL_FORCED_HEAD) || bb_puts(&b, r->tool_names[i]) ||
            bb_puts(&b, "\n```json\n") || (f->again && (bb_puts(&a, "\n") || bb_puts(&a, b.p)))) {
            bb_free(&b);
            bb_free(&a);
            break;
        }
        f->schemas[f->n] = r->tool_schemas[i];  // the frame's now
        r->tool_schemas[i] = NULL;
        if (f->again) f->again[f->n] = a.p;
        f->heads[f->n++] = b.p;
    }
    if (f->n == last - first) return 0;
    tool_frame_free(f);
    return -1;
}

JsonFrame tool_frame_view(const ToolFrame *f) {
    return (JsonFrame){.heads = (const char *const *)f->heads,
                       .head_schemas = (const JsonSchema *const *)f->schemas,
                       .n_heads = f->n,
                       .tail = f->again ? TOOL_CALL_TAIL : TOOL_FORCED_TAIL,  // (one call: closed after it)
                       .again = (const char *const *)f->again,
                       .close = CHAT_TOOL_CALLS_END,
                       .trigger = f->lazy ? CHAT_TOOL_CALLS_BEGIN : NULL};
}

void tool_frame_free(ToolFrame *f) {
    for (int i = 0; i < f->n; i++) {
        free(f->heads[i]);
        if (f->again) free(f->again[i]);
        json_schema_free(f->schemas[i]);
    }
    free(f->heads);
    free(f->again);
    free(f->schemas);
    memset(f, 0, sizeof *f);
}
