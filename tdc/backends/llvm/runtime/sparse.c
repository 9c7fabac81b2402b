/* tdc runtime: sparse_linear, a dense x times a CSR weight (pruned layers).
 *
 * out[M,N] = x[M,K] @ W^T (+ b) with W [N,K] in CSR (values, cols, rowptr; int32 indices). The
 * CSR arrays were checked when the executable bound them (tdc/ops/sparse.py: check_csr), so the
 * kernels index without bounds checks.
 *
 * Without -ffast-math gcc never reorders a floating sum, so a plain `acc += v[j] * x[c[j]]` runs
 * at one FMA latency per nonzero. Both kernels below make the independent lanes explicit instead:
 *   - one row of x (M small): each output row's nonzeros are summed in LANES partial sums, so gcc
 *     vectorises the loop with gathers of x; the lanes are added at the end of the row;
 *   - a batch: x is transposed block by block into xt [K, MB] (MB rows of x side by side), and a
 *     nonzero (n, k) adds v * xt[k, 0:MB] to the MB accumulators of row n: contiguous loads, one
 *     broadcast, MB / (vector width) independent FMAs per nonzero. Results go to yt [N, MB], then
 *     out. MB is the smallest of 8, 16, 32, 64 that covers the batch (64 for larger batches, in
 *     blocks), so a small batch does not pay for padding. */
#include "internal.h"

#ifndef TDC_TEMPLATE
#define LANES 16
#define TDC_SELF "sparse.c"
#include "instantiate.h"

#else /* the template: T, SFX(name) */

static void SFX(csr_rows)(const T *x, const T *values, const int32_t *cols, const int32_t *rowptr,
                          const T *b, int64_t has_bias, T *out, int64_t N)
{
    for (int64_t n = 0; n < N; n++) {
        const int64_t lo = rowptr[n], hi = rowptr[n + 1];
        T part[LANES] = {0};
        int64_t j = lo;
        for (; j + LANES <= hi; j += LANES)
            for (int i = 0; i < LANES; i++)
                part[i] += values[j + i] * x[cols[j + i]];
        T acc = 0;
        for (; j < hi; j++)
            acc += values[j] * x[cols[j]];
        for (int i = 0; i < LANES; i++)
            acc += part[i];
        out[n] = has_bias ? acc + b[n] : acc;
    }
}

/* One block of mb <= MB rows of x starting at row m0: xt and yt are scratch of K * MB and N * MB. */
#define BLOCK_KERNEL(MB)                                                                              \
static void SFX(csr_block##MB)(const T *x, const T *values, const int32_t *cols, const int32_t *rowptr, \
                               const T *b, int64_t has_bias, T *out, int64_t mb, int64_t K, int64_t N, \
                               T *xt, T *yt)                                                           \
{                                                                                                     \
    for (int64_t k = 0; k < K; k++) {                                                                 \
        T *row = xt + k * MB;                                                                         \
        for (int64_t i = 0; i < mb; i++)                                                              \
            row[i] = x[i * K + k];                                                                    \
        for (int64_t i = mb; i < MB; i++)                                                             \
            row[i] = 0;                                                                               \
    }                                                                                                 \
    for (int64_t n = 0; n < N; n++) {                                                                 \
        T acc[MB] = {0};                                                                              \
        for (int64_t j = rowptr[n]; j < rowptr[n + 1]; j++) {                                         \
            const T v = values[j];                                                                    \
            const T *r = xt + (int64_t)cols[j] * MB;                                                  \
            for (int i = 0; i < MB; i++)                                                              \
                acc[i] += v * r[i];                                                                   \
        }                                                                                             \
        const T bn = has_bias ? b[n] : 0;                                                             \
        for (int i = 0; i < MB; i++)                                                                  \
            yt[n * MB + i] = acc[i] + bn;                                                             \
    }                                                                                                 \
    for (int64_t i = 0; i < mb; i++)                                                                  \
        for (int64_t n = 0; n < N; n++)                                                               \
            out[i * N + n] = yt[n * MB + i];                                                          \
}
BLOCK_KERNEL(8)
BLOCK_KERNEL(16)
BLOCK_KERNEL(32)
BLOCK_KERNEL(64)

void SFX(tdc_sparse_linear)(const T *x, const T *values, const int32_t *cols, const int32_t *rowptr,
                            const T *b, int64_t has_bias, T *out, int64_t M, int64_t K, int64_t N)
{
    if (M <= 0 || N <= 0)
        return;
    if (M < 4) {   /* a gather per nonzero and row beats padding a block of 8 */
        for (int64_t m = 0; m < M; m++)
            SFX(csr_rows)(x + m * K, values, cols, rowptr, b, has_bias, out + m * N, N);
        return;
    }
    const int64_t mb = M <= 8 ? 8 : M <= 16 ? 16 : M <= 32 ? 32 : 64;
    T *xt = tdcrt_malloc((max64(K, 1) + N) * mb * (int64_t)sizeof(T));
    T *yt = xt + max64(K, 1) * mb;
    for (int64_t m0 = 0; m0 < M; m0 += mb) {
        const int64_t rows = min64(mb, M - m0);
        const T *xb = x + m0 * K;
        T *ob = out + m0 * N;
        switch (mb) {
        case 8: SFX(csr_block8)(xb, values, cols, rowptr, b, has_bias, ob, rows, K, N, xt, yt); break;
        case 16: SFX(csr_block16)(xb, values, cols, rowptr, b, has_bias, ob, rows, K, N, xt, yt); break;
        case 32: SFX(csr_block32)(xb, values, cols, rowptr, b, has_bias, ob, rows, K, N, xt, yt); break;
        default: SFX(csr_block64)(xb, values, cols, rowptr, b, has_bias, ob, rows, K, N, xt, yt); break;
        }
    }
    free(xt);
}

#undef BLOCK_KERNEL
#endif
