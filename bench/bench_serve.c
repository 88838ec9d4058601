// `dsv3 serve` under load: a bounded load generator on loopback against a server on the ~108M
// benchmark model (bench/configs/v3-108m.json, BF16, random weights, a tokenizer trained on the
// repository's documentation): 1, 4, 16 and 64 concurrent streams, each client sending
// REQUESTS_PER_CLIENT streamed completions one after another (SOLO_REQUESTS for the single
// stream, whose percentiles would otherwise rest on two samples; a prompt of PROMPT ids, GEN new
// tokens, greedy, EOS ignored; every request of the run its own prompt, so the prefix cache finds
// nothing). Per level: aggregate generated tokens/s over the level's wall time, time to first token
// and time per output token (after the first), p50 and p99 — the levels taking turns over three
// rounds, medians, each ratio against the same round's single stream.
// Figures, not tests; it stops by itself. The aims of issue 11: aggregate tokens/s at 16 streams
// ≥ 6× one stream, TTFT p99 at 16 streams under 4× its single-stream value.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench_common.h"

#define PROMPT 64
#define GEN 32
#define REQUESTS_PER_CLIENT 2
#define SOLO_REQUESTS 8
#define MAX_CLIENTS 64

typedef struct {
    int port, client;
    int n;                       // requests done
    int requests;                // to send
    double ttft[SOLO_REQUESTS], tpot[SOLO_REQUESTS];
    long tokens;
    int failed;
} Client;

static int connect_to(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct timeval tv = {.tv_sec = 600};
    if (fd >= 0) setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a)) {
        if (fd >= 0) close(fd);
        return -1;
    }
    return fd;
}

