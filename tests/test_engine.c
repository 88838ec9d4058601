// The inference engine (src/infer/engine.h) and `dsv3 generate` on it: a sequence's tokens do not
// depend on what else runs or on how its prompt is chunked; --batch-file prints what --tokens
// prints for each line; cancelled sequences free their slot; bad input is a one-line error.
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "infer/engine.h"
#include "test.h"

#define GOLDEN "tests/data/v3"

typedef struct {
    int tok[8][64];
    int n[8];
    FinishReason why[8];
} Got;

typedef struct {
    EngineToken first;  // the first token's report
    int seen;
} FirstToken;

static void keep_first(void *owner, int seq, const EngineToken *et) {
    FirstToken *f = owner;
    (void)seq;
    if (!f->seen++) f->first = *et;
}

static void collect(void *owner, int seq, const EngineToken *et) {
    int token = et->token;
    FinishReason finish = et->finish;
    Got *g = owner;
    if (et->prompt) return;  // the prompt's own tokens (prompt_logprobs)
    if (token >= 0 && g->n[seq] < 64) g->tok[seq][g->n[seq]++] = token;
    if (finish != FINISH_NONE) g->why[seq] = finish;
}

static int run_all(Engine *e, Error *err) {
    int live;
    while ((live = engine_step(e, err)) > 0) {
    }
    return live;
}

// Each sequence alone in an engine of one slot, prefilled in one chunk: the reference.
static int run_alone(const Model *m, const int *prompt, int n, const SeqParams *sp, int *out, Error *err) {
    EngineOptions o = {.parallel = 1, .ctx = n + sp->max_new, .prefill_chunk = 64};
    Engine *e = engine_new(m, &o, err);
    Got g = {0};
    if (!e || engine_add(e, prompt, n, sp, collect, &g, err) != 0 || run_all(e, err) != 0) {
        engine_free(e);
        return -1;
    }
    engine_free(e);
    memcpy(out, g.tok[0], sizeof(int) * g.n[0]);
    return g.n[0];
}

TEST(test_engine_sequence_independent_of_company_and_chunking) {
    Model m;
    Error err = {0};
    CHECK_MSG(model_load(&m, GOLDEN, 0, &err) == 0, "%s", err.msg);
    static const int p0[] = {5, 17, 3, 9, 44, 2, 8}, p1[] = {7}, p2[] = {11, 12, 13, 14}, p3[] = {60, 61};
    const int *prompts[] = {p0, p1, p2, p3};
    int lens[] = {7, 1, 4, 2};
    SeqParams sp[4];
    for (int i = 0; i < 4; i++) {
        sp[i] = seq_params_default();
        sp[i].max_new = 6 + i;
        sp[i].temperature = i % 2 ? 0.9f : 0.0f;  // greedy and sampled sequences side by side
        sp[i].seed = 100 + i;
        sp[i].stop_at_eos = 0;
    }
    // two slots for four sequences (the last two wait), prompts prefilled 3 positions at a time
    EngineOptions o = {.parallel = 2, .ctx = 32, .prefill_chunk = 3};
    Engine *e = engine_new(&m, &o, &err);
    CHECK_MSG(e, "%s", err.msg);
    Got g = {0};
    for (int i = 0; i < 4; i++) CHECK_MSG(engine_add(e, prompts[i], lens[i], &sp[i], collect, &g, &err) == i, "%s", err.msg);
    CHECK_MSG(run_all(e, &err) == 0, "%s", err.msg);
    const EngineStats *st = engine_stats(e);
    CHECK(st->prompt_tokens == 14 && st->generated_tokens == 6 + 7 + 8 + 9 && st->decode_tokens == st->generated_tokens - 4);
    engine_free(e);
    for (int i = 0; i < 4; i++) {
        int alone[64], n = run_alone(&m, prompts[i], lens[i], &sp[i], alone, &err);
        CHECK_MSG(n == sp[i].max_new && g.n[i] == n, "sequence %d: %d tokens with company, %d alone (%s)", i, g.n[i], n,
                  err.msg);
        CHECK(g.why[i] == FINISH_LENGTH);
        for (int j = 0; j < n; j++) CHECK_MSG(g.tok[i][j] == alone[j], "sequence %d token %d: %d vs %d alone", i, j, g.tok[i][j], alone[j]);
    }
    model_free(&m);
}

// A step's prompt budget (prefill_chunk positions) spans the sequences, whatever their context:
// four prompts of 5 positions with ctx 8 all start in the first step (the budget was once cut to
// ctx, so that short-context sequences trickled in one or two a step and a "batch" of 64 never
// decoded as one), each answering what it answers alone.
TEST(test_engine_prompt_budget_spans_short_context_sequences) {
    Model m;
    Error err = {0};
    CHECK_MSG(model_load(&m, GOLDEN, 0, &err) == 0, "%s", err.msg);
    static const int p[4][5] = {{5, 17, 3, 9, 44}, {7, 1, 2, 3, 4}, {11, 12, 13, 14, 15}, {60, 61, 62, 63, 64}};
    SeqParams sp = seq_params_default();
    sp.max_new = 3;
    sp.stop_at_eos = 0;
    EngineOptions o = {.parallel = 4, .ctx = 8, .prefill_chunk = 32};
    Engine *e = engine_new(&m, &o, &err);
    CHECK_MSG(e, "%s", err.msg);
    Got g = {0};
    for (int i = 0; i < 4; i++) CHECK_MSG(engine_add(e, p[i], 5, &sp, collect, &g, &err) == i, "%s", err.msg);
    CHECK_MSG(engine_step(e, &err) == 4, "%s", err.msg);
    CHECK_MSG(engine_stats(e)->prompt_tokens == 20, "%lld prompt positions in the first step, not 20",
              (long long)engine_stats(e)->prompt_tokens);
    for (int i = 0; i < 4; i++) CHECK_MSG(g.n[i] == 1, "sequence %d: %d tokens after the first step", i, g.n[i]);
    CHECK_MSG(run_all(e, &err) == 0, "%s", err.msg);
    engine_free(e);
    for (int i = 0; i < 4; i++) {
        int alone[64], n = run_alone(&m, p[i], 5, &sp, alone, &err);
        CHECK_MSG(n == 3 && g.n[i] == 3, "sequence %d: %d tokens, %d alone (%s)", i, g.n[i], n, err.msg);
        for (int j = 0; j < n && j < g.n[i]; j++) CHECK(g.tok[i][j] == alone[j]);
    }
    model_free(&m);
}

