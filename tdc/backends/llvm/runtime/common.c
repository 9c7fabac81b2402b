/* tdc runtime: what every family uses: memory, the thread pool, image chunks. */
#include "internal.h"

#include <pthread.h>
#include <unistd.h>

void *tdcrt_malloc(int64_t bytes)
{
    void *p = malloc(bytes > 0 ? (size_t)bytes : 1);
    if (!p) {
        fprintf(stderr, "tdc runtime: out of memory allocating %lld bytes\n", (long long)bytes);
        abort();
    }
    return p;
}

/* ---- threads ----------------------------------------------------------------------------
 * A pool of worker threads that sleep on a condition variable between calls (never spin: two
 * spinning pools on 2 vCPUs cost milliseconds per call here). tdcrt_parallel_for(n, work, fn, ctx)
 * runs fn(ctx, begin, end) on contiguous parts of [0, n), one per thread, the caller taking
 * part 0. Threads: TDC_THREADS, else the online CPUs (tdc_runtime_set_threads sets BLAS's).
 * Several threads may run steps at once (Hogwild): one of them has the pool, the others run
 * their loops alone, which is what keeps every core busy then anyway. */

#define MAX_THREADS 64
static pthread_mutex_t pool_owner = PTHREAD_MUTEX_INITIALIZER;   /* held by the caller using the pool */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t wake, done;
    int threads;              /* including the caller; 0: not started */
    uint64_t generation;      /* bumped per call: each worker runs once per generation */
    int pending;
    range_fn fn;
    void *ctx;
    int64_t n;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, NULL, NULL, 0};

static void part(int64_t n, int t, int parts, int64_t *b, int64_t *e)
{
    *b = n * t / parts;
    *e = n * (t + 1) / parts;
}

static void *pool_worker(void *arg)
{
    const int t = (int)(intptr_t)arg;
    uint64_t seen = 0;
    pthread_mutex_lock(&pool.mu);
    for (;;) {
        while (pool.generation == seen)
            pthread_cond_wait(&pool.wake, &pool.mu);
        seen = pool.generation;
        range_fn fn = pool.fn;
        void *ctx = pool.ctx;
        int64_t b, e;
        part(pool.n, t, pool.threads, &b, &e);
        pthread_mutex_unlock(&pool.mu);
        if (b < e)
            fn(ctx, b, e);
        pthread_mutex_lock(&pool.mu);
        if (--pool.pending == 0)
            pthread_cond_signal(&pool.done);
    }
    return NULL;
}

static int pool_threads(void)   /* called with pool_owner held */
{
    if (pool.threads == 0) {
        const char *s = getenv("TDC_THREADS");
        long n = s ? strtol(s, NULL, 10) : sysconf(_SC_NPROCESSORS_ONLN);
        n = n < 1 ? 1 : (n > MAX_THREADS ? MAX_THREADS : n);
        int started = 1;
        for (int t = 1; t < n; t++) {
            pthread_t th;
            if (pthread_create(&th, NULL, pool_worker, (void *)(intptr_t)t) != 0)
                break;
            pthread_detach(th);
            started++;
        }
        pool.threads = started;
    }
    return pool.threads;
}

int tdcrt_parallel_parts(double work)
{
    if (work < 2e6 || pthread_mutex_trylock(&pool_owner) != 0)
        return 1;
    const int t = pool_threads();
    pthread_mutex_unlock(&pool_owner);
    return t;
}

/* fn over [0, n) on the pool, when `work` (about the flops) pays for waking the threads and the
   pool is free. */
void tdcrt_parallel_for(int64_t n, double work, range_fn fn, void *ctx)
{
    if (n <= 1 || work < 2e6 || pthread_mutex_trylock(&pool_owner) != 0) {
        fn(ctx, 0, n);
        return;
    }
    if (pool_threads() == 1) {
        pthread_mutex_unlock(&pool_owner);
        fn(ctx, 0, n);
        return;
    }
    pthread_mutex_lock(&pool.mu);
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n = n;
    pool.pending = pool.threads - 1;
    pool.generation++;
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    int64_t b, e;
    part(n, 0, pool.threads, &b, &e);
    fn(ctx, b, e);
    pthread_mutex_lock(&pool.mu);
    while (pool.pending > 0)
        pthread_cond_wait(&pool.done, &pool.mu);
    pthread_mutex_unlock(&pool.mu);
    pthread_mutex_unlock(&pool_owner);
}

/* Images per chunk: the column matrix [K, nb * P] stays within SCRATCH_BYTES and the
 * GEMM's column count within a BLAS int. */
int64_t tdcrt_chunk_images(int64_t N, int64_t K, int64_t P, int64_t elem)
{
    int64_t per_image = max64(1, K * P * elem);
    int64_t nb = max64(1, SCRATCH_BYTES / per_image);
    if (P > 0)
        nb = min64(nb, max64(1, INT_MAX / P));
    return max64(1, min64(nb, N));
}

void tdc_parallel_for(int64_t n, double work, void (*fn)(void *, int64_t, int64_t), void *ctx)
{
    tdcrt_parallel_for(n, work, fn, ctx);
}

void tdc_runtime_set_threads(int64_t n)
{
    scipy_openblas_set_num_threads((int)max64(1, min64(n, INT_MAX)));
}
