// Text in, text out: a HuggingFace tokenizer.json holding a byte-level BPE (DeepSeek-V3's, GPT-2's,
// one written by `dsv3 tokenizer train`), with tokenizer_config.json beside it when present.
//
//   Tokenizer *tok = tok_load_dir(model_dir, &err);          // NULL with err on failure
//   TokIds ids = {0};
//   tok_encode(tok, text, strlen(text), TOK_ADD_SPECIAL, &ids, &err);   // BOS as the config says
//   TokStream ts;  tok_stream_init(&ts, tok, TOK_SKIP_SPECIAL);
//   for each generated id: tok_stream_push(&ts, id, &s, &n, &err); fwrite(s, 1, n, stdout);
//   tok_stream_finish(&ts, &s, &n); fwrite(s, 1, n, stdout); tok_stream_free(&ts);
//   ids_free(&ids); tok_free(tok);
//
// Encoding matches the JavaScript reference (@lenml/tokenizers, transformers.js) id for id; input
// that is not valid UTF-8 is first repaired as the reference's decoder does (each maximal invalid
// subpart becomes U+FFFD). Decoding is the exact reverse: byte-exact for text that was valid UTF-8.
// A Tokenizer is not safe to use from two threads at once (it owns a word cache and regex state).
#ifndef DSV3_TEXT_TOKENIZER_H
#define DSV3_TEXT_TOKENIZER_H

#include <stddef.h>

#include "base/error.h"
#include "text/bpe.h"  // TokIds: a growable id list (ids_push, ids_free)

typedef struct Tokenizer Tokenizer;

// Loads a tokenizer.json, and tokenizer_config.json from the same directory when it exists.
Tokenizer *tok_load(const char *tokenizer_json, Error *err);
// Loads DIR/tokenizer.json (+ DIR/tokenizer_config.json): what a model directory holds.
Tokenizer *tok_load_dir(const char *dir, Error *err);
void tok_free(Tokenizer *t);

// 1 + the largest token id (vocabulary and added tokens).
int tok_vocab_size(const Tokenizer *t);
// The ids of the config's bos_token / eos_token / pad_token, -1 when not configured.
int tok_bos_id(const Tokenizer *t);
int tok_eos_id(const Tokenizer *t);
int tok_pad_id(const Tokenizer *t);
// The id of a token given by its text (an added token or a vocabulary entry), -1 when none.
int tok_token_id(const Tokenizer *t, const char *text);

// Flags of tok_encode.
enum {
    TOK_ADD_SPECIAL = 1,  // add what the tokenizer says: add_bos_token/add_eos_token of the
                          // config, else the post-processor's template (nothing when neither)
    TOK_ADD_BOS = 2,      // prepend BOS (once, even with TOK_ADD_SPECIAL); an error without one
};
// Appends the ids of text[0, len) to out. Added tokens (special or not) are matched first.
int tok_encode(Tokenizer *t, const char *text, size_t len, int flags, TokIds *out, Error *err);

// Flags of tok_decode and the stream.
enum {
    TOK_SKIP_SPECIAL = 1,  // leave out added tokens marked "special" (BOS, EOS, pad, ...)
};
// Decodes ids into a malloc'd NUL-terminated string (*len bytes). An id outside the vocabulary
// is an error naming it. Byte sequences that are not valid UTF-8 come out as U+FFFD.
char *tok_decode(const Tokenizer *t, const int *ids, size_t n, int flags, size_t *len, Error *err);
// The raw bytes of one token (no UTF-8 repair), NULL for an id outside the vocabulary.
const char *tok_token_bytes(const Tokenizer *t, int id, size_t *len);
// Whether id is an added token marked special.
int tok_is_special(const Tokenizer *t, int id);
// Whether id is an added token, special or not (DeepSeek-V3's chat and tool-call markers are not
// special: they are text of the answer, but never of a JSON value inside it).
int tok_is_added(const Tokenizer *t, int id);

// Streaming decode for generation: each push returns only complete UTF-8, holding back the start
// of a character split across tokens; concatenating every push and the finish equals tok_decode
// of all the ids.
typedef struct TokStream {
    const Tokenizer *tok;
    int flags;
    ByteBuf in;   // bytes of an unfinished character, then the new token's bytes
    ByteBuf out;  // the complete text handed back
} TokStream;
void tok_stream_init(TokStream *s, const Tokenizer *t, int flags);
// *text (valid until the next call) gets the text completed by this id, possibly empty.
int tok_stream_push(TokStream *s, int id, const char **text, size_t *len, Error *err);
// The held-back bytes of an unfinished character, as U+FFFD (empty when nothing is pending).
void tok_stream_finish(TokStream *s, const char **text, size_t *len);
void tok_stream_free(TokStream *s);

