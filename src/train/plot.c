// metrics.jsonl → metrics.svg: two panels over the steps, the loss (training total, main, and the
// validation points) and MaxVio_batch (mean over MoE layers, worst layer). And the comparison of
// several runs (`dsv3 plot`): validation loss, training main loss and MaxVio, one colour per run.
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/file.h"
#include "train/trainer.h"

enum { S_LOSS, S_MAIN, S_VAL, S_VIO, S_VIO_WORST, S_COUNT };
static const char *const KEYS[S_COUNT] = {"loss", "main_loss", "val_loss", "max_vio", "max_vio_worst"};
static const char *const LABELS[S_COUNT] = {"loss", "main loss", "validation loss", "MaxVio (mean of layers)",
                                            "MaxVio (worst layer)"};
static const char *const COLORS[S_COUNT] = {"#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e"};

typedef struct {
    int n, cap;
    double *x, *y;
} Series;

static int push(Series *s, double x, double y) {
    if (s->n == s->cap) {
        int cap = s->cap ? 2 * s->cap : 256;
        double *nx = realloc(s->x, sizeof(double) * cap), *ny = nx ? realloc(s->y, sizeof(double) * cap) : NULL;
        if (nx) s->x = nx;
        if (!nx || !ny) return -1;
        s->y = ny;
        s->cap = cap;
    }
    s->x[s->n] = x;
    s->y[s->n++] = y;
    return 0;
}

typedef struct {
    char *buf;
    size_t n, cap;
    int oom;
} Out;

static void out(Out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void out(Out *o, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        size_t room = o->cap - o->n;
        int k = vsnprintf(o->buf ? o->buf + o->n : NULL, o->buf ? room : 0, fmt, ap);
        va_end(ap);
        if (k < 0) return;
        if (o->buf && (size_t)k < room) {
            o->n += (size_t)k;
            return;
        }
        size_t cap = (o->cap ? o->cap * 2 : 65536) + (size_t)k;
        char *nb = realloc(o->buf, cap);
        if (!nb) {
            o->oom = 1;
            return;
        }
        o->buf = nb;
        o->cap = cap;
    }
}

// A "nice" tick step for the span (1, 2 or 5 × a power of ten) giving about 5 ticks.
static double tick_step(double span) {
    double raw = span / 5, p = pow(10, floor(log10(raw))), f = raw / p;
    return (f < 1.5 ? 1 : f < 3.5 ? 2 : f < 7.5 ? 5 : 10) * p;
}

// How a panel draws its series: label, colour, and points (markers and a dashed line, for the few
// evaluation points) or a plain line.
typedef struct {
    const char *const *labels, *const *colors;
    const int *points;
    int legend_width;
} Style;

