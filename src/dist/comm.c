// dist.h over MPI (built with -DDSV3_MPI when OpenMPI is installed), or a world of one process.
#define _GNU_SOURCE
#include <limits.h>
#include <omp.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "dist/dist.h"

#ifdef DSV3_MPI
#include <mpi.h>
#endif

struct DistComm {
#ifdef DSV3_MPI
    MPI_Comm comm;    // MPI_COMM_NULL in a world of one
    MPI_Comm gather;  // a duplicate for the bucket sums' second phase (see DistSum)
#endif
    int rank, size;
};

static struct {
    int inited, mpi;  // mpi: MPI_Init ran
    int local_size;
    DistComm world;
} g = {.world = {.size = 1}, .local_size = 1};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int dist_have_mpi(void) {
#ifdef DSV3_MPI
    return 1;
#else
    return 0;
#endif
}

#ifdef DSV3_MPI
// The rank's share of the machine's cores: its affinity mask when the launcher bound it to its
// share (the masks of the node's ranks then add up to no more than the machine), else the mask
// divided among the ranks.
static void set_threads(int local_size) {
    if (getenv("OMP_NUM_THREADS")) return;
    cpu_set_t set;
    int mine = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    int n = (long)mine * local_size <= online ? mine : mine / local_size;
    omp_set_num_threads(n > 0 ? n : 1);
}
#endif

