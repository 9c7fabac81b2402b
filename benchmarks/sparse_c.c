/* The runtime's CSR product (tdc_sparse_linear_f32) against its dense one (tdc_linear_f32:
 * OpenBLAS sgemm, or sgemv for one row) on the MLP's layers, float32, one thread. Built and run
 * by sparse.py with the runtime's flags. For each layer, batch and sparsity it prints one line
 *   N K M SPARSITY NNZ DENSE_US SPARSE_US
 * of median microseconds per call; dense and sparse calls alternate in rounds, so both see the
 * same machine. Weights are Gaussian with the smallest |w| zeroed (magnitude pruning): an
 * unstructured pattern, each row a random subset of columns. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "tdc_runtime.h"

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
static int cmpd(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return (x > y) - (x < y); }
static int cmpf(const void *a, const void *b) { float x = *(const float *)a, y = *(const float *)b; return (x > y) - (x < y); }

static uint64_t state = 88172645463325252ull;
static double uniform(void) { state ^= state << 13; state ^= state >> 7; state ^= state << 17; return (state >> 11) * 0x1.0p-53; }
static float gauss(void) { return (float)(sqrt(-2 * log(1 - uniform())) * cos(6.283185307179586 * uniform())); }

#define ROUNDS 31

int main(int argc, char **argv)
{
    static const int64_t layers[][2] = {{300, 784}, {100, 300}, {10, 100}};
    static const int64_t batches[] = {1, 64};
    int nsp = argc > 1 ? argc - 1 : 0;
    tdc_runtime_set_threads(1);
    for (int l = 0; l < 3; l++) {
        const int64_t N = layers[l][0], K = layers[l][1];
        float *w = malloc(sizeof(float) * N * K), *mag = malloc(sizeof(float) * N * K), *b = malloc(sizeof(float) * N);
        float *values = malloc(sizeof(float) * N * K);
        int32_t *cols = malloc(sizeof(int32_t) * N * K), *rowptr = malloc(sizeof(int32_t) * (N + 1));
        for (int64_t i = 0; i < N * K; i++) w[i] = gauss();
        for (int64_t i = 0; i < N; i++) b[i] = gauss();
        for (int bi = 0; bi < 2; bi++) {
            const int64_t M = batches[bi];
            float *x = malloc(sizeof(float) * M * K), *out = malloc(sizeof(float) * M * N);
            for (int64_t i = 0; i < M * K; i++) x[i] = gauss();
            for (int s = 0; s < nsp; s++) {
                const double sp = atof(argv[1 + s]);
                for (int64_t i = 0; i < N * K; i++) mag[i] = fabsf(w[i]);
                qsort(mag, N * K, sizeof(float), cmpf);
                const int64_t cut = (int64_t)llround(sp * N * K);
                const float thr = cut > 0 ? mag[cut - 1] : -1;
                int64_t nnz = 0;
                rowptr[0] = 0;
                for (int64_t n = 0; n < N; n++) {
                    for (int64_t k = 0; k < K; k++)
                        if (fabsf(w[n * K + k]) > thr) { values[nnz] = w[n * K + k]; cols[nnz++] = (int32_t)k; }
                    rowptr[n + 1] = (int32_t)nnz;
                }
                /* the dense kernel gets the pruned matrix too: BLAS does the same work either way */
                float *wp = calloc(N * K, sizeof(float));
                for (int64_t n = 0; n < N; n++)
                    for (int64_t j = rowptr[n]; j < rowptr[n + 1]; j++) wp[n * K + cols[j]] = values[j];
                const int iters = (int)fmax(1, fmin(2000, 2e7 / (double)(M * N * K)));
                double td[ROUNDS], ts[ROUNDS];
                for (int r = 0; r < ROUNDS; r++) {
                    double t = now();
                    for (int i = 0; i < iters; i++) tdc_linear_f32(x, wp, b, 1, out, M, K, N);
                    td[r] = (now() - t) / iters;
                    t = now();
                    for (int i = 0; i < iters; i++) tdc_sparse_linear_f32(x, values, cols, rowptr, b, 1, out, M, K, N);
                    ts[r] = (now() - t) / iters;
                }
                qsort(td, ROUNDS, sizeof(double), cmpd);
                qsort(ts, ROUNDS, sizeof(double), cmpd);
                printf("%ld %ld %ld %.4f %ld %.3f %.3f\n", (long)N, (long)K, (long)M, sp, (long)nnz,
                       td[ROUNDS / 2] * 1e6, ts[ROUNDS / 2] * 1e6);
                fflush(stdout);
                free(wp);
            }
            free(x);
            free(out);
        }
        free(w); free(mag); free(b); free(values); free(cols); free(rowptr);
    }
    return 0;
}
