// The DeepSeek-V3 chat format (tokenizer.h has the rules): system prompts, user and assistant
// turns, the assistant's tool calls and the tools' outputs.
#include <stdlib.h>
#include <string.h>

#include "text/tokenizer.h"
#include "text/utf8.h"

static const char USER[] = "<｜User｜>";
static const char ASSISTANT[] = "<｜Assistant｜>";
static const char EOS[] = "<｜end▁of▁sentence｜>";
static const char OUTPUTS_BEGIN[] = "<｜tool▁outputs▁begin｜>";
static const char OUTPUTS_END[] = "<｜tool▁outputs▁end｜>";
static const char OUTPUT_BEGIN[] = "<｜tool▁output▁begin｜>";
static const char OUTPUT_END[] = "<｜tool▁output▁end｜>";

static int put_calls(ByteBuf *b, const ChatMessage *m) {
    int fail = bb_puts(b, CHAT_TOOL_CALLS_BEGIN);
    for (int k = 0; k < m->n_tool_calls; k++) {
        const ChatToolCall *c = &m->tool_calls[k];
        fail = fail || (k && bb_puts(b, "\n")) || bb_puts(b, CHAT_TOOL_CALL_BEGIN "function" CHAT_TOOL_SEP) ||
               bb_puts(b, c->name) || bb_puts(b, "\n```json\n") || bb_puts(b, c->arguments) ||
               bb_puts(b, "\n```" CHAT_TOOL_CALL_END);
    }
    return fail || bb_puts(b, CHAT_TOOL_CALLS_END) || bb_puts(b, EOS);
}

static int check(const ChatMessage *msgs, int n, Error *err) {
    for (int i = 0; i < n; i++) {
        const char *r = msgs[i].role;
        if (!r || (strcmp(r, "system") && strcmp(r, "user") && strcmp(r, "assistant") && strcmp(r, "tool")))
            return err_set(err, "chat message %d: role '%s' is not system, user, assistant or tool", i, r ? r : "(none)");
        int calls = !strcmp(r, "assistant") && msgs[i].n_tool_calls > 0;
        if (!msgs[i].content && !calls) return err_set(err, "chat message %d (%s): no content", i, r);
        for (int k = 0; calls && k < msgs[i].n_tool_calls; k++)
            if (!msgs[i].tool_calls[k].name || !msgs[i].tool_calls[k].arguments)
                return err_set(err, "chat message %d: tool call %d has no name or no arguments", i, k);
    }
    return 0;
}

char *tok_chat_render_tools(const Tokenizer *t, const ChatMessage *msgs, int n, const char *tools,
                            int add_generation_prompt, Error *err) {
    if (check(msgs, n, err)) return NULL;
    ByteBuf b = {0};
    int fail = bb_reserve(&b, 0);
    // the template puts BOS and every system prompt (joined by a blank line) before the turns
    size_t blen = 0;
    const char *bos = t && tok_bos_id(t) >= 0 ? tok_token_bytes(t, tok_bos_id(t), &blen) : NULL;
    if (bos) fail = fail || bb_append(&b, bos, blen);
    int first_sys = 1;
    for (int i = 0; i < n; i++) {
        if (strcmp(msgs[i].role, "system")) continue;
        if (!first_sys) fail = fail || bb_puts(&b, "\n\n");
        fail = fail || bb_puts(&b, msgs[i].content);
        first_sys = 0;
    }
    if (tools && tools[0]) fail = fail || (!first_sys && bb_puts(&b, "\n\n")) || bb_puts(&b, tools);
    int in_outputs = 0;  // a run of tool outputs is open
    for (int i = 0; i < n; i++) {
        const ChatMessage *m = &msgs[i];
        if (!strcmp(m->role, "user")) {
            fail = fail || bb_puts(&b, USER) || bb_puts(&b, m->content);
            in_outputs = 0;
        } else if (!strcmp(m->role, "assistant")) {
            if (in_outputs && m->n_tool_calls == 0) {
                fail = fail || bb_puts(&b, OUTPUTS_END) || bb_puts(&b, m->content) || bb_puts(&b, EOS);
            } else {
                if (in_outputs) fail = fail || bb_puts(&b, OUTPUTS_END);
                fail = fail || bb_puts(&b, ASSISTANT) || (m->content && bb_puts(&b, m->content));
                fail = fail || (m->n_tool_calls > 0 ? put_calls(&b, m) : bb_puts(&b, EOS));
            }
            in_outputs = 0;
        } else if (!strcmp(m->role, "tool")) {
            fail = fail || bb_puts(&b, in_outputs ? "\n" : OUTPUTS_BEGIN) || bb_puts(&b, OUTPUT_BEGIN) ||
                   bb_puts(&b, m->content) || bb_puts(&b, OUTPUT_END);
            in_outputs = 1;
        }
    }
    if (in_outputs) fail = fail || bb_puts(&b, OUTPUTS_END);
    else if (add_generation_prompt) fail = fail || bb_puts(&b, ASSISTANT);
    if (fail) {
        bb_free(&b);
        err_set(err, "out of memory");
        return NULL;
    }
    return b.p;
}

char *tok_chat_render(const Tokenizer *t, const ChatMessage *msgs, int n, int add_generation_prompt, Error *err) {
    return tok_chat_render_tools(t, msgs, n, NULL, add_generation_prompt, err);
}

int tok_chat_encode_tools(Tokenizer *t, const ChatMessage *msgs, int n, const char *tools, int add_generation_prompt,
                          TokIds *out, Error *err) {
    char *s = tok_chat_render_tools(t, msgs, n, tools, add_generation_prompt, err);
    if (!s) return -1;
    int rc = tok_encode(t, s, strlen(s), 0, out, err);
    free(s);
    return rc;
}

int tok_chat_encode(Tokenizer *t, const ChatMessage *msgs, int n, int add_generation_prompt, TokIds *out,
                    Error *err) {
    return tok_chat_encode_tools(t, msgs, n, NULL, add_generation_prompt, out, err);
}

int tok_fim_encode(Tokenizer *t, const char *prefix, size_t prefix_len, const char *suffix, size_t suffix_len,
                   TokIds *out, Error *err) {
    const char *marks[3] = {FIM_BEGIN, FIM_HOLE, FIM_END};
    for (int i = 0; i < 3; i++) {
        int id = tok_token_id(t, marks[i]);
        if (id < 0 || !tok_is_added(t, id))
            return err_set(err, "the tokenizer has no %s token: this model cannot fill in the middle", marks[i]);
    }
    ByteBuf b = {0};
    size_t blen = 0;
    const char *bos = tok_bos_id(t) >= 0 ? tok_token_bytes(t, tok_bos_id(t), &blen) : NULL;
    int fail = bb_reserve(&b, blen + prefix_len + suffix_len + 64);
    if (bos) fail = fail || bb_append(&b, bos, blen);
    fail = fail || bb_puts(&b, FIM_BEGIN) || bb_append(&b, prefix, prefix_len) || bb_puts(&b, FIM_HOLE) ||
           bb_append(&b, suffix, suffix_len) || bb_puts(&b, FIM_END);
    int rc = fail ? err_set(err, "out of memory") : tok_encode(t, b.p, b.n, 0, out, err);
    bb_free(&b);
    return rc;
}
