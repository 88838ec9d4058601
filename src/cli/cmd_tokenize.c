// dsv3 tokenize / detokenize: UTF-8 text on stdin to ids on stdout and back, through a
// tokenizer.json (or a model directory holding one).
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/file.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "cli/util.h"
#include "text/tokenizer.h"

static char *read_stdin(size_t *len, Error *err) {
    ByteBuf b = {0};
    char chunk[1 << 16];
    size_t got;
    while ((got = fread(chunk, 1, sizeof chunk, stdin)) > 0)
        if (bb_append(&b, chunk, got)) {
            bb_free(&b);
            err_set(err, "out of memory");
            return NULL;
        }
    if (ferror(stdin)) {
        bb_free(&b);
        err_set(err, "stdin: read error");
        return NULL;
    }
    if (bb_reserve(&b, 0)) {
        err_set(err, "out of memory");
        return NULL;
    }
    *len = b.n;
    return b.p;
}

static Tokenizer *open_tokenizer(const char *path, Error *err) {
    return path_is_dir(path) ? tok_load_dir(path, err) : tok_load(path, err);
}

// Writes ids separated by single spaces and a newline; formatting by hand keeps output off the
// profile for megabytes of ids.
static int write_ids(FILE *f, const int *ids, size_t n, ByteBuf *line) {
    line->n = 0;
    for (size_t i = 0; i < n; i++) {
        char tmp[16];
        int k = 0;
        unsigned v = (unsigned)ids[i];
        do tmp[k++] = (char)('0' + v % 10);
        while ((v /= 10));
        if (bb_reserve(line, (size_t)k + 2)) return -1;
        if (i) line->p[line->n++] = ' ';
        while (k) line->p[line->n++] = tmp[--k];
    }
    if (bb_append(line, "\n", 1)) return -1;
    return fwrite(line->p, 1, line->n, f) == line->n ? 0 : -1;
}

static const char *const TOK_VALUED[] = {"tokenizer", NULL};
static const char *const TOK_FLAGS[] = {"bos", "lines", "stats", NULL};

int cmd_tokenize(int argc, char **argv) {
    const char *cmd = "dsv3 tokenize";
    Error err = {0};
    Args a;
    const char *path;
    if (args_parse(&a, cmd, argc, argv, TOK_VALUED, TOK_FLAGS, &err) || args_require(&a, "tokenizer", &path, &err))
        return cli_fail(cmd, &err);
    int flags = args_flag(&a, "bos") ? TOK_ADD_BOS : 0, lines = args_flag(&a, "lines");
    double t0 = cli_now();
    Tokenizer *tok = open_tokenizer(path, &err);
    if (!tok) return cli_fail(cmd, &err);
    double t1 = cli_now();
    size_t len;
    char *text = read_stdin(&len, &err);
    if (!text) {
        tok_free(tok);
        return cli_fail(cmd, &err);
    }
    double t2 = cli_now(), t_out = 0;
    TokIds ids = {0};
    ByteBuf line = {0};
    size_t ntok = 0;
    int rc = 0;
    const char *p = text, *end = text + len;
    while (rc == 0 && (lines ? p < end : p == text)) {
        const char *e = end;
        if (lines) {
            e = memchr(p, '\n', (size_t)(end - p));
            if (!e) e = end;
        }
        ids.n = 0;
        if (tok_encode(tok, p, (size_t)(e - p), flags, &ids, &err)) rc = -1;
        double w0 = cli_now();
        if (rc == 0 && write_ids(stdout, ids.v, ids.n, &line)) rc = err_set(&err, "stdout: write error");
        t_out += cli_now() - w0;
        ntok += ids.n;
        p = e + 1;
    }
    if (rc == 0 && fflush(stdout)) rc = err_set(&err, "stdout: write error");
    double t3 = cli_now();
    if (rc == 0 && args_flag(&a, "stats"))
        fprintf(stderr, "load %.3f s; encoded %zu bytes into %zu tokens in %.3f s (%.2f MB/s)\n", t1 - t0, len, ntok,
                t3 - t2 - t_out, len / 1e6 / (t3 - t2 - t_out > 1e-9 ? t3 - t2 - t_out : 1e-9));
    ids_free(&ids);
    bb_free(&line);
    free(text);
    tok_free(tok);
    return rc ? cli_fail(cmd, &err) : 0;
}

