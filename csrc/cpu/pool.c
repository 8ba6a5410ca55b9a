/* The thread pool of pool.h (Linux: futex; the extension is built for Linux x86-64 only). */
#define _GNU_SOURCE
#include "pool.h"

#include <immintrin.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static _Atomic uint32_t job_gen;      /* bumped once per job; the workers' futex word */
static _Atomic uint64_t job_next;     /* (generation << 32) | next unclaimed task */
static _Atomic uint32_t job_done;     /* tasks finished; the caller's futex word */
static _Atomic int sleepers;          /* workers asleep on job_gen */
static _Atomic int caller_sleeping;
static pool_task_fn job_fn;
static void *job_ctx;
static uint32_t job_tasks;
static int job_threads;               /* workers 1 .. job_threads - 1 take part */
static _Atomic int spin_ns = 50000;
static int n_started;                 /* worker threads running (ids 1 .. n_started) */
static pthread_mutex_t busy = PTHREAD_MUTEX_INITIALIZER;

/* Stall back-off. A wait this long for another thread's task means that thread was
 * descheduled (other processes hold the cores), not that a task ran long. Each stall sends
 * the following jobs to the caller alone for a back-off that doubles per stall (up to
 * BACKOFF_MAX_NS) and halves per job that ran in parallel without one: a busy machine runs
 * on the caller with a parallel probe now and then, a free one in parallel. */
#define STALL_NS 500000u
#define BACKOFF_MIN_NS 2000000u
#define BACKOFF_MAX_NS 256000000u
static uint64_t backoff_ns, solo_until_ns;
static pool_stats stats;

void pool_set_spin_us(int us) { atomic_store(&spin_ns, us < 0 ? 0 : us * 1000); }
int pool_spin_us(void) { return atomic_load(&spin_ns) / 1000; }

static long futex(_Atomic uint32_t *addr, int op, uint32_t val) {
    return syscall(SYS_futex, addr, op, val, NULL, NULL, 0);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Spin until *word != seen or the spin budget is spent; returns whether it changed. */
static int spin_while_equal(_Atomic uint32_t *word, uint32_t seen) {
    uint64_t budget = (uint64_t)atomic_load(&spin_ns), start = 0;
    for (uint32_t i = 1;; i++) {
        if (atomic_load(word) != seen) return 1;
        if ((i & 63) == 0) {
            uint64_t t = now_ns();
            if (start == 0) start = t;
            else if (t - start >= budget) return 0;
        }
        _mm_pause();
    }
}

/* Claim and run tasks of job `gen` until none is left. A successful claim proves the job
 * is still current: the caller publishes the next job only after every task is done. */
static int run_tasks(uint32_t gen) {
    for (int ran = 0;; ran++) {
        uint64_t cur = atomic_load(&job_next);
        if ((uint32_t)(cur >> 32) != gen || (uint32_t)cur >= job_tasks) return ran;
        if (!atomic_compare_exchange_weak(&job_next, &cur, cur + 1)) {
            ran--;
            continue;
        }
        job_fn(job_ctx, (int)(uint32_t)cur);
        if (atomic_fetch_add(&job_done, 1) + 1 == job_tasks && atomic_load(&caller_sleeping))
            futex(&job_done, FUTEX_WAKE_PRIVATE, 1);
    }
}

static void *worker(void *arg) {
    int id = (int)(intptr_t)arg;
    uint32_t seen = atomic_load(&job_gen);
    for (;;) {
        if (!spin_while_equal(&job_gen, seen)) {
            atomic_fetch_add(&sleepers, 1);
            while (atomic_load(&job_gen) == seen) futex(&job_gen, FUTEX_WAIT_PRIVATE, seen);
            atomic_fetch_sub(&sleepers, 1);
        }
        seen = atomic_load(&job_gen);
        if (id < job_threads) run_tasks(seen);   /* a stale job_threads only sends it back to wait */
    }
    return NULL;
}

/* A forked child has none of the parent's workers. */
static void forget_workers(void) {
    n_started = 0;
    atomic_store(&sleepers, 0);
    pthread_mutex_init(&busy, NULL);
}

static void start_workers(int n) {
    static int registered;
    if (!registered) {
        pthread_atfork(NULL, NULL, forget_workers);
        registered = 1;
    }
    while (n_started < n && n_started < POOL_MAX_THREADS - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&t, &attr, worker, (void *)(intptr_t)(n_started + 1));
        pthread_attr_destroy(&attr);
        if (failed) break;       /* fewer threads: the caller runs what they would have */
        n_started++;
    }
}

pool_stats pool_get_stats(void) { return stats; }

void pool_run(int n_threads, int n_tasks, pool_task_fn fn, void *ctx) {
    /* One thread, one task, or another thread's job in flight: run here, in order. */
    if (n_threads <= 1 || n_tasks <= 1 || pthread_mutex_trylock(&busy) != 0) {
        for (int t = 0; t < n_tasks; t++) fn(ctx, t);
        return;
    }
    if (solo_until_ns && now_ns() < solo_until_ns) {        /* backing off after a stall */
        stats.solo_jobs++;
        pthread_mutex_unlock(&busy);
        for (int t = 0; t < n_tasks; t++) fn(ctx, t);
        return;
    }
    stats.parallel_jobs++;
    start_workers(n_threads - 1);
    job_fn = fn;
    job_ctx = ctx;
    job_tasks = (uint32_t)n_tasks;
    job_threads = n_threads;
    atomic_store(&job_done, 0);
    uint32_t gen = atomic_load(&job_gen) + 1;
    atomic_store(&job_next, (uint64_t)gen << 32);
    atomic_store(&job_gen, gen);
    if (atomic_load(&sleepers) > 0) futex(&job_gen, FUTEX_WAKE_PRIVATE, INT_MAX);
    uint64_t start = now_ns();
    int ran = run_tasks(gen);
    uint64_t own_done = now_ns();
    /* Wait for tasks other threads hold: spin while they progress, sleep once the budget
     * passes with none finishing (the last one to finish wakes the caller). */
    for (;;) {
        uint32_t done = atomic_load(&job_done);
        if (done == job_tasks) break;
        if (spin_while_equal(&job_done, done)) continue;
        atomic_store(&caller_sleeping, 1);
        while ((done = atomic_load(&job_done)) != job_tasks) futex(&job_done, FUTEX_WAIT_PRIVATE, done);
        atomic_store(&caller_sleeping, 0);
    }
    uint64_t end = now_ns();
    stats.wait_ns += end - own_done;
    /* a stall: past STALL_NS and past 4 of the caller's own tasks (long tasks of a big matmul
     * can keep a healthy thread that long) */
    if (end - own_done > STALL_NS && (ran == 0 || end - own_done > 4 * (own_done - start) / ran)) {
        stats.stalls++;
        backoff_ns = backoff_ns ? (backoff_ns * 2 < BACKOFF_MAX_NS ? backoff_ns * 2 : BACKOFF_MAX_NS) : BACKOFF_MIN_NS;
        solo_until_ns = end + backoff_ns;
    } else {
        backoff_ns = backoff_ns / 2 >= BACKOFF_MIN_NS ? backoff_ns / 2 : 0;
        solo_until_ns = 0;
    }
    pthread_mutex_unlock(&busy);
}
