/* Matrix-vector products in C: OpenBLAS's gemm and gemv against the runtime's product
 * (tdc_linear_f32 / tdc_matmul_f32) and two vectorised C loops, float32, one BLAS thread.
 * Built and run by gemv_c.py with the runtime's flags; prints median microseconds. */
#define _POSIX_C_SOURCE 200809L
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "tdc_runtime.h"

#ifdef __AVX512F__
#define VB 64
#else
#define VB 32
#endif
typedef float vf __attribute__((vector_size(VB)));
#define L ((int64_t)(VB / sizeof(float)))

/* y = W x, W [n, k]: four rows share each load of x; explicit vector sums because without
 * -ffast-math gcc does not reorder a float reduction. */
static void dot_rows(int64_t n, int64_t k, const float *W, const float *x, float *y)
{
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        vf s[4] = {{0}}, v, xv;
        int64_t c = 0;
        for (; c + L <= k; c += L) {
            memcpy(&xv, x + c, VB);
            for (int r = 0; r < 4; r++) {
                memcpy(&v, W + (i + r) * k + c, VB);
                s[r] += v * xv;
            }
        }
        for (int r = 0; r < 4; r++) {
            float t = 0;
            for (int l = 0; l < L; l++) t += s[r][l];
            for (int64_t cc = c; cc < k; cc++) t += W[(i + r) * k + cc] * x[cc];
            y[i + r] = t;
        }
    }
    for (; i < n; i++) {
        float t = 0;
        for (int64_t c = 0; c < k; c++) t += W[i * k + c] * x[c];
        y[i] = t;
    }
}

/* y = x B, B [k, n]: rows of B scaled and added; gcc vectorises the inner loop. */
static void axpy_rows(int64_t k, int64_t n, const float *x, const float *B, float *y)
{
    for (int64_t j = 0; j < n; j++) y[j] = 0;
    for (int64_t c = 0; c < k; c++)
        for (int64_t j = 0; j < n; j++) y[j] += x[c] * B[c * n + j];
}

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
static int cmp(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return (x > y) - (x < y); }

#define REPS 1001
#define TIME(label, stmt) do { \
        double ts[REPS]; \
        for (int r = 0; r < 100; r++) { stmt; } \
        for (int r = 0; r < REPS; r++) { double t0 = now(); stmt; ts[r] = now() - t0; } \
        qsort(ts, REPS, sizeof(double), cmp); \
        printf("  %-30s %8.2f us\n", label, ts[REPS / 2] * 1e6); \
    } while (0)

static float *rnd(int64_t n)
{
    float *p = malloc(sizeof(float) * n);
    for (int64_t i = 0; i < n; i++) p[i] = rand() / (float)RAND_MAX - 0.5f;
    return p;
}

int main(void)
{
    tdc_runtime_set_threads(1);
    const int64_t shapes[][2] = {{784, 300}, {300, 100}, {100, 10}};
    for (int s = 0; s < 3; s++) {
        int64_t k = shapes[s][0], n = shapes[s][1];
        float *x = rnd(k), *W = rnd(k * n), *y = rnd(n);
        printf("1x%ldx%ld, x @ W.T (linear; W [%ld, %ld])\n", (long)k, (long)n, (long)n, (long)k);
        TIME("cblas_sgemm", scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, 1, n, k, 1, x, k, W, k, 0, y, n));
        TIME("cblas_sgemv", scipy_cblas_sgemv(CblasRowMajor, CblasNoTrans, n, k, 1, W, k, x, 1, 0, y, 1));
        TIME("tdc_linear_f32", tdc_linear_f32(x, W, NULL, 0, y, 1, k, n));
        TIME("C loop, 4 rows per x load", dot_rows(n, k, W, x, y));
        printf("1x%ldx%ld, x @ W (matmul, input gradient; W [%ld, %ld])\n", (long)k, (long)n, (long)k, (long)n);
        TIME("cblas_sgemm", scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, 1, n, k, 1, x, k, W, n, 0, y, n));
        TIME("cblas_sgemv", scipy_cblas_sgemv(CblasRowMajor, CblasTrans, k, n, 1, W, n, x, 1, 0, y, 1));
        TIME("tdc_matmul_f32", tdc_matmul_f32(x, W, y, 1, k, n));
        TIME("C loop, rows of W added", axpy_rows(k, n, x, W, y));
        free(x); free(W); free(y);
    }
    return 0;
}