// The DeepSeek-V3 chat format (SPEC §6), as the chat_template of DeepSeek-V3's
// tokenizer_config.json renders it: BOS, the system prompts (joined by "\n\n"; then `tools`, a
// description of the functions the model may call, when given), then per turn:
//   user:       "<｜User｜>" + content
//   assistant:  "<｜Assistant｜>" + content + "<｜end▁of▁sentence｜>"; right after tool outputs the
//               template leaves out "<｜Assistant｜>" and closes them: "<｜tool▁outputs▁end｜>" +
//               content + "<｜end▁of▁sentence｜>"
//   tool calls: "<｜Assistant｜>" + content (if any) + "<｜tool▁calls▁begin｜>" + the calls joined by
//               "\n", each "<｜tool▁call▁begin｜>function<｜tool▁sep｜>" + name + "\n```json\n" +
//               arguments + "\n```<｜tool▁call▁end｜>", then "<｜tool▁calls▁end｜><｜end▁of▁sentence｜>"
//   tool:       a run of outputs: "<｜tool▁outputs▁begin｜>" before the first, "\n" between, each
//               "<｜tool▁output▁begin｜>" + content + "<｜tool▁output▁end｜>"
// and with add_generation_prompt a final "<｜Assistant｜>" — or, after tool outputs,
// "<｜tool▁outputs▁end｜>" (the reply follows it). Where the released template is inconsistent
// (its single tool call is never closed, its second run of outputs is not opened) this follows the
// rules above, as DeepSeek's later V3 templates do. The special strings in it become their tokens
// when the result is encoded, exactly as apply_chat_template does.
typedef struct ChatToolCall {
    const char *id;         // the caller's, not rendered
    const char *name;
    const char *arguments;  // JSON text, rendered as given
} ChatToolCall;
typedef struct ChatMessage {
    const char *role;     // "system", "user", "assistant" or "tool"
    const char *content;  // NULL only for an assistant turn that has tool calls
    const ChatToolCall *tool_calls;  // (n_tool_calls) an assistant turn's
    int n_tool_calls;
} ChatMessage;
// The rendered prompt as a malloc'd string; an unknown role is an error naming it. tools: NULL or
// the functions' description, appended to the system prompt.
char *tok_chat_render_tools(const Tokenizer *t, const ChatMessage *msgs, int n, const char *tools,
                            int add_generation_prompt, Error *err);
char *tok_chat_render(const Tokenizer *t, const ChatMessage *msgs, int n, int add_generation_prompt, Error *err);
// Renders and encodes (no further specials are added: the BOS is in the text).
int tok_chat_encode_tools(Tokenizer *t, const ChatMessage *msgs, int n, const char *tools, int add_generation_prompt,
                          TokIds *out, Error *err);
int tok_chat_encode(Tokenizer *t, const ChatMessage *msgs, int n, int add_generation_prompt, TokIds *out,
                    Error *err);

// Fill in the middle, as DeepSeek-V3 was pretrained on it (the report's Prefix-Suffix-Middle
// documents, §4.1): BOS (when the tokenizer has one), <｜fim▁begin｜>, the text before the hole,
// <｜fim▁hole｜>, the text after it, <｜fim▁end｜> — the model then writes the middle; appended to
// out. Encoded as `tokenizer.encode` encodes that string (DeepSeek's own FIM examples do so), so an
// added token's string inside the texts becomes its token, as in a chat message or a plain prompt.
// A tokenizer without the three tokens is an error naming the missing one.
#define FIM_BEGIN "<｜fim▁begin｜>"
#define FIM_HOLE "<｜fim▁hole｜>"
#define FIM_END "<｜fim▁end｜>"
int tok_fim_encode(Tokenizer *t, const char *prefix, size_t prefix_len, const char *suffix, size_t suffix_len,
                   TokIds *out, Error *err);

// The chat format's tool-call markers (the strings of DeepSeek-V3's tokens for them).
#define CHAT_TOOL_CALLS_BEGIN "<｜tool▁calls▁begin｜>"
#define CHAT_TOOL_CALLS_END "<｜tool▁calls▁end｜>"
#define CHAT_TOOL_CALL_BEGIN "<｜tool▁call▁begin｜>"
#define CHAT_TOOL_CALL_END "<｜tool▁call▁end｜>"
#define CHAT_TOOL_SEP "<｜tool▁sep｜>"

#endif