TEST(test_engine_cancel_frees_the_slot_and_stops_at_stop_ids) {
    Model m;
    Error err = {0};
    CHECK_MSG(model_load(&m, GOLDEN, 0, &err) == 0, "%s", err.msg);
    static const int p[] = {5, 17, 3};
    SeqParams sp = seq_params_default();
    sp.max_new = 5;
    sp.stop_at_eos = 0;
    int ref[64], n = run_alone(&m, p, 3, &sp, ref, &err);
    CHECK_MSG(n == 5, "%s", err.msg);
    EngineOptions o = {.parallel = 1, .ctx = 16, .prefill_chunk = 8};
    Engine *e = engine_new(&m, &o, &err);
    Got g = {0};
    CHECK(engine_add(e, p, 3, &sp, collect, &g, &err) == 0);
    CHECK(engine_add(e, p, 3, &sp, collect, &g, &err) == 1);
    CHECK(engine_add(e, p, 3, &sp, collect, &g, &err) == 2);
    CHECK(engine_step(e, &err) == 3);  // sequence 0 prefilled (its first token), 1 and 2 wait
    CHECK(g.n[0] == 1);
    CHECK(engine_step(e, &err) == 3);  // and one token decoded
    CHECK(engine_cancel(e, 0) == 0 && g.why[0] == FINISH_CANCELLED && g.n[0] == 2);
    CHECK(engine_cancel(e, 1) == 0 && g.why[1] == FINISH_CANCELLED && g.n[1] == 0);  // cancelled while waiting
    CHECK(engine_cancel(e, 1) == -1);                                                // not live any more
    CHECK_MSG(run_all(e, &err) == 0, "%s", err.msg);
    CHECK(g.n[2] == 5);  // the slot's cache was reused from position 0
    for (int j = 0; j < 5; j++) CHECK(g.tok[2][j] == ref[j]);
    // a stop id ends the sequence on that token, which is reported
    int stop = ref[2];
    SeqParams ss = sp;
    ss.stop_ids = &stop;
    ss.n_stop_ids = 1;
    Got h = {0};
    CHECK(engine_add(e, p, 3, &ss, collect, &h, &err) == 3);
    CHECK_MSG(run_all(e, &err) == 0, "%s", err.msg);
    int first = 0;
    while (ref[first] != stop) first++;
    CHECK(h.n[3] == first + 1 && h.tok[3][first] == stop && h.why[3] == FINISH_STOP);
    // bad input names what is wrong
    static const int bad[] = {5, 9999};
    CHECK(engine_add(e, bad, 2, &sp, collect, &h, &err) == -1 && strstr(err.msg, "9999") && strstr(err.msg, "position 1"));
    static const int longp[16] = {0};
    CHECK(engine_add(e, longp, 16, &sp, collect, &h, &err) == -1 && strstr(err.msg, "16"));
    engine_free(e);
    model_free(&m);
}

TEST(test_cli_batch_file_prints_what_tokens_prints) {
    char path[600], o[8192], one[1024];
    snprintf(path, sizeof path, "%s/batch.txt", test_tmpdir());
    FILE *f = fopen(path, "w");
    CHECK(f);
    const char *lines[] = {"5,17,3,9,44", "7", "11,12,13", "60,61", "2,3,4,5,6,7,8,9"};
    for (int i = 0; i < 5; i++) fprintf(f, "%s\n", lines[i]);
    fclose(f);
    int rc = test_run(o, sizeof o, "%s generate --model %s --batch-file %s --max-new 6 --temperature 0.8 --seed 40 --parallel 2 --prefill-chunk 3",
                      test_bin(), GOLDEN, path);
    CHECK_MSG(rc == 0, "%s", o);
    char *line = o;
    for (int i = 0; i < 5; i++) {
        char *end = strchr(line, '\n');
        CHECK_MSG(end, "line %d missing: %s", i, o);
        *end = 0;
        rc = test_run(one, sizeof one, "%s generate --model %s --tokens %s --max-new 6 --temperature 0.8 --seed %d",
                      test_bin(), GOLDEN, lines[i], 40 + i);
        CHECK_MSG(rc == 0, "%s", one);
        one[strcspn(one, "\n")] = 0;
        CHECK_MSG(strcmp(line, one) == 0, "line %d: batch '%s', alone '%s'", i, line, one);
        line = end + 1;
    }
    CHECK_MSG(*line == 0, "more output than prompts: %s", line);
    // --stats-json: the run's figures
    char js[600];
    snprintf(js, sizeof js, "%s/stats.json", test_tmpdir());
    rc = test_run(o, sizeof o, "%s generate --model %s --batch-file %s --max-new 4 --stats-json %s >/dev/null", test_bin(),
                  GOLDEN, path, js);
    CHECK_MSG(rc == 0, "%s", o);
    size_t len;
    char *text = test_read_file(js, &len);
    CHECK(text);
    CHECK_MSG(strstr(text, "\"prompt_tokens\": 19") && strstr(text, "\"generated_tokens\": ") &&
                  strstr(text, "\"decode_tokens_per_s\": ") && strstr(text, "\"acceptance_rate\": ") &&
                  strstr(text, "\"draft_tokens\": 0") && strstr(text, "\"decode_profile\": {") &&
                  strstr(text, "\"products_s\": ") && strstr(text, "\"attention_s\": ") && strstr(text, "\"meetings_s\": "),
              "%s", text);
    free(text);
}

