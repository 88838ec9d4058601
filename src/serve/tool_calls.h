// The tool calls in a chat answer: the text the model wrote after "<｜tool▁calls▁begin｜>", read
// into functions and their arguments. DeepSeek-V3 writes each call as
//   <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGUMENTS\n```<｜tool▁call▁end｜>
// (V3.1 drops the type and the fence: <｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS<｜tool▁call▁end｜>;
// both are read). A call without its end marker (the answer ran out) is left out; the arguments
// are returned as the model wrote them (JSON text, not checked: the API hands them on as a string).
#ifndef DSV3_SERVE_TOOL_CALLS_H
#define DSV3_SERVE_TOOL_CALLS_H

#include <stddef.h>

typedef struct ToolCallText {
    char *name, *arguments;  // owned
} ToolCallText;

// Reads text[0, n) (any bytes); *out gets the complete calls (free with tool_calls_free). Returns
// their count, or -1 when memory runs out.
int tool_calls_parse(const char *text, size_t n, ToolCallText **out);
void tool_calls_free(ToolCallText *calls, int n);

#endif
