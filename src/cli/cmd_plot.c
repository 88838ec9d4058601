// dsv3 plot: compare training runs in one SVG (validation loss, main loss, MaxVio), each run named
// by its directory, or by LABEL=DIR.
#include <stdio.h>
#include <string.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/util.h"
#include "train/trainer.h"

static const char *const VALUED[] = {"out", "smooth", "from", NULL};

int cmd_plot(int argc, char **argv) {
    const char *cmd = "dsv3 plot";
    Error err = {0};
    Args a;
    const char *svg;
    long smooth, from;
    if (args_parse(&a, cmd, argc, argv, VALUED, NULL, &err) || args_require(&a, "out", &svg, &err) ||
        args_long(&a, "smooth", 10, 1, 100000, &smooth, &err) || args_long(&a, "from", 0, 0, 1L << 40, &from, &err))
        return cli_fail(cmd, &err);
    if (a.npos < 1 || a.npos > TRAINER_PLOT_MAX_RUNS) {
        err_set(&err, "give 1 to %d run directories (or LABEL=DIR), got %d", TRAINER_PLOT_MAX_RUNS, a.npos);
        return cli_fail(cmd, &err);
    }
    char files[TRAINER_PLOT_MAX_RUNS][4200], names[TRAINER_PLOT_MAX_RUNS][256];
    const char *fp[TRAINER_PLOT_MAX_RUNS], *lp[TRAINER_PLOT_MAX_RUNS];
    for (int i = 0; i < a.npos; i++) {
        const char *arg = a.pos[i], *eq = strchr(arg, '='), *dir = eq ? eq + 1 : arg;
        if (eq) snprintf(names[i], sizeof names[i], "%.*s", (int)(eq - arg), arg);
        else {
            size_t n = strlen(dir);
            while (n > 1 && dir[n - 1] == '/') n--;  // the directory's own name labels it
            const char *b = dir + n;
            while (b > dir && b[-1] != '/') b--;
            snprintf(names[i], sizeof names[i], "%.*s", (int)(dir + n - b), b);
        }
        if (snprintf(files[i], sizeof files[i], "%s/metrics.jsonl", dir) >= (int)sizeof files[i]) {
            err_set(&err, "%s: path too long", dir);
            return cli_fail(cmd, &err);
        }
        fp[i] = files[i];
        lp[i] = names[i];
    }
    if (trainer_plot_compare(fp, lp, a.npos, (int)smooth, from, svg, &err)) return cli_fail(cmd, &err);
    printf("wrote %s (%d runs)\n", svg, a.npos);
    return 0;
}