TEST(test_cli_batch_file_bad_lines) {
    char path[600], o[4096];
    snprintf(path, sizeof path, "%s/bad_batch.txt", test_tmpdir());
    const char *cases[][2] = {{"1,2\n\n3\n", "line 2"}, {"1,2\n4,x\n", "line 2"}, {"1,2\n3,9999\n", "line 2"}, {"", "no prompts"}};
    for (int i = 0; i < 4; i++) {
        FILE *f = fopen(path, "w");
        CHECK(f);
        fputs(cases[i][0], f);
        fclose(f);
        int rc = test_run(o, sizeof o, "%s generate --model %s --batch-file %s --max-new 2", test_bin(), GOLDEN, path);
        CHECK_MSG(rc == 1 && strstr(o, cases[i][1]) && strstr(o, "bad_batch.txt") && strchr(o, '\n') == o + strlen(o) - 1,
                  "case %d: rc %d: %s", i, rc, o);
    }
    int rc = test_run(o, sizeof o, "%s generate --model %s --batch-file %s --tokens 1", test_bin(), GOLDEN, path);
    CHECK_MSG(rc == 1 && strstr(o, "exactly one of"), "%s", o);
    rc = test_run(o, sizeof o, "%s generate --model %s --tokens 1 --parallel 0", test_bin(), GOLDEN);
    CHECK_MSG(rc == 1 && strstr(o, "--parallel"), "%s", o);
}

// A small model with a tokenizer trained here: the golden v3 configuration over a 300-id BPE.
static int chat_model(char *dir, size_t n) {
    char out[4096];
    snprintf(dir, n, "%s/chat_model", test_tmpdir());
    return test_run(out, sizeof out,
                    "rm -rf %s && mkdir -p %s/tok && "
                    "for i in 1 2 3 4 5 6; do echo 'the cat sat on the mat and the dog sat on the log'; done > %s/tok/text.txt && "
                    "%s tokenizer train --vocab-size 300 --out %s/tok/tokenizer.json %s/tok/text.txt >/dev/null && "
                    "sed 's/\"vocab_size\": 256/\"vocab_size\": 300/' %s/config.json > %s/tok/config.json && "
                    "%s init --config %s/tok/config.json --out %s >/dev/null && "
                    "cp %s/tok/tokenizer.json %s/tok/tokenizer_config.json %s/",
                    dir, dir, dir, test_bin(), dir, dir, GOLDEN, dir, test_bin(), dir, dir, dir, dir, dir);
}

// Turns through stdin: the history in the chat format (--verbose-prompt shows each turn's prompt),
// /reset, /exit, end of input; a greedy first reply is what `generate --chat` writes.
TEST(test_cli_chat_turns_history_reset_and_exit) {
    char dir[600], o[16384], g[4096];
    CHECK(chat_model(dir, sizeof dir) == 0);
    int rc = test_run(o, sizeof o,
                      "printf 'the cat\\nthe dog\\n/reset\\nsat on\\n/exit\\nnever read\\n' | "
                      "%s chat --model %s --max-new 6 --temperature 0 --system 'be brief' --verbose-prompt",
                      test_bin(), dir);
    CHECK_MSG(rc == 0, "%s", o);
    const char *U = "<｜User｜>", *A = "<｜Assistant｜>", *E = "<｜end▁of▁sentence｜>";
    char first[256], second_head[256];
    snprintf(first, sizeof first, "be brief%sthe cat%s\n", U, A);
    CHECK_MSG(strstr(o, first), "turn 1 prompt missing: %s", o);
    // turn 2 repeats turn 1 with its reply closed by the end-of-sentence token
    snprintf(second_head, sizeof second_head, "be brief%sthe cat%s", U, A);
    const char *t2 = strstr(strstr(o, first) + strlen(first), second_head);
    CHECK_MSG(t2, "turn 2 prompt missing: %s", o);
    char tail[256];
    snprintf(tail, sizeof tail, "%s%sthe dog%s\n", E, U, A);
    CHECK_MSG(strstr(t2, tail), "turn 2 does not close turn 1's reply: %s", o);
    // after /reset only the system prompt remains
    char third[256];
    snprintf(third, sizeof third, "be brief%ssat on%s\n", U, A);
    CHECK_MSG(strstr(o, "(conversation cleared)") && strstr(o, third), "%s", o);
    CHECK_MSG(!strstr(o, "never read"), "read past /exit: %s", o);
    // the first reply, greedy, is generate --chat's
    rc = test_run(g, sizeof g, "%s generate --model %s --prompt 'the cat' --chat --system 'be brief' --max-new 6",
                  test_bin(), dir);
    CHECK_MSG(rc == 0, "%s", g);
    g[strcspn(g, "\n")] = 0;
    const char *r1 = strstr(o, first) + strlen(first);
    CHECK_MSG(strncmp(r1, g, strlen(g)) == 0, "chat reply '%.40s' vs generate '%s'", r1, g);
    // end of input ends the session as /exit does; a model without tokenizer.json is an error
    rc = test_run(o, sizeof o, "printf 'the cat' | %s chat --model %s --max-new 2", test_bin(), dir);
    CHECK_MSG(rc == 0, "%s", o);
    rc = test_run(o, sizeof o, "echo hi | %s chat --model %s", test_bin(), GOLDEN);
    CHECK_MSG(rc == 1 && strstr(o, "tokenizer"), "%s", o);
}

