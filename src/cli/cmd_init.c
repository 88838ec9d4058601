#include <stdio.h>
#include "cli/commands.h"
int cmd_init(int argc, char **argv) {
    (void)argc; (void)argv;
    fprintf(stderr, "dsv3 init: not built yet\n");
    return 1;
}
