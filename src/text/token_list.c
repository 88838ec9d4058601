#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "base/file.h"
#include "text/token_list.h"

int token_list_parse(const char *s, int **out, int *n, Error *err) {
    int cap = 16, cnt = 0;
    int *v = malloc(sizeof(int) * cap);
    if (!v) return err_set(err, "out of memory");
    const char *p = s;
    for (;;) {
        while (*p == ' ') p++;
        char *end;
        errno = 0;
        long x = strtol(p, &end, 10);
        if (end == p || errno || x < 0 || x > 0x7fffffff) {
            free(v);
            return err_set(err, "item %d ('%.20s') is not a token id", cnt + 1, p);
        }
        if (cnt == cap) {
            cap *= 2;
            int *nv = realloc(v, sizeof(int) * cap);
            if (!nv) {
                free(v);
                return err_set(err, "out of memory");
            }
            v = nv;
        }
        v[cnt++] = (int)x;
        p = end;
        while (*p == ' ') p++;
        if (*p == 0) break;
        if (*p != ',') {
            free(v);
            return err_set(err, "unexpected '%c' after item %d", *p, cnt);
        }
        p++;
    }
    *out = v;
    *n = cnt;
    return 0;
}

void token_lists_free(int **lines, int *lens, int n) {
    for (int i = 0; lines && i < n; i++) free(lines[i]);
    free(lines);
    free(lens);
}

int token_lists_parse(char *text, const char *name, int ***lines, int **lens, int *n, Error *err) {
    int cap = 16, rc = 0;
    *n = 0;
    *lines = malloc(sizeof **lines * cap);
    *lens = malloc(sizeof **lens * cap);
    if (!*lines || !*lens) rc = err_set(err, "%s: out of memory", name);
    char *line = text;
    for (int no = 1; rc == 0 && *line; no++) {
        char *end = strchr(line, '\n');
        if (end) *end = '\0';
        size_t l = strlen(line);
        if (l > 0 && line[l - 1] == '\r') line[--l] = '\0';
        if (*n == cap) {
            cap *= 2;
            int **nl = realloc(*lines, sizeof **lines * cap);
            if (nl) *lines = nl;
            int *nn = nl ? realloc(*lens, sizeof **lens * cap) : NULL;
            if (nn) *lens = nn;
            if (!nl || !nn) {
                rc = err_set(err, "%s: out of memory", name);
                break;
            }
        }
        if (token_list_parse(line, &(*lines)[*n], &(*lens)[*n], err)) {
            rc = err_prefix(err, "%s: line %d", name, no);
            break;
        }
        (*n)++;
        if (!end) break;
        line = end + 1;
    }
    if (rc == 0 && *n == 0) rc = err_set(err, "%s: no prompts", name);
    if (rc) {
        token_lists_free(*lines, *lens, *n);
        *lines = NULL, *lens = NULL, *n = 0;
    }
    return rc;
}

int token_lists_read(const char *path, int ***lines, int **lens, int *n, Error *err) {
    size_t len;
    char *text = file_read_all(path, &len, err);
    if (!text) return -1;
    int rc = token_lists_parse(text, path, lines, lens, n, err);
    free(text);
    return rc;
}
