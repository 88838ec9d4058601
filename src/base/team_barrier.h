// A barrier for the threads of one parallel region that meet many times in a short step (a decode
// step meets ~10 times per layer). OpenMP's barrier costs 1.4-3 us on the 2-core VMs here
// (libgomp 12: it also runs pending tasks and keeps team state) — 150-250 us of a ~1 ms decode step
// of bench/configs' v3-108m; this one is an arrival counter and a generation number on their own
// cache lines, 0.1-0.5 us (`bench_kernels` prints both; ggml's CPU backend meets its threads the
// same way). Waiters spin, then
// yield the CPU, so that a team larger than the cores it runs on (MPI ranks sharing a machine)
// still moves.
#ifndef DSV3_BASE_TEAM_BARRIER_H
#define DSV3_BASE_TEAM_BARRIER_H

#include <sched.h>
#include <stdatomic.h>

typedef struct TeamBarrier {
    _Alignas(64) atomic_int arrived;  // threads at the current meeting
    _Alignas(64) atomic_int passed;   // meetings completed
} TeamBarrier;

// Spins (a pause is ~19 ns on the Zen 4 VMs here: ~40 us in all, longer than a phase's imbalance) before a
// waiter starts yielding its CPU.
#define TEAM_BARRIER_SPINS 2000

static inline void team_barrier_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

// team_barrier_wait in two halves, for a thread with something to do that needs nobody (requests
// for what it reads after the meeting): arrive — the last one in lets everyone go at once — then
// await the meeting's end with what arrive returned (wait 0: the last one in, or a team of one).
typedef struct TeamTicket {
    int gen, wait;
} TeamTicket;

static inline TeamTicket team_barrier_arrive(TeamBarrier *b, int nthreads) {
    if (nthreads <= 1) return (TeamTicket){0, 0};
    int gen = atomic_load(&b->passed);
    if (atomic_fetch_add(&b->arrived, 1) == nthreads - 1) {
        atomic_store(&b->arrived, 0);
        atomic_fetch_add(&b->passed, 1);
        return (TeamTicket){gen, 0};
    }
    return (TeamTicket){gen, 1};
}

static inline void team_barrier_await(TeamBarrier *b, TeamTicket t) {
    for (long spins = 0; t.wait && atomic_load(&b->passed) == t.gen; spins++) {
        if (spins < TEAM_BARRIER_SPINS) team_barrier_pause();
        else sched_yield();
    }
}

// Every one of the team's nthreads threads calls it; none returns before all have called it, and
// each then sees every write the others made before calling (sequentially consistent atomics).
static inline void team_barrier_wait(TeamBarrier *b, int nthreads) {
    team_barrier_await(b, team_barrier_arrive(b, nthreads));
}

// Meetings completed so far: the same number on every thread between two meetings, so a phase can
// name a flag's value by it.
static inline int team_barrier_passed(TeamBarrier *b) { return atomic_load(&b->passed); }

// One thread's signal to the others that something it wrote is ready (a meeting that only some wait
// for): raised with a value, waited for until it holds that value; the writes before the raise are
// seen by the waiter after its wait (sequentially consistent atomics).
static inline void team_flag_raise(atomic_int *flag, int value) { atomic_store(flag, value); }

static inline void team_flag_wait(atomic_int *flag, int value) {
    for (long spins = 0; atomic_load(flag) != value; spins++) {
        if (spins < TEAM_BARRIER_SPINS) team_barrier_pause();
        else sched_yield();
    }
}

#endif
