// `dsv3 serve` end to end, and its parts: the stop strings (src/serve/stop_text.h) and the
// request parser (src/serve/request.h) against their definitions; then a server started on a free
// port over a small model with a tokenizer made here: the official OpenAI client (node; skipped
// without node/npm), greedy answers equal to `dsv3 generate`, concurrent requests equal to the same
// requests alone, a client that disconnects cancels its sequence, the queue limit answers 503, a
// corpus of bad requests sent raw and through curl gets 4xx with the OpenAI error body, the API key,
// SIGTERM exits 0.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <jansson.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "serve/json_mode.h"
#include "serve/request.h"
#include "serve/stop_text.h"
#include "test.h"

// Feeds text in the given pieces; returns what came out (malloc'd) and whether a stop matched.
static char *stop_run(const char *const *stops, int n, const char *const *pieces, int np, int *matched) {
    StopText s;
    ByteBuf out = {0};
    stop_text_init(&s, stops, n);
    *matched = 0;
    for (int i = 0; i < np && !*matched; i++) *matched = stop_text_push(&s, pieces[i], strlen(pieces[i]), &out) == 1;
    if (!*matched) stop_text_finish(&s, &out);
    stop_text_free(&s);
    bb_append(&out, "", 0);
    return out.p;
}

TEST(test_stop_text_holds_back_a_possible_start) {
    const char *stops[] = {"END"};
    StopText s;
    ByteBuf out = {0};
    stop_text_init(&s, stops, 1);
    CHECK(stop_text_push(&s, "abcE", 4, &out) == 0);
    CHECK_MSG(out.n == 3 && !memcmp(out.p, "abc", 3), "released '%.*s'", (int)out.n, out.p);  // "E" may start END
    CHECK(stop_text_push(&s, "N", 1, &out) == 0);
    CHECK(out.n == 3);  // "EN" still may
    CHECK(stop_text_push(&s, "x", 1, &out) == 0);
    CHECK_MSG(out.n == 6 && !memcmp(out.p, "abcENx", 6), "released '%.*s'", (int)out.n, out.p);
    CHECK(stop_text_push(&s, "yEN", 3, &out) == 0 && stop_text_push(&s, "Dzz", 3, &out) == 1);
    CHECK_MSG(out.n == 7 && !memcmp(out.p, "abcENxy", 7), "released '%.*s'", (int)out.n, out.p);
    CHECK(stop_text_push(&s, "more", 4, &out) == 1 && out.n == 7);  // nothing after a match
    stop_text_free(&s);
    bb_free(&out);
}

// Against the definition: the output is the text up to the stop string that is complete first —
// of all occurrences the one that ends first, on a tie the one that starts first — (all of it when
// none occurs), however the text is split into pieces. "abcd" with stops "abcd" and "bc" stops at
// "bc" (complete at byte 3, before "abcd" is), with "abcd" and "cd" at "abcd" (both end at 4).
TEST(test_stop_text_equals_truncation_at_first_match) {
    const char *texts[] = {"hello world, the end", "aaab", "x<stop>y", "ümlaut ✓ done", "abcabd", "no match here",
                           "abcd", "abcd", "xx long stop 1 string yy"};
    const char *const stop_sets[][3] = {{"end", "world", NULL}, {"aab", NULL, NULL},   {"<stop>", "<s", NULL},
                                        {"✓", NULL, NULL},      {"abd", "bca", NULL},  {"zz", "ere!", NULL},
                                        {"abcd", "bc", NULL},   {"abcd", "cd", NULL},  {"long stop 1 string", "1", NULL}};
    const size_t want[] = {6, 1, 1, 8, 1, 13, 1, 0, 13};
    unsigned seed = 7;
    for (int t = 0; t < 9; t++) {
        const char *text = texts[t];
        int ns = 0;
        while (ns < 3 && stop_sets[t][ns]) ns++;
        size_t first = strlen(text), end = (size_t)-1;
        for (int k = 0; k < ns; k++) {
            const char *at = strstr(text, stop_sets[t][k]);
            size_t a = at ? (size_t)(at - text) : 0, l = strlen(stop_sets[t][k]);
            if (at && (a + l < end || (a + l == end && a < first))) first = a, end = a + l;
        }
        CHECK_MSG(first == want[t], "'%s': the definition gives %zu, the test expects %zu", text, first, want[t]);
        for (int trial = 0; trial < 50; trial++) {  // random splits, at character boundaries
            char buf[64][32];
            const char *pieces[64];
            int np = 0;
            for (const char *p = text; *p && np < 64;) {
                size_t len = 1 + (seed = seed * 1103515245 + 12345) % 4, i = 0;
                while (p[i] && i < len) i++;
                while (p[i] && ((unsigned char)p[i] & 0xC0) == 0x80) i++;  // whole characters
                memcpy(buf[np], p, i);
                buf[np][i] = 0;
                pieces[np] = buf[np];
                np++;
                p += i;
            }
            int matched;
            char *got = stop_run(stop_sets[t], ns, pieces, np, &matched);
            int ok = strlen(got) == first && !strncmp(got, text, first) && matched == (first < strlen(text));
            CHECK_MSG(ok, "'%s': got '%s' (matched %d), want the first %zu bytes", text, got, matched, first);
            free(got);
        }
    }
}

static int parse(ApiKind kind, const char *body, ServeRequest *r, ApiError *e) {
    return serve_request_parse(r, kind, body, strlen(body), e);
}

TEST(test_request_parse_fields) {
    ServeRequest r;
    ApiError e;
    const char *body =
        "{\"model\": \"m\", \"messages\": [{\"role\": \"system\", \"content\": \"be brief\"},"
        " {\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"a\"}, {\"type\": \"text\", \"text\": \"b\"}]},"
        " {\"role\": \"assistant\", \"content\": null}], \"max_completion_tokens\": 7, \"temperature\": 0.5, \"top_p\": 0.9,"
        " \"top_k\": -1, \"min_p\": 0.1, \"seed\": 42, \"stop\": [\"x\", \"yy\"], \"n\": 2, \"stream\": true,"
        " \"stream_options\": {\"include_usage\": true}, \"logprobs\": true, \"top_logprobs\": 5,"
        " \"presence_penalty\": 0.5, \"frequency_penalty\": -0.5, \"unknown_field\": {\"ignored\": [1]}}";
    CHECK_MSG(parse(API_CHAT, body, &r, &e) == 0, "%s", e.message);
    int ok = !strcmp(r.model, "m") && r.n_msgs == 3 && !strcmp(r.msgs[0].role, "system") && !strcmp(r.msgs[1].content, "a\nb") &&
             !strcmp(r.msgs[2].content, "") && r.max_tokens == 7 && r.temperature == 0.5f && r.top_p == 0.9f && r.top_k == 0 &&
             r.min_p == 0.1f && r.has_seed && r.seed == 42 && r.n_stop == 2 && !strcmp(r.stop[1], "yy") && r.n == 2 &&
             r.stream && r.include_usage && r.logprobs && r.top_logprobs == 5 && r.presence_penalty == 0.5f &&
             r.frequency_penalty == -0.5f;
    serve_request_free(&r);
    CHECK(ok);
    CHECK(parse(API_COMPLETION, "{\"prompt\": [5, 6, 7], \"logprobs\": 3, \"stop\": \"s\", \"seed\": null}", &r, &e) == 0);
    ok = r.n_prompts == 1 && r.prompts[0].n_ids == 3 && r.prompts[0].ids[2] == 7 && !r.prompts[0].text && r.logprobs &&
         r.top_logprobs == 3 && r.n_stop == 1 && !r.has_seed && r.max_tokens == -1 && r.temperature == 1.0f && r.n == 1 &&
         !r.echo && r.n_bias == 0;
    serve_request_free(&r);
    CHECK(ok);
    CHECK(parse(API_COMPLETION, "{\"prompt\": [\"text\"]}", &r, &e) == 0);
    ok = r.n_prompts == 1 && r.prompts[0].text && !strcmp(r.prompts[0].text, "text");
    serve_request_free(&r);
    CHECK(ok);
    // several prompts, echo with max_tokens 0, a logit bias
    CHECK_MSG(parse(API_COMPLETION, "{\"prompt\": [\"a\", [3, 4], \"b\"], \"echo\": true, \"max_tokens\": 0,"
                                    " \"logit_bias\": {\"17\": -100, \"5\": 2.5}}", &r, &e) == 0, "%s", e.message);
    ok = r.n_prompts == 3 && !strcmp(r.prompts[0].text, "a") && r.prompts[1].n_ids == 2 && r.prompts[1].ids[1] == 4 &&
         !strcmp(r.prompts[2].text, "b") && r.echo && r.max_tokens == 0 && r.n_bias == 2;
    for (int i = 0; ok && i < r.n_bias; i++)
        ok = r.bias_ids[i] == 17 ? r.bias_values[i] == -100.0f : r.bias_ids[i] == 5 && r.bias_values[i] == 2.5f;
    serve_request_free(&r);
    CHECK(ok);
    // an empty tool_calls array is no calls: null content beside it reads as empty text, as vLLM reads it
    CHECK_MSG(parse(API_CHAT, "{\"messages\": [{\"role\": \"assistant\", \"content\": null, \"tool_calls\": []}]}", &r, &e) == 0,
              "%s", e.message);
    ok = r.n_msgs == 1 && r.msgs[0].n_tool_calls == 0 && r.msgs[0].content && !strcmp(r.msgs[0].content, "");
    serve_request_free(&r);
    CHECK(ok);
    CHECK(parse(API_COMPLETION, "{\"prompt\": [[1, 2], [3]]}", &r, &e) == 0);
    ok = r.n_prompts == 2 && r.prompts[0].n_ids == 2 && r.prompts[1].n_ids == 1 && r.prompts[1].ids[0] == 3;
    serve_request_free(&r);
    CHECK(ok);
    // tools: auto by default, several calls allowed unless parallel_tool_calls is false (and the
    // description the model reads says which)
    const char *tb = "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tools\": [{\"type\": \"function\", "
                     "\"function\": {\"name\": \"f\"}}]%s}";
    char tbody[400];
    for (int par = 0; par < 2; par++) {
        snprintf(tbody, sizeof tbody, tb, par ? "" : ", \"parallel_tool_calls\": false");
        CHECK_MSG(parse(API_CHAT, tbody, &r, &e) == 0, "%s", e.message);
        ok = r.tool_choice == TOOL_AUTO && r.n_tools == 1 && r.parallel_tool_calls == par && r.tools_prompt &&
             (strstr(r.tools_prompt, "at most one call") != NULL) == !par;
        serve_request_free(&r);
        CHECK(ok);
    }
}

