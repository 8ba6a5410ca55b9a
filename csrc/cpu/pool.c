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
static _Atomic uint32_t job_done;     /* tasks finished; the caller's futex word */
static _Atomic int sleepers;          /* workers asleep on job_gen */
static _Atomic int caller_sleeping;
static pool_task_fn job_fn;
static void *job_ctx;
static uint32_t job_tasks;
static _Atomic int job_threads;       /* workers 1 .. job_threads - 1 take part */

/* Each thread's share of a job: a contiguous run of tasks, the word (front << 32) | back of
 * what is left unclaimed, one cache line each. Its thread claims from the front, so the tasks
 * a thread runs are neighbours (a matmul's rows in order: its prefetch ahead lands in rows it
 * will read itself, where tasks dealt round-robin sent the rows past each task's end into the
 * other core's cache); a thread out of work takes from the back of the others' shares, so a
 * descheduled thread's share is still done. The caller writes the words only after job_fn and
 * job_ctx, and a claim succeeds only on the current word, so whatever a thread claims belongs
 * to the job in flight; a finished job leaves every word empty (front == back). */
static struct {
    _Alignas(64) _Atomic uint64_t word;
} shares[POOL_MAX_THREADS];
static _Atomic int spin_ns = 50000;
static int n_started;                 /* worker threads running (ids 1 .. n_started) */
static pthread_mutex_t busy = PTHREAD_MUTEX_INITIALIZER;

/* Stall back-off. A wait this long for another thread's task means that thread was
 * descheduled (other processes hold the cores), not that a task ran long. Each stall (below) sends
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

/* Claims one task of share i: from its front (the owner) or its back (a thread helping). */
static int claim(int i, int from_back) {
    uint64_t cur = atomic_load(&shares[i].word);
    for (;;) {
        uint32_t front = (uint32_t)(cur >> 32), back = (uint32_t)cur;
        if (front >= back) return -1;
        if (atomic_compare_exchange_weak(&shares[i].word, &cur, from_back ? cur - 1 : cur + ((uint64_t)1 << 32)))
            return (int)(from_back ? back - 1 : front);
    }
}

/* Runs the tasks of thread `self`'s share, then helps with the others'. */
static void run_tasks(int self) {
    int n = atomic_load(&job_threads);
    for (int k = 0; k < n; k++) {
        int i = (self + k) % n;
        for (int t; (t = claim(i, k > 0)) >= 0;) {
            job_fn(job_ctx, t);
            if (atomic_fetch_add(&job_done, 1) + 1 == job_tasks && atomic_load(&caller_sleeping))
                futex(&job_done, FUTEX_WAKE_PRIVATE, 1);
        }
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
        if (id < atomic_load(&job_threads)) run_tasks(id);
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
    if (n_threads > n_started + 1) n_threads = n_started + 1;     /* a share per thread that runs */
    job_fn = fn;
    job_ctx = ctx;
    job_tasks = (uint32_t)n_tasks;
    atomic_store(&job_threads, n_threads);
    atomic_store(&job_done, 0);
    for (int i = 0; i < n_threads; i++)     /* even shares: tasks [i n / T, (i + 1) n / T) */
        atomic_store(&shares[i].word, (uint64_t)((int64_t)n_tasks * i / n_threads) << 32 |
                                          (uint64_t)((int64_t)n_tasks * (i + 1) / n_threads));
    atomic_store(&job_gen, atomic_load(&job_gen) + 1);
    if (atomic_load(&sleepers) > 0) futex(&job_gen, FUTEX_WAKE_PRIVATE, INT_MAX);
    uint64_t start = now_ns();
    run_tasks(0);
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
    /* a stall: past STALL_NS and longer than the caller's own part of the job, which is about
     * what the other threads saved it, so the job would have ended sooner on the caller alone.
     * A prompt's big matmul often waits a time slice for a descheduled thread's last task and
     * still gains from it: counted as a stall per 4 of the caller's tasks, a busy 512-row
     * prefill ran a quarter of its jobs alone (SmolLM2-135M, 2 threads, 2 busy neighbours). */
    if (end - own_done > STALL_NS && end - own_done > own_done - start) {
        stats.stalls++;
        backoff_ns = backoff_ns ? (backoff_ns * 2 < BACKOFF_MAX_NS ? backoff_ns * 2 : BACKOFF_MAX_NS) : BACKOFF_MIN_NS;
        solo_until_ns = end + backoff_ns;
    } else {
        backoff_ns = backoff_ns / 2 >= BACKOFF_MIN_NS ? backoff_ns / 2 : 0;
        solo_until_ns = 0;
    }
    pthread_mutex_unlock(&busy);
}