// Tools in the chat: --tools FILE is described in the prompt as the server describes it; a forced
// reply is one call held to the function's parameters, printed as "[tool call] NAME ARGUMENTS";
// the next input line is its result, rendered as the chat format's tool output before the model
// goes on. Bad files and choices are one-line errors naming them.
TEST(test_cli_chat_tools) {
    char dir[600], tools[700], o[32768];
    CHECK(chat_model(dir, sizeof dir) == 0);
    snprintf(tools, sizeof tools, "%s/tools.json", dir);
    FILE *f = fopen(tools, "w");
    CHECK(f);
    if (!f) return;
    fputs("[{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"the weather in a city\", "
          "\"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"enum\": [\"Paris\", \"Rome\"]}}, "
          "\"required\": [\"city\"], \"additionalProperties\": false}}}]\n", f);
    fclose(f);
    int rc = test_run(o, sizeof o,
                      "printf 'the cat\\n{\"temp\": 20}\\n/exit\\n' | %s chat --model %s --max-new 200 --temperature 0 "
                      "--tools %s --tool-choice required --verbose-prompt",
                      test_bin(), dir, tools);
    CHECK_MSG(rc == 0, "%s", o);
    CHECK_MSG(strstr(o, "## Tools") && strstr(o, "### get_weather\nthe weather in a city\n"), "no tools described: %s", o);
    const char *call = strstr(o, "[tool call] get_weather ");
    CHECK_MSG(call, "no call printed: %s", o);
    if (call) {
        call += strlen("[tool call] get_weather ");
        json_t *args = json_loadb(call, strcspn(call, "\n"), 0, NULL);
        const char *city = json_string_value(json_object_get(args, "city"));
        CHECK_MSG(json_object_size(args) == 1 && city && (!strcmp(city, "Paris") || !strcmp(city, "Rome")),
                  "the arguments do not fit the parameters: %.80s", call);
        json_decref(args);
    }
    CHECK_MSG(strstr(o, "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{\"temp\": 20}<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"),
              "the result is not in the next prompt: %s", o);
    // none: no description; bad input
    rc = test_run(o, sizeof o, "echo hi | %s chat --model %s --max-new 2 --tools %s --tool-choice none --verbose-prompt",
                  test_bin(), dir, tools);
    CHECK_MSG(rc == 0 && !strstr(o, "## Tools"), "%s", o);
    static const struct {
        const char *content, *choice, *want;
    } bad[] = {
        {"[{\"type\": \"function\", \"function\": {\"name\": \"a b\"}}]", "auto", "tools[0]"},
        {"[{\"type\": \"function\"", "auto", "line 1"},
        {"[{\"type\": \"function\", \"function\": {\"name\": \"f\"}}]", "g", "'g', which is not in 'tools'"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char path[700];
        snprintf(path, sizeof path, "%s/bad%zu.json", dir, i);
        FILE *b = fopen(path, "w");
        CHECK(b);
        if (!b) continue;
        fputs(bad[i].content, b);
        fclose(b);
        rc = test_run(o, sizeof o, "echo hi | %s chat --model %s --tools %s --tool-choice %s", test_bin(), dir, path, bad[i].choice);
        CHECK_MSG(rc == 1 && strstr(o, path) && strstr(o, bad[i].want), "%s: %s", bad[i].content, o);
    }
    rc = test_run(o, sizeof o, "echo hi | %s chat --model %s --tools %s/missing.json", test_bin(), dir, dir);
    CHECK_MSG(rc == 1 && strstr(o, "missing.json: cannot open") && test_count_lines(o) == 1, "%s", o);
    rc = test_run(o, sizeof o, "echo hi | %s chat --model %s --tools %s", test_bin(), dir, dir);  // a directory
    CHECK_MSG(rc == 1 && strstr(o, "is a directory") && test_count_lines(o) == 1, "%s", o);
    rc = test_run(o, sizeof o, "echo hi | %s chat --model %s --tool-choice auto", test_bin(), dir);
    CHECK_MSG(rc == 1 && strstr(o, "--tool-choice needs --tools"), "%s", o);
}

// A BF16 cache rounds each stored latent and rotated key to BF16 (8 bits of mantissa): the logits
// move by a few 1e-3 of their scale, not more, through prefill (plain attention reads the widened
// cache) and decode (absorbed attention reads BF16 directly). Measured on the golden models.
static int run_cache(const Model *m, DType dt, const int *tok, int T, int decode, float *logits, Error *err) {
    KVCache kv;
    if (kvcache_init_as(&kv, &m->cfg, 0, T, dt, err)) return -1;
    ForwardState *s = forward_state_new(m, T, T, err);
    int rc = s ? 0 : -1, V = m->cfg.vocab_size;
    if (!decode && rc == 0) rc = model_forward(m, s, &kv, tok, T, ATTN_PLAIN, logits, NULL, NULL, err);
    for (int t = 0; decode && t < T && rc == 0; t++)
        rc = model_forward(m, s, &kv, tok + t, 1, ATTN_ABSORBED, logits + (size_t)t * V, NULL, NULL, err);
    forward_state_free(s);
    kvcache_free(&kv);
    return rc;
}

TEST(test_bf16_cache_close_to_f32) {
    const char *models[] = {"tests/data/v3", "tests/data/v2lite", "tests/data/fp8"};
    for (int k = 0; k < 3; k++) {
        Model m;
        Error err = {0};
        CHECK_MSG(model_load(&m, models[k], 0, &err) == 0, "%s", err.msg);
        int T = 40, V = m.cfg.vocab_size, tok[40];
        for (int t = 0; t < T; t++) tok[t] = (t * 37 + 11) % V;
        float *a = malloc(sizeof(float) * T * V), *b = malloc(sizeof(float) * T * V);
        for (int decode = 0; decode < 2; decode++) {
            CHECK_MSG(run_cache(&m, DT_F32, tok, T, decode, a, &err) == 0 && run_cache(&m, DT_BF16, tok, T, decode, b, &err) == 0,
                      "%s", err.msg);
            double worst = 0, scale = 0;
            int agree = 0;
            for (int t = 0; t < T; t++) {
                int ia = 0, ib = 0;
                for (int v = 0; v < V; v++) {
                    worst = fmax(worst, test_absdiff(a[(size_t)t * V + v], b[(size_t)t * V + v]));
                    scale = fmax(scale, fabs(a[(size_t)t * V + v]));
                    if (a[(size_t)t * V + v] > a[(size_t)t * V + ia]) ia = v;
                    if (b[(size_t)t * V + v] > b[(size_t)t * V + ib]) ib = v;
                }
                agree += ia == ib;
            }
            printf("    %s %s: bf16 cache max|diff| %.1e of max|logit|, argmax agrees at %d of %d positions\n", models[k],
                   decode ? "decode" : "prefill", worst / scale, agree, T);
            CHECK_MSG(worst <= 2e-2 * scale && worst > 0, "%s: %.3g of %.3g", models[k], worst, scale);
            CHECK_MSG(agree >= T - 2, "%s: argmax agrees at %d of %d", models[k], agree, T);
        }
        free(a);
        free(b);
        model_free(&m);
    }
}

TEST(test_cli_kv_dtype) {
    char o[8192], ref[1024];
    int rc = test_run(o, sizeof o, "%s info --model %s --json", test_bin(), GOLDEN);
    // (kv_lora 32 + rope 8) x 3 layers x 4 or 2 bytes
    CHECK_MSG(rc == 0 && strstr(o, "\"kv_bytes_per_token\": 480") && strstr(o, "\"kv_bytes_per_token_bf16\": 240"), "%s", o);
    rc = test_run(ref, sizeof ref, "%s generate --model %s --tokens 5,17,3 --max-new 8 --kv-dtype f32", test_bin(), GOLDEN);
    CHECK_MSG(rc == 0, "%s", ref);
    rc = test_run(o, sizeof o, "%s generate --model %s --tokens 5,17,3 --max-new 8 --kv-dtype bf16", test_bin(), GOLDEN);
    CHECK_MSG(rc == 0 && strcmp(o, ref) == 0, "greedy ids with a bf16 cache: '%s' vs '%s'", o, ref);
    rc = test_run(o, sizeof o, "%s generate --model %s --tokens 5 --kv-dtype fp8", test_bin(), GOLDEN);
    CHECK_MSG(rc == 1 && strstr(o, "--kv-dtype") && strstr(o, "fp8"), "%s", o);
    // the default, auto: the cache in BF16 where the model computes in BF16, else F32 (--stats says)
    rc = test_run(o, sizeof o, "%s generate --model %s --tokens 5,17,3 --max-new 2 --compute f32 --stats 2>&1 >/dev/null",
                  test_bin(), GOLDEN);
    CHECK_MSG(rc == 0 && strstr(o, "cache: f32 latent rows (--kv-dtype auto)"), "--compute f32: %s", o);
    rc = test_run(o, sizeof o, "%s generate --model %s --tokens 5,17,3 --max-new 2 --compute bf16 --stats 2>&1 >/dev/null",
                  test_bin(), GOLDEN);
    CHECK_MSG(rc == 0 && strstr(o, "cache: bf16 latent rows (--kv-dtype auto)"), "--compute bf16: %s", o);
    rc = test_run(o, sizeof o, "%s generate --model %s --tokens 5,17,3 --max-new 2 --compute bf16 --kv-dtype f32 --stats 2>&1 >/dev/null",
                  test_bin(), GOLDEN);
    CHECK_MSG(rc == 0 && strstr(o, "cache: f32 latent rows (--kv-dtype f32)"), "--compute bf16 --kv-dtype f32: %s", o);
}

// The golden model's prompt (tokens.txt, up to 64 ids) and the independent reference's logits for
// it (logits.f32, (T, V)); 0, or -1 when the files are missing or do not agree in size.
static int read_golden(int V, int *tok, int *T, float **ref) {
    size_t len;
    char *text = test_read_file(GOLDEN "/tokens.txt", NULL);
    *ref = test_read_file(GOLDEN "/logits.f32", &len);
    *T = 0;
    for (char *p = text; p && *p && *T < 64;) {
        tok[(*T)++] = (int)strtol(p, &p, 10);
        while (*p == ',' || *p == '\n') p++;
    }
    int ok = text && *ref && len == sizeof(float) * (size_t)*T * V;
    free(text);
    return ok ? 0 : -1;
}

// log-softmax(row)[id] in float64, and the row's argmax in *best.
static double ref_logprob(const float *row, int V, int id, int *best) {
    double mx = row[0], sum = 0;
    *best = 0;
    for (int i = 1; i < V; i++)
        if (row[i] > mx) mx = row[i], *best = i;
    for (int i = 0; i < V; i++) sum += exp(row[i] - mx);
    return row[id] - mx - log(sum);
}

// The first token's log-probabilities after the golden prompt against the log-softmax of the
// independent float64 reference's logits (tests/data/v3/logits.f32, last row).
TEST(test_engine_logprobs_match_the_reference_distribution) {
    Model m;
    Error err = {0};
    CHECK_MSG(model_load(&m, GOLDEN, 0, &err) == 0, "%s", err.msg);
    int tok[64], T, V = m.cfg.vocab_size;
    float *ref;
    CHECK_MSG(read_golden(V, tok, &T, &ref) == 0, GOLDEN ": tokens.txt and logits.f32 missing or of different sizes");
    const float *last = ref + (size_t)(T - 1) * V;
    int best;
    SeqParams sp = seq_params_default();
    sp.max_new = 1;
    sp.temperature = 1.0f;  // a sampled token: its log-probability is not the largest in general
    sp.seed = 7;
    sp.logprobs = 1;
    sp.top_logprobs = 5;
    EngineOptions o = {.parallel = 1, .ctx = T + 1, .prefill_chunk = 64};
    Engine *e = engine_new(&m, &o, &err);
    FirstToken f = {0};
    CHECK_MSG(e && engine_add(e, tok, T, &sp, keep_first, &f, &err) == 0 && run_all(e, &err) == 0, "%s", err.msg);
    CHECK(f.seen == 1 && f.first.finish == FINISH_LENGTH && f.first.n_top == 5);
    double want = ref_logprob(last, V, f.first.token, &best);
    CHECK_MSG(fabs(f.first.logprob - want) < 1e-5, "token %d: %g vs %g", f.first.token, f.first.logprob, want);
    for (int j = 0; j < 5; j++) {
        int id = f.first.top_ids[j], above = 0;  // the reference's rank of the j-th reported id
        for (int i = 0; i < V; i++) above += last[i] > last[id];
        CHECK_MSG(above == j, "alternative %d (id %d) ranks %d in the reference", j, id, above);
        CHECK(fabs(f.first.top_logprobs[j] - ref_logprob(last, V, id, &best)) < 1e-5);
    }
    SeqParams bad = sp;
    bad.top_logprobs = 21;
    CHECK(engine_add(e, tok, T, &bad, keep_first, &f, &err) == -1 && strstr(err.msg, "top_logprobs"));
    engine_free(e);
    free(ref);
    model_free(&m);
}

// Prompt log-probabilities (SeqParams.prompt_logprobs) against the independent reference's logits
// of tests/data/v3 (tools/ref_model.py): the prompt's tokens come first, in order, the first
// without a log-probability; max_new 0 ends after them. The prompt runs in pieces of 5 positions
// beside another sequence.
typedef struct {
    int n_prompt, n_gen, tok[64];
    float lp[64];
    int top0[64];
    FinishReason why;
    int token_at_end;
} PromptLp;

static void collect_prompt(void *owner, int seq, const EngineToken *et) {
    PromptLp *o = (PromptLp *)owner + seq;
    if (et->prompt && o->n_prompt < 64) {
        o->lp[o->n_prompt] = et->logprob;
        o->top0[o->n_prompt] = et->n_top > 0 ? et->top_ids[0] : -1;
        o->tok[o->n_prompt++] = et->token;
    } else if (et->token >= 0) {
        o->n_gen++;
    }
    if (et->finish != FINISH_NONE) o->why = et->finish, o->token_at_end = et->token;
}

TEST(test_engine_prompt_logprobs_match_the_reference) {
    Model m;
    Error err = {0};
    CHECK_MSG(model_load(&m, GOLDEN, 0, &err) == 0, "%s", err.msg);
    int tok[64], T, V = m.cfg.vocab_size;
    float *ref;
    CHECK_MSG(read_golden(V, tok, &T, &ref) == 0, GOLDEN ": tokens.txt and logits.f32 missing or of different sizes");
    EngineOptions o = {.parallel = 2, .ctx = T + 4, .prefill_chunk = 5, .prefix_cache = 1};
    Engine *e = engine_new(&m, &o, &err);
    CHECK_MSG(e, "%s", err.msg);
    static PromptLp got[2];
    memset(got, 0, sizeof got);
    SeqParams sp = seq_params_default();
    sp.max_new = 0;
    sp.logprobs = 1;
    sp.top_logprobs = 2;
    sp.prompt_logprobs = 1;
    SeqParams other = seq_params_default();
    other.max_new = 3;
    CHECK(engine_add(e, tok, T, &sp, collect_prompt, got, &err) == 0);
    CHECK(engine_add(e, tok + 3, 9, &other, collect_prompt, got, &err) == 1);
    CHECK_MSG(run_all(e, &err) == 0, "%s", err.msg);
    CHECK_MSG(got[0].n_prompt == T && got[0].n_gen == 0 && got[0].why == FINISH_LENGTH && got[0].token_at_end == -1,
              "%d prompt tokens of %d, %d generated, finish %d", got[0].n_prompt, T, got[0].n_gen, (int)got[0].why);
    CHECK(got[1].n_prompt == 0 && got[1].n_gen == 3);
    CHECK(isnan(got[0].lp[0]) && got[0].tok[0] == tok[0]);
    double worst = 0;
    for (int t = 1; t < T; t++) {
        int best;
        double want = ref_logprob(ref + (size_t)(t - 1) * V, V, tok[t], &best), d = fabs(got[0].lp[t] - want);
        worst = d > worst ? d : worst;
        CHECK_MSG(got[0].tok[t] == tok[t] && d < 1e-4, "position %d: token %d logprob %g, reference %g", t, got[0].tok[t],
                  got[0].lp[t], want);
        CHECK_MSG(got[0].top0[t] == best, "position %d: most likely %d, reference %d", t, got[0].top0[t], best);
    }
    printf("    %d prompt positions, max |logprob - reference| %.2g\n", T - 1, worst);
    // a prompt's log-probabilities do not change its answer: the same tokens as without them
    static const int p[] = {5, 17, 3, 9, 44, 2, 8};
    SeqParams plain = seq_params_default(), with = plain;
    plain.max_new = with.max_new = 6;
    plain.stop_at_eos = with.stop_at_eos = 0;
    with.prompt_logprobs = with.logprobs = 1;
    int a[64], b[64];
    CHECK(run_alone(&m, p, 7, &plain, a, &err) == 6 && run_alone(&m, p, 7, &with, b, &err) == 6);
    CHECK(memcmp(a, b, sizeof(int) * 6) == 0);
    engine_free(e);
    free(ref);
    model_free(&m);
}

// logit_bias: −100 on the greedy answer's first token changes it, +100 on an id makes every token
// that id, and greedy speculative decoding still equals plain decoding under a bias.
TEST(test_engine_logit_bias) {
    Model m;
    Error err = {0};
    CHECK_MSG(model_load(&m, GOLDEN, 1, &err) == 0, "%s", err.msg);
    static const int p[] = {5, 17, 3, 9, 44, 2, 8};
    SeqParams sp = seq_params_default();
    sp.max_new = 8;
    sp.stop_at_eos = 0;
    int ref[64], got[64];
    CHECK(run_alone(&m, p, 7, &sp, ref, &err) == 8);
    SeqParams ban = sp, force = sp, mild = sp;
    float minus = -100, plus = 100, some = 3;
    ban.bias_ids = &ref[0], ban.bias_values = &minus, ban.n_bias = 1;
    CHECK(run_alone(&m, p, 7, &ban, got, &err) == 8 && got[0] != ref[0]);
    for (int i = 0; i < 8; i++) CHECK(got[i] != ref[0]);
    int x = 11;
    force.bias_ids = &x, force.bias_values = &plus, force.n_bias = 1;
    CHECK(run_alone(&m, p, 7, &force, got, &err) == 8);
    for (int i = 0; i < 8; i++) CHECK_MSG(got[i] == x, "token %d is %d, not the forced %d", i, got[i], x);
    mild.bias_ids = &ref[2], mild.bias_values = &some, mild.n_bias = 1;
    int plain[64];
    CHECK(run_alone(&m, p, 7, &mild, plain, &err) == 8);
    EngineOptions o = {.parallel = 1, .ctx = 7 + 8, .prefill_chunk = 64, .speculative = 2};
    Engine *e = engine_new(&m, &o, &err);
    Got g = {0};
    CHECK_MSG(e && engine_add(e, p, 7, &mild, collect, &g, &err) == 0 && run_all(e, &err) == 0, "%s", err.msg);
    CHECK(g.n[0] == 8 && memcmp(g.tok[0], plain, sizeof(int) * 8) == 0);
    // bad biases name what is wrong
    int bad_id = m.cfg.vocab_size;
    float nan_v = NAN;
    SeqParams bad = sp;
    bad.bias_ids = &bad_id, bad.bias_values = &plus, bad.n_bias = 1;
    CHECK(engine_add(e, p, 7, &bad, collect, &g, &err) == -1 && strstr(err.msg, "logit bias"));
    bad.bias_ids = &x, bad.bias_values = &nan_v;
    CHECK(engine_add(e, p, 7, &bad, collect, &g, &err) == -1 && strstr(err.msg, "finite"));
    engine_free(e);
    model_free(&m);
}

// A constraint (TokenConstraint): only even ids after an odd one and only multiples of 3 after an
// even one — a state that moves with every token. Every token obeys it, the state sees each token
// once, in order, and greedy speculative decoding under it equals plain decoding under it.
typedef struct {
    int last, seen, order_ok;
    int tokens[64];
} Alternating;

static void alt_mask(void *ctx, float *logits, int V) {
    Alternating *a = ctx;
    for (int i = 0; i < V; i++)
        if (a->last % 2 ? i % 2 != 0 : i % 3 != 0) logits[i] = -INFINITY;
}

static void alt_accept(void *ctx, int token) {
    Alternating *a = ctx;
    if (a->seen < 64) a->tokens[a->seen] = token;
    a->seen++;
    a->last = token;
}

TEST(test_engine_constraint_masks_every_choice) {
    Model m;
    Error err = {0};
    CHECK_MSG(model_load(&m, GOLDEN, 1, &err) == 0, "%s", err.msg);
    static const int p[] = {5, 17, 3, 9, 44, 2, 7};
    int out[3][64];
    for (int K = 0; K <= 2; K += 2) {
        for (int sampled = 0; sampled < 2; sampled++) {
            Alternating a = {.last = 7};  // the prompt's last token
            TokenConstraint tc = {.ctx = &a, .mask = alt_mask, .accept = alt_accept};
            SeqParams sp = seq_params_default();
            sp.max_new = 12;
            sp.stop_at_eos = 0;
            sp.constraint = &tc;
            sp.temperature = sampled ? 1.0f : 0.0f;
            sp.seed = 9;
            EngineOptions o = {.parallel = 1, .ctx = 7 + 12, .prefill_chunk = 4, .speculative = K};
            Engine *e = engine_new(&m, &o, &err);
            Got g = {0};
            CHECK_MSG(e && engine_add(e, p, 7, &sp, collect, &g, &err) == 0 && run_all(e, &err) == 0, "%s", err.msg);
            engine_free(e);
            CHECK(g.n[0] == 12 && a.seen == 12 && memcmp(a.tokens, g.tok[0], sizeof(int) * 12) == 0);
            for (int i = 0, prev = 7; i < 12; prev = g.tok[0][i++])
                CHECK_MSG(prev % 2 ? g.tok[0][i] % 2 == 0 : g.tok[0][i] % 3 == 0, "token %d (%d after %d)", i, g.tok[0][i], prev);
            if (!sampled) memcpy(out[K], g.tok[0], sizeof(int) * 12);
        }
    }
    CHECK_MSG(memcmp(out[0], out[2], sizeof(int) * 12) == 0, "speculative decoding under the constraint differs from plain");
    model_free(&m);
}

// The prefix cache never changes an answer: prompts that share a prefix — the same prompt twice, a
// longer one, one that leaves the shared part inside a chunk — give, with the blocks an earlier
// prompt left in the cache, the log-probabilities bit for bit that they give alone in a fresh
// engine without the cache, with BF16 compute (a row's bits do not depend on its chunk's other
// rows) and with fp32 (they do: a reused prefix then ends only where a chunk starts or in an
// absorbed tail). Chunks of 256: plain attention for a chunk of more than 128 positions, absorbed
// below, so a reused prefix may end inside a plain chunk or leave an absorbed tail.
typedef struct {
    float lp[16];
    int tok[16], n;
} LpRun;

static void collect_lp(void *owner, int seq, const EngineToken *et) {
    LpRun *r = owner;
    (void)seq;
    if (et->token >= 0 && r->n < 16) r->lp[r->n] = et->logprob, r->tok[r->n++] = et->token;
}

TEST(test_engine_prefix_cache_answers_as_alone) {
    Model m;
    Error err = {0};
    CHECK_MSG(model_load(&m, GOLDEN, 0, &err) == 0, "%s", err.msg);
    enum { N_PROMPTS = 5 };
    static int prompts[N_PROMPTS][700];
    int lens[N_PROMPTS] = {301, 301, 340, 530, 260};  // the first twice; the last shares only 200 positions
    for (int k = 0; k < N_PROMPTS; k++)
        for (int t = 0; t < lens[k]; t++)
            prompts[k][t] = k == 4 && t >= 200 ? (t * 31 + 7) % m.cfg.vocab_size : (t * 7919 + 13) % m.cfg.vocab_size;
    SeqParams sp = seq_params_default();
    sp.max_new = 8;
    sp.stop_at_eos = 0;
    sp.logprobs = 1;
    for (int bf = 1; bf >= 0; bf--) {
        CHECK_MSG(model_set_compute(&m, bf ? COMPUTE_BF16 : COMPUTE_F32, &err) == 0, "%s", err.msg);
        CHECK(model_rows_independent(&m) == bf);
        LpRun alone[N_PROMPTS], cached[N_PROMPTS];
        memset(alone, 0, sizeof alone);
        memset(cached, 0, sizeof cached);
        for (int k = 0; k < N_PROMPTS; k++) {
            EngineOptions o = {.parallel = 1, .ctx = 700, .prefill_chunk = 256};
            Engine *e = engine_new(&m, &o, &err);
            CHECK_MSG(e && engine_add(e, prompts[k], lens[k], &sp, collect_lp, &alone[k], &err) == 0 && run_all(e, &err) == 0,
                      "%s", err.msg);
            engine_free(e);
        }
        EngineOptions o = {.parallel = 1, .ctx = 700, .prefill_chunk = 256, .prefix_cache = 1};
        Engine *e = engine_new(&m, &o, &err);
        CHECK_MSG(e, "%s", err.msg);
        long hits[N_PROMPTS];
        for (int k = 0; k < N_PROMPTS; k++) {
            long before = engine_stats(e)->prefix_hit_tokens;
            CHECK_MSG(engine_add(e, prompts[k], lens[k], &sp, collect_lp, &cached[k], &err) >= 0 && run_all(e, &err) == 0,
                      "%s", err.msg);
            hits[k] = engine_stats(e)->prefix_hit_tokens - before;
            CHECK_MSG(cached[k].n == 8 && alone[k].n == 8 && !memcmp(cached[k].tok, alone[k].tok, sizeof(int) * 8) &&
                          !memcmp(cached[k].lp, alone[k].lp, sizeof(float) * 8),
                      "%s compute, prompt %d (%d positions, %ld from the cache): the answer's log-probabilities differ "
                      "from the prompt's alone (first %.9g vs %.9g)", bf ? "bf16" : "f32", k, lens[k], hits[k],
                      cached[k].lp[0], alone[k].lp[0]);
        }
        engine_free(e);
        printf("    %s compute: positions from the cache %ld / %ld / %ld / %ld / %ld, every answer the bits it has alone\n",
               bf ? "bf16" : "f32", hits[0], hits[1], hits[2], hits[3], hits[4]);
        // fp32: the last prompt's shared part ends inside a plain chunk, so nothing is reused
        CHECK(hits[0] == 0 && hits[1] > 0 && hits[2] > 0 && hits[3] > 0 && (hits[4] > 0) == bf);
    }
    model_free(&m);
}