// Each bad body: refused with a 400 naming the field.
TEST(test_request_parse_refuses_bad_fields) {
    static const struct {
        ApiKind kind;
        const char *body, *param;
    } bad[] = {
        {API_CHAT, "{", ""}, {API_CHAT, "[1]", ""}, {API_CHAT, "{}", "messages"},
        {API_CHAT, "{\"messages\": []}", "messages"}, {API_CHAT, "{\"messages\": [\"hi\"]}", "messages[0]"},
        {API_CHAT, "{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}", "messages[0].role"},
        {API_CHAT, "{\"messages\": [{\"role\": \"tool\"}]}", "messages[0].content"},
        {API_CHAT, "{\"messages\": [{\"role\": \"assistant\", \"tool_calls\": [{\"function\": {\"name\": \"f\", \"arguments\": {}}}]}]}",
         "messages[0].tool_calls[0]"},
        {API_CHAT, "{\"messages\": [{\"role\": \"assistant\", \"tool_calls\": [{\"function\": {\"name\": \"a b\", \"arguments\": \"{}\"}}]}]}",
         "messages[0].tool_calls[0]"},
        {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tools\": {}}", "tools"},
        {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tools\": [{\"type\": \"function\"}]}", "tools[0]"},
        {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tools\": [{\"type\": \"code\", \"function\": {\"name\": \"f\"}}]}",
         "tools[0]"},
        {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tools\": [{\"function\": {\"name\": \"f\", \"parameters\": 3}}]}",
         "tools[0]"},
        {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tool_choice\": \"required\"}", "tool_choice"},
        {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tools\": [{\"function\": {\"name\": \"f\"}}], \"parallel_tool_calls\": 1}",
         "parallel_tool_calls"},
        {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tools\": [{\"function\": {\"name\": \"f\"}}], \"tool_choice\": \"always\"}",
         "tool_choice"},
        {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tools\": [{\"function\": {\"name\": \"f\"}}], \"tool_choice\": {\"type\": \"function\", \"function\": {\"name\": \"g\"}}}",
         "tool_choice"},
        {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": 3}]}", "messages[0].content"},
        {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"max_tokens\": 0}", "max_tokens"},
        {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"temperature\": -1}", "temperature"},
        {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"top_logprobs\": 3}", "top_logprobs"},
        {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"stop\": [\"a\",\"b\",\"c\",\"d\",\"e\"]}", "stop"},
        {API_COMPLETION, "{\"prompt\": 5}", "prompt"}, {API_COMPLETION, "{\"prompt\": []}", "prompt"},
        {API_COMPLETION, "{\"prompt\": [1, \"a\"]}", "prompt"}, {API_COMPLETION, "{\"prompt\": \"x\", \"logprobs\": 21}", "logprobs"},
        {API_COMPLETION, "{\"prompt\": \"x\", \"n\": 0}", "n"}, {API_COMPLETION, "{\"prompt\": \"x\", \"stream\": 1}", "stream"},
        {API_COMPLETION, "{\"prompt\": [[1], []]}", "prompt"}, {API_COMPLETION, "{\"prompt\": [\"a\", 3]}", "prompt"},
        {API_COMPLETION, "{\"prompt\": [[1], [\"a\"]]}", "prompt"}, {API_COMPLETION, "{\"prompt\": [[1, -2]]}", "prompt"},
        {API_COMPLETION, "{\"prompt\": \"x\", \"max_tokens\": 0}", "max_tokens"},
        {API_COMPLETION, "{\"prompt\": \"x\", \"echo\": 1}", "echo"},
        {API_COMPLETION, "{\"prompt\": \"x\", \"best_of\": 2, \"n\": 3}", "best_of"},
        {API_COMPLETION, "{\"prompt\": \"x\", \"best_of\": 3, \"stream\": true}", "best_of"},
        {API_COMPLETION, "{\"prompt\": \"x\", \"best_of\": 17}", "best_of"},
        {API_COMPLETION, "{\"prompt\": \"x\", \"suffix\": 3}", "suffix"},
        {API_COMPLETION, "{\"prompt\": [1, 2], \"suffix\": \"y\"}", "suffix"},
        {API_COMPLETION, "{\"prompt\": [\"a\", \"b\"], \"suffix\": \"y\", \"echo\": true}", "suffix"},
        {API_COMPLETION, "{\"prompt\": \"x\", \"logit_bias\": [1]}", "logit_bias"},
        {API_COMPLETION, "{\"prompt\": \"x\", \"logit_bias\": {\"12\": 101}}", "logit_bias"},
        {API_COMPLETION, "{\"prompt\": \"x\", \"logit_bias\": {\"a1\": 1}}", "logit_bias"},
        {API_COMPLETION, "{\"prompt\": \"x\", \"logit_bias\": {\"-1\": 1}}", "logit_bias"},
        {API_COMPLETION, "{\"prompt\": \"x\", \"logit_bias\": {\"\": 1}}", "logit_bias"},
        {API_COMPLETION, "{\"prompt\": \"x\", \"logit_bias\": {\"99999999999\": 1}}", "logit_bias"},
        {API_COMPLETION, "{\"prompt\": \"x\", \"logit_bias\": {\"3\": \"high\"}}", "logit_bias"},
        {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"logit_bias\": {\"3\": -101}}", "logit_bias"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ServeRequest r;
        ApiError e;
        int rc = parse(bad[i].kind, bad[i].body, &r, &e);
        if (rc == 0) serve_request_free(&r);
        CHECK_MSG(rc == -1 && e.status == 400 && !strcmp(e.param, bad[i].param), "%s: rc %d, status %d, param '%s' (want '%s'): %s",
                  bad[i].body, rc, e.status, rc ? e.param : "", bad[i].param, rc ? e.message : "");
    }
}

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

// Model directories with a tokenizer trained here and random models of its vocabulary, made once
// per run: a small one with an MTP module (quick, also under the sanitizers), and a big one for the disconnect test —
// a long answer of it takes seconds, so that cancelling one is visible.
#define MODEL_CONFIG(hidden, layers, inter, moe_inter, heads, mtp)                                                   \
    "{\"model_type\": \"deepseek_v3\", \"vocab_size\": 400, \"hidden_size\": " #hidden ", \"num_hidden_layers\": " #layers \
    ", \"first_k_dense_replace\": 1, \"intermediate_size\": " #inter ", \"moe_intermediate_size\": " #moe_inter         \
    ", \"num_attention_heads\": " #heads ", \"q_lora_rank\": 32, \"kv_lora_rank\": 32, \"qk_nope_head_dim\": 16,"       \
    " \"qk_rope_head_dim\": 8, \"v_head_dim\": 16, \"n_routed_experts\": 8, \"n_shared_experts\": 1,"                 \
    " \"num_experts_per_tok\": 2, \"n_group\": 2, \"topk_group\": 1, \"topk_method\": \"noaux_tc\","                 \
    " \"scoring_func\": \"sigmoid\", \"norm_topk_prob\": true, \"routed_scaling_factor\": 2.5,"                      \
    " \"num_nextn_predict_layers\": " #mtp ", \"max_position_embeddings\": 32768, \"rope_theta\": 10000,"                  \
    " \"rms_norm_eps\": 1e-6, \"initializer_range\": 0.5, \"bos_token_id\": 0, \"eos_token_id\": 1}"

static const char *model_dir_of(int big) {
    static char dirs[2][512];
    static int state[2], tokenizer;
    char base[400], path[600], out[4096];
    if (state[big]) return state[big] == 1 ? dirs[big] : NULL;
    state[big] = 2;
    snprintf(base, sizeof base, "%s/serve", test_tmpdir());
    snprintf(dirs[big], sizeof dirs[big], "%s/model-%s", base, big ? "big" : "small");
    if (!tokenizer) {  // the repository's documentation is the corpus: enough distinct text for 400 ids
        if (test_run(out, sizeof out, "rm -rf '%s' && mkdir -p '%s' && %s tokenizer train --vocab-size 400 --out %s/tokenizer.json "
                     "README.md docs/*.md", base, base, test_bin(), base)) {
            fprintf(stderr, "    tokenizer setup failed: %s\n", out);
            return NULL;
        }
        tokenizer = 1;
    }
    snprintf(path, sizeof path, "%s/config-%d.json", base, big);
    write_file(path, big ? MODEL_CONFIG(512, 6, 1536, 384, 8, 0) : MODEL_CONFIG(128, 2, 256, 64, 2, 1));
    if (test_run(out, sizeof out, "%s init --config %s --out %s --seed 3 --dtype bf16 && cp %s/tokenizer.json %s/tokenizer_config.json %s/",
                 test_bin(), path, dirs[big], base, base, dirs[big])) {
        fprintf(stderr, "    model setup failed: %s\n", out);
        return NULL;
    }
    state[big] = 1;
    return dirs[big];
}

static const char *model_dir(void) { return model_dir_of(0); }

typedef struct {
    pid_t pid;
    int port;
    char log[600];
} Server;

// Starts `dsv3 serve --model DIR --port 0 EXTRA` (the big model or the small one), waits for its
// "listening on" line.
static int server_start_on(Server *s, int big, const char *extra) {
    static int serial;
    const char *dir = model_dir_of(big);
    if (!dir) return -1;
    snprintf(s->log, sizeof s->log, "%s/serve/server-%d.log", test_tmpdir(), serial++);
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "exec %s serve --model %s --alias tiny --port 0 %s 2>%s", test_bin(), dir, extra, s->log);
    unlink(s->log);
    s->pid = fork();
    if (s->pid < 0) return -1;
    if (s->pid == 0) {
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    for (int i = 0; i < 600; i++) {  // 60 s (a sanitized build loads slowly)
        size_t n;
        char *log = test_read_file(s->log, &n);
        const char *at = log ? strstr(log, "listening on http://127.0.0.1:") : NULL;
        if (at) {
            s->port = atoi(at + strlen("listening on http://127.0.0.1:"));
            free(log);
            return s->port > 0 ? 0 : -1;
        }
        free(log);
        int st;
        if (waitpid(s->pid, &st, WNOHANG) == s->pid) return -1;
        usleep(100000);
    }
    kill(s->pid, SIGKILL);
    waitpid(s->pid, NULL, 0);
    return -1;
}

// SIGTERM; the exit status (-1 when it did not exit within 20 s, or died of a signal).
static int server_stop(Server *s) {
    kill(s->pid, SIGTERM);
    for (int i = 0; i < 200; i++) {
        int st;
        if (waitpid(s->pid, &st, WNOHANG) == s->pid) return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
        usleep(100000);
    }
    kill(s->pid, SIGKILL);
    waitpid(s->pid, NULL, 0);
    return -1;
}

static int connect_to(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct timeval tv = {.tv_sec = 60};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a)) {
        if (fd >= 0) close(fd);
        return -1;
    }
    return fd;
}

