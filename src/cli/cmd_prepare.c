// dsv3 prepare: text files → token shards for `dsv3 train` (format in src/train/data.h).
#include <stdio.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/util.h"
#include "train/data.h"

static const char *const VALUED[] = {"tokenizer", "out", "val-fraction", "shard-tokens", NULL};

int cmd_prepare(int argc, char **argv) {
    const char *cmd = "dsv3 prepare";
    Error err = {0};
    Args a;
    PrepareOptions o = {0};
    double vf;
    long shard;
    if (args_parse(&a, cmd, argc, argv, VALUED, NULL, &err) || args_require(&a, "tokenizer", &o.tokenizer, &err) ||
        args_require(&a, "out", &o.out, &err) || args_double(&a, "val-fraction", 0.05, 0, 0.99, &vf, &err) ||
        args_long(&a, "shard-tokens", 1L << 26, 1, 1L << 40, &shard, &err))
        return cli_fail(cmd, &err);
    if (a.npos < 1) {
        err_set(&err, "give the text files to tokenise (one document each)");
        return cli_fail(cmd, &err);
    }
    o.files = a.pos;
    o.n_files = a.npos;
    o.val_fraction = vf;
    o.shard_tokens = (size_t)shard;
    PrepareStats st;
    if (data_prepare(&o, &st, &err)) return cli_fail(cmd, &err);
    printf("%d documents: %lld training tokens, %lld validation tokens (vocabulary %d) in %s\n", st.documents,
           st.train_tokens, st.val_tokens, st.vocab_size, o.out);
    return 0;
}
