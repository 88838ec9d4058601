// dsv3 generate: a thin user of the engine (src/infer/engine.h). A --tokens prompt prints ids as
// they come; a --prompt (text, with the model directory's tokenizer.json) streams decoded text;
// --batch-file runs one prompt per line, --parallel at a time, and prints one line of ids per
// prompt in input order (the line --tokens prints for it alone; line k samples with seed S + k).
// Under mpirun with --expert-parallel E every rank runs the same sequences with its share of the
// routed experts (the sums of each MoE layer added up over the ranks); rank 0 alone prints.
// --json constrains a --prompt's answer to a JSON object (serve/json_mode.h) and ends it there;
// --json-schema FILE to an object that JSON Schema accepts (text/json_schema.h).
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/file.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "cli/util.h"
#include "infer/engine.h"
#include "model/model.h"
#include "serve/json_mode.h"
#include "text/tokenizer.h"
#include "text/token_list.h"

static const char *const VALUED[] = {"model", "tokens", "prompt", "system", "batch-file", "max-new", "temperature",
                                     "top-p", "top-k", "seed", "parallel", "prefill-chunk", "stats-json", "kv-dtype",
                                     "speculative", "expert-parallel", "compute", "logit-bias", "json-schema", "suffix",
                                     "decode-tiles", NULL};
static const char *const FLAGS[] = {"chat", "no-mmap", "stats", "json", NULL};

// --parallel's default: sequences decoded at once when --batch-file gives several.
#define DEFAULT_PARALLEL 4
#define DEFAULT_PREFILL_CHUNK 512

// The prompt's ids: --tokens as given, or --prompt encoded (BOS as tokenizer_config.json says;
// with --chat in the DeepSeek-V3 chat format ending in the generation prompt; with --suffix in the
// fill-in-the-middle format, the prompt the text before the hole).
static int prompt_ids(const Args *a, const char *dir, Tokenizer **tok, int **ids, int *n, Error *err) {
    const char *tokens = args_str(a, "tokens", NULL), *text = args_str(a, "prompt", NULL);
    if (!!tokens + !!text + !!args_str(a, "batch-file", NULL) != 1)
        return err_set(err, "give exactly one of --tokens IDS, --prompt TEXT and --batch-file FILE");
    if ((args_flag(a, "chat") || args_str(a, "system", NULL)) && !text)
        return err_set(err, "--chat and --system need --prompt");
    const char *suffix = args_str(a, "suffix", NULL);
    if (suffix && !*suffix) suffix = NULL;  // nothing after the hole: a plain continuation, as in serve
    if (suffix && (!text || args_flag(a, "chat") || args_str(a, "system", NULL)))
        return err_set(err, "--suffix needs --prompt (the text before the hole) and no --chat or --system");
    if (tokens) return parse_token_list(tokens, ids, n, err);
    *tok = tok_load_dir(dir, err);
    if (!*tok) return -1;
    TokIds v = {0};
    int rc;
    if (args_flag(a, "chat") || args_str(a, "system", NULL)) {
        ChatMessage msgs[2];
        int nm = 0;
        if (args_str(a, "system", NULL)) msgs[nm++] = (ChatMessage){.role = "system", .content = args_str(a, "system", NULL)};
        msgs[nm++] = (ChatMessage){.role = "user", .content = text};
        rc = tok_chat_encode(*tok, msgs, nm, 1, &v, err);
    } else if (suffix) {
        rc = tok_fim_encode(*tok, text, strlen(text), suffix, strlen(suffix), &v, err);
        if (rc) err_prefix(err, "%s/tokenizer.json", dir);
    } else {
        rc = tok_encode(*tok, text, strlen(text), TOK_ADD_SPECIAL, &v, err);
    }
    if (rc == 0 && v.n == 0) rc = err_set(err, "--prompt: the text encodes to no tokens");
    if (rc) {
        ids_free(&v);
        return -1;
    }
    *ids = v.v;  // the list's buffer becomes the caller's (freed with free())
    *n = (int)v.n;
    return 0;
}

// What the command collects from the engine.
typedef struct {
    Tokenizer *tok;     // --prompt: text is streamed as it comes
    TokStream ts;
    int stream;         // one sequence: print its tokens as they arrive
    int **out;          // (n) each sequence's generated ids, for --batch-file
    int *n_out, *cap_out;
    Error *err;
    int failed;
    JsonMode *json;     // --json: the answer ends once its object is complete
    Engine *e;
} Sink;

