// dsv3 tokenizer train: learn a byte-level BPE vocabulary under DeepSeek-V3's pre-tokenizer and
// write it as tokenizer.json (with tokenizer_config.json beside it).
#include <stdio.h>
#include <string.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/util.h"
#include "text/bpe_train.h"

static const char *const VALUED[] = {"vocab-size", "out", NULL};

static int tokenizer_train(int argc, char **argv) {
    const char *cmd = "dsv3 tokenizer train";
    Error err = {0};
    Args a;
    const char *out;
    long vocab;
    if (args_parse(&a, cmd, argc, argv, VALUED, NULL, &err) || args_require(&a, "out", &out, &err) ||
        args_long(&a, "vocab-size", 0, 0, 1 << 24, &vocab, &err))
        return cli_fail(cmd, &err);
    if (!vocab) {
        err_set(&err, "--vocab-size is required");
        return cli_fail(cmd, &err);
    }
    if (a.npos == 0) {
        err_set(&err, "no input files (dsv3 tokenizer train --vocab-size N --out tokenizer.json FILES...)");
        return cli_fail(cmd, &err);
    }
    BpeTrainStats st;
    if (bpe_train(a.pos, a.npos, (int)vocab, out, &st, &err)) return cli_fail(cmd, &err);
    printf("%s: %d ids (%d specials, 256 bytes, %d merges) from %zu bytes in %d file(s): %zu pieces, %zu distinct; "
           "counted in %.2f s, merged in %.2f s\n",
           out, st.vocab_size, BPE_TRAIN_N_SPECIAL, st.merges, st.bytes, a.npos, st.pieces, st.unique,
           st.seconds_count, st.seconds_merge);
    if (st.vocab_size < vocab)
        printf("note: stopped at %d ids: no pair of symbols occurs twice in the text any more\n", st.vocab_size);
    return 0;
}

int cmd_tokenizer(int argc, char **argv) {
    if (argc >= 1 && strcmp(argv[0], "train") == 0) return tokenizer_train(argc - 1, argv + 1);
    fprintf(stderr, "dsv3 tokenizer: unknown subcommand '%s' (usage: dsv3 tokenizer train --vocab-size N --out "
                    "tokenizer.json FILES...)\n", argc >= 1 ? argv[0] : "");
    return 2;
}
