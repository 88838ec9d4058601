#include <stdio.h>
#include "cli/commands.h"
int cmd_generate(int argc, char **argv) {
    (void)argc; (void)argv;
    fprintf(stderr, "dsv3 generate: not built yet\n");
    return 1;
}
