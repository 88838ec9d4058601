#include <stdio.h>
#include "cli/commands.h"
int cmd_logits(int argc, char **argv) {
    (void)argc; (void)argv;
    fprintf(stderr, "dsv3 logits: not built yet\n");
    return 1;
}