static void on_token(void *owner, int seq, const EngineToken *et) {
    int token = et->token;
    FinishReason finish = et->finish;
    Sink *k = owner;
    if (finish == FINISH_ERROR && !k->failed) {
        err_set(k->err, "sequence %d: the KV cache pool ran out", seq);
        k->failed = 1;
    }
    if (token < 0 || k->failed) return;
    if (k->stream) {
        if (k->tok) {
            const char *text;
            size_t n;
            if (tok_stream_push(&k->ts, token, &text, &n, k->err)) {
                k->failed = 1;
                return;
            }
            fwrite(text, 1, n, stdout);
            if (k->json && json_mode_complete(k->json)) engine_cancel(k->e, seq);  // reports back here, token -1
        } else {
            printf(k->n_out[0] ? " %d" : "%d", token);
        }
        fflush(stdout);
    }
    if (k->n_out[seq] == k->cap_out[seq]) {
        int cap = k->cap_out[seq] ? 2 * k->cap_out[seq] : 64, *nv = realloc(k->out[seq], sizeof(int) * cap);
        if (!nv) {
            err_set(k->err, "out of memory for the generated tokens");
            k->failed = 1;
            return;
        }
        k->out[seq] = nv;
        k->cap_out[seq] = cap;
    }
    k->out[seq][k->n_out[seq]++] = token;
}

// --stats-json: the run's figures as one JSON object, written atomically.
static int write_stats_json(const char *path, const EngineStats *st, Error *err) {
    double tps = st->decode_s > 0 ? st->decode_tokens / st->decode_s : 0;
    const DecodeProfile *pf = &st->decode_profile;  // (per thread, averaged over the team)
    json_t *o = json_pack("{s:I, s:I, s:f, s:f, s:f, s:I, s:I, s:f, s:{s:I, s:f, s:f, s:f, s:f}}", "prompt_tokens",
                          (json_int_t)st->prompt_tokens, "generated_tokens", (json_int_t)st->generated_tokens,
                          "prefill_s", st->prefill_s, "decode_s", st->decode_s, "decode_tokens_per_s", tps,
                          "draft_tokens", (json_int_t)st->draft_tokens, "accepted_tokens",
                          (json_int_t)st->accepted_tokens, "acceptance_rate",
                          st->draft_tokens > 0 ? (double)st->accepted_tokens / st->draft_tokens : 0.0,
                          "decode_profile", "passes", (json_int_t)pf->steps, "seconds", pf->seconds, "products_s",
                          pf->products, "attention_s", pf->attention, "meetings_s", pf->meetings);
    char *text = o ? json_dumps(o, JSON_INDENT(2)) : NULL;
    json_decref(o);
    if (!text) return err_set(err, "%s: out of memory", path);
    size_t n = strlen(text);
    text[n] = '\n';  // json_dumps leaves room for the NUL, which the newline replaces
    int rc = file_write_all(path, text, n + 1, err);
    free(text);
    return rc;
}

