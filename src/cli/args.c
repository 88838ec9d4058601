#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cli/args.h"

static int in_list(const char *const *list, const char *s) {
    for (; list && *list; list++)
        if (strcmp(*list, s) == 0) return 1;
    return 0;
}

int args_parse(Args *a, const char *cmd, int argc, char **argv, const char *const *valued,
               const char *const *flags, Error *err) {
    memset(a, 0, sizeof *a);
    a->cmd = cmd;
    for (int i = 0; i < argc; i++) {
        const char *s = argv[i];
        if (strncmp(s, "--", 2) != 0 || s[2] == 0) {
            if (a->npos >= (int)(sizeof a->pos / sizeof a->pos[0])) return err_set(err, "too many arguments");
            a->pos[a->npos++] = s;
            continue;
        }
        const char *name = s + 2;
        if (a->n >= ARGS_MAX) return err_set(err, "too many options");
        if (in_list(valued, name)) {
            if (i + 1 >= argc) return err_set(err, "--%s needs a value", name);
            a->name[a->n] = name;
            a->value[a->n++] = argv[++i];
        } else if (in_list(flags, name)) {
            a->name[a->n] = name;
            a->value[a->n++] = NULL;
        } else {
            return err_set(err, "unknown option --%s (dsv3 --help lists each command's options)", name);
        }
    }
    return 0;
}

static int find(const Args *a, const char *name) {
    for (int i = a->n - 1; i >= 0; i--)  // the last occurrence wins
        if (strcmp(a->name[i], name) == 0) return i;
    return -1;
}

const char *args_str(const Args *a, const char *name, const char *dflt) {
    int i = find(a, name);
    return i >= 0 ? a->value[i] : dflt;
}

int args_flag(const Args *a, const char *name) { return find(a, name) >= 0; }

int args_long(const Args *a, const char *name, long dflt, long lo, long hi, long *out, Error *err) {
    const char *s = args_str(a, name, NULL);
    if (!s) {
        *out = dflt;
        return 0;
    }
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end) return err_set(err, "--%s: '%s' is not an integer", name, s);
    if (v < lo || v > hi) return err_set(err, "--%s: %ld is outside [%ld, %ld]", name, v, lo, hi);
    *out = v;
    return 0;
}

int args_double(const Args *a, const char *name, double dflt, double lo, double hi, double *out, Error *err) {
    const char *s = args_str(a, name, NULL);
    if (!s) {
        *out = dflt;
        return 0;
    }
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end) return err_set(err, "--%s: '%s' is not a number", name, s);
    if (!(v >= lo && v <= hi)) return err_set(err, "--%s: %g is outside [%g, %g]", name, v, lo, hi);
    *out = v;
    return 0;
}

int args_require(const Args *a, const char *name, const char **out, Error *err) {
    *out = args_str(a, name, NULL);
    if (!*out) return err_set(err, "--%s is required", name);
    return 0;
}
