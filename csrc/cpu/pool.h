/* A small thread pool for the CPU kernels: one job at a time; each thread claims the tasks of its
 * own contiguous share one by one, then helps with the others' from their ends (pool.c).
 *
 * Why not OpenMP: libgomp's workers spin ~300k iterations after every parallel region
 * (its default wait), so on a machine whose cores other processes hold, dozens of short
 * regions per decoded token each stall on a descheduled thread. Here the caller runs
 * tasks too, tasks are claimed dynamically (a thread that starts late finds its share
 * taken by the others and costs nothing), idle threads spin a bounded time and then sleep
 * on a futex, and the caller sleeps too when it has waited past the bound (so a preempted
 * worker can be moved to its core). A job that waited milliseconds on a descheduled thread sends the next ones
 * to the caller alone for a while (pool.c: the stall back-off). */
#ifndef SMOLLM3_CPU_POOL_H
#define SMOLLM3_CPU_POOL_H

#include <stdint.h>

#define POOL_MAX_THREADS 64

typedef void (*pool_task_fn)(void *ctx, int task);

/* Run fn(ctx, t) for t in [0, n_tasks) on up to n_threads threads (the caller included);
 * returns when every task has finished. Not reentrant: one job at a time per process. */
void pool_run(int n_threads, int n_tasks, pool_task_fn fn, void *ctx);

typedef struct {
    uint64_t parallel_jobs, solo_jobs, stalls;   /* since the process started */
    uint64_t wait_ns;                            /* the caller's waits for other threads' tasks */
} pool_stats;
pool_stats pool_get_stats(void);

/* How long an idle thread spins before it sleeps, in microseconds. */
void pool_set_spin_us(int spin_us);
int pool_spin_us(void);

#endif
