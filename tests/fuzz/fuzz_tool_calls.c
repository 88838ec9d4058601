#define _GNU_SOURCE  // memmem
// Any bytes as a chat answer's text after its tool calls' opening (src/serve/tool_calls.h): the
// model writes what it likes there, so it is read without a crash, and every call read has a
// name, both strings trimmed and found in the text. Calls whose strings hold no marker and no
// fence, written again in V3.1's form, read back as the same calls.
#include <stdlib.h>
#include <string.h>

#include "serve/tool_calls.h"
#include "text/tokenizer.h"
#include "text/utf8.h"

static int trimmed(const char *s) {
    size_t n = strlen(s);
    return !n || (!strchr(" \n\t\r", s[0]) && !strchr(" \n\t\r", s[n - 1]));
}

static int plain(const char *s) {
    return !strstr(s, "```") && !strstr(s, CHAT_TOOL_CALL_BEGIN) && !strstr(s, CHAT_TOOL_CALL_END) &&
           !strstr(s, CHAT_TOOL_SEP);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    ToolCallText *c;
    int n = tool_calls_parse((const char *)data, size, &c);
    if (n < 0) abort();
    int no_nul = !memchr(data, 0, size), all_plain = no_nul;  // (a NUL ends a returned string early)
    for (int i = 0; i < n; i++) {
        if (!c[i].name[0] || (no_nul && (!trimmed(c[i].name) || !trimmed(c[i].arguments)))) abort();
        if (!memmem(data, size, c[i].name, strlen(c[i].name)) || !memmem(data, size, c[i].arguments, strlen(c[i].arguments)))
            abort();
        all_plain = all_plain && plain(c[i].name) && plain(c[i].arguments);
    }
    if (all_plain && n > 0) {
        ByteBuf b = {0};
        for (int i = 0; i < n; i++)
            if (bb_puts(&b, CHAT_TOOL_CALL_BEGIN) || bb_puts(&b, c[i].name) || bb_puts(&b, CHAT_TOOL_SEP) ||
                bb_puts(&b, c[i].arguments) || bb_puts(&b, CHAT_TOOL_CALL_END))
                abort();
        ToolCallText *again;
        int m = tool_calls_parse(b.p, b.n, &again);
        if (m != n) abort();
        for (int i = 0; i < n; i++)
            if (strcmp(again[i].name, c[i].name) || strcmp(again[i].arguments, c[i].arguments)) abort();
        tool_calls_free(again, m);
        bb_free(&b);
    }
    tool_calls_free(c, n);
    return 0;
}