// A well-mixed 64-bit value of x (splitmix64's finaliser): prompts of different seeds differ.
static unsigned long long mix64(unsigned long long x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// One streamed request; *ttft and *tpot in seconds, the answer's token count from the usage chunk.
static int one_request(int port, int seed, double *ttft, double *tpot, long *tokens) {
    char body[2048], head[256];
    int n = snprintf(body, sizeof body, "{\"prompt\": [");
    for (int t = 0; t < PROMPT; t++)
        n += snprintf(body + n, sizeof body - n, "%s%llu", t ? "," : "", 2 + mix64((unsigned long long)seed * 1000003ull + t) % 8000);
    // logprobs: a chunk per token, so the first chunk times the first token
    n += snprintf(body + n, sizeof body - n, "], \"max_tokens\": %d, \"temperature\": 0, \"ignore_eos\": true, \"stream\": true,"
                  " \"logprobs\": 0, \"stream_options\": {\"include_usage\": true}}", GEN);
    int h = snprintf(head, sizeof head, "POST /v1/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n", n);
    int fd = connect_to(port);
    if (fd < 0) return -1;
    double t0 = bench_now(), first = 0, last = 0;
    if (send(fd, head, h, MSG_NOSIGNAL) != h || send(fd, body, n, MSG_NOSIGNAL) != n) {
        close(fd);
        return -1;
    }
    static __thread char buf[1 << 16];
    size_t len = 0;
    for (;;) {
        ssize_t k = recv(fd, buf + len, sizeof buf - 1 - len, 0);
        if (k <= 0) break;
        buf[len + k] = 0;
        double now = bench_now();
        if (!first && strstr(buf + (len > 16 ? len - 16 : 0), "\"text\"")) first = now;
        last = now;
        len += (size_t)k;
        if (len > sizeof buf - 4096) {  // keep the tail (the usage chunk comes last)
            memmove(buf, buf + len - 4096, 4096);
            len = 4096;
        }
    }
    close(fd);
    buf[len] = 0;
    const char *u = strstr(buf, "\"completion_tokens\":");
    if (!u || !first) return -1;
    *tokens = atol(u + strlen("\"completion_tokens\":"));
    *ttft = first - t0;
    *tpot = *tokens > 1 ? (last - first) / (*tokens - 1) : 0;
    return 0;
}

static void *client_main(void *arg) {
    Client *c = arg;
    for (int r = 0; r < c->requests; r++) {
        long tok = 0;
        if (one_request(c->port, c->client * 100 + r, &c->ttft[r], &c->tpot[r], &tok)) {
            c->failed++;
            continue;
        }
        c->tokens += tok;
        c->n++;
    }
    return NULL;
}

static double pct(double *v, int n, double p) {
    qsort(v, n, sizeof *v, bench_cmp_double);
    int i = (int)(p * (n - 1) + 0.5);
    return n ? v[i] : 0;
}

static int sh(const char *cmd) {
    int rc = system(cmd);
    return rc == 0 ? 0 : -1;
}

int main(void) {
    const char *dsv3 = getenv("DSV3") ? getenv("DSV3") : "build/dsv3", *dir = "build/bench-serve";
    char cmd[4096], log[512];
    snprintf(cmd, sizeof cmd,
             "set -e; rm -rf %s && mkdir -p %s/model && %s tokenizer train --vocab-size 4096 --out %s/model/tokenizer.json "
             "README.md docs/*.md >/dev/null && %s init --config bench/configs/v3-108m.json --out %s/model --dtype bf16 --seed 1 "
             ">/dev/null",
             dir, dir, dsv3, dir, dsv3, dir);
    if (sh(cmd)) {
        fprintf(stderr, "bench_serve: making the model failed\n");
        return 1;
    }
    snprintf(log, sizeof log, "%s/server.log", dir);
    pid_t pid = fork();
    if (pid == 0) {
        // BENCH_SERVE_ARGS: more options for the server (e.g. --decode-tiles off, to compare kernels)
        const char *extra = getenv("BENCH_SERVE_ARGS") ? getenv("BENCH_SERVE_ARGS") : "";
        snprintf(cmd, sizeof cmd, "exec %s serve --model %s/model --port 0 --parallel %d --max-queue %d --ctx %d %s 2>%s", dsv3,
                 dir, MAX_CLIENTS, MAX_CLIENTS, PROMPT + GEN + 8, extra, log);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    int port = 0;
    for (int i = 0; i < 600 && !port; i++) {
        usleep(100000);
        FILE *f = fopen(log, "r");
        char line[256];
        while (f && fgets(line, sizeof line, f))
            if (sscanf(line, "listening on http://127.0.0.1:%d", &port) == 1) break;
        if (f) fclose(f);
    }
    if (!port) {
        fprintf(stderr, "bench_serve: the server did not start (%s)\n", log);
        kill(pid, SIGKILL);
        return 1;
    }
    printf("-- dsv3 serve, v3-108m (BF16, random weights) on loopback: streamed completions, prompts of %d ids, %d new tokens,\n"
           "   %d requests per client one after another (%d for the single stream); the prefix cache sees distinct prompts;\n"
           "   the levels taking turns, 3 rounds; medians, each ratio against the same round's single stream\n",
           PROMPT, GEN, REQUESTS_PER_CLIENT, SOLO_REQUESTS);
    double wt, wp;  // one request first, untimed: the server's first pass touches its memory
    long wn;
    if (one_request(port, 999999, &wt, &wp, &wn)) fprintf(stderr, "bench_serve: the warm-up request failed\n");
    // The levels take turns, ROUNDS rounds each in another order, and each round's level is compared
    // with that round's single stream: a drift of the host's speed moves both sides alike.
    enum { LEVELS = 4, ROUNDS = 3 };
    static const int levels[LEVELS] = {1, 4, 16, 64};
    double tps[LEVELS][ROUNDS], t50[LEVELS][ROUNDS], t99[LEVELS][ROUNDS], p50[LEVELS][ROUNDS], p99[LEVELS][ROUNDS];
    int rc = 0, failed_at[LEVELS] = {0}, next_client = 0;
    for (int r = 0; r < ROUNDS; r++)
        for (int k = 0; k < LEVELS; k++) {
            int l = (r + k) % LEVELS, nc = levels[l];
            static Client cl[MAX_CLIENTS];
            pthread_t th[MAX_CLIENTS];
            double t0 = bench_now();
            for (int i = 0; i < nc; i++) {  // (every client of every round its own prompts)
                cl[i] = (Client){.port = port, .client = next_client++, .requests = nc == 1 ? SOLO_REQUESTS : REQUESTS_PER_CLIENT};
                pthread_create(&th[i], NULL, client_main, &cl[i]);
            }
            for (int i = 0; i < nc; i++) pthread_join(th[i], NULL);
            double wall = bench_now() - t0, ttft[MAX_CLIENTS * SOLO_REQUESTS], tpot[MAX_CLIENTS * SOLO_REQUESTS];
            long tokens = 0;
            int n = 0;
            for (int i = 0; i < nc; i++) {
                for (int q = 0; q < cl[i].n; q++) ttft[n] = cl[i].ttft[q], tpot[n++] = cl[i].tpot[q];
                tokens += cl[i].tokens;
                failed_at[l] += cl[i].failed;
            }
            tps[l][r] = tokens / wall, t50[l][r] = pct(ttft, n, 0.5), t99[l][r] = pct(ttft, n, 0.99);
            p50[l][r] = pct(tpot, n, 0.5), p99[l][r] = pct(tpot, n, 0.99);
        }
    double ratio[LEVELS][ROUNDS], ratio99[LEVELS][ROUNDS];  // (before bench_median sorts the rounds apart)
    for (int l = 0; l < LEVELS; l++)
        for (int r = 0; r < ROUNDS; r++) ratio[l][r] = tps[l][r] / tps[0][r], ratio99[l][r] = t99[l][r] / t99[0][r];
    for (int l = 0; l < LEVELS; l++) {
        printf("   %2d streams: %7.1f tokens/s aggregate (%.2fx one stream); TTFT p50 %6.3f s p99 %6.3f s (%.2fx); "
               "TPOT p50 %6.4f s p99 %6.4f s%s\n",
               levels[l], bench_median(tps[l], ROUNDS), bench_median(ratio[l], ROUNDS), bench_median(t50[l], ROUNDS),
               bench_median(t99[l], ROUNDS), bench_median(ratio99[l], ROUNDS), bench_median(p50[l], ROUNDS),
               bench_median(p99[l], ROUNDS), failed_at[l] ? "  (some requests FAILED)" : "");
        if (failed_at[l]) rc = 1;
    }
    kill(pid, SIGTERM);
    int st;
    waitpid(pid, &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        fprintf(stderr, "bench_serve: the server did not exit cleanly on SIGTERM\n");
        rc = 1;
    }
    return rc;
}
