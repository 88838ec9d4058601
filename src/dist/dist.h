// The processes of a run and what they say to each other (MPI; the only file that includes mpi.h
// is dist/comm.c). A build without MPI, or a process not started by mpirun, is a world of one
// process and every operation here is then a local no-op, so callers never branch on MPI.
//
// Collectives are deterministic: a sum is added up in rank order (rank 0's value, + rank 1's, ...)
// by one rank and the result sent to the others, so every rank holds the same bits and a run gives
// the same bits every time on the same world size.
#ifndef DSV3_DIST_DIST_H
#define DSV3_DIST_DIST_H

#include <stddef.h>

#include "base/error.h"

typedef struct DistComm DistComm;  // a group of processes (MPI communicator)

// Starts MPI when the process was launched by an MPI launcher (mpirun, mpiexec: its rank is in the
// environment) and the build has MPI; otherwise a world of one. Sets the OpenMP thread count to
// the cores this process may use divided by the ranks on its node when OMP_NUM_THREADS is not set,
// so ranks sharing a machine do not oversubscribe it. Idempotent.
int dist_init(Error *err);
// Ends MPI (after every rank reached it).
void dist_finalize(void);
// Ends every process of the run with exit code `code` (after a failure only one rank saw).
void dist_abort(int code) __attribute__((noreturn));
// Whether this build can run on more than one process.
int dist_have_mpi(void);

// All processes of the run; this process's rank in it and its size.
DistComm *dist_world(void);
int dist_rank(const DistComm *c);
int dist_size(const DistComm *c);
// The processes of the world that share this process's machine (MPI's shared-memory split).
int dist_local_size(void);

// Splits c: the ranks passing the same color form one group, ordered by key. Collective over c.
int dist_split(DistComm *c, int color, int key, DistComm **out, Error *err);
void dist_comm_free(DistComm *c);

// Status agreement, collective over c: every rank passes its own rc (0 or -1); returns -1 on every
// rank when any failed, and *first_failed (may be NULL) is the lowest failed rank (-1: none). The
// way ranks leave together: the first failed rank reports its error, the others stay quiet.
int dist_agree(DistComm *c, int rc, int *first_failed);
// Sums over the ranks of c, in place; every rank gets the same values.
int dist_sum_f64(DistComm *c, double *x, int n, Error *err);
int dist_sum_i64(DistComm *c, long long *x, int n, Error *err);
int dist_max_f64(DistComm *c, double *x, int n, Error *err);
// Every rank's n bytes (the same n everywhere) into root's recv (size × n bytes, in rank order).
int dist_gather(DistComm *c, const void *send, size_t n, void *recv, int root, Error *err);

// The all-to-all of one int per rank (send[r] to rank r,
// recv[r] from rank r).
int dist_alltoall_int(DistComm *c, const int *send, int *recv, Error *err);
// The all-to-all of variable blocks: send_counts[r] elements of elem_bytes each from send (blocks in
// rank order) to rank r, recv_counts[r] from rank r into recv (in rank order).
int dist_alltoallv(DistComm *c, const void *send, const int *send_counts, void *recv, const int *recv_counts,
                   size_t elem_bytes, Error *err);

// The same, nonblocking: started, then tested (MPI moves it on inside the calls) until it is done,
// or waited for. The buffers and counts must stay untouched until then. Exchanges on one
// communicator must be started in the same order on every rank.
typedef struct DistExchange {
    void *req;           // the MPI request (NULL: complete)
    int *counts;         // (4 × size) byte counts and displacements, owned
    double started_s;    // when it started, and when this rank saw it complete
    double done_s;
} DistExchange;
int dist_alltoallv_start(DistComm *c, const void *send, const int *send_counts, void *recv, const int *recv_counts,
                         size_t elem_bytes, DistExchange *x, Error *err);
// *done: whether x completed (it stays complete).
int dist_exchange_test(DistExchange *x, int *done, Error *err);
int dist_exchange_wait(DistExchange *x, Error *err);

// Nonblocking sums of float buffers (gradient buckets) over the ranks of a communicator, started
// as their values become final and completed together: each bucket is cut into one chunk per rank,
// each rank adds up its chunk over the ranks in rank order (an all-to-all of the chunks) and hands
// the result back to every rank (an all-gather). MPI moves data only inside MPI calls, so the
// caller calls dist_sum_progress between pieces of its own work to keep the exchanges moving.
typedef struct DistSum DistSum;

typedef struct DistSumStats {
    double started_s;   // the first start of the round (monotonic seconds)
    double wait_s;      // time spent blocked in dist_sum_wait: the communication not hidden
    double busy_s;      // time inside start / progress / wait (summing chunks included)
    size_t bytes_sent;  // by this rank in the round
    int buckets;
} DistSumStats;

DistSum *dist_sum_new(DistComm *c, Error *err);
void dist_sum_free(DistSum *s);
// Starts summing x[0..n) over the ranks; x must not be touched until dist_sum_wait returns, and
// every rank starts the same buckets (same n) in the same order.
int dist_sum_start(DistSum *s, float *x, size_t n, Error *err);
// Advances the exchanges in flight without blocking.
int dist_sum_progress(DistSum *s, Error *err);
// Completes every started bucket (x then holds the sum on every rank) and ends the round; st (may
// be NULL) gets the round's figures.
int dist_sum_wait(DistSum *s, DistSumStats *st, Error *err);

#endif
