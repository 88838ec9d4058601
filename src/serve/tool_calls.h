// The tool calls in a chat answer: the text the model wrote after "<｜tool▁calls▁begin｜>", read
// into functions and their arguments. DeepSeek-V3 writes each call as
//   <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGUMENTS\n```<｜tool▁call▁end｜>
// (V3.1 drops the type and the fence: <｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS<｜tool▁call▁end｜>;
// both are read). A call without its end marker (the answer ran out) is left out; the arguments
// are returned as the model wrote them (JSON text, not checked: the API hands them on as a string).
#ifndef DSV3_SERVE_TOOL_CALLS_H
#define DSV3_SERVE_TOOL_CALLS_H

#include <stddef.h>

#include "serve/json_mode.h"
#include "serve/request.h"

typedef struct ToolCallText {
    char *name, *arguments;  // owned
} ToolCallText;

// Reads text[0, n) (any bytes); *out gets the complete calls (free with tool_calls_free). Returns
// their count, or -1 when memory runs out.
int tool_calls_parse(const char *text, size_t n, ToolCallText **out);
void tool_calls_free(ToolCallText *calls, int n);

// The format a chat answer's tool calls are held to (serve/json_mode.h's frame over the request's
// functions): tool_choice "required" or a named function forces one call, the whole answer; "auto"
// (without JSON mode) holds the calls the model opens itself to the format (lazy: free text until
// the calls' opening marker), one or, with parallel_tool_calls, several.
typedef struct ToolFrame {
    int force, lazy;        // neither: the answer is not framed (no tools, "none", or JSON mode)
    char **heads;           // (n) a call's opening, one per function allowed (forced: the answer's)
    char **again;           // (n) lazy with several calls: a later call's opening; else NULL
    JsonSchema **schemas;   // (n) the functions' parameters (owned; NULL: any object)
    int n;
} ToolFrame;

// Builds f from r's tools and tool_choice, taking r's compiled parameters. 0, or -1 when memory
// runs out (f then holds nothing).
int tool_frame_build(ToolFrame *f, ServeRequest *r);
// The frame for json_mode_frame (pointing into f, which outlives it).
JsonFrame tool_frame_view(const ToolFrame *f);
void tool_frame_free(ToolFrame *f);

#endif
