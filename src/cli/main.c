// dsv3: the command line. Each subcommand lives in its own cmd_*.c file.
#include <stdio.h>
#include <string.h>

#include "cli/commands.h"

static const struct {
    const char *name;
    int (*fn)(int, char **);
    const char *help;
} commands[] = {
    {"logits", cmd_logits, "--model DIR --tokens IDS [--out FILE] [--mtp-out FILE] [--decode]"},
    {"generate", cmd_generate, "--model DIR --tokens IDS [--max-new N] [--temperature T] [--top-p P] [--top-k K] [--seed S]"},
    {"init", cmd_init, "--config FILE --out DIR [--seed S] [--dtype f32|bf16|fp8]"},
    {"info", cmd_info, "--model DIR [--json]"},
    {"plan", cmd_plan, "(--config FILE | --preset NAME | --tables) [--seq T] [--ep-bandwidth GBPS] [--json] | --pipeline PP | --network"},
};

static void usage(FILE *f) {
    fprintf(f, "usage: dsv3 COMMAND [options]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].help);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(stdout);
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (strcmp(argv[1], commands[i].name) == 0) return commands[i].fn(argc - 2, argv + 2);
    fprintf(stderr, "dsv3: unknown command '%s' (try dsv3 --help)\n", argv[1]);
    return 2;
}