static int send_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k <= 0) return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

// Sends an HTTP/1.0 request (the server closes after the answer) with the body; returns the fd.
static int http_send(int port, const char *method, const char *path, const char *headers, const char *body, size_t n) {
    int fd = connect_to(port);
    if (fd < 0) return -1;
    char head[1024];
    int h = snprintf(head, sizeof head, "%s %s HTTP/1.0\r\nHost: localhost\r\n%sContent-Length: %zu\r\n\r\n", method, path,
                     headers ? headers : "", n);
    if (send_all(fd, head, (size_t)h) || send_all(fd, body, n)) {
        close(fd);
        return -1;
    }
    return fd;
}

typedef struct {
    int status;
    char *head, *body;  // malloc'd (one block: body points into it)
} Response;

// The whole response; status -1 when none came.
static Response http_read(int fd) {
    Response r = {.status = -1};
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (n + 4096 > cap) buf = realloc(buf, cap *= 2);
        ssize_t k = recv(fd, buf + n, cap - n - 1, 0);
        if (k <= 0) break;
        n += (size_t)k;
    }
    close(fd);
    buf[n] = 0;
    r.head = buf;
    char *sep = strstr(buf, "\r\n\r\n");
    r.body = sep ? sep + 4 : buf + n;
    if (!strncmp(buf, "HTTP/1.", 7)) r.status = atoi(buf + 9);
    return r;
}

static Response http(int port, const char *method, const char *path, const char *headers, const char *body) {
    int fd = http_send(port, method, path, headers, body, strlen(body));
    if (fd < 0) return (Response){.status = -1, .head = calloc(1, 1), .body = NULL};
    return http_read(fd);
}

static Response post(int port, const char *path, const char *body) { return http(port, "POST", path, NULL, body); }

// The first choice's text of a completion answer as a JSON string (malloc'd; escaped, so a NUL in
// the text compares too), NULL when it is not one.
static char *answer_text(const Response *r) {
    json_t *o = r->body ? json_loads(r->body, JSON_ALLOW_NUL, NULL) : NULL;
    json_t *c = json_array_get(json_object_get(o, "choices"), 0);
    json_t *t = json_object_get(c, "text");
    if (!t) t = json_object_get(json_object_get(c, "message"), "content");
    char *s = json_is_string(t) ? json_dumps(t, JSON_ENCODE_ANY) : NULL;
    json_decref(o);
    return s;
}

// A gauge or counter of /metrics; -1 when missing.
static double metric(int port, const char *name) {
    Response r = http(port, "GET", "/metrics", NULL, "");
    double v = -1;
    char key[128];
    snprintf(key, sizeof key, "\n%s ", name);
    const char *at = r.body ? strstr(r.body - 1, key) : NULL;
    if (at) v = atof(at + strlen(key));
    free(r.head);
    return v;
}

#define SERVER_OR_FAIL(s, extra) CHECK_MSG(server_start_on(s, 0, extra) == 0, "the server did not start: %s", (s)->log)

TEST(test_serve_openai_client_and_generate_agree) {
    char out[16384];
    int rc = test_run(out, sizeof out, "bash tests/js/setup_openai.sh 2>&1");
    if (rc == 77) SKIP("%s", out);
    CHECK_MSG(rc == 0, "installing the openai client failed: %s", out);
    out[strcspn(out, "\n")] = 0;
    char mods[1024];
    snprintf(mods, sizeof mods, "%.1000s", out);
    Server s;
    SERVER_OR_FAIL(&s, "--api-key test-key --parallel 4 --decode-tiles on");  // (every matrix: as logits' below)
    const char *prompt = "the engine serves", *system = "be brief", *user = "every request waits";
    rc = test_run(out, sizeof out, "node tests/js/serve_client.js %s http://127.0.0.1:%d/v1 tiny '%s' '%s' '%s'", mods, s.port,
                  prompt, system, user);
    int stop_rc = server_stop(&s);
    CHECK_MSG(rc == 0, "the client's checks: %s", out);
    CHECK_MSG(stop_rc == 0, "SIGTERM: exit %d", stop_rc);
    const char *line = out;  // the result is the last line
    for (const char *p = out; *p; p++)
        if (p[0] == '\n' && p[1]) line = p + 1;
    json_t *res = json_loads(line, JSON_ALLOW_NUL, NULL);
    CHECK_MSG(res, "no result line: %s", out);
    json_t *completion = json_object_get(res, "completion"), *chat = json_object_get(res, "chat");
    int stop_checked = json_is_string(json_object_get(res, "stop_checked"));
    // dsv3 generate's text, into files (it may hold a NUL): the answer and a newline
    char gen1[600], gen2[600];
    snprintf(gen1, sizeof gen1, "%s/serve/generate.txt", test_tmpdir());
    snprintf(gen2, sizeof gen2, "%s/serve/generate_chat.txt", test_tmpdir());
    int g1 = test_run(NULL, 0, "%s generate --model %s --prompt '%s' --max-new 24 > %s", test_bin(), model_dir(), prompt, gen1);
    int g2 = test_run(NULL, 0, "%s generate --model %s --chat --system '%s' --prompt '%s' --max-new 20 > %s", test_bin(),
                      model_dir(), system, user, gen2);
    size_t lw = 0, lc = 0;
    char *want = test_read_file(gen1, &lw), *want_chat = test_read_file(gen2, &lc);
    int ok1 = g1 == 0 && want && json_is_string(completion) && lw > 0 && json_string_length(completion) == lw - 1 &&
              !memcmp(json_string_value(completion), want, lw - 1);
    int ok2 = g2 == 0 && want_chat && json_is_string(chat) && lc > 0 && json_string_length(chat) == lc - 1 &&
              !memcmp(json_string_value(chat), want_chat, lc - 1);
    printf("    completion %zu bytes, chat %zu bytes, stop string checked: %s\n", json_string_length(completion),
           json_string_length(chat), stop_checked ? "yes" : "no");
    char *got1 = json_dumps(completion, JSON_ENCODE_ANY), *got2 = json_dumps(chat, JSON_ENCODE_ANY);
    CHECK_MSG(ok1, "the server's greedy completion %s differs from dsv3 generate's '%s'", got1 ? got1 : "?", want ? want : "?");
    CHECK_MSG(ok2, "the server's greedy chat answer %s differs from dsv3 generate --chat's '%s'", got2 ? got2 : "?",
              want_chat ? want_chat : "?");
    CHECK_MSG(stop_checked, "the answer was too short to check a stop string");
    free(got1), free(got2), free(want), free(want_chat);
    // echo's prompt log-probabilities against `dsv3 logits --decode` (the same absorbed rows, the
    // server's compute, cache type and kernels) of the prompt's ids
    json_t *plp = json_object_get(res, "prompt_logprobs"), *pids = json_object_get(res, "prompt_ids");
    size_t T = json_array_size(pids);
    CHECK(json_is_array(plp) && json_is_array(pids) && T >= 2 && json_array_size(plp) == T);
    char ids[2048] = "", lpath[600];
    for (size_t i = 0, w = 0; i < T && w < sizeof ids - 16; i++)
        w += snprintf(ids + w, sizeof ids - w, i ? ",%lld" : "%lld", (long long)json_integer_value(json_array_get(pids, i)));
    snprintf(lpath, sizeof lpath, "%s/serve/prompt_logits.f32", test_tmpdir());
    CHECK(test_run(out, sizeof out, "%s logits --model %s --tokens %s --decode --compute auto --kv-dtype auto --decode-tiles on --out %s",
                   test_bin(), model_dir(), ids, lpath) == 0);
    size_t len;
    float *lg = test_read_file(lpath, &len);
    CHECK(lg && len % (sizeof(float) * T) == 0);
    size_t V = len / sizeof(float) / T;
    double worst = 0;
    for (size_t t = 1; t < T; t++) {
        const float *row = lg + (t - 1) * V;
        float mx = row[0];
        for (size_t i = 1; i < V; i++) mx = row[i] > mx ? row[i] : mx;
        double sum = 0;
        for (size_t i = 0; i < V; i++) sum += exp((double)row[i] - mx);
        double want_lp = (float)(row[json_integer_value(json_array_get(pids, t))] - (mx + log(sum)));
        double d = fabs(json_number_value(json_array_get(plp, t)) - want_lp);
        worst = d > worst ? d : worst;
    }
    printf("    echo: %zu prompt log-probabilities, max |difference| from dsv3 logits %.2g\n", T - 1, worst);
    CHECK_MSG(worst < 1e-6, "the prompt's log-probabilities differ from dsv3 logits by %g", worst);
    free(lg);
    // JSON mode's complete answers parse as objects with jansson too
    json_t *ja = json_object_get(res, "json_answers");
    CHECK(json_is_array(ja) && json_array_size(ja) >= 2);
    for (size_t i = 0; i < json_array_size(ja); i++) {
        json_t *a = json_array_get(ja, i), *o = json_loadb(json_string_value(a), json_string_length(a), 0, NULL);
        CHECK_MSG(o && json_is_object(o), "a JSON-mode answer is not an object for jansson: %s", json_string_value(a));
        json_decref(o);
    }
    printf("    JSON mode: %zu answers closed their object, each parsed by jansson\n", json_array_size(ja));
    // structured outputs: each complete answer read by jansson and held to the client's schema here
    // ({name: string, count: integer, kind: "a" | "b", tags?: [boolean, ≤ 2]}, nothing else)
    json_t *sa = json_object_get(res, "schema_answers");
    CHECK(json_is_array(sa) && json_array_size(sa) >= 2);
    for (size_t i = 0; i < json_array_size(sa); i++) {
        json_t *a = json_array_get(sa, i), *o = json_loadb(json_string_value(a), json_string_length(a), 0, NULL);
        json_t *kind = json_object_get(o, "kind"), *tags = json_object_get(o, "tags");
        int ok = json_is_object(o) && json_is_string(json_object_get(o, "name")) && json_is_integer(json_object_get(o, "count")) &&
                 json_is_string(kind) && (!strcmp(json_string_value(kind), "a") || !strcmp(json_string_value(kind), "b")) &&
                 json_object_size(o) == 3u + (tags != NULL) && (!tags || (json_is_array(tags) && json_array_size(tags) <= 2));
        for (size_t k = 0; ok && tags && k < json_array_size(tags); k++) ok = json_is_boolean(json_array_get(tags, k));
        CHECK_MSG(ok, "a json_schema answer does not fit its schema: %s", json_string_value(a));
        json_decref(o);
    }
    printf("    json_schema: %zu answers completed their object, each fits the schema\n", json_array_size(sa));
    json_t *ac = json_object_get(res, "auto_calls");
    CHECK_MSG(json_integer_value(json_object_get(ac, "opened")) >= 2, "tool_choice auto: the client's counts missing");
    printf("    tool_choice auto: %lld of 6 answers completed their calls (%lld calls), each in the format and its "
           "function's parameters; with parallel_tool_calls false %lld of 6, one call each\n",
           (long long)json_integer_value(json_object_get(ac, "opened")), (long long)json_integer_value(json_object_get(ac, "calls")),
           (long long)json_integer_value(json_object_get(ac, "single")));
    json_decref(res);
}