int dist_init(Error *err) {
    if (g.inited) return 0;
    g.inited = 1;
#ifdef DSV3_MPI
    g.world.comm = MPI_COMM_NULL;
    const char *launched[] = {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"};
    int by_launcher = 0;
    for (size_t i = 0; i < sizeof launched / sizeof *launched; i++) by_launcher |= getenv(launched[i]) != NULL;
    if (!by_launcher) return 0;
    int provided;
    // every MPI call is made by the main thread, outside OpenMP regions
    if (MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
        return err_set(err, "MPI_Init_thread failed");
    g.mpi = 1;
    MPI_Comm_dup(MPI_COMM_WORLD, &g.world.comm);
    MPI_Comm_set_errhandler(g.world.comm, MPI_ERRORS_RETURN);
    MPI_Comm_dup(g.world.comm, &g.world.gather);
    MPI_Comm_rank(g.world.comm, &g.world.rank);
    MPI_Comm_size(g.world.comm, &g.world.size);
    MPI_Comm local;
    if (MPI_Comm_split_type(g.world.comm, MPI_COMM_TYPE_SHARED, g.world.rank, MPI_INFO_NULL, &local) == MPI_SUCCESS) {
        MPI_Comm_size(local, &g.local_size);
        MPI_Comm_free(&local);
    }
    set_threads(g.local_size);
#endif
    (void)err;
    return 0;
}

void dist_finalize(void) {
#ifdef DSV3_MPI
    if (g.mpi) {
        MPI_Comm_free(&g.world.comm);
        MPI_Comm_free(&g.world.gather);
        MPI_Finalize();
        g.mpi = 0;
    }
#endif
}

void dist_abort(int code) {
    fflush(stdout);
    fflush(stderr);
#ifdef DSV3_MPI
    if (g.mpi) MPI_Abort(MPI_COMM_WORLD, code);
#endif
    exit(code);
}

DistComm *dist_world(void) { return &g.world; }
int dist_rank(const DistComm *c) { return c->rank; }
int dist_size(const DistComm *c) { return c->size; }
int dist_local_size(void) { return g.local_size; }

#ifdef DSV3_MPI
// The message of an MPI error code, as an Error.
static int mpi_err(Error *err, int rc, const char *what) {
    char s[MPI_MAX_ERROR_STRING];
    int n = 0;
    if (MPI_Error_string(rc, s, &n) != MPI_SUCCESS) snprintf(s, sizeof s, "error %d", rc);
    return err_set(err, "%s: %s", what, s);
}
#define MPI_TRY(call, what)                                  \
    do {                                                     \
        int rc_ = (call);                                    \
        if (rc_ != MPI_SUCCESS) return mpi_err(err, rc_, what); \
    } while (0)
#endif

int dist_split(DistComm *c, int color, int key, DistComm **out, Error *err) {
    DistComm *n = calloc(1, sizeof *n);
    if (!n) return err_set(err, "out of memory");
    n->size = 1;
#ifdef DSV3_MPI
    n->comm = n->gather = MPI_COMM_NULL;
    if (c->size > 1) {
        int rc = MPI_Comm_split(c->comm, color, key, &n->comm);
        if (rc == MPI_SUCCESS) rc = MPI_Comm_dup(n->comm, &n->gather);
        if (rc != MPI_SUCCESS) {
            if (n->comm != MPI_COMM_NULL) MPI_Comm_free(&n->comm);
            free(n);
            return mpi_err(err, rc, "MPI_Comm_split");
        }
        MPI_Comm_set_errhandler(n->comm, MPI_ERRORS_RETURN);
        MPI_Comm_set_errhandler(n->gather, MPI_ERRORS_RETURN);
        MPI_Comm_rank(n->comm, &n->rank);
        MPI_Comm_size(n->comm, &n->size);
    }
#else
    (void)c, (void)color, (void)key;
#endif
    *out = n;
    return 0;
}

void dist_comm_free(DistComm *c) {
    if (!c || c == &g.world) return;
#ifdef DSV3_MPI
    if (c->comm != MPI_COMM_NULL) MPI_Comm_free(&c->comm);
    if (c->gather != MPI_COMM_NULL) MPI_Comm_free(&c->gather);
#endif
    free(c);
}

int dist_agree(DistComm *c, int rc, int *first_failed) {
    int first = rc ? c->rank : INT_MAX;
#ifdef DSV3_MPI
    if (c->size > 1 && MPI_Allreduce(MPI_IN_PLACE, &first, 1, MPI_INT, MPI_MIN, c->comm) != MPI_SUCCESS)
        dist_abort(1);  // the ranks can no longer agree on anything
#endif
    if (first_failed) *first_failed = first == INT_MAX ? -1 : first;
    return first == INT_MAX ? 0 : -1;
}

int dist_sum_f64(DistComm *c, double *x, int n, Error *err) {
    if (c->size == 1 || n <= 0) return 0;
#ifdef DSV3_MPI
    // gathered on rank 0 and added up in rank order there, so the bits never depend on MPI's algorithm
    double *all = c->rank == 0 ? malloc(sizeof(double) * (size_t)n * c->size) : NULL;
    if (c->rank == 0 && !all) return err_set(err, "out of memory");
    int rc = MPI_Gather(x, n, MPI_DOUBLE, all, n, MPI_DOUBLE, 0, c->comm);
    if (rc == MPI_SUCCESS && c->rank == 0)
        for (int i = 0; i < n; i++) {
            double s = all[i];
            for (int r = 1; r < c->size; r++) s += all[(size_t)r * n + i];
            x[i] = s;
        }
    free(all);
    if (rc != MPI_SUCCESS) return mpi_err(err, rc, "MPI_Gather");
    MPI_TRY(MPI_Bcast(x, n, MPI_DOUBLE, 0, c->comm), "MPI_Bcast");
#endif
    (void)x, (void)err;
    return 0;
}

int dist_sum_i64(DistComm *c, long long *x, int n, Error *err) {
    if (c->size == 1 || n <= 0) return 0;
#ifdef DSV3_MPI
    MPI_TRY(MPI_Allreduce(MPI_IN_PLACE, x, n, MPI_LONG_LONG, MPI_SUM, c->comm), "MPI_Allreduce");  // exact
#endif
    (void)x, (void)err;
    return 0;
}

int dist_max_f64(DistComm *c, double *x, int n, Error *err) {
    if (c->size == 1 || n <= 0) return 0;
#ifdef DSV3_MPI
    MPI_TRY(MPI_Allreduce(MPI_IN_PLACE, x, n, MPI_DOUBLE, MPI_MAX, c->comm), "MPI_Allreduce");  // exact
#endif
    (void)x, (void)err;
    return 0;
}

int dist_gather(DistComm *c, const void *send, size_t n, void *recv, int root, Error *err) {
    if (c->size == 1) {
        memcpy(recv, send, n);
        return 0;
    }
#ifdef DSV3_MPI
    if (n > INT_MAX) return err_set(err, "gather: %zu bytes per rank, more than MPI's int counts allow", n);
    MPI_TRY(MPI_Gather(send, (int)n, MPI_BYTE, recv, (int)n, MPI_BYTE, root, c->comm), "MPI_Gather");
#else
    (void)send, (void)recv, (void)root;
#endif
    (void)err;
    return 0;
}

int dist_alltoall_int(DistComm *c, const int *send, int *recv, Error *err) {
    if (c->size == 1) {
        recv[0] = send[0];
        return 0;
    }
#ifdef DSV3_MPI
    MPI_TRY(MPI_Alltoall(send, 1, MPI_INT, recv, 1, MPI_INT, c->comm), "MPI_Alltoall");
#endif
    (void)err;
    return 0;
}

int dist_alltoallv(DistComm *c, const void *send, const int *send_counts, void *recv, const int *recv_counts,
                   size_t elem_bytes, Error *err) {
    DistExchange x;
    TRY(dist_alltoallv_start(c, send, send_counts, recv, recv_counts, elem_bytes, &x, err));
    return dist_exchange_wait(&x, err);
}

int dist_alltoallv_start(DistComm *c, const void *send, const int *send_counts, void *recv, const int *recv_counts,
                         size_t elem_bytes, DistExchange *x, Error *err) {
    memset(x, 0, sizeof *x);
    x->started_s = now_s();
    if (c->size == 1) {
        x->done_s = x->started_s;
        if (send_counts[0] != recv_counts[0])
            return err_set(err, "all-to-all: %d elements sent, %d expected", send_counts[0], recv_counts[0]);
        memcpy(recv, send, (size_t)send_counts[0] * elem_bytes);
        return 0;
    }
#ifdef DSV3_MPI
    int R = c->size;
    x->counts = malloc(sizeof(int) * 4 * R);
    MPI_Request *req = malloc(sizeof *req);
    if (!x->counts || !req) {
        free(x->counts), free(req);
        x->counts = NULL;
        return err_set(err, "out of memory");
    }
    int *sc = x->counts, *sd = sc + R, *rc = sc + 2 * R, *rd = sc + 3 * R;
    size_t so = 0, ro = 0;
    for (int r = 0; r < R; r++) {
        size_t sb = (size_t)send_counts[r] * elem_bytes, rb = (size_t)recv_counts[r] * elem_bytes;
        if (sb > INT_MAX || rb > INT_MAX || so + sb > INT_MAX || ro + rb > INT_MAX) {
            free(x->counts), free(req);
            x->counts = NULL;
            return err_set(err, "all-to-all: more than 2 GB in one exchange");
        }
        sc[r] = (int)sb, sd[r] = (int)so, rc[r] = (int)rb, rd[r] = (int)ro;
        so += sb, ro += rb;
    }
    int rc_ = MPI_Ialltoallv(send, sc, sd, MPI_BYTE, recv, rc, rd, MPI_BYTE, c->comm, req);
    if (rc_ != MPI_SUCCESS) {
        free(x->counts), free(req);
        x->counts = NULL;
        return mpi_err(err, rc_, "MPI_Ialltoallv");
    }
    x->req = req;
#endif
    return 0;
}

int dist_exchange_test(DistExchange *x, int *done, Error *err) {
    *done = 1;
#ifdef DSV3_MPI
    if (!x->req) return 0;
    MPI_TRY(MPI_Test((MPI_Request *)x->req, done, MPI_STATUS_IGNORE), "MPI_Test");
    if (*done) {
        x->done_s = now_s();
        free(x->req), free(x->counts);
        x->req = NULL, x->counts = NULL;
    }
#else
    (void)x, (void)err;
#endif
    return 0;
}

int dist_exchange_wait(DistExchange *x, Error *err) {
#ifdef DSV3_MPI
    if (!x->req) return 0;
    int rc = MPI_Wait((MPI_Request *)x->req, MPI_STATUS_IGNORE);
    x->done_s = now_s();
    free(x->req), free(x->counts);
    x->req = NULL, x->counts = NULL;
    if (rc != MPI_SUCCESS) return mpi_err(err, rc, "MPI_Wait");
#else
    (void)x, (void)err;
#endif
    return 0;
}

// ---- nonblocking bucket sums ----

typedef struct Bucket {
    float *x;
    size_t n;
    int phase;  // 0: the all-to-all of the chunks in flight; 1: the all-gather of the sums; 2: done
    float *recv;  // (size, my chunk) every rank's copy of this rank's chunk
    int *counts, *displs, *mine_counts, *mine_displs;  // (size) each
#ifdef DSV3_MPI
    MPI_Request req;
#endif
} Bucket;

// MPI wants the collectives on a communicator started in the same order on every rank; a bucket's
// all-gather starts when its all-to-all has arrived, which differs between ranks. So the all-to-alls
// go on the communicator, the all-gathers on its duplicate, each in bucket order: a bucket's
// all-gather is never started before the previous bucket's.
struct DistSum {
    DistComm *c;
    Bucket *b;
    int n, cap;
    int gathering;  // buckets [0, gathering) have started their all-gather
    int open;  // a round has started
    DistSumStats st;
};

DistSum *dist_sum_new(DistComm *c, Error *err) {
    DistSum *s = calloc(1, sizeof *s);
    if (!s) return err_set(err, "out of memory"), NULL;
    s->c = c;
    return s;
}

static void bucket_free(Bucket *b) {
    free(b->recv);
    free(b->counts);
}

static void round_reset(DistSum *s) {
    for (int i = 0; i < s->n; i++) bucket_free(&s->b[i]);
    s->n = s->gathering = s->open = 0;
}

void dist_sum_free(DistSum *s) {
    if (!s) return;
    round_reset(s);
    free(s->b);
    free(s);
}

#ifdef DSV3_MPI
// Waits for (wait) or tests the request of bucket b; *done: it completed.
static int bucket_request(DistSum *s, Bucket *b, int wait, int *done, Error *err) {
    if (wait) {
        double t0 = now_s();
        MPI_TRY(MPI_Wait(&b->req, MPI_STATUS_IGNORE), "gradient sum: MPI_Wait");
        s->st.wait_s += now_s() - t0;
        *done = 1;
        return 0;
    }
    MPI_TRY(MPI_Test(&b->req, done, MPI_STATUS_IGNORE), "gradient sum: MPI_Test");
    return 0;
}

// Bucket b's all-to-all has arrived: its chunk of this rank, added up over the ranks in rank order,
// goes back to every rank.
static int bucket_gather(DistSum *s, Bucket *b, Error *err) {
    int R = s->c->size, me = s->c->rank, mc = b->counts[me];
    float *out = b->x + b->displs[me];
    for (int k = 0; k < mc; k++) out[k] = b->recv[k];
    for (int r = 1; r < R; r++) {
        const float *in = b->recv + (size_t)r * mc;
        for (int k = 0; k < mc; k++) out[k] += in[k];
    }
    MPI_TRY(MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_FLOAT, b->x, b->counts, b->displs, MPI_FLOAT, s->c->gather, &b->req),
            "gradient sum: MPI_Iallgatherv");
    s->st.bytes_sent += (size_t)mc * sizeof(float) * (R - 1);
    b->phase = 1;
    return 0;
}

// Moves the buckets on: all-gathers start in bucket order as their all-to-alls arrive, and finished
// all-gathers are noted. wait: until every bucket is complete.
static int buckets_advance(DistSum *s, int wait, Error *err) {
    while (s->gathering < s->n) {
        Bucket *b = &s->b[s->gathering];
        int done = 0;
        if (bucket_request(s, b, wait, &done, err)) return -1;
        if (!done) break;
        if (bucket_gather(s, b, err)) return -1;
        s->gathering++;
    }
    for (int i = 0; i < s->gathering; i++) {
        Bucket *b = &s->b[i];
        int done = 0;
        if (b->phase == 1 && bucket_request(s, b, wait, &done, err)) return -1;
        if (done) b->phase = 2;
    }
    return 0;
}
#endif

int dist_sum_start(DistSum *s, float *x, size_t n, Error *err) {
    double t0 = now_s();
    if (!s->open) {
        memset(&s->st, 0, sizeof s->st);
        s->st.started_s = t0;
        s->open = 1;
    }
    s->st.buckets++;
    if (s->c->size == 1 || n == 0) return 0;
#ifdef DSV3_MPI
    int R = s->c->size, me = s->c->rank;
    if (n > (size_t)INT_MAX) return err_set(err, "gradient sum: a bucket of %zu floats is too large", n);
    if (s->n == s->cap) {
        int cap = s->cap ? 2 * s->cap : 64;
        Bucket *nb = realloc(s->b, sizeof *nb * cap);
        if (!nb) return err_set(err, "out of memory");
        s->b = nb, s->cap = cap;
    }
    Bucket *b = &s->b[s->n];
    memset(b, 0, sizeof *b);
    b->x = x, b->n = n;
    b->counts = malloc(sizeof(int) * 4 * R);
    if (!b->counts) return err_set(err, "out of memory");
    b->displs = b->counts + R, b->mine_counts = b->displs + R, b->mine_displs = b->mine_counts + R;
    for (int r = 0; r < R; r++) {
        size_t lo = n * r / R, hi = n * (r + 1) / R;
        b->counts[r] = (int)(hi - lo), b->displs[r] = (int)lo;
    }
    int mc = b->counts[me];
    for (int r = 0; r < R; r++) b->mine_counts[r] = mc, b->mine_displs[r] = r * mc;
    b->recv = malloc(sizeof(float) * ((size_t)mc * R + 1));
    if (!b->recv) {
        free(b->counts);
        return err_set(err, "out of memory");
    }
    s->n++;
    MPI_TRY(MPI_Ialltoallv(x, b->counts, b->displs, MPI_FLOAT, b->recv, b->mine_counts, b->mine_displs, MPI_FLOAT,
                           s->c->comm, &b->req),
            "gradient sum: MPI_Ialltoallv");
    s->st.bytes_sent += (n - (size_t)mc) * sizeof(float);
    s->st.busy_s += now_s() - t0;
    return dist_sum_progress(s, err);
#else
    (void)x, (void)err;
    return 0;
#endif
}

int dist_sum_progress(DistSum *s, Error *err) {
#ifdef DSV3_MPI
    double t0 = now_s();
    int rc = buckets_advance(s, 0, err);
    s->st.busy_s += now_s() - t0;
    if (rc) return -1;
#else
    (void)s, (void)err;
#endif
    return 0;
}

int dist_sum_wait(DistSum *s, DistSumStats *st, Error *err) {
    int rc = 0;
#ifdef DSV3_MPI
    double t0 = now_s();
    rc = buckets_advance(s, 1, err);
    s->st.busy_s += now_s() - t0;
#else
    (void)err;
#endif
    if (st) *st = s->st;
    round_reset(s);
    return rc;
}
