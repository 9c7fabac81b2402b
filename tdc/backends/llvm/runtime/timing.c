/* tdc runtime: kernels timed in a loop here, for the cost models' calibration (passes/sparsify.py).
 *
 * The MLP's small layers take 0.05-2 us per call, about what one foreign call from Python costs
 * and varies by, so a probe timed call by call through ctypes cannot tell 0.05 us from 0.12 us.
 * Called `reps` times back to back from C, only the kernel is left: each function returns the
 * seconds per call of its kernel on the given arguments. */
#include "internal.h"

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
