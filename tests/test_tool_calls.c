// The tool calls read from an answer's text (serve/tool_calls.h): DeepSeek-V3's fenced form and
// V3.1's plain one, several calls, unfinished and malformed ones, and arbitrary bytes.
#include <stdlib.h>
#include <string.h>

#include "base/rng.h"
#include "serve/tool_calls.h"
#include "test.h"
#include "text/tokenizer.h"

#define B CHAT_TOOL_CALL_BEGIN
#define E CHAT_TOOL_CALL_END
#define S CHAT_TOOL_SEP

TEST(test_tool_calls_read_both_forms) {
    const char *text = B "function" S "get_weather\n```json\n{\"city\": \"Paris\"}\n```" E "\n"
                       B "get_time" S "{\"zone\":\"CET\"}" E
                       B "function" S "no_args\n```json\n\n```" E CHAT_TOOL_CALLS_END;
    ToolCallText *c;
    int n = tool_calls_parse(text, strlen(text), &c);
    CHECK_MSG(n == 3, "%d calls", n);
    CHECK(!strcmp(c[0].name, "get_weather") && !strcmp(c[0].arguments, "{\"city\": \"Paris\"}"));
    CHECK(!strcmp(c[1].name, "get_time") && !strcmp(c[1].arguments, "{\"zone\":\"CET\"}"));
    CHECK(!strcmp(c[2].name, "no_args") && !strcmp(c[2].arguments, ""));
    tool_calls_free(c, n);
}

// The end marker inside a JSON string of fenced arguments (with DeepSeek-V3's tokenizer it is one
// token, which constrained decoding lets a string hold): the arguments end at the fence and the
// marker, not at the marker alone; an unfinished such call is left out.
TEST(test_tool_calls_marker_inside_a_string) {
    const char *text = B "function" S "say\n```json\n{\"text\": \"a " E " b```" E "\"}\n```" E
                       "\n" B "function" S "f\n```json\n{}\n```" E CHAT_TOOL_CALLS_END;
    ToolCallText *c;
    int n = tool_calls_parse(text, strlen(text), &c);
    CHECK_MSG(n == 2, "%d calls", n);
    CHECK_MSG(n >= 1 && !strcmp(c[0].arguments, "{\"text\": \"a " E " b```" E "\"}"), "arguments: %s", n >= 1 ? c[0].arguments : "");
    CHECK(n == 2 && !strcmp(c[1].name, "f") && !strcmp(c[1].arguments, "{}"));
    tool_calls_free(c, n);
    // a call that never closed its fence ends at its end marker, not at the next call's fence
    const char *open = B "function" S "g\n```json\n{\"a\": 1}" E "\n" B "function" S "h\n```json\n{}\n```" E;
    n = tool_calls_parse(open, strlen(open), &c);
    CHECK_MSG(n == 2 && !strcmp(c[0].arguments, "{\"a\": 1}") && !strcmp(c[1].name, "h"), "%d calls", n);
    tool_calls_free(c, n);
}

TEST(test_tool_calls_unfinished_and_malformed) {
    ToolCallText *c;
    const char *cut = B "function" S "f\n```json\n{\"a\": 1}\n```" E B "function" S "g\n```json\n{\"b\":";
    int n = tool_calls_parse(cut, strlen(cut), &c);  // the second ran out: left out
    CHECK(n == 1 && !strcmp(c[0].name, "f") && !strcmp(c[0].arguments, "{\"a\": 1}"));
    tool_calls_free(c, n);
    const char *odd = B "no separator" E B S "{}" E "text only" B "  " S "x" E;  // no name: skipped
    CHECK(tool_calls_parse(odd, strlen(odd), &c) == 0 && c == NULL);
    CHECK(tool_calls_parse("", 0, &c) == 0);
}

// Any bytes, marker pieces among them: no crash, every call has a name (ASan checks the reads).
TEST(test_tool_calls_random_bytes) {
    const char *parts[] = {B, E, S, "function", "\n", "```json", "```", "{", "}", "x", " ", "\xe4\xbd"};
    Rng r;
    rng_seed(&r, 3);
    for (int trial = 0; trial < 3000; trial++) {
        char buf[512];
        size_t n = 0;
        int k = (int)(rng_next(&r) % 12);
        for (int i = 0; i < k; i++) {
            const char *p = parts[rng_next(&r) % (sizeof parts / sizeof *parts)];
            size_t l = strlen(p);
            if (n + l >= sizeof buf) break;
            memcpy(buf + n, p, l);
            n += l;
        }
        char *exact = malloc(n ? n : 1);  // no terminator: the parser reads n bytes only
        memcpy(exact, buf, n);
        ToolCallText *c;
        int m = tool_calls_parse(exact, n, &c);
        CHECK(m >= 0);
        for (int i = 0; i < m; i++) CHECK(c[i].name[0] != '\0');
        tool_calls_free(c, m);
        free(exact);
    }
}