#define N_CONC 16

typedef struct {
    int port;
    const char *body;
    char *text;
} Call;

static void *call_thread(void *arg) {
    Call *c = arg;
    Response r = post(c->port, "/v1/completions", c->body);
    c->text = r.status == 200 ? answer_text(&r) : NULL;
    free(r.head);
    return NULL;
}

// Requests running together (more than the slots: some wait in the queue) answer exactly what
// they answer alone: greedy, and sampled with a seed — here with MTP speculative decoding on
// (--speculative reaches the engine: /metrics counts drafts) and the steps profiled (--profile:
// /metrics has their parts).
TEST(test_serve_concurrent_requests_equal_solo) {
    Server s;
    SERVER_OR_FAIL(&s, "--parallel 6 --max-queue 16 --speculative 2 --profile");
    char bodies[N_CONC][256];
    char *solo[N_CONC] = {0};
    Call calls[N_CONC];
    for (int i = 0; i < N_CONC; i++) {
        snprintf(bodies[i], sizeof bodies[i],
                 "{\"prompt\": \"request %d: the model decodes\", \"max_tokens\": %d, \"temperature\": %s, \"seed\": %d,"
                 " \"ignore_eos\": true}", i, 12 + 3 * i, i % 2 ? "0.8" : "0", 100 + i);
        Call c = {.port = s.port, .body = bodies[i]};
        call_thread(&c);
        solo[i] = c.text;
    }
    pthread_t th[N_CONC];
    for (int i = 0; i < N_CONC; i++) {
        calls[i] = (Call){.port = s.port, .body = bodies[i]};
        pthread_create(&th[i], NULL, call_thread, &calls[i]);
    }
    for (int i = 0; i < N_CONC; i++) pthread_join(th[i], NULL);
    // the engine's counts are read after each step: the last answer can reach its client a moment
    // before the step that produced it has ended
    double live = 1, used = 1, drafts = 0;
    for (int tries = 0; tries < 200 && (live != 0 || used != 0); tries++) {
        if (tries) usleep(10000);
        live = metric(s.port, "dsv3_sequences_live");
        used = metric(s.port, "dsv3_cache_blocks_used");
    }
    drafts = metric(s.port, "dsv3_speculative_draft_tokens_total");
    double passes = metric(s.port, "dsv3_decode_passes_total"),
           products = metric(s.port, "dsv3_decode_step_seconds_total{part=\"products\"}"),
           attention = metric(s.port, "dsv3_decode_step_seconds_total{part=\"attention\"}"),
           meetings = metric(s.port, "dsv3_decode_step_seconds_total{part=\"meetings\"}");
    int rc = server_stop(&s), same = 0;
    for (int i = 0; i < N_CONC; i++) {
        same += solo[i] && calls[i].text && !strcmp(solo[i], calls[i].text);
        if (!(solo[i] && calls[i].text && !strcmp(solo[i], calls[i].text)))
            printf("    request %d: alone '%s', together '%s'\n", i, solo[i] ? solo[i] : "(failed)", calls[i].text ? calls[i].text : "(failed)");
        free(solo[i]);
        free(calls[i].text);
    }
    CHECK_MSG(same == N_CONC, "%d of %d concurrent answers equal their solo answers", same, N_CONC);
    CHECK_MSG(live == 0 && used == 0, "%g sequences still live, %g cache blocks used after every answer", live, used);
    CHECK_MSG(drafts > 0, "no draft tokens with --speculative 2 (%g)", drafts);
    CHECK_MSG(passes > 0 && products > 0 && attention > 0 && meetings >= 0,
              "--profile: %g passes, products %g s, attention %g s, meetings %g s", passes, products, attention, meetings);
    CHECK_MSG(rc == 0, "SIGTERM: exit %d", rc);
}

// Opens a stream and reads until its first content chunk has arrived; returns the fd.
static int open_stream(int port, int max_tokens) {
    char body[256];
    snprintf(body, sizeof body, "{\"prompt\": \"the engine\", \"max_tokens\": %d, \"temperature\": 0, \"stream\": true,"
             " \"ignore_eos\": true}", max_tokens);
    int fd = http_send(port, "POST", "/v1/completions", NULL, body, strlen(body));
    if (fd < 0) return -1;
    char buf[8192];
    size_t n = 0;
    while (n < sizeof buf - 1) {
        ssize_t k = recv(fd, buf + n, sizeof buf - 1 - n, 0);
        if (k <= 0) break;
        n += (size_t)k;
        buf[n] = 0;
        if (strstr(buf, "\"text\"")) return fd;
    }
    close(fd);
    return -1;
}

// Waits up to ms for a metric to reach want; returns its last value.
static double await_metric(int port, const char *name, double want, int ms) {
    double v = -1;
    for (int t = 0; t < ms; t += 20) {
        if ((v = metric(port, name)) == want) break;
        usleep(20000);
    }
    return v;
}