// One panel at (x0, y0) of size w × h showing series [first, last].
static void panel(Out *o, const Series *s, int first, int last, double x0, double y0, double w, double h,
                  double xmin, double xmax, const char *title, const Style *st) {
    double ymin = INFINITY, ymax = -INFINITY;
    for (int k = first; k <= last; k++)
        for (int i = 0; i < s[k].n; i++) {
            ymin = fmin(ymin, s[k].y[i]);
            ymax = fmax(ymax, s[k].y[i]);
        }
    if (!isfinite(ymin)) ymin = 0, ymax = 1;
    if (ymax - ymin < 1e-12) ymin -= 0.5, ymax += 0.5;
    double pad = 0.05 * (ymax - ymin);
    ymin -= pad, ymax += pad;
    if (xmax <= xmin) xmax = xmin + 1;
#define PX(v) (x0 + ((v) - xmin) / (xmax - xmin) * w)
#define PY(v) (y0 + h - ((v) - ymin) / (ymax - ymin) * h)
    out(o, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"15\" font-weight=\"bold\">%s</text>\n", x0, y0 - 10, title);
    out(o, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" stroke=\"#444\"/>\n", x0, y0, w, h);
    double ys = tick_step(ymax - ymin);
    for (double t = ceil(ymin / ys) * ys; t <= ymax; t += ys) {
        out(o, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n", x0, PY(t), x0 + w, PY(t));
        out(o, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"11\" text-anchor=\"end\">%g</text>\n", x0 - 5, PY(t) + 4, t);
    }
    double xs = tick_step(xmax - xmin);
    if (xs < 1) xs = 1;
    for (double t = ceil(xmin / xs) * xs; t <= xmax; t += xs)
        out(o, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"11\" text-anchor=\"middle\">%g</text>\n", PX(t), y0 + h + 15, t);
    for (int k = first; k <= last; k++) {
        if (s[k].n == 0) continue;
        if (st->points[k]) {  // few points: markers joined by a dashed line
            out(o, "<polyline fill=\"none\" stroke=\"%s\" stroke-dasharray=\"4 3\" points=\"", st->colors[k]);
            for (int i = 0; i < s[k].n; i++) out(o, "%.1f,%.1f ", PX(s[k].x[i]), PY(s[k].y[i]));
            out(o, "\"/>\n");
            for (int i = 0; i < s[k].n; i++)
                out(o, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"%s\"/>\n", PX(s[k].x[i]), PY(s[k].y[i]),
                    st->colors[k]);
        } else {
            out(o, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\" points=\"", st->colors[k]);
            for (int i = 0; i < s[k].n; i++) out(o, "%.1f,%.1f ", PX(s[k].x[i]), PY(s[k].y[i]));
            out(o, "\"/>\n");
        }
    }
    int shown = 0;
    for (int k = first; k <= last; k++) shown += s[k].n > 0;
    if (shown)  // the legend sits on a white card so the curves under it do not cross its text
        out(o, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%d\" height=\"%d\" fill=\"white\" fill-opacity=\"0.85\" "
               "stroke=\"#ccc\"/>\n", x0 + w - st->legend_width - 8, y0 + 4, st->legend_width, 16 * shown + 6);
    double ly = y0 + 16;
    for (int k = first; k <= last; k++) {
        if (s[k].n == 0) continue;
        double lx = x0 + w - st->legend_width;
        out(o, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"2\"/>\n", lx,
            ly - 4, lx + 20, ly - 4, st->colors[k]);
        out(o, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"12\">%s</text>\n", lx + 25, ly, st->labels[k]);
        ly += 16;
    }
#undef PX
#undef PY
}

// Reads metrics.jsonl: series k gets (step, value of keys[k]) from every record that has it.
static int read_metrics(const char *metrics_jsonl, const char *const *keys, int nkeys, long from, Series *s,
                        double *xmin, double *xmax, Error *err) {
    size_t len;
    char *text = file_read_all(metrics_jsonl, &len, err);
    if (!text) return -1;
    int rc = -1, lineno = 0;
    for (char *line = text; *line;) {
        char *nl = strchr(line, '\n');
        if (nl) *nl = 0;
        lineno++;
        if (*line) {
            json_error_t je;
            json_t *o = json_loads(line, 0, &je);
            json_t *st = o ? json_object_get(o, "step") : NULL;
            if (!json_is_integer(st)) {
                json_decref(o);
                if (!nl) break;  // a torn last line (a run stopped mid-write), dropped as --resume drops it
                err_set(err, "%s: line %d: not a metrics record", metrics_jsonl, lineno);
                goto done;
            }
            double x = (double)json_integer_value(st);
            if (json_integer_value(st) < from) {
                json_decref(o);
                goto next;
            }
            *xmin = fmin(*xmin, x);
            *xmax = fmax(*xmax, x);
            for (int k = 0; k < nkeys; k++) {
                json_t *v = json_object_get(o, keys[k]);
                if (json_is_number(v) && push(&s[k], x, json_number_value(v))) {
                    json_decref(o);
                    err_set(err, "out of memory");
                    goto done;
                }
            }
            json_decref(o);
        }
    next:
        if (!nl) break;
        line = nl + 1;
    }
    rc = 0;
done:
    free(text);
    return rc;
}

static int write_svg(Out *o, const char *svg, Error *err) {
    int rc = o->oom ? err_set(err, "out of memory drawing %s", svg) : file_write_all(svg, o->buf, o->n, err);
    free(o->buf);
    return rc;
}

int trainer_plot(const char *metrics_jsonl, const char *svg, Error *err) {
    Series s[S_COUNT] = {{0}};
    double xmin = INFINITY, xmax = -INFINITY;
    int rc = -1;
    if (read_metrics(metrics_jsonl, KEYS, S_COUNT, 0, s, &xmin, &xmax, err)) goto done;
    if (!isfinite(xmin)) xmin = 0, xmax = 1;
    static const int POINTS[S_COUNT] = {[S_VAL] = 1};
    Style st = {LABELS, COLORS, POINTS, 190};
    Out o = {0};
    out(&o, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"860\" height=\"640\" font-family=\"sans-serif\">\n");
    out(&o, "<rect width=\"860\" height=\"640\" fill=\"white\"/>\n");
    panel(&o, s, S_LOSS, S_VAL, 70, 40, 760, 240, xmin, xmax, "loss", &st);
    panel(&o, s, S_VIO, S_VIO_WORST, 70, 350, 760, 240, xmin, xmax, "MaxVio_batch", &st);
    out(&o, "<text x=\"450\" y=\"630\" font-size=\"12\" text-anchor=\"middle\">step</text>\n</svg>\n");
    rc = write_svg(&o, svg, err);
done:
    for (int k = 0; k < S_COUNT; k++) free(s[k].x), free(s[k].y);
    return rc;
}

// In place: each value becomes the mean of the last `w` values up to it (per-step curves are
// noisy; a comparison of runs reads better smoothed). -1 when out of memory.
static int trailing_mean(Series *s, int w) {
    if (s->n == 0) return 0;
    double sum = 0, *raw = malloc(sizeof(double) * s->n);
    if (!raw) return -1;
    memcpy(raw, s->y, sizeof(double) * s->n);
    for (int i = 0; i < s->n; i++) {
        sum += raw[i];
        if (i >= w) sum -= raw[i - w];
        s->y[i] = sum / (i + 1 < w ? i + 1 : w);
    }
    free(raw);
    return 0;
}

int trainer_plot_compare(const char *const *metrics_jsonl, const char *const *labels, int n, int smooth, long from,
                         const char *svg, Error *err) {
    static const char *const PALETTE[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e",
                                          "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
    if (n < 1 || n > TRAINER_PLOT_MAX_RUNS)
        return err_set(err, "plot: %d runs; give 1 to %d", n, TRAINER_PLOT_MAX_RUNS);
    static const char *const keys[3] = {"val_loss", "main_loss", "max_vio"};
    Series s[3][TRAINER_PLOT_MAX_RUNS] = {{{0}}};
    double xmin = INFINITY, xmax = -INFINITY;
    int rc = -1, points[TRAINER_PLOT_MAX_RUNS], lines[TRAINER_PLOT_MAX_RUNS] = {0};
    for (int r = 0; r < n; r++) {
        Series tmp[3] = {{0}};
        points[r] = 1;
        int bad = read_metrics(metrics_jsonl[r], keys, 3, from, tmp, &xmin, &xmax, err);
        for (int k = 0; k < 3; k++) s[k][r] = tmp[k];
        if (bad) goto done;
        if (smooth > 1 && (trailing_mean(&s[1][r], smooth) || trailing_mean(&s[2][r], smooth))) {
            err_set(err, "out of memory smoothing %s", metrics_jsonl[r]);
            goto done;
        }
    }
    if (!isfinite(xmin)) xmin = 0, xmax = 1;
    int lw = 0;
    for (int r = 0; r < n; r++) lw = (int)fmax(lw, 40 + 7 * (double)strlen(labels[r]));
    Style pts = {labels, PALETTE, points, lw}, lin = {labels, PALETTE, lines, lw};
    char t1[96], t2[96];
    snprintf(t1, sizeof t1, "training main loss%s", smooth > 1 ? " (trailing mean)" : "");
    snprintf(t2, sizeof t2, "MaxVio_batch, mean of layers%s", smooth > 1 ? " (trailing mean)" : "");
    Out o = {0};
    out(&o, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"860\" height=\"930\" font-family=\"sans-serif\">\n");
    out(&o, "<rect width=\"860\" height=\"930\" fill=\"white\"/>\n");
    panel(&o, s[0], 0, n - 1, 70, 40, 760, 240, xmin, xmax, "validation loss", &pts);
    panel(&o, s[1], 0, n - 1, 70, 340, 760, 240, xmin, xmax, t1, &lin);
    panel(&o, s[2], 0, n - 1, 70, 640, 760, 240, xmin, xmax, t2, &lin);
    out(&o, "<text x=\"450\" y=\"920\" font-size=\"12\" text-anchor=\"middle\">step</text>\n</svg>\n");
    rc = write_svg(&o, svg, err);
done:
    for (int k = 0; k < 3; k++)
        for (int r = 0; r < n; r++) free(s[k][r].x), free(s[k][r].y);
    return rc;
}
