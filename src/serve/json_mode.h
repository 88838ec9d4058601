// JSON mode (`response_format: {"type": "json_object"}`) as a constraint on one answer: before each
// token every id whose bytes would not continue the answer as the beginning of a JSON object
// (text/json_prefix.h) is masked, special tokens always; once the object is complete only the
// answer's end ids may follow (the server ends the answer there itself). When no id would fit the
// logits are left as they are.
#ifndef DSV3_SERVE_JSON_MODE_H
#define DSV3_SERVE_JSON_MODE_H

#include "infer/engine.h"
#include "text/json_prefix.h"
#include "text/tokenizer.h"

typedef struct JsonMode {
    JsonPrefix answer;      // the answer so far
    const Tokenizer *tok;
    int vocab;              // the model's (ids from the tokenizer's size up have no bytes)
    int end_ids[2], n_end;  // the answer's ends: the model's EOS, the chat format's end of a turn
    uint8_t *allow;         // (vocab) scratch
} JsonMode;

// 0, or -1 when memory runs out. end_ids: up to two (n_end), -1 entries ignored.
int json_mode_init(JsonMode *m, const Tokenizer *tok, int vocab, const int *end_ids, int n_end);
void json_mode_free(JsonMode *m);
// The engine's hook for this answer (m must outlive the sequence).
TokenConstraint json_mode_constraint(JsonMode *m);
// 1 once the answer is a complete object.
int json_mode_complete(const JsonMode *m);

#endif
