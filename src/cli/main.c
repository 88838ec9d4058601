// dsv3: the command line. Each subcommand lives in its own cmd_*.c file.
#include <stdio.h>
#include <string.h>

#include "cli/commands.h"

static const struct {
    const char *name;
    int (*fn)(int, char **);
    const char *help;
} commands[] = {
    {"logits", cmd_logits, "--model DIR --tokens IDS [--out FILE] [--mtp-out FILE] [--decode] [--no-mmap] [--compute f32|bf16] [--expert-parallel E (under mpirun)]"},
    {"generate", cmd_generate, "--model DIR (--tokens IDS | --prompt TEXT [--chat] [--system TEXT] | --batch-file FILE) [--max-new N] [--temperature T] [--top-p P] [--top-k K] [--seed S] [--parallel N] [--prefill-chunk N] [--no-mmap] [--stats] [--stats-json FILE] [--compute f32|bf16] [--expert-parallel E (under mpirun)]"},
    {"chat", cmd_chat, "--model DIR [--system TEXT] [--max-new N] [--temperature T] [--top-p P] [--top-k K] [--seed S] [--ctx N] [--no-mmap] [--compute f32|bf16] [--verbose-prompt]  (/reset, /exit; Ctrl-C stops a reply)"},
    {"serve", cmd_serve, "--model DIR [--host 127.0.0.1] [--port 8080] [--parallel N] [--ctx N] [--kv-dtype f32|bf16] [--speculative K] [--api-key KEY] [--alias NAME] [--max-queue N] [--timeout S] [--max-body BYTES] [--no-prefix-cache] [--compute f32|bf16]  (OpenAI-compatible HTTP server)"},
    {"init", cmd_init, "--config FILE --out DIR [--seed S] [--dtype f32|bf16|fp8]"},
    {"convert", cmd_convert, "--model IN --out OUT --dtype fp8|bf16|f32 [--shard-mb N] [--force]  (FP8: the released block-scaled format)"},
    {"info", cmd_info, "--model DIR [--json]"},
    {"plan", cmd_plan, "(--config FILE | --preset NAME | --tables) [--seq T] [--ep-bandwidth GBPS] [--ep-ranks E [--ranks-per-node R] [--a2a-dtype T]] [--json] | --pipeline PP | --network"},
    {"tokenize", cmd_tokenize, "--tokenizer FILE|DIR [--bos] [--lines] [--stats]  (UTF-8 on stdin, ids on stdout)"},
    {"detokenize", cmd_detokenize, "--tokenizer FILE|DIR [--lines] [--skip-special]  (ids on stdin, text on stdout)"},
    {"tokenizer", cmd_tokenizer, "train --vocab-size N --out tokenizer.json FILES...  (also writes tokenizer_config.json beside it)"},
    {"prepare", cmd_prepare, "--tokenizer FILE|DIR|bytes --out DIR [--val-fraction F] [--shard-tokens N] FILES..."},
    {"plot", cmd_plot, "--out FILE.svg [--smooth N] [--from STEP] RUN_DIR|LABEL=RUN_DIR...  (compare training runs: val loss, main loss, MaxVio)"},
    {"train", cmd_train, "(--config FILE | --init MODEL_DIR) --data DIR --out DIR [options] | --resume DIR [options]  (dsv3 train --help lists the options)"},
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
