// dsv3: the command line. Each subcommand lives in its own cmd_*.c file.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/commands.h"
#include "cli/util.h"
#include "dist/dist.h"
#include "kernels/matmul.h"

// How a command runs under mpirun (docs/distributed.md): not at all (a world of one), on every rank,
// or on every rank computing the same thing, where the others' output and errors go nowhere.
enum { ONE_PROCESS, EVERY_RANK, EVERY_RANK_RANK0_PRINTS };

static const struct {
    const char *name;
    int (*fn)(int, char **);
    const char *help;
    int ranks;
} commands[] = {
    {"logits", cmd_logits, "--model DIR --tokens IDS [--out FILE] [--mtp-out FILE] [--routes-out FILE] [--decode] [--absorbed] [--kv-dtype f32|bf16|auto] [--no-mmap] [--compute f32|bf16|auto] [--decode-tiles auto|on|off] [--expert-parallel E (under mpirun)]", EVERY_RANK},
    {"generate", cmd_generate, "--model DIR (--tokens IDS | --prompt TEXT [--chat] [--system TEXT] [--suffix TEXT] | --batch-file FILE) [--max-new N] [--temperature T] [--top-p P] [--top-k K] [--seed S] [--parallel N] [--prefill-chunk N] [--kv-dtype auto|f32|bf16] [--speculative K] [--logit-bias ID=B,...] [--json | --json-schema FILE] [--no-mmap] [--stats] [--stats-json FILE] [--compute auto|f32|bf16] [--decode-tiles auto|on|off] [--expert-parallel E (under mpirun)]", EVERY_RANK_RANK0_PRINTS},
    {"chat", cmd_chat, "--model DIR [--system TEXT] [--max-new N] [--temperature T] [--top-p P] [--top-k K] [--seed S] [--ctx N] [--kv-dtype auto|f32|bf16] [--speculative K] [--no-mmap] [--compute auto|f32|bf16] [--decode-tiles auto|on|off] [--verbose-prompt] [--tools FILE [--tool-choice auto|none|required|NAME]]  (/reset, /exit; Ctrl-C stops a reply; after a tool call, each input line is a call's result)", ONE_PROCESS},
    {"serve", cmd_serve, "--model DIR [--host 127.0.0.1] [--port 8080] [--parallel N] [--ctx N] [--kv-dtype auto|f32|bf16] [--speculative K] [--api-key KEY] [--alias NAME] [--max-queue N] [--timeout S] [--max-body BYTES] [--sse-ping S] [--no-prefix-cache] [--no-mmap] [--compute auto|f32|bf16] [--decode-tiles auto|on|off] [--profile]  (OpenAI-compatible HTTP server)", ONE_PROCESS},
    {"init", cmd_init, "--config FILE --out DIR [--seed S] [--dtype f32|bf16|fp8] [--shard-mb N]", ONE_PROCESS},
    {"convert", cmd_convert, "--model IN --out OUT --dtype fp8|bf16|f32 [--shard-mb N] [--force]  (FP8: the released block-scaled format)", ONE_PROCESS},
    {"info", cmd_info, "--model DIR [--json]", ONE_PROCESS},
    {"plan", cmd_plan, "(--config FILE | --preset NAME | --tables) [--seq T] [--ep-bandwidth GBPS] [--ep-ranks E [--ranks-per-node R] [--a2a-dtype T]] [--json] | --pipeline PP | --network", ONE_PROCESS},
    {"tokenize", cmd_tokenize, "--tokenizer FILE|DIR [--bos] [--lines] [--stats]  (UTF-8 on stdin, ids on stdout)", ONE_PROCESS},
    {"detokenize", cmd_detokenize, "--tokenizer FILE|DIR [--lines] [--skip-special]  (ids on stdin, text on stdout)", ONE_PROCESS},
    {"tokenizer", cmd_tokenizer, "train --vocab-size N --out tokenizer.json FILES...  (also writes tokenizer_config.json beside it)", ONE_PROCESS},
    {"prepare", cmd_prepare, "--tokenizer FILE|DIR|bytes --out DIR [--val-fraction F] [--shard-tokens N] FILES...", ONE_PROCESS},
    {"plot", cmd_plot, "--out FILE.svg [--smooth N] [--from STEP] RUN_DIR|LABEL=RUN_DIR...  (compare training runs: val loss, main loss, MaxVio)", ONE_PROCESS},
    {"train", cmd_train, "(--config FILE | --init MODEL_DIR) --data DIR --out DIR [options] | --resume DIR [options]  (dsv3 train --help lists the options)", EVERY_RANK},
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
    const char *isa = getenv("DSV3_ISA");  // (the kernels read it too; an unknown name is an error here)
    if (isa && kernels_set_isa(isa)) {
        fprintf(stderr, "dsv3: DSV3_ISA='%s' is not one of auto, amx, avx512bf16, avx512, scalar\n", isa);
        return 2;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
        if (strcmp(argv[1], commands[i].name) != 0) continue;
        // `dsv3 COMMAND --help` (or `dsv3 COMMAND SUBCOMMAND --help`): the command's line of the
        // usage (train lists its options itself)
        const char *last = argv[argc - 1];
        if ((argc == 3 || (argc == 4 && argv[2][0] != '-')) && (strcmp(last, "--help") == 0 || strcmp(last, "-h") == 0) &&
            strcmp(commands[i].name, "train") != 0) {
            printf("usage: dsv3 %s %s\n", commands[i].name, commands[i].help);
            return 0;
        }
        if (commands[i].ranks == ONE_PROCESS) return commands[i].fn(argc - 2, argv + 2);
        // MPI when mpirun started the process (every rank finalises it before leaving)
        Error err = {0};
        char cmd[64];
        snprintf(cmd, sizeof cmd, "dsv3 %s", commands[i].name);
        if (dist_init(&err)) return cli_fail(cmd, &err);
        if (commands[i].ranks == EVERY_RANK_RANK0_PRINTS && dist_rank(dist_world()) != 0 &&
            (!freopen("/dev/null", "w", stdout) || !freopen("/dev/null", "w", stderr)))
            dist_abort(1);
        int rc = commands[i].fn(argc - 2, argv + 2);
        dist_finalize();
        return rc;
    }
    fprintf(stderr, "dsv3: unknown command '%s' (try dsv3 --help)\n", argv[1]);
    return 2;
}
