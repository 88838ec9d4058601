#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "test.h"

#define MAX_TESTS 1024

static struct {
    const char *file, *name;
    TestFn fn;
} tests[MAX_TESTS];
static int ntests;
static int current_failed, current_skipped;

void test_register(const char *file, const char *name, TestFn fn) {
    if (ntests < MAX_TESTS) tests[ntests++] = (typeof(tests[0])){file, name, fn};
}

void test_fail(const char *file, int line, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stdout, "    %s:%d: ", file, line);
    vfprintf(stdout, fmt, ap);
    fprintf(stdout, "\n");
    va_end(ap);
    current_failed = 1;
}

void test_skip(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stdout, "    skipped: ");
    vfprintf(stdout, fmt, ap);
    fprintf(stdout, "\n");
    va_end(ap);
    current_skipped = 1;
}

// A tiny V3-style model over the byte vocabulary (258 ids): q_lora, noaux_tc in 2 groups, MTP.
const char *const TEST_TINY_V3_CONFIG =
    "{\"model_type\": \"deepseek_v3\", \"vocab_size\": 264, \"hidden_size\": 32, \"num_hidden_layers\": 2,"
    " \"first_k_dense_replace\": 1, \"intermediate_size\": 48, \"moe_intermediate_size\": 16,"
    " \"num_attention_heads\": 2, \"q_lora_rank\": 16, \"kv_lora_rank\": 16, \"qk_nope_head_dim\": 8,"
    " \"qk_rope_head_dim\": 8, \"v_head_dim\": 8, \"n_routed_experts\": 8, \"n_shared_experts\": 1,"
    " \"num_experts_per_tok\": 2, \"n_group\": 2, \"topk_group\": 1, \"topk_method\": \"noaux_tc\","
    " \"scoring_func\": \"sigmoid\", \"norm_topk_prob\": true, \"routed_scaling_factor\": 2.5,"
    " \"num_nextn_predict_layers\": 1, \"max_position_embeddings\": 256, \"rope_theta\": 10000,"
    " \"rms_norm_eps\": 1e-6, \"initializer_range\": 0.02, \"bos_token_id\": 0, \"eos_token_id\": 1}";

const char *test_bin(void) {
    const char *b = getenv("DSV3");
    return b && *b ? b : "build/dsv3";
}

// Under mpirun (a test running the runner on several ranks) each rank has a directory of its own,
// since each clears it at start.
const char *test_tmpdir(void) {
    static char dir[256];
    if (dir[0]) return dir;
    const char *t = getenv("TEST_TMP"), *rank = getenv("OMPI_COMM_WORLD_RANK");
    snprintf(dir, sizeof dir, "%s%s%s", t && *t ? t : "build/test-tmp", rank ? "/rank" : "", rank ? rank : "");
    return dir;
}

const char *test_datadir(void) { return "tests/data"; }

int test_run(char *out, size_t n, const char *fmt, ...) {
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    char full[8300];
    snprintf(full, sizeof full, "(%s) 2>&1", cmd);
    FILE *p = popen(full, "r");
    if (!p) return -1;
    size_t len = 0;
    char buf[4096];
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, p)) > 0) {
        if (out && len + 1 < n) {
            size_t take = got < n - 1 - len ? got : n - 1 - len;
            memcpy(out + len, buf, take);
            len += take;
        }
    }
    if (out && n) out[len] = 0;
    int st = pclose(p);
    if (st == -1) return -1;
    if (WIFEXITED(st)) return WEXITSTATUS(st);
    return 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
}

int test_count_lines(const char *s) {
    int n = 0;
    for (; *s; s++) n += *s == '\n';
    return n;
}

void *test_read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc(sz + 1);
    if (buf && fread(buf, 1, sz, f) != (size_t)sz) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf) buf[sz] = 0;
    if (len) *len = sz;
    return buf;
}

int main(int argc, char **argv) {
    mkdir("build", 0755);
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s'", test_tmpdir(), test_tmpdir());
    if (system(cmd) != 0) {
        fprintf(stderr, "cannot create %s\n", test_tmpdir());
        return 2;
    }
    int passed = 0, failed = 0, skipped = 0;
    for (int i = 0; i < ntests; i++) {
        int selected = argc < 2;
        for (int a = 1; a < argc && !selected; a++)
            selected = strstr(tests[i].name, argv[a]) || strstr(tests[i].file, argv[a]);
        if (!selected) continue;
        current_failed = current_skipped = 0;
        tests[i].fn();
        // a failure outweighs a skip: a test that failed before it gave up still failed
        const char *status = current_failed ? "FAIL" : current_skipped ? "SKIP" : "ok  ";
        printf("%s %s (%s)\n", status, tests[i].name, tests[i].file);
        fflush(stdout);
        if (current_failed) failed++;
        else if (current_skipped) skipped++;
        else passed++;
    }
    printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);
    return failed ? 1 : 0;
}

void test_write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

// The training corpus and its data directory, made once (test.h).
const char *test_train_corpus(void) {
    static char dir[512];
    if (dir[0]) return dir;
    snprintf(dir, sizeof dir, "%s/train_cli", test_tmpdir());
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s'", dir, dir);
    if (system(cmd) != 0) return dir;
    char path[600];
    for (int d = 0; d < 3; d++) {
        char *text = malloc(16384), *p = text;
        for (int i = 0; i < 120; i++)
            p += sprintf(p, "document %d line %d: the quick brown fox jumps over the lazy dog.\n", d, i * (d + 1));
        snprintf(path, sizeof path, "%s/doc%d.txt", dir, d);
        test_write_text(path, text);
        free(text);
    }
    snprintf(path, sizeof path, "%s/config.json", dir);
    test_write_text(path, TEST_TINY_V3_CONFIG);
    char out[4096];
    snprintf(cmd, sizeof cmd, "%s prepare --tokenizer bytes --out '%s/data' --val-fraction 0.3 '%s/doc0.txt' '%s/doc1.txt' '%s/doc2.txt'",
             test_bin(), dir, dir, dir, dir);
    test_run(out, sizeof out, "%s", cmd);
    return dir;
}

int test_golden_ids(const char *name, char *ids, size_t n) {
    char path[600];
    snprintf(path, sizeof path, "%s/%s/tokens.txt", test_datadir(), name);
    char *tok = test_read_file(path, NULL);
    if (!tok) return 0;
    snprintf(ids, n, "%.*s", (int)strcspn(tok, "\n"), tok);
    free(tok);
    int T = 1;
    for (const char *p = ids; *p; p++) T += *p == ',';
    return T;
}
