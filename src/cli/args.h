// Command-line options of the form --name VALUE and --flag, plus positional arguments.
#ifndef DSV3_CLI_ARGS_H
#define DSV3_CLI_ARGS_H

#include "base/error.h"

#define ARGS_MAX 64

typedef struct Args {
    const char *cmd;  // for error messages: "dsv3 logits"
    int n;
    const char *name[ARGS_MAX];
    const char *value[ARGS_MAX];  // NULL for a flag
    int npos;
    const char *pos[ARGS_MAX * 4];
} Args;

// valued: NULL-terminated names that take a value ("model", "tokens"); flags: NULL-terminated
// names that do not. An unknown option or a missing value is an error naming the option.
int args_parse(Args *a, const char *cmd, int argc, char **argv, const char *const *valued,
               const char *const *flags, Error *err);
const char *args_str(const Args *a, const char *name, const char *dflt);
int args_flag(const Args *a, const char *name);
// Parse a number option; a malformed or out-of-range value is an error naming the option.
int args_long(const Args *a, const char *name, long dflt, long lo, long hi, long *out, Error *err);
int args_double(const Args *a, const char *name, double dflt, double lo, double hi, double *out, Error *err);
// A required option: error "dsv3 X: --name is required" when absent.
int args_require(const Args *a, const char *name, const char **out, Error *err);

#endif
