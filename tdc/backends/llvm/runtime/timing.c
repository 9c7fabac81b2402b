/* tdc runtime: kernels timed in a loop here, for the cost models' calibration (passes/sparsify.py);
 * the profiler's clock; and the host's FMA peak, which the profiler reports fractions of.
 *
 * The MLP's small layers take 0.05-2 us per call, about what one foreign call from Python costs
 * and varies by, so a probe timed call by call through ctypes cannot tell 0.05 us from 0.12 us.
 * Called `reps` times back to back from C, only the kernel is left: each function returns the
 * seconds per call of its kernel on the given arguments. */
#include "internal.h"

#include <pthread.h>
#include <time.h>

static double seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

double tdc_time_linear_f32(const float *x, const float *w, const float *b, int64_t has_bias, float *out,
                           int64_t M, int64_t K, int64_t N, int64_t reps)
{
    const double t0 = seconds();
    for (int64_t r = 0; r < reps; r++)
        tdc_linear_f32(x, w, b, has_bias, out, M, K, N);
    return (seconds() - t0) / (double)max64(reps, 1);
}

double tdc_time_sparse_linear_f32(const float *x, const float *values, const int32_t *cols, const int32_t *rowptr,
                                  const float *b, int64_t has_bias, float *out, int64_t M, int64_t K, int64_t N,
                                  int64_t reps)
{
    const double t0 = seconds();
    for (int64_t r = 0; r < reps; r++)
        tdc_sparse_linear_f32(x, values, cols, rowptr, b, has_bias, out, M, K, N);
    return (seconds() - t0) / (double)max64(reps, 1);
}

/* A profiled program (codegen's profile=True) reads the clock before each kernel and adds the
 * seconds since into that kernel's slot after it. */
double tdc_prof_now(void) { return seconds(); }

void tdc_prof_add(double *slot, double t0) { *slot += seconds() - t0; }

/* The FMA peak of one core: independent accumulators in the widest vectors -march=native gives
 * (enough of them to cover the FMA latency on two ports), so the loop is FMA-throughput bound. */
#if defined(__AVX512F__)
#define PEAK_LANES 16
#elif defined(__AVX__)
#define PEAK_LANES 8
#else
#define PEAK_LANES 4
#endif
typedef float peakvec __attribute__((vector_size(4 * PEAK_LANES)));
#define PEAK_ACC 12

/* -std=c11 does not contract a * b + c into an FMA by default; this loop must */
__attribute__((optimize("fp-contract=fast"))) static double fma_loop(int64_t iters)
{
    peakvec acc[PEAK_ACC], a, b;
    for (int i = 0; i < PEAK_LANES; i++) {
        a[i] = 0.999999f;
        b[i] = 1e-7f;
    }
    for (int j = 0; j < PEAK_ACC; j++)
        acc[j] = b * (float)j;
    for (int64_t it = 0; it < iters; it++)
        for (int j = 0; j < PEAK_ACC; j++)
            acc[j] = acc[j] * a + b;
    double sum = 0;   /* used, so the loop is not removed */
    for (int j = 0; j < PEAK_ACC; j++)
        for (int i = 0; i < PEAK_LANES; i++)
            sum += acc[j][i];
    return sum;
}

typedef struct { int64_t iters; double seconds, sink; } peak_job;

static void *peak_thread(void *arg)
{
    peak_job *job = arg;
    const double t0 = seconds();
    job->sink = fma_loop(job->iters);
    job->seconds = seconds() - t0;
    return NULL;
}

/* GFLOP/s (2 per FMA lane) of `threads` cores each running the loop at once: the slowest sets the rate. */
double tdc_fma_peak_gflops(int64_t threads, int64_t iters)
{
    threads = max64(1, min64(threads, 64));
    pthread_t ids[64];
    peak_job jobs[64];
    for (int64_t t = 0; t < threads; t++) {
        jobs[t].iters = iters;
        if (t > 0 && pthread_create(&ids[t], NULL, peak_thread, &jobs[t]) != 0)
            return -1.0;
    }
    peak_thread(&jobs[0]);
    double slowest = jobs[0].seconds;
    for (int64_t t = 1; t < threads; t++) {
        pthread_join(ids[t], NULL);
        slowest = jobs[t].seconds > slowest ? jobs[t].seconds : slowest;
    }
    return (double)threads * (double)iters * PEAK_ACC * PEAK_LANES * 2.0 / slowest * 1e-9;
}