// With one slot and a queue of one: a request for more choices than that can ever hold is a 400; a
// long stream runs, a second waits (its stream kept alive by ": ping" comments, --sse-ping 1), a
// third is refused with 503 and Retry-After. A client that closes its socket — waiting or mid-stream — cancels its
// sequence at once (the long one is far from done when it goes). SIGTERM ends a stream in flight
// and the server exits 0.
TEST(test_serve_disconnect_cancels_and_queue_limit) {
    Server s;
    // (without the prefix cache, so that the blocks of a finished sequence are free, not kept)
    CHECK_MSG(server_start_on(&s, 1, "--parallel 1 --max-queue 1 --no-prefix-cache --sse-ping 1 --ctx 32768") == 0,
              "the server did not start: %s", s.log);
    Response too_many = post(s.port, "/v1/completions", "{\"prompt\": \"the\", \"max_tokens\": 2, \"n\": 3}");
    int n_refused = too_many.status == 400 && too_many.body && strstr(too_many.body, "\"param\":\"n\"");
    free(too_many.head);
    int a = open_stream(s.port, 32000);  // (far from done when its client leaves, on any machine here)
    CHECK_MSG(a >= 0, "the first stream did not start");
    char body[] = "{\"prompt\": \"the engine\", \"max_tokens\": 4000, \"stream\": true}";
    int b = http_send(s.port, "POST", "/v1/completions", NULL, body, strlen(body));
    double live = await_metric(s.port, "dsv3_sequences_live", 2, 2000);
    double blocks = 0;  // the engine's counts are read after each step: wait for one
    for (int t = 0; t < 250 && blocks <= 0; t++) {
        if ((blocks = metric(s.port, "dsv3_cache_blocks_used")) <= 0) usleep(20000);
    }
    // the waiting stream hears a comment line within a few seconds (before any data of its own)
    struct timeval tv = {.tv_sec = 4};
    setsockopt(b, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char heard[4096] = "";
    size_t nh = 0;
    while (nh < sizeof heard - 1 && !strstr(heard, ": ping\n\n")) {
        ssize_t k = recv(b, heard + nh, sizeof heard - 1 - nh, 0);
        if (k <= 0) break;
        heard[nh += (size_t)k] = 0;
    }
    int pinged = strstr(heard, ": ping\n\n") && !strstr(heard, "\"text\"");
    Response c = post(s.port, "/v1/completions", "{\"prompt\": \"the engine\", \"max_tokens\": 4}");
    int got503 = c.status == 503 && strstr(c.head, "Retry-After:") && strstr(c.body, "\"error\"");
    free(c.head);
    close(b);  // the waiting one leaves
    double live_after_b = await_metric(s.port, "dsv3_sequences_live", 1, 2000);
    double gen_before = metric(s.port, "dsv3_generation_tokens_total");
    close(a);  // the running one leaves
    double live_after_a = await_metric(s.port, "dsv3_sequences_live", 0, 2000);
    double running = 1, blocks_after = 1;  // (the engine's counts follow the cancellation a moment later)
    for (int t = 0; t < 200 && (running != 0 || blocks_after != 0); t++) {
        if (t) usleep(10000);
        running = metric(s.port, "dsv3_sequences_running");
        blocks_after = metric(s.port, "dsv3_cache_blocks_used");
    }
    double gen = metric(s.port, "dsv3_generation_tokens_total");
    usleep(200000);
    double gen_later = metric(s.port, "dsv3_generation_tokens_total");
    int d = open_stream(s.port, 4000);  // the slot is free again; then SIGTERM in mid-stream
    kill(s.pid, SIGTERM);
    Response rest = d >= 0 ? http_read(d) : (Response){.status = -1, .head = calloc(1, 1)};
    int rc = server_stop(&s);
    printf("    live %g with two streams (cache blocks used %g); %g after the waiting one left, %g after the running one "
           "left (running %g, cache blocks used %g); generated %g tokens before it left, %g after, %g later\n",
           live, blocks, live_after_b, live_after_a, running, blocks_after, gen_before, gen, gen_later);
    CHECK_MSG(n_refused, "n = 3 with room for 2 sequences in all: not refused with 400 naming n");
    CHECK_MSG(live == 2, "two streams: %g sequences live", live);
    CHECK_MSG(pinged, "the waiting stream got no \": ping\" comment: '%s'", heard);
    CHECK_MSG(got503, "a third request beyond the queue did not get 503 with Retry-After");
    CHECK_MSG(live_after_b == 1, "the waiting stream's client left: %g sequences live", live_after_b);
    CHECK_MSG(live_after_a == 0 && running == 0, "the running stream's client left: %g live, %g running", live_after_a, running);
    CHECK_MSG(blocks > 0 && blocks_after == 0, "cache blocks used: %g while streaming, %g after the client left", blocks, blocks_after);
    // (the long stream must still be running when its client leaves: 32,000 tokens take ~20 s here)
    CHECK_MSG(gen_before < 31900, "the long stream was done before its client left (%g tokens)", gen_before);
    CHECK_MSG(gen - gen_before < 200 && gen_later == gen, "the abandoned stream went on: %g tokens when its client left, "
              "%g once it was gone, %g later", gen_before, gen, gen_later);
    CHECK_MSG(d >= 0, "a stream after the cancels did not start");
    free(rest.head);
    CHECK_MSG(rc == 0, "SIGTERM with a stream in flight: exit %d", rc);
}

typedef struct {
    const char *method, *path, *body;
    int status;
    const char *param;  // NULL: not checked
} Bad;

static int check_error_body(const Response *r, const Bad *b, char *why, size_t n) {
    json_t *o = r->body ? json_loads(r->body, 0, NULL) : NULL, *e = json_object_get(o, "error");
    const char *param = json_string_value(json_object_get(e, "param"));
    int ok = r->status == b->status && json_is_string(json_object_get(e, "message")) && json_is_string(json_object_get(e, "type")) &&
             json_object_get(e, "code") && (!b->param || (param && !strcmp(param, b->param)));
    if (!ok)
        snprintf(why, n, "%s %s %.80s: status %d (want %d), param %s (want %s), body %.300s", b->method, b->path, b->body ? b->body : "",
                 r->status, b->status, param ? param : "null", b->param ? b->param : "-", r->body ? r->body : "");
    json_decref(o);
    return ok;
}

#define CHAT "/v1/chat/completions"
#define COMPL "/v1/completions"
#define MSG "\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]"

TEST(test_serve_bad_requests_get_4xx) {
    static const Bad bad[] = {
        {"POST", CHAT, "{", 400, NULL}, {"POST", CHAT, "", 400, NULL}, {"POST", CHAT, "[]", 400, NULL},
        {"POST", CHAT, "42", 400, NULL}, {"POST", CHAT, "null", 400, NULL}, {"POST", CHAT, "{}", 400, "messages"},
        {"POST", CHAT, "{\"messages\": \"hi\"}", 400, "messages"}, {"POST", CHAT, "{\"messages\": []}", 400, "messages"},
        {"POST", CHAT, "{\"messages\": [1]}", 400, "messages[0]"},
        {"POST", CHAT, "{\"messages\": [{\"content\": \"x\"}]}", 400, "messages[0].role"},
        {"POST", CHAT, "{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}", 400, "messages[0].role"},
        {"POST", CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tools\": [{\"function\": {\"name\": \"\"}}]}", 400,
         "tools[0]"},
        {"POST", CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": 5}]}", 400, "messages[0].content"},
        {"POST", CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image_url\", \"image_url\": {}}]}]}", 400,
         "messages[0].content"},
        {"POST", CHAT, "{" MSG ", \"max_tokens\": -1}", 400, "max_tokens"},
        {"POST", CHAT, "{" MSG ", \"max_tokens\": 0}", 400, "max_tokens"},
        {"POST", CHAT, "{" MSG ", \"max_tokens\": 1000000000000}", 400, "max_tokens"},
        {"POST", CHAT, "{" MSG ", \"max_tokens\": \"10\"}", 400, "max_tokens"},
        {"POST", CHAT, "{" MSG ", \"max_completion_tokens\": 1.5}", 400, "max_completion_tokens"},
        {"POST", CHAT, "{" MSG ", \"temperature\": -0.1}", 400, "temperature"},
        {"POST", CHAT, "{" MSG ", \"temperature\": \"hot\"}", 400, "temperature"},
        {"POST", CHAT, "{" MSG ", \"top_p\": 1.5}", 400, "top_p"}, {"POST", CHAT, "{" MSG ", \"top_p\": -0.1}", 400, "top_p"},
        {"POST", CHAT, "{" MSG ", \"n\": 0}", 400, "n"}, {"POST", CHAT, "{" MSG ", \"n\": 17}", 400, "n"},
        {"POST", CHAT, "{" MSG ", \"stop\": [\"a\", \"b\", \"c\", \"d\", \"e\"]}", 400, "stop"},
        {"POST", CHAT, "{" MSG ", \"stop\": 5}", 400, "stop"}, {"POST", CHAT, "{" MSG ", \"stop\": [1]}", 400, "stop"},
        {"POST", CHAT, "{" MSG ", \"logprobs\": true, \"top_logprobs\": 21}", 400, "top_logprobs"},
        {"POST", CHAT, "{" MSG ", \"logprobs\": \"yes\"}", 400, "logprobs"},
        {"POST", CHAT, "{" MSG ", \"stream\": \"true\"}", 400, "stream"}, {"POST", CHAT, "{" MSG ", \"model\": 5}", 400, "model"},
        {"POST", CHAT, "{" MSG ", \"model\": \"gpt-4\"}", 404, "model"}, {"POST", CHAT, "{" MSG ", \"min_p\": 2}", 400, "min_p"},
        {"POST", CHAT, "{" MSG ", \"presence_penalty\": 3}", 400, "presence_penalty"},
        {"POST", CHAT, "{" MSG ", \"frequency_penalty\": -3}", 400, "frequency_penalty"},
        {"POST", CHAT, "{" MSG ", \"seed\": \"x\"}", 400, "seed"},
        {"POST", CHAT, "{" MSG ", \"stream_options\": 1}", 400, "stream_options"},
        {"POST", CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"a\\u0000b\"}]}", 400, NULL},
        {"POST", COMPL, "{}", 400, "prompt"}, {"POST", COMPL, "{\"prompt\": [1, 2, 100000]}", 400, "prompt"},
        {"POST", COMPL, "{\"prompt\": [-1]}", 400, "prompt"}, {"POST", COMPL, "{\"prompt\": []}", 400, "prompt"},
        {"POST", COMPL, "{\"prompt\": {\"a\": 1}}", 400, "prompt"}, {"POST", COMPL, "{\"prompt\": [[1], [2, 100000]]}", 400, "prompt"},
        {"POST", COMPL, "{\"prompt\": \"x\", \"logprobs\": 21}", 400, "logprobs"},
        {"POST", COMPL, "{\"prompt\": \"x\", \"echo\": \"yes\"}", 400, "echo"},
        {"POST", COMPL, "{\"prompt\": \"x\", \"max_tokens\": 0}", 400, "max_tokens"},
        {"POST", COMPL, "{\"prompt\": \"x\", \"logit_bias\": {\"100000\": 1}}", 400, "logit_bias"},
        {"POST", COMPL, "{\"prompt\": \"x\", \"logit_bias\": {\"1\": 1e9}}", 400, "logit_bias"},
        {"POST", COMPL, "{\"prompt\": [\"x\", 5]}", 400, "prompt"},
        {"POST", COMPL, "{\"prompt\": [[1], []]}", 400, "prompt"},
        {"POST", CHAT, "{" MSG ", \"response_format\": {\"type\": \"json_schema\", \"json_schema\": {}}}", 400,
         "response_format.json_schema.name"},
        {"POST", CHAT, "{" MSG ", \"response_format\": {\"type\": \"json_schema\", \"json_schema\": 3}}", 400,
         "response_format.json_schema"},
        {"POST", CHAT, "{" MSG ", \"response_format\": {\"type\": \"json_schema\", \"json_schema\": {\"name\": \"a b\"}}}", 400,
         "response_format.json_schema.name"},
        {"POST", CHAT, "{" MSG ", \"response_format\": {\"type\": \"json_schema\", \"json_schema\": {\"name\": \"r\", "
         "\"schema\": {\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"string\", \"pattern\": \"(?=x)\"}}}}}}", 400,
         "response_format.json_schema.schema"},
        {"POST", CHAT, "{" MSG ", \"response_format\": {\"type\": \"json_schema\", \"json_schema\": {\"name\": \"r\", "
         "\"schema\": {\"type\": \"array\"}}}}", 400, "response_format.json_schema.schema"},
        {"POST", CHAT, "{" MSG ", \"response_format\": {\"type\": \"json_schema\", \"json_schema\": {\"name\": \"r\", "
         "\"strict\": \"yes\"}}}", 400, "response_format.json_schema"},
        {"POST", CHAT, "{" MSG ", \"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"f\", \"strict\": true, "
         "\"parameters\": {\"type\": \"object\", \"properties\": {\"n\": {\"type\": \"string\", \"pattern\": \"(?!a)\"}}}}}]}", 400,
         "tools[0]"},
        {"POST", CHAT, "{" MSG ", \"response_format\": {\"type\": \"xml\"}}", 400, "response_format"},
        {"POST", CHAT, "{" MSG ", \"response_format\": \"json\"}", 400, "response_format"},
        {"POST", COMPL, "{\"prompt\": \"\\xff\\xfe\"}", 400, NULL},
        {"GET", CHAT, "", 405, NULL}, {"PUT", "/v1/models", "", 405, NULL}, {"DELETE", "/health", "", 405, NULL},
        {"GET", "/nope", "", 404, NULL}, {"POST", "/v1/completion", "{}", 404, NULL},
        {"POST", "/tokenize", "x", 400, NULL}, {"POST", "/tokenize", "{\"content\": 5}", 400, "content"},
        {"POST", "/detokenize", "{\"tokens\": [999999]}", 400, "tokens"}, {"POST", "/detokenize", "{\"tokens\": \"a\"}", 400, "tokens"},
    };
    Server s;
    SERVER_OR_FAIL(&s, "--ctx 64 --max-body 65536");
    char why[1024];
    int failed = 0, n = 0;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++, n++) {
        char body[512];
        snprintf(body, sizeof body, "%s", bad[i].body);
        if (strstr(body, "\\xff")) strcpy(body, "{\"prompt\": \"\xff\xfe\"}");  // invalid UTF-8, raw
        Response r = http(s.port, bad[i].method, bad[i].path, NULL, body);
        if (!check_error_body(&r, &bad[i], why, sizeof why) && failed++ < 5) printf("    %s\n", why);
        free(r.head);
    }
    // a nesting bomb, a prompt longer than the context (the message gives both sizes), a body
    // over the limit
    static char bomb[60000];  // under the body limit, deeper than the parser goes
    memset(bomb, '[', sizeof bomb - 1);
    memcpy(bomb, "{\"prompt\": ", 11);
    char longp[4096] = "{\"prompt\": [5", *p = longp + strlen(longp);
    for (int i = 0; i < 100; i++) p += sprintf(p, ", 5");
    strcpy(p, "]}");
    static char big[100000];
    memset(big, ' ', sizeof big - 1);
    big[0] = '{';
    big[sizeof big - 2] = '}';
    const Bad more[] = {{"POST", COMPL, bomb, 400, NULL}, {"POST", COMPL, longp, 400, "prompt"}, {"POST", COMPL, big, 413, NULL}};
    for (int i = 0; i < 3; i++, n++) {
        Response r = http(s.port, more[i].method, more[i].path, NULL, more[i].body);
        int ok = check_error_body(&r, &more[i], why, sizeof why);
        if (ok && i == 1 && !(strstr(r.body, "101") && strstr(r.body, "64"))) {
            ok = 0;
            snprintf(why, sizeof why, "the context error does not give the prompt's length and the context: %.300s", r.body);
        }
        if (!ok && failed++ < 5) printf("    %s\n", why);
        free(r.head);
    }
    {  // a body declared over the limit is refused at its headers, not after it is sent (or never is)
        int fd = connect_to(s.port);
        const char *head = "POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000000000\r\n\r\n{}";
        Response r = {.status = -1};
        if (fd >= 0 && send_all(fd, head, strlen(head)) == 0) r = http_read(fd);
        else if (fd >= 0) close(fd);
        n++;
        if (r.status != 413 && failed++ < 5) printf("    a declared 1e12-byte body: status %d, want 413 at once\n", r.status);
        free(r.head);
    }
    // the same corpus again through curl (another client's framing: Expect, chunking choices, headers)
    int curl_n = 0, curl_failed = 0;
    char bodyfile[600], outfile[600];
    snprintf(bodyfile, sizeof bodyfile, "%s/curl_body", test_tmpdir());
    snprintf(outfile, sizeof outfile, "%s/curl_out", test_tmpdir());
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++, curl_n++) {
        char body[512], out[256];
        snprintf(body, sizeof body, "%s", bad[i].body);
        if (strstr(body, "\\xff")) strcpy(body, "{\"prompt\": \"\xff\xfe\"}");
        write_file(bodyfile, body);
        int has_body = strcmp(bad[i].method, "GET") != 0 && strcmp(bad[i].method, "DELETE") != 0;
        int rc = test_run(out, sizeof out,
                          "curl -s -o '%s' -w '%%{http_code}' -X %s -H 'Content-Type: application/json' %s%s%s "
                          "'http://127.0.0.1:%d%s'",
                          outfile, bad[i].method, has_body ? "--data-binary '@" : "", has_body ? bodyfile : "",
                          has_body ? "'" : "", s.port, bad[i].path);
        Response r = {.status = rc == 0 ? atoi(out) : -1};
        r.head = test_read_file(outfile, NULL);
        r.body = r.head;
        if (!check_error_body(&r, &bad[i], why, sizeof why) && curl_failed++ < 5) printf("    curl: %s\n", why);
        free(r.head);
    }
    Response h = http(s.port, "GET", "/health", NULL, "");
    int health = h.status;
    free(h.head);
    int rc = server_stop(&s);
    printf("    %d bad requests, %d answered otherwise than expected; through curl %d, %d\n", n, failed, curl_n,
           curl_failed);
    CHECK_MSG(curl_n >= 40 && curl_failed == 0, "curl: %d of %d bad requests were not refused as expected",
              curl_failed, curl_n);
    CHECK_MSG(n >= 40 && failed == 0, "%d of %d bad requests were not refused as expected", failed, n);
    CHECK_MSG(health == 200, "/health after the bad requests: %d", health);
    CHECK_MSG(rc == 0, "SIGTERM: exit %d", rc);
}

