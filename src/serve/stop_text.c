#define _GNU_SOURCE  // memmem
#include <string.h>

#include "serve/stop_text.h"

void stop_text_init(StopText *s, const char *const *stops, int n) {
    memset(s, 0, sizeof *s);
    for (int i = 0; i < n && s->n < STOP_TEXT_MAX; i++)
        if (stops[i] && stops[i][0]) {
            s->stop[s->n] = stops[i];
            s->len[s->n++] = strlen(stops[i]);
        }
}

void stop_text_free(StopText *s) { bb_free(&s->held); }

// The length of the longest end of h[0, n) that is a proper start of some stop string.
static size_t partial_end(const StopText *s, const char *h, size_t n) {
    size_t best = 0;
    for (int k = 0; k < s->n; k++) {
        size_t l = s->len[k] - 1 < n ? s->len[k] - 1 : n;
        for (; l > best; l--)
            if (memcmp(h + n - l, s->stop[k], l) == 0) {
                best = l;
                break;
            }
    }
    return best;
}

int stop_text_push(StopText *s, const char *text, size_t n, ByteBuf *out) {
    if (s->matched) return 1;
    if (s->n == 0) return bb_append(out, text, n);
    if (bb_append(&s->held, text, n)) return -1;
    const char *h = s->held.p;
    size_t hn = s->held.n, first = hn, end = (size_t)-1;
    if (hn == 0) return 0;
    for (int k = 0; k < s->n; k++) {  // the occurrence that is complete first (the longer one on a tie)
        const char *at = memmem(h, hn, s->stop[k], s->len[k]);
        size_t a = at ? (size_t)(at - h) : 0;
        if (at && (a + s->len[k] < end || (a + s->len[k] == end && a < first))) {
            first = a;
            end = a + s->len[k];
        }
    }
    if (first < hn) {
        s->matched = 1;
        int rc = bb_append(out, h, first);
        memmove(s->held.p, h + end, hn - end);  // what came after it, for stop_text_after
        s->held.n = hn - end;
        s->held.p[s->held.n] = '\0';
        return rc ? -1 : 1;
    }
    size_t keep = partial_end(s, h, hn);
    if (bb_append(out, h, hn - keep)) return -1;
    memmove(s->held.p, h + hn - keep, keep);
    s->held.n = keep;
    s->held.p[keep] = '\0';
    return 0;
}

int stop_text_finish(StopText *s, ByteBuf *out) {
    if (s->matched || s->held.n == 0) return 0;
    int rc = bb_append(out, s->held.p, s->held.n);
    s->held.n = 0;
    s->held.p[0] = '\0';
    return rc;
}

const char *stop_text_after(const StopText *s, size_t *n) {
    *n = s->matched ? s->held.n : 0;
    return *n ? s->held.p : "";
}
