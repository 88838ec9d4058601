// The body of a completion request (POST /v1/chat/completions, POST /v1/completions) as the
// OpenAI API defines it, parsed and checked; and the API's error body. No tokenizer, no model:
// what is checked here needs only the JSON (the prompt's length, the model's name and the token
// ids' range are checked by the server, which knows them).
//
// A field given as JSON null counts as absent; unknown fields are ignored. Every error names the
// field (`param`) and is a 4xx: the parser takes any bytes.
#ifndef DSV3_SERVE_REQUEST_H
#define DSV3_SERVE_REQUEST_H

#include <stddef.h>

#include "serve/stop_text.h"
#include "text/json_schema.h"
#include "text/tokenizer.h"

typedef enum { API_CHAT, API_COMPLETION } ApiKind;

// {"error": {"message", "type", "param", "code"}} with its HTTP status.
typedef struct ApiError {
    int status;
    char message[512];
    char param[64];  // "" when no field is at fault
    char code[48];   // "" for none
} ApiError;

// Fills e (type from the status) and returns -1. param may be NULL.
int api_error(ApiError *e, int status, const char *param, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
// "invalid_request_error", "authentication_error", ... for a status.
const char *api_error_type(int status);

#define SERVE_MAX_N 16          // choices per prompt
#define SERVE_MAX_PROMPTS 64    // prompts in one completions request
#define SERVE_MAX_TOKENS (1 << 24)

// One prompt of a completions request: text, or token ids.
typedef struct ServePrompt {
    char *text;               // the prompt as text (owned), or
    int *ids;                 // as token ids (n_ids), NULL when text
    int n_ids;
} ServePrompt;

#define SERVE_MAX_TOOLS 128
// tool_choice: "none" (tools neither described nor parsed), "auto" (the default with tools: the
// model may answer with calls), "required" (it must call one), or a named function.
typedef enum { TOOL_NONE, TOOL_AUTO, TOOL_REQUIRED, TOOL_NAMED } ToolChoice;

typedef struct ServeRequest {
    ApiKind kind;
    char *model;              // NULL when absent
    ChatMessage *msgs;        // (n_msgs) chat; role and content owned
    int n_msgs;
    ServePrompt *prompts;     // (n_prompts) completions: a string or ids, or an array of either;
    int n_prompts;            // the answers are prompt 0's n choices, then prompt 1's, ...
    int echo;                 // completions: the answer starts with its prompt
    char *suffix;             // completions: the text after the hole (fill in the middle; each prompt
                              // is then the text before it), NULL when none (owned)
    int max_tokens;           // -1: absent (the rest of the context); 0 only with echo
    float temperature, top_p, min_p, presence_penalty, frequency_penalty;
    int top_k;                // 0: off (-1 is accepted for it, as vLLM spells off)
    int has_seed;
    unsigned long long seed;
    char *stop[STOP_TEXT_MAX];  // owned
    int n_stop;
    int n;                    // choices (per prompt)
    int best_of;              // completions: answers drawn per prompt, the n most likely per token returned
    int stream, include_usage;
    int logprobs;             // report log-probabilities
    int top_logprobs;         // and this many alternatives (≤ 20)
    int ignore_eos;           // vLLM's extension: EOS does not end the answer
    int json_mode;            // response_format json_object or json_schema: the answer is a JSON object
    JsonSchema *json_schema;  // json_schema's schema, compiled (owned), or NULL: any object
    int *bias_ids;            // logit_bias: bias_values[i] (in [-100, 100]) is added to the logit of
    float *bias_values;       // bias_ids[i] (the server checks the ids against its vocabulary)
    int n_bias;
    // chat: the functions the model may call (tools), described for the prompt in tools_prompt,
    // and how it must call them (tool_choice; TOOL_NAMED: tool_names[tool_named])
    char *tools_prompt;       // NULL without tools, or with tool_choice "none"
    char **tool_names;        // (n_tools) owned
    JsonSchema **tool_schemas;  // (n_tools) their parameters compiled (owned), NULL where a function
                                // has none or (not strict) a schema outside json_schema.h's subset
    int n_tools;
    ToolChoice tool_choice;
    int tool_named;
    int parallel_tool_calls;  // 1 (the default): an answer may hold several calls; 0: at most one
} ServeRequest;

// body[0, len): any bytes. 0 with *r filled (free it with serve_request_free), or -1 with e set
// and nothing to free.
int serve_request_parse(ServeRequest *r, ApiKind kind, const char *body, size_t len, ApiError *e);
void serve_request_free(ServeRequest *r);

#endif