int cmd_generate(int argc, char **argv) {
    const char *cmd = "dsv3 generate";
    Error err = {0};
    Args a;
    const char *dir;
    long parallel, chunk, spec;
    SeqParams sp = seq_params_default();  // greedy, 32 tokens unless told otherwise
    JsonMode json = {0};
    JsonVocab json_vocab = {0};
    JsonSchema *schema = NULL;
    int *bias_ids = NULL, n_bias = 0;
    float *bias_values = NULL;
    if (args_parse(&a, cmd, argc, argv, VALUED, FLAGS, &err) || args_require(&a, "model", &dir, &err) ||
        parse_sampling(&a, &sp, &err) || args_long(&a, "parallel", DEFAULT_PARALLEL, 1, 1024, &parallel, &err) ||
        args_long(&a, "prefill-chunk", DEFAULT_PREFILL_CHUNK, 1, 1 << 20, &chunk, &err) ||
        args_long(&a, "speculative", 0, 0, ENGINE_MAX_SPECULATIVE, &spec, &err))
        return cli_fail(cmd, &err);
    DType kv_dtype;
    int kv_auto;
    if (parse_kv_dtype(&a, "auto", &kv_dtype, &kv_auto, &err)) return cli_fail(cmd, &err);
    const char *schema_path = args_str(&a, "json-schema", NULL);
    int json_out = args_flag(&a, "json") || schema_path;
    if (json_out && !args_str(&a, "prompt", NULL)) {
        err_set(&err, "--json%s needs --prompt (the answer's text is checked with the model's tokenizer)",
                schema_path ? "-schema" : "");
        return cli_fail(cmd, &err);
    }
    Tokenizer *tok = NULL;
    int **prompts = NULL, *lens = NULL, np = 0, rc = 1;
    const char *batch = args_str(&a, "batch-file", NULL);
    if (batch) {
        if (args_str(&a, "tokens", NULL) || args_str(&a, "prompt", NULL)) {
            err_set(&err, "give exactly one of --tokens IDS, --prompt TEXT and --batch-file FILE");
            return cli_fail(cmd, &err);
        }
        if (args_flag(&a, "chat") || args_str(&a, "system", NULL)) {
            err_set(&err, "--chat and --system need --prompt");
            return cli_fail(cmd, &err);
        }
        if (token_lists_read(batch, &prompts, &lens, &np, &err)) goto done_prompts;
    } else {
        prompts = malloc(sizeof *prompts);
        lens = malloc(sizeof *lens);
        if (!prompts || !lens) {
            err_set(&err, "out of memory");
            goto done_prompts;
        }
        if (prompt_ids(&a, dir, &tok, &prompts[0], &lens[0], &err)) goto done_prompts;
        np = 1;
    }
    if (schema_path) {
        json_t *js = file_read_json(schema_path, JSON_DECODE_ANY, &err);
        char why[256];
        if (js && json_schema_compile(&schema, js, why, sizeof why)) err_set(&err, "%s: %s", schema_path, why);
        json_decref(js);
        if (!schema) goto done_prompts;
    }
    Model m;
    Engine *e = NULL;
    Sink k = {.tok = tok, .stream = !batch, .err = &err};
    if (parse_logit_bias(&a, &bias_ids, &bias_values, &n_bias, &err)) goto done_prompts;
    sp.bias_ids = bias_ids, sp.bias_values = bias_values, sp.n_bias = n_bias;
    if (args_flag(&a, "no-mmap")) st_set_load_mode(ST_READ);
    ExpertParallel *ep = NULL;
    long E;
    ComputeMode cmode;
    long tile_rows;
    if (cli_expert_parallel_size(&a, &E, &err) || parse_compute(&a, "auto", &cmode, &err) ||
        parse_decode_tiles(&a, parallel < np ? parallel : np, &tile_rows, &err) || model_load(&m, dir, 0, &err))
        goto done_prompts;
    // (the experts split first: a rank packs weight panels for its own experts only)
    if ((E > 1 && cli_expert_parallel_start(&m, &ep, &err)) || model_set_compute(&m, cmode, &err)) {
        expert_parallel_free(ep);
        model_free(&m);
        goto done_prompts;
    }
    if (kv_auto) kv_dtype = model_kv_dtype_auto(&m);
    int longest = 0;
    for (int i = 0; i < np; i++) longest = lens[i] > longest ? lens[i] : longest;
    EngineOptions eo = {.parallel = (int)(parallel < np ? parallel : np), .ctx = longest + sp.max_new,
                        .prefill_chunk = (int)chunk, .kv_dtype = kv_dtype, .speculative = (int)spec,
                        .profile = args_flag(&a, "stats") || args_str(&a, "stats-json", NULL)};
    model_set_panel_tiles(&m, tile_rows);
    if (tok) tok_stream_init(&k.ts, tok, TOK_SKIP_SPECIAL);
    k.out = calloc(np, sizeof *k.out);
    k.n_out = calloc(np, sizeof *k.n_out);
    k.cap_out = calloc(np, sizeof *k.cap_out);
    if (!k.out || !k.n_out || !k.cap_out) {
        err_set(&err, "out of memory");
        goto done;
    }
    e = engine_new(&m, &eo, &err);
    if (!e) goto done;
    TokenConstraint tc;
    if (json_out) {
        int ends[2] = {m.cfg.eos_token_id, args_flag(&a, "chat") || args_str(&a, "system", NULL) ? tok_eos_id(tok) : -1};
        if (json_vocab_init(&json_vocab, tok, m.cfg.vocab_size) || json_mode_init(&json, &json_vocab, ends, 2, schema)) {
            err_set(&err, "out of memory");
            goto done;
        }
        tc = json_mode_constraint(&json);
        sp.constraint = &tc;
        k.json = &json;
        k.e = e;
    }
    for (int i = 0; i < np; i++) {
        SeqParams si = sp;
        si.seed = sp.seed + (unsigned long long)i;  // sequence k samples with seed S + k
        if (engine_add(e, prompts[i], lens[i], &si, on_token, &k, &err) < 0) {
            if (batch) err_prefix(&err, "%s: line %d", batch, i + 1);
            goto done;
        }
    }
    int live;
    while ((live = engine_step(e, &err)) > 0 && !k.failed) {
    }
    if (live < 0 || k.failed) goto done;
    if (tok) {
        const char *text;
        size_t n;
        tok_stream_finish(&k.ts, &text, &n);
        fwrite(text, 1, n, stdout);
    }
    if (batch)
        for (int i = 0; i < np; i++) {
            for (int j = 0; j < k.n_out[i]; j++) printf(j ? " %d" : "%d", k.out[i][j]);
            printf("\n");
        }
    else
        printf("\n");
    const EngineStats *st = engine_stats(e);
    if (args_flag(&a, "stats")) {
        long steps = st->decode_tokens;
        fprintf(stderr, "prompt: %ld tokens in %.3f s (%.1f tokens/s); generated %ld tokens in %.3f s (%.1f tokens/s)\n",
                st->prompt_tokens, st->prefill_s, st->prompt_tokens / (st->prefill_s > 1e-9 ? st->prefill_s : 1e-9),
                st->generated_tokens, st->decode_s, steps > 0 ? steps / (st->decode_s > 1e-9 ? st->decode_s : 1e-9) : 0.0);
        if (st->draft_tokens > 0)
            fprintf(stderr, "speculative: %ld of %ld drafts accepted (%.1f%%)\n", st->accepted_tokens, st->draft_tokens,
                    100.0 * st->accepted_tokens / st->draft_tokens);
        fprintf(stderr, "cache: %s latent rows (--kv-dtype %s)\n", kv_dtype == DT_BF16 ? "bf16" : "f32",
                kv_auto ? "auto" : kv_dtype == DT_BF16 ? "bf16" : "f32");
        const DecodeProfile *pf = &st->decode_profile;
        double parts = pf->products + pf->attention + pf->meetings;
        if (parts > 0)
            fprintf(stderr, "decode steps (profiled, ~1%% of a step): the products %.0f%%, absorbed attention %.0f%%, "
                    "waiting at the threads' meetings %.0f%%\n", 100 * pf->products / parts, 100 * pf->attention / parts,
                    100 * pf->meetings / parts);
        long long resident = 0, huge = st_model_huge_bytes(&m.files, &resident);
        if (huge >= 0 && resident > 0)  // (see atomic_commit in base/file.h)
            fprintf(stderr, "pages: %.1f MB of the checkpoint resident, %.0f%% of them mapped 2 MB at a time%s\n",
                    resident / 1e6, 100.0 * huge / resident,
                    2 * huge < resident && resident >= (64 << 20) && m.files.nfiles > 0 && m.files.files[0].mapped
                        ? " (a file written through the page cache stays in 4 KB pages: --no-mmap, or dropping its "
                          "cached pages, reads it in 2 MB ones where the kernel gives them)"
                        : "");
    }
    if (ep && args_flag(&a, "stats") && cli_report_expert_ranks(ep, &m, &err)) goto done;
    if (args_str(&a, "stats-json", NULL) && dist_rank(dist_world()) == 0 &&
        write_stats_json(args_str(&a, "stats-json", NULL), st, &err))
        goto done;
    rc = 0;
done:
    if (rc) {
        fflush(stdout);
        cli_fail(cmd, &err);
    }
    engine_free(e);
    expert_parallel_free(ep);
    if (tok) tok_stream_free(&k.ts);
    if (k.out)
        for (int i = 0; i < np; i++) free(k.out[i]);
    free(k.out);
    free(k.n_out);
    free(k.cap_out);
    model_free(&m);
    rc = rc ? 1 : 0;
    goto done_free;
done_prompts:
    cli_fail(cmd, &err);
done_free:
    token_lists_free(prompts, lens, np);
    json_mode_free(&json);
    json_vocab_free(&json_vocab);
    json_schema_free(schema);
    free(bias_ids);
    free(bias_values);
    tok_free(tok);
    return rc;
}
