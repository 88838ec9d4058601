// metrics.jsonl → metrics.svg: two panels over the steps, the loss (training total, main, and the
// validation points) and MaxVio_batch (mean over MoE layers, worst layer).
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

// One panel at (x0, y0) of size w × h showing series [first, last].
static void panel(Out *o, const Series *s, int first, int last, double x0, double y0, double w, double h,
                  double xmin, double xmax, const char *title) {
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
        if (k == S_VAL) {  // few points: markers joined by a dashed line
            out(o, "<polyline fill=\"none\" stroke=\"%s\" stroke-dasharray=\"4 3\" points=\"", COLORS[k]);
            for (int i = 0; i < s[k].n; i++) out(o, "%.1f,%.1f ", PX(s[k].x[i]), PY(s[k].y[i]));
            out(o, "\"/>\n");
            for (int i = 0; i < s[k].n; i++)
                out(o, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"%s\"/>\n", PX(s[k].x[i]), PY(s[k].y[i]), COLORS[k]);
        } else {
            out(o, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\" points=\"", COLORS[k]);
            for (int i = 0; i < s[k].n; i++) out(o, "%.1f,%.1f ", PX(s[k].x[i]), PY(s[k].y[i]));
            out(o, "\"/>\n");
        }
    }
    int shown = 0;
    for (int k = first; k <= last; k++) shown += s[k].n > 0;
    if (shown)  // the legend sits on a white card so the curves under it do not cross its text
        out(o, "<rect x=\"%.1f\" y=\"%.1f\" width=\"190\" height=\"%d\" fill=\"white\" fill-opacity=\"0.85\" "
               "stroke=\"#ccc\"/>\n", x0 + w - 198, y0 + 4, 16 * shown + 6);
    double ly = y0 + 16;
    for (int k = first; k <= last; k++) {
        if (s[k].n == 0) continue;
        out(o, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"2\"/>\n",
            x0 + w - 190, ly - 4, x0 + w - 170, ly - 4, COLORS[k]);
        out(o, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"12\">%s</text>\n", x0 + w - 165, ly, LABELS[k]);
        ly += 16;
    }
#undef PX
#undef PY
}

int trainer_plot(const char *metrics_jsonl, const char *svg, Error *err) {
    size_t len;
    char *text = file_read_all(metrics_jsonl, &len, err);
    if (!text) return -1;
    Series s[S_COUNT] = {{0}};
    int rc = -1, lineno = 0;
    double xmin = INFINITY, xmax = -INFINITY;
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
                err_set(err, "%s: line %d: not a metrics record", metrics_jsonl, lineno);
                goto done;
            }
            double x = (double)json_integer_value(st);
            xmin = fmin(xmin, x);
            xmax = fmax(xmax, x);
            for (int k = 0; k < S_COUNT; k++) {
                json_t *v = json_object_get(o, KEYS[k]);
                if (json_is_number(v) && push(&s[k], x, json_number_value(v))) {
                    json_decref(o);
                    err_set(err, "out of memory");
                    goto done;
                }
            }
            json_decref(o);
        }
        if (!nl) break;
        line = nl + 1;
    }
    if (!isfinite(xmin)) xmin = 0, xmax = 1;
    Out o = {0};
    out(&o, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"860\" height=\"640\" font-family=\"sans-serif\">\n");
    out(&o, "<rect width=\"860\" height=\"640\" fill=\"white\"/>\n");
    panel(&o, s, S_LOSS, S_VAL, 70, 40, 760, 240, xmin, xmax, "loss");
    panel(&o, s, S_VIO, S_VIO_WORST, 70, 350, 760, 240, xmin, xmax, "MaxVio_batch");
    out(&o, "<text x=\"450\" y=\"630\" font-size=\"12\" text-anchor=\"middle\">step</text>\n</svg>\n");
    if (o.oom) err_set(err, "out of memory drawing %s", svg);
    else rc = file_write_all(svg, o.buf, o.n, err);
    free(o.buf);
done:
    for (int k = 0; k < S_COUNT; k++) free(s[k].x), free(s[k].y);
    free(text);
    return rc;
}
