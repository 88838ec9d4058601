// JSON mode (`response_format: {"type": "json_object"}`) and structured outputs (`"json_schema"`)
// as a constraint on one answer: before each token every id whose bytes would not continue the
// answer as the beginning of a JSON object — one the schema accepts, when there is one
// (text/json_schema.h) — is masked, special tokens always; once the object is complete only the
// answer's end ids may follow (the server ends the answer there itself). When no id would fit the
// logits are left as they are.
#ifndef DSV3_SERVE_JSON_MODE_H
#define DSV3_SERVE_JSON_MODE_H

#include "infer/engine.h"
#include "text/json_schema.h"
#include "text/tokenizer.h"

// Framed (tool calls): the answer must first be exactly one of `heads` (literal text, none the
// start of another), then the object (held to that head's schema), then exactly `tail`; only then
// may it end. With `again`, after the tail comes another call — one of again (the heads' entries
// as a later call opens, the same schemas) — or `close`, and only close ends it. With `trigger`,
// the answer is free text (nothing masked) until its text ends with trigger; the frame then
// begins: tool_choice auto, where the model opens its calls itself and the calls are held to the
// format and the functions' parameters from there (llama.cpp's lazy grammars).
typedef enum { JSON_MODE_WAIT, JSON_MODE_HEAD, JSON_MODE_OBJECT, JSON_MODE_TAIL, JSON_MODE_DONE } JsonModePhase;

typedef struct JsonFrame {
    const char *const *heads;               // (n_heads ≥ 1)
    const JsonSchema *const *head_schemas;  // (n_heads) or NULL; an entry NULL: any object
    int n_heads;
    const char *tail;                       // NULL: none
    const char *const *again;               // (n_heads) or NULL: one call
    const char *close;                      // with again: what ends the calls
    const char *trigger;                    // NULL: the frame from the first byte
} JsonFrame;

// What the mask needs of the vocabulary, made once per tokenizer (~4 ms for DeepSeek-V3's) and
// shared, read-only, by every answer: each id's bytes, whether they are plain string text (whole
// characters without '"', '\\' or control characters: json_schema_prefix_at_free_text), and
// their leading whitespace. Added tokens (the chat format's markers, special or not) are never
// part of the object: a marker inside a JSON string would end a tool call's arguments for any
// reader that looks for the marker; literal parts (a frame's heads and tail) take them.
typedef struct JsonVocab {
    const Tokenizer *tok;
    int vocab;              // the model's (ids from the tokenizer's size up have no bytes)
    uint8_t *text;          // (vocab) 1: the id is plain string text
    uint8_t *lead;          // (vocab) the id's leading whitespace bytes (255 at most)
} JsonVocab;

// 0, or -1 when memory runs out. tok outlives v.
int json_vocab_init(JsonVocab *v, const Tokenizer *tok, int vocab);
void json_vocab_free(JsonVocab *v);

typedef struct JsonMode {
    JsonSchemaPrefix answer;   // the answer's object so far
    JsonModePhase phase;
    JsonFrame f;               // not owned; f.n_heads 0: unframed, the object comes first
    int calls;                 // heads matched so far (from the second on, `again` is the candidates)
    int *live;                 // (n_live) in a literal part: the candidates the answer still matches
    int n_live;                //   (heads i < n_heads, close = n_heads; the tail: 0)
    size_t lit_n;              // and its bytes matched so far
    size_t trig_n;             // waiting: the longest end of the answer that begins the trigger
    const JsonVocab *v;
    int end_ids[2], n_end;  // the answer's ends: the model's EOS, the chat format's end of a turn
    uint8_t *allow;         // (v->vocab) scratch
} JsonMode;

// 0, or -1 when memory runs out. end_ids: up to two (n_end), -1 entries ignored. v and schema
// (NULL: any object) outlive m.
int json_mode_init(JsonMode *m, const JsonVocab *v, const int *end_ids, int n_end, const JsonSchema *schema);
void json_mode_free(JsonMode *m);
// Frames the object as f says; what f points at outlives m. 0, or -1 when memory runs out.
int json_mode_frame(JsonMode *m, const JsonFrame *f);
// The engine's hook for this answer (m must outlive the sequence).
TokenConstraint json_mode_constraint(JsonMode *m);
// 1 once the answer is a complete object (and its tail, framed; its close, with again).
int json_mode_complete(const JsonMode *m);

#endif
