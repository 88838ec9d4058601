// The DeepSeek-V3 chat format, as its tokenizer_config.json's chat_template renders a conversation
// of system, user and assistant turns (tool calls and tool outputs are not covered).
#include <stdlib.h>
#include <string.h>

#include "text/tokenizer.h"
#include "text/utf8.h"

static const char USER[] = "<｜User｜>";
static const char ASSISTANT[] = "<｜Assistant｜>";
static const char EOS[] = "<｜end▁of▁sentence｜>";

static int put(ByteBuf *b, const char *s) { return bb_append(b, s, strlen(s)); }

char *tok_chat_render(const Tokenizer *t, const ChatMessage *msgs, int n, int add_generation_prompt, Error *err) {
    ByteBuf b = {0};
    for (int i = 0; i < n; i++) {
        const char *r = msgs[i].role;
        if (!r || (strcmp(r, "system") && strcmp(r, "user") && strcmp(r, "assistant"))) {
            err_set(err, "chat message %d: role '%s' is not system, user or assistant", i, r ? r : "(none)");
            return NULL;
        }
        if (!msgs[i].content) {
            err_set(err, "chat message %d (%s): no content", i, r);
            return NULL;
        }
    }
    int fail = bb_reserve(&b, 0);
    // the template puts BOS and every system prompt (joined by a blank line) before the turns
    size_t blen = 0;
    const char *bos = t && tok_bos_id(t) >= 0 ? tok_token_bytes(t, tok_bos_id(t), &blen) : NULL;
    if (bos) fail = fail || bb_append(&b, bos, blen);
    int first_sys = 1;
    for (int i = 0; i < n; i++) {
        if (strcmp(msgs[i].role, "system")) continue;
        if (!first_sys) fail = fail || put(&b, "\n\n");
        fail = fail || put(&b, msgs[i].content);
        first_sys = 0;
    }
    for (int i = 0; i < n; i++) {
        if (!strcmp(msgs[i].role, "user")) fail = fail || put(&b, USER) || put(&b, msgs[i].content);
        else if (!strcmp(msgs[i].role, "assistant"))
            fail = fail || put(&b, ASSISTANT) || put(&b, msgs[i].content) || put(&b, EOS);
    }
    if (add_generation_prompt) fail = fail || put(&b, ASSISTANT);
    if (fail) {
        bb_free(&b);
        err_set(err, "out of memory");
        return NULL;
    }
    return b.p;
}

int tok_chat_encode(Tokenizer *t, const ChatMessage *msgs, int n, int add_generation_prompt, TokIds *out,
                    Error *err) {
    char *s = tok_chat_render(t, msgs, n, add_generation_prompt, err);
    if (!s) return -1;
    int rc = tok_encode(t, s, strlen(s), 0, out, err);
    free(s);
    return rc;
}