TEST(test_serve_api_key) {
    Server s;
    SERVER_OR_FAIL(&s, "--api-key sekrit");
    const char *body = "{\"prompt\": \"the\", \"max_tokens\": 2}";
    Response none = http(s.port, "POST", COMPL, NULL, body);
    Response wrong = http(s.port, "POST", COMPL, "Authorization: Bearer sekrix\r\n", body);
    Response bare = http(s.port, "GET", "/v1/models", "Authorization: sekrit\r\n", "");
    Response right = http(s.port, "POST", COMPL, "Authorization: Bearer sekrit\r\n", body);
    Response health = http(s.port, "GET", "/health", NULL, "");
    int rc = server_stop(&s);
    int st[5] = {none.status, wrong.status, bare.status, right.status, health.status};
    int shaped = none.body && strstr(none.body, "\"error\"") != NULL;
    free(none.head), free(wrong.head), free(bare.head), free(right.head), free(health.head);
    CHECK_MSG(st[0] == 401 && st[1] == 401 && st[2] == 401 && shaped, "without the key: %d %d %d", st[0], st[1], st[2]);
    CHECK_MSG(st[3] == 200, "with the key: %d", st[3]);
    CHECK_MSG(st[4] == 200, "/health needs no key: %d", st[4]);
    CHECK_MSG(rc == 0, "SIGTERM: exit %d", rc);
}