// Parses the whitespace-separated ids of s[0, n) into ids; errors name the line (when lineno > 0)
// and the item.
static int parse_ids(const char *s, size_t n, int lineno, TokIds *ids, Error *err) {
    size_t i = 0;
    int item = 0;
    while (i < n) {
        while (i < n && (s[i] == ' ' || s[i] == '\t' || s[i] == '\r' || s[i] == '\n')) i++;
        if (i >= n) break;
        item++;
        long v = 0;
        size_t j = i;
        while (j < n && s[j] >= '0' && s[j] <= '9' && v <= 0x7fffffffL) v = v * 10 + (s[j++] - '0');
        int ends = j >= n || s[j] == ' ' || s[j] == '\t' || s[j] == '\r' || s[j] == '\n';
        if (j == i || !ends || v > 0x7fffffffL) {
            size_t k = i;
            while (k < n && k - i < 20 && s[k] != ' ' && s[k] != '\n') k++;
            if (lineno > 0)
                return err_set(err, "stdin: line %d, item %d ('%.*s') is not a token id", lineno, item, (int)(k - i),
                               s + i);
            return err_set(err, "stdin: item %d ('%.*s') is not a token id", item, (int)(k - i), s + i);
        }
        if (ids_push(ids, (int)v)) return err_set(err, "out of memory");
        i = j;
    }
    return 0;
}

static const char *const DETOK_FLAGS[] = {"lines", "skip-special", NULL};

int cmd_detokenize(int argc, char **argv) {
    const char *cmd = "dsv3 detokenize";
    Error err = {0};
    Args a;
    const char *path;
    if (args_parse(&a, cmd, argc, argv, TOK_VALUED, DETOK_FLAGS, &err) || args_require(&a, "tokenizer", &path, &err))
        return cli_fail(cmd, &err);
    int lines = args_flag(&a, "lines"), flags = args_flag(&a, "skip-special") ? TOK_SKIP_SPECIAL : 0;
    Tokenizer *tok = open_tokenizer(path, &err);
    if (!tok) return cli_fail(cmd, &err);
    size_t len;
    char *in = read_stdin(&len, &err);
    if (!in) {
        tok_free(tok);
        return cli_fail(cmd, &err);
    }
    // decode everything before writing anything, so a bad id leaves no partial output
    ByteBuf out = {0};
    TokIds ids = {0};
    int rc = 0, lineno = 1;
    const char *p = in, *end = in + len;
    while (rc == 0 && (lines ? p < end : p == in)) {
        const char *e = end;
        if (lines) {
            e = memchr(p, '\n', (size_t)(end - p));
            if (!e) e = end;
        }
        ids.n = 0;
        size_t n = 0;
        char *text = NULL;
        if (parse_ids(p, (size_t)(e - p), lines ? lineno : 0, &ids, &err)) rc = -1;
        else if (!(text = tok_decode(tok, ids.v, ids.n, flags, &n, &err)))
            rc = lines ? err_prefix(&err, "stdin: line %d", lineno) : err_prefix(&err, "stdin");
        else if (bb_append(&out, text, n) || (lines && bb_append(&out, "\n", 1))) rc = err_set(&err, "out of memory");
        free(text);
        p = e + 1;
        lineno++;
    }
    if (rc == 0 && (fwrite(out.p, 1, out.n, stdout) != out.n || fflush(stdout)))
        rc = err_set(&err, "stdout: write error");
    bb_free(&out);
    ids_free(&ids);
    free(in);
    tok_free(tok);
    return rc ? cli_fail(cmd, &err) : 0;
}
