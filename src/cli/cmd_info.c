#include <stdio.h>
#include "cli/commands.h"
int cmd_info(int argc, char **argv) {
    (void)argc; (void)argv;
    fprintf(stderr, "dsv3 info: not built yet\n");
    return 1;
}