// A client that sends half a request and goes silent holds no sequence and is cut off after
// --timeout seconds; the server answers others meanwhile.
TEST(test_serve_silent_client_times_out) {
    Server s;
    SERVER_OR_FAIL(&s, "--timeout 1");
    int fd = connect_to(s.port);
    CHECK(fd >= 0);
    const char *half = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\": ";
    CHECK(send_all(fd, half, strlen(half)) == 0);
    struct timeval tv = {.tv_sec = 10};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    double live = metric(s.port, "dsv3_sequences_live");
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    char b[256];
    ssize_t k;
    while ((k = recv(fd, b, sizeof b, 0)) > 0) {
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    close(fd);
    double waited = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
    Response h = http(s.port, "GET", "/health", NULL, "");
    int health = h.status;
    free(h.head);
    int rc = server_stop(&s);
    printf("    the silent connection was closed after %.1f s\n", waited);
    CHECK_MSG(live == 0, "a half-sent request holds %g sequences", live);
    CHECK_MSG(k == 0 && waited < 5, "the silent connection was not closed (recv %zd after %.1f s)", k, waited);
    CHECK_MSG(health == 200, "/health: %d", health);
    CHECK_MSG(rc == 0, "SIGTERM: exit %d", rc);
}

// A system prompt shared by requests is computed once: later requests take its cache blocks (the
// prefix cache's hit counts in /metrics), and their answers are those of a server without it.
TEST(test_serve_shared_prefix_hits_the_cache) {
    char sys[2048] = "", body[3][2600];
    for (int i = 0; i < 20; i++) strcat(sys, "the engine serves tokens to clients over HTTP. ");
    for (int i = 0; i < 3; i++)
        snprintf(body[i], sizeof body[i],
                 "{\"messages\": [{\"role\": \"system\", \"content\": \"%s\"}, {\"role\": \"user\", \"content\": "
                 "\"question %d\"}], \"max_tokens\": 8, \"temperature\": 0}", sys, i);
    char *with[3] = {0}, *without[3] = {0};
    double lookups = -1, hits = -1, hits_off = -1;
    for (int pass = 0; pass < 2; pass++) {
        Server s;
        SERVER_OR_FAIL(&s, pass ? "--no-prefix-cache" : "");
        for (int i = 0; i < 3; i++) {
            Response r = post(s.port, "/v1/chat/completions", body[i]);
            (pass ? without : with)[i] = r.status == 200 ? answer_text(&r) : NULL;
            free(r.head);
        }
        if (pass == 0) {
            lookups = metric(s.port, "dsv3_prefix_cache_lookup_tokens_total");
            hits = metric(s.port, "dsv3_prefix_cache_hit_tokens_total");
        } else {
            hits_off = metric(s.port, "dsv3_prefix_cache_hit_tokens_total");
        }
        CHECK_MSG(metric(s.port, "dsv3_decode_passes_total") == -1, "a decode profile without --profile");
        CHECK_MSG(server_stop(&s) == 0, "SIGTERM: exit not 0");
    }
    int same = 0;
    for (int i = 0; i < 3; i++) {
        same += with[i] && without[i] && !strcmp(with[i], without[i]);
        free(with[i]);
        free(without[i]);
    }
    printf("    prefix cache: %g of %g prompt positions served from the cache (%g without it)\n", hits, lookups, hits_off);
    CHECK_MSG(same == 3, "%d of 3 answers equal with and without the prefix cache", same);
    CHECK_MSG(hits >= 2 * 16 && hits_off == 0, "the shared system prompt was not reused: %g hit positions (%g without the cache)",
              hits, hits_off);
}

static Tokenizer *model_tokenizer(void);

// Fill in the middle: a completion with a suffix is the model's answer to the FIM prompt (usage
// counts its tokens) and the same text `dsv3 generate --prompt P --suffix S` gives;
// an empty suffix is a plain completion.
TEST(test_serve_fill_in_the_middle) {
    const char *prefix = "the server answers", *suffix = " over HTTP.";
    Tokenizer *t = model_tokenizer();
    CHECK(t);
    TokIds fim = {0};
    Error err = {0};
    CHECK_MSG(tok_fim_encode(t, prefix, strlen(prefix), suffix, strlen(suffix), &fim, &err) == 0, "%s", err.msg);
    size_t fim_n = fim.n;
    ids_free(&fim);
    tok_free(t);
    char body[3][400];
    snprintf(body[0], sizeof body[0], "{\"prompt\": \"%s\", \"suffix\": \"%s\", \"max_tokens\": 16, \"temperature\": 0}", prefix, suffix);
    snprintf(body[1], sizeof body[1], "{\"prompt\": \"%s\", \"suffix\": \"\", \"max_tokens\": 16, \"temperature\": 0}", prefix);
    snprintf(body[2], sizeof body[2], "{\"prompt\": \"%s\", \"max_tokens\": 16, \"temperature\": 0}", prefix);
    Server s;
    SERVER_OR_FAIL(&s, "");
    char *text[3] = {0};
    long prompt_tokens = -1;
    for (int i = 0; i < 3; i++) {
        Response r = post(s.port, "/v1/completions", body[i]);
        text[i] = r.status == 200 ? answer_text(&r) : NULL;
        if (i == 0 && r.body) {
            json_t *o = json_loads(r.body, 0, NULL);
            prompt_tokens = (long)json_integer_value(json_object_get(json_object_get(o, "usage"), "prompt_tokens"));
            json_decref(o);
        }
        free(r.head);
    }
    CHECK_MSG(server_stop(&s) == 0, "SIGTERM: exit not 0");
    char gen[600], cmd_out[2048];
    snprintf(gen, sizeof gen, "%s/serve/generate_fim.txt", test_tmpdir());
    int g = test_run(cmd_out, sizeof cmd_out, "%s generate --model %s --prompt '%s' --suffix '%s' --max-new 16 > %s", test_bin(),
                     model_dir(), prefix, suffix, gen);
    CHECK_MSG(g == 0, "dsv3 generate --suffix: %s", cmd_out);
    size_t lw = 0;
    char *want = test_read_file(gen, &lw);
    json_t *got = text[0] ? json_loads(text[0], JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL) : NULL;
    int same = want && lw > 0 && json_is_string(got) && json_string_length(got) == lw - 1 &&
               !memcmp(json_string_value(got), want, lw - 1);
    printf("    fill in the middle: %ld prompt tokens, %zu bytes of answer\n", prompt_tokens, got ? json_string_length(got) : 0);
    CHECK_MSG(same, "the server's FIM answer %s differs from dsv3 generate --suffix's '%s'", text[0] ? text[0] : "(none)",
              want ? want : "?");
    CHECK_MSG(prompt_tokens == (long)fim_n, "usage.prompt_tokens %ld, the FIM prompt has %zu tokens", prompt_tokens, fim_n);
    CHECK_MSG(text[1] && text[2] && !strcmp(text[1], text[2]), "an empty suffix answered %s, no suffix %s", text[1], text[2]);
    // and on the command line: --suffix '' is a plain continuation too
    char plain[600], empty[600];
    snprintf(plain, sizeof plain, "%s/serve/generate_plain.txt", test_tmpdir());
    snprintf(empty, sizeof empty, "%s/serve/generate_empty_suffix.txt", test_tmpdir());
    CHECK(test_run(NULL, 0, "%s generate --model %s --prompt '%s' --max-new 16 > %s && %s generate --model %s --prompt '%s' "
                   "--suffix '' --max-new 16 > %s && cmp -s %s %s", test_bin(), model_dir(), prefix, plain, test_bin(),
                   model_dir(), prefix, empty, plain, empty) == 0);
    json_decref(got);
    free(want);
    for (int i = 0; i < 3; i++) free(text[i]);
}

// The same JSON mode and logit bias from the command line: `dsv3 generate --json` stops by itself
// exactly when its answer is a complete object (jansson parses it), else it ran to --max-new;
// `--logit-bias ID=100` makes every token that id.
TEST(test_cli_generate_json_and_logit_bias) {
    const char *dir = model_dir();
    CHECK(dir);
    char out[8192], bias[256] = "";
    static const char *const chars[] = {"\"", "}", ":", ",", "1"};
    for (int i = 0; i < 5; i++) {  // the structural characters' ids, favoured so that objects close
        CHECK(test_run(out, sizeof out, "printf '%%s' '%s' | %s tokenize --tokenizer %s/tokenizer.json", chars[i], test_bin(),
                       dir) == 0);
        int id = atoi(out);
        snprintf(bias + strlen(bias), sizeof bias - strlen(bias), "%s%d=6", i ? "," : "", id);
    }
    int closed = 0;
    for (int seed = 1; seed <= 4; seed++) {
        char txt[600], stats[600];
        snprintf(txt, sizeof txt, "%s/serve/json-%d.txt", test_tmpdir(), seed);
        snprintf(stats, sizeof stats, "%s/serve/json-%d.stats", test_tmpdir(), seed);
        CHECK(test_run(out, sizeof out, "%s generate --model %s --prompt 'data:' --json --temperature 1 --seed %d --max-new 300 "
                       "--logit-bias %s --stats-json %s > %s", test_bin(), dir, seed, bias, stats, txt) == 0);
        size_t n;
        char *answer = test_read_file(txt, &n), *st = test_read_file(stats, NULL);
        CHECK(answer && st && n > 0 && answer[n - 1] == '\n');
        json_t *s = json_loads(st, 0, NULL), *o = json_loadb(answer, n - 1, 0, NULL);
        long generated = (long)json_integer_value(json_object_get(s, "generated_tokens"));
        CHECK_MSG(generated < 300 ? o && json_is_object(o) : generated == 300,
                  "seed %d: %ld tokens, %s: %.200s", seed, generated, o ? "parsed" : "not an object", answer);
        closed += generated < 300;
        json_decref(s), json_decref(o);
        free(answer), free(st);
    }
    printf("    generate --json: %d of 4 sampled answers closed their object, each parsed by jansson\n", closed);
    CHECK(closed >= 2);
    // +100 on an id: every token is it
    CHECK(test_run(out, sizeof out, "%s generate --model %s --tokens 5,6,7 --max-new 5 --logit-bias 42=100", test_bin(), dir) == 0);
    CHECK_MSG(!strcmp(out, "42 42 42 42 42\n"), "%s", out);
    CHECK(test_run(out, sizeof out, "%s generate --model %s --tokens 5 --logit-bias 3=101 2>&1", test_bin(), dir) != 0 &&
          strstr(out, "--logit-bias"));
    CHECK(test_run(out, sizeof out, "%s generate --model %s --tokens 5 --json 2>&1", test_bin(), dir) != 0 && strstr(out, "--json"));
    // --json-schema FILE: an answer that ends by itself is {"id": integer, "ok": boolean} exactly
    char schema[600], txt[600];
    snprintf(schema, sizeof schema, "%s/serve/schema.json", test_tmpdir());
    snprintf(txt, sizeof txt, "%s/serve/schema-answer.txt", test_tmpdir());
    test_write_text(schema, "{\"type\": \"object\", \"properties\": {\"id\": {\"type\": \"integer\"}, \"ok\": {\"type\": \"boolean\"}},"
                            " \"required\": [\"id\", \"ok\"], \"additionalProperties\": false}");
    int fitted = 0;
    for (int seed = 1; seed <= 3; seed++) {
        CHECK(test_run(out, sizeof out, "%s generate --model %s --prompt 'data:' --json-schema %s --temperature 1 --seed %d "
                       "--max-new 200 --logit-bias %s > %s", test_bin(), dir, schema, seed, bias, txt) == 0);
        size_t n;
        char *answer = test_read_file(txt, &n);
        json_t *o = answer && n > 0 ? json_loadb(answer, n - 1, 0, NULL) : NULL;
        if (o) {
            CHECK_MSG(json_object_size(o) == 2 && json_is_integer(json_object_get(o, "id")) &&
                          json_is_boolean(json_object_get(o, "ok")), "seed %d: %.200s", seed, answer);
            fitted++;
        }
        json_decref(o);
        free(answer);
    }
    printf("    generate --json-schema: %d of 3 sampled answers completed their object, each fits the schema\n", fitted);
    CHECK(fitted >= 1);
    // a schema outside the subset, or not JSON: one line naming the file and what is wrong
    static const char *const bad[][2] = {
        {"{\"type\": \"object\", \"properties\": {\"id\": {\"type\": \"array\", \"uniqueItems\": true}}}",
         "schema.properties.id: 'uniqueItems' is not supported"},
        {"{\"type\": ", "line 1"},
    };
    for (int i = 0; i < 2; i++) {
        test_write_text(schema, bad[i][0]);
        CHECK(test_run(out, sizeof out, "%s generate --model %s --prompt x --json-schema %s 2>&1", test_bin(), dir, schema) != 0 &&
              strstr(out, schema) && strstr(out, bad[i][1]));
    }
    CHECK(test_run(out, sizeof out, "%s generate --model %s --tokens 5 --json-schema %s 2>&1", test_bin(), dir, schema) != 0 &&
          strstr(out, "--json-schema needs --prompt"));
}

// The mask's shortcuts (free string text from a table; ids refused by their first byte, or their
// first byte after leading whitespace between tokens) give exactly the ids that feeding each id's
// bytes to a copy of the answer's automaton gives, in JSON mode and under a schema, at states
// between tokens, inside strings, numbers, keys and literals.
// The test model's tokenizer and a schema compiled from its text (NULL, the test failed, when either
// cannot be had).
static Tokenizer *model_tokenizer(void) {
    char path[600];
    snprintf(path, sizeof path, "%s/tokenizer.json", model_dir());
    Error err = {0};
    Tokenizer *t = tok_load(path, &err);
    if (!t) test_fail(__FILE__, __LINE__, "%s", err.msg);
    return t;
}

static JsonSchema *schema_of(const char *text) {
    char why[256] = "";
    json_t *js = json_loads(text, 0, NULL);
    JsonSchema *s = NULL;
    int rc = js ? json_schema_compile(&s, js, why, sizeof why) : -1;
    json_decref(js);
    if (rc) test_fail(__FILE__, __LINE__, "%s: %s", text, why);
    return s;
}

TEST(test_json_mode_mask_equals_feeding_each_id) {
    Tokenizer *t = model_tokenizer();
    JsonSchema *s = schema_of("{\"type\": \"object\", \"properties\": {\"s\": {\"type\": \"string\"}, \"o\": {\"type\": \"object\"}, "
                              "\"e\": {\"enum\": [\"ax\", 12, \"a b\"]}}}");
    if (!t || !s) {
        tok_free(t);
        json_schema_free(s);
        return;
    }
    static const char *const prefixes[] = {"", "{", "  {\"s\": ", "{\"s\": \"ab", "{\"s\": \"\xc3\xa9 x", "{\"o\": {\"k",
                                           "{\"o\": {\"k\": 12", "{\"o\": {\"k\": [1, ", "{\"s\": \"a\" ,  ", "{\"o\": {\"k\": tr",
                                           "{\"e\": \"a", "{\"zz"};
    int V = tok_vocab_size(t);
    float *logits = malloc(sizeof(float) * V);
    long allowed = 0;
    JsonVocab v;
    CHECK(json_vocab_init(&v, t, V) == 0);
    for (int sc = 0; sc < 2; sc++)
        for (size_t i = 0; i < sizeof prefixes / sizeof prefixes[0]; i++) {
            JsonMode m;
            int ends[2] = {0, -1};
            CHECK(json_mode_init(&m, &v, ends, 2, sc ? s : NULL) == 0);
            if (json_schema_prefix_feed(&m.answer, prefixes[i], strlen(prefixes[i]))) {  // (the schema refuses "zz")
                json_mode_free(&m);
                continue;
            }
            TokenConstraint tc = json_mode_constraint(&m);
            memset(logits, 0, sizeof(float) * V);
            tc.mask(tc.ctx, logits, V);
            int wrong = 0;
            for (int id = 0; id < V; id++) {
                size_t n;
                const char *b = tok_is_added(t, id) ? NULL : tok_token_bytes(t, id, &n);  // (markers never)
                JsonSchemaPrefix q;
                json_schema_prefix_copy(&q, &m.answer);
                int want = b && n > 0 && json_schema_prefix_feed(&q, b, n) == 0;
                wrong += want != (logits[id] != -INFINITY);
                allowed += want;
            }
            CHECK_MSG(wrong == 0, "%s after '%s': %d ids differ", sc ? "schema" : "JSON mode", prefixes[i], wrong);
            json_mode_free(&m);
        }
    printf("    the mask equals feeding each id's bytes: %ld ids allowed over the states tried\n", allowed);
    CHECK(allowed > 1000);
    free(logits);
    json_vocab_free(&v);
    json_schema_free(s);
    tok_free(t);
}

// tool_choice auto's lazy frame: free text (nothing masked) until the answer opens its calls, then
// each call held to the format — one of the tools' openings, the arguments to that function's
// parameters, the call's end — and after each call either another or the close. The answer is fed
// id by id as the engine would; every id of a well-formed answer passes the mask, and an unknown
// function, an argument outside the parameters or text after a call is refused at some id.
static int lazy_feed(JsonMode *m, Tokenizer *t, const char *text, float *logits, int V, int *refused_at) {
    TokIds ids = {0};
    Error err = {0};
    if (tok_encode(t, text, strlen(text), 0, &ids, &err)) return -1;
    TokenConstraint tc = json_mode_constraint(m);
    *refused_at = -1;
    for (size_t i = 0; i < ids.n; i++) {
        memset(logits, 0, sizeof(float) * V);
        int waiting = m->phase == JSON_MODE_WAIT;
        tc.mask(tc.ctx, logits, V);
        int touched = 0;
        for (int id = 0; id < V; id++) touched |= logits[id] != 0;
        if (waiting && touched) return -2;  // free text must be left alone
        if (logits[ids.v[i]] == -INFINITY) {
            *refused_at = (int)i;
            break;
        }
        tc.accept(tc.ctx, ids.v[i]);
    }
    ids_free(&ids);
    return 0;
}

TEST(test_json_mode_lazy_tool_calls) {
    Tokenizer *t = model_tokenizer();
    JsonSchema *weather = schema_of("{\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, "
                                    "\"required\": [\"city\"], \"additionalProperties\": false}");
    if (!t || !weather) {
        tok_free(t);
        json_schema_free(weather);
        return;
    }
#define OPEN CHAT_TOOL_CALL_BEGIN "function" CHAT_TOOL_SEP
    const char *heads[2] = {OPEN "get_weather\n```json\n", OPEN "get_time\n```json\n"};
    const char *again[2] = {"\n" OPEN "get_weather\n```json\n", "\n" OPEN "get_time\n```json\n"};
    const JsonSchema *schemas[2] = {weather, NULL};
    JsonFrame f = {.heads = heads, .head_schemas = schemas, .n_heads = 2, .tail = "\n```" CHAT_TOOL_CALL_END,
                   .again = again, .close = CHAT_TOOL_CALLS_END, .trigger = CHAT_TOOL_CALLS_BEGIN};
    const char *good = "Let me look. " CHAT_TOOL_CALLS_BEGIN OPEN "get_weather\n```json\n{\"city\": \"Paris\"}\n```" CHAT_TOOL_CALL_END
                       "\n" OPEN "get_time\n```json\n{\"zone\": [1, 2]}\n```" CHAT_TOOL_CALL_END CHAT_TOOL_CALLS_END;
    const char *bad[] = {
        "x " CHAT_TOOL_CALLS_BEGIN OPEN "get_wether\n```json\n{}",                                     // no such function
        CHAT_TOOL_CALLS_BEGIN OPEN "get_weather\n```json\n{\"town\": \"Paris\"}",                          // not a parameter
        CHAT_TOOL_CALLS_BEGIN OPEN "get_time\n```json\n{}\n```" CHAT_TOOL_CALL_END " and then",        // text after a call
        CHAT_TOOL_CALLS_BEGIN "hello",                                                                   // not a call
    };
#undef OPEN
    int V = tok_vocab_size(t), ends[2] = {0, -1}, at;
    float *logits = malloc(sizeof(float) * V);
    JsonVocab v;
    CHECK(json_vocab_init(&v, t, V) == 0);
    JsonMode m;
    CHECK(json_mode_init(&m, &v, ends, 2, NULL) == 0 && json_mode_frame(&m, &f) == 0);
    CHECK(lazy_feed(&m, t, good, logits, V, &at) == 0);
    CHECK_MSG(at < 0, "a well-formed answer refused at id %d", at);
    CHECK(json_mode_complete(&m));
    json_mode_free(&m);
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK(json_mode_init(&m, &v, ends, 2, NULL) == 0 && json_mode_frame(&m, &f) == 0);
        CHECK(lazy_feed(&m, t, bad[i], logits, V, &at) == 0);
        CHECK_MSG(at >= 0 && !json_mode_complete(&m), "bad answer %zu was let through", i);
        json_mode_free(&m);
    }
    free(logits);
    json_vocab_free(&v);
    json_schema_free(weather);
    tok_free(t);
}
