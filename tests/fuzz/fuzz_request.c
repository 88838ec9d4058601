#define _GNU_SOURCE  // memmem
// Any bytes as the body of POST /v1/chat/completions and /v1/completions: parsed into a request or
// refused with a 4xx that names its reason, never a crash; a parsed request keeps the API's limits.
// The stop strings of a parsed request then run over the body's bytes split in two, and what comes
// out is the text up to the stop string that is complete first (src/serve/stop_text.h's definition).
#include <string.h>

#include "serve/request.h"
#include "serve/stop_text.h"
#include "text/utf8.h"
#include "fuzz_common.h"

static void check_stops(const ServeRequest *r, const uint8_t *data, size_t size) {
    StopText s;
    ByteBuf out = {0};
    stop_text_init(&s, (const char *const *)r->stop, r->n_stop);
    size_t cut = size ? data[0] % (size + 1) : 0;
    int m = stop_text_push(&s, (const char *)data, cut, &out);
    if (m == 0) m = stop_text_push(&s, (const char *)data + cut, size - cut, &out);
    if (m == 0 && stop_text_finish(&s, &out)) abort();
    if (m < 0) abort();
    size_t first = size, end = (size_t)-1;  // the occurrence that ends first, the earlier start on a tie
    for (int k = 0; k < r->n_stop; k++) {
        size_t l = strlen(r->stop[k]);
        if (l == 0) continue;
        const void *at = memmem(data, size, r->stop[k], l);
        size_t a = at ? (size_t)((const uint8_t *)at - data) : 0;
        if (at && (a + l < end || (a + l == end && a < first))) first = a, end = a + l;
    }
    if (out.n != first || (first && memcmp(out.p, data, first)) || m != (first < size)) abort();
    bb_free(&out);
    stop_text_free(&s);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    for (int kind = 0; kind < 2; kind++) {
        ServeRequest r;
        ApiError e;
        if (serve_request_parse(&r, kind ? API_COMPLETION : API_CHAT, (const char *)data, size, &e)) {
            if (e.status < 400 || e.status > 499 || !e.message[0]) abort();
            continue;
        }
        if (r.n < 1 || r.n > SERVE_MAX_N || r.top_logprobs < 0 || r.top_logprobs > 20 || r.n_stop > STOP_TEXT_MAX ||
            (r.max_tokens != -1 && (r.max_tokens < 0 || r.max_tokens > SERVE_MAX_TOKENS)) || !(r.temperature >= 0) ||
            !(r.top_p >= 0 && r.top_p <= 1))
            abort();
        if (kind == 0 && r.n_msgs < 1) abort();
        for (int i = 0; kind == 0 && i < r.n_msgs; i++)  // content NULL only beside an assistant's calls
            if (!r.msgs[i].content && !(!strcmp(r.msgs[i].role, "assistant") && r.msgs[i].n_tool_calls > 0)) abort();
        if (r.json_schema && !r.json_mode) abort();
        if (kind == 1 && (r.n_prompts < 1 || r.n_prompts > SERVE_MAX_PROMPTS)) abort();
        for (int i = 0; kind == 1 && i < r.n_prompts; i++)
            if (!r.prompts[i].text && r.prompts[i].n_ids < 1) abort();
        for (int i = 0; i < r.n_bias; i++)
            if (r.bias_ids[i] < 0 || !(r.bias_values[i] >= -100 && r.bias_values[i] <= 100)) abort();
        if (r.max_tokens == 0 && !r.echo) abort();
        if (r.best_of < r.n || r.best_of > SERVE_MAX_N || (r.best_of > r.n && r.stream)) abort();
        check_stops(&r, data, size);
        serve_request_free(&r);
    }
    return 0;
}
