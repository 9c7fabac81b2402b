/* tdc runtime: matrix products (linear, matmul) through OpenBLAS. */
#include "internal.h"

#ifndef TDC_TEMPLATE
/* Products of GEMM_SPLIT_FLOPS or more are split over the thread pool, the larger of C's row
 * and column counts cut in blocks of GEMM_SPLIT_ALIGN (BLAS's own threads stay at one: on 2
 * vCPUs they spun against the pool's). Below it, waking the other thread costs more than it saves. */
#define GEMM_SPLIT_FLOPS 2e7
#define GEMM_SPLIT_ALIGN 16
#define TDC_SELF "linalg.c"
#include "instantiate.h"

#else /* the template: T, SFX(name), GEMM, GEMV */

typedef struct {
    int ta, tb;
    int64_t M, N, K;
    const T *A;
    int64_t lda;
    const T *B;
    int64_t ldb;
    T beta;
    T *C;
    int64_t ldc;
    int by_columns;
} SFX(gemm_job);

/* Blocks [b, e) of GEMM_SPLIT_ALIGN columns (or rows) of C: each thread's own single-threaded
 * BLAS call on its slice of B (or A), so every output sums its K products in BLAS's order for
 * that shape, as one call would up to BLAS's own blocking of the slice. */
static void SFX(gemm_part)(void *ctx, int64_t b, int64_t e)
{
    const SFX(gemm_job) *j = ctx;
    const int64_t lo = b * GEMM_SPLIT_ALIGN, hi = min64(e * GEMM_SPLIT_ALIGN, j->by_columns ? j->N : j->M);
    if (hi <= lo)
        return;
    const T *A = j->A, *B = j->B;
    T *C = j->C;
    int64_t M = j->M, N = j->N;
    if (j->by_columns) {
        B += j->tb ? lo * j->ldb : lo;
        C += lo;
        N = hi - lo;
    } else {
        A += j->ta ? lo : lo * j->lda;
        C += lo * j->ldc;
        M = hi - lo;
    }
    GEMM(CblasRowMajor, j->ta ? CblasTrans : CblasNoTrans, j->tb ? CblasTrans : CblasNoTrans,
         (blasint)M, (blasint)N, (blasint)j->K, (T)1, A, (blasint)j->lda, B, (blasint)j->ldb, j->beta, C,
         (blasint)j->ldc);
}

/* C[M,N] = op(A) @ op(B) + beta * C, row-major; ta/tb transpose A/B. Empty sizes are
 * handled here (BLAS rejects leading dimensions of 0).
 *
 * A single row or column of C (batch-1 layers, their input gradients, a layer with one output)
 * goes to gemv: OpenBLAS's gemm runs those through its packing GEMM kernels on AVX2-only CPUs
 * (its Haswell and Zen kernels; 1x784x300 took 83 us against 12 us as a gemv); with its
 * SkylakeX kernels (AVX-512) gemm and gemv are about as fast. Vectorised C loops were slower
 * than gemv (benchmarks/gemv_c.py). */
void SFX(tdcrt_gemm)(int ta, int tb, int64_t M, int64_t N, int64_t K, const T *A, int64_t lda,
                        const T *B, int64_t ldb, T beta, T *C, int64_t ldc)
{
    if (M <= 0 || N <= 0)
        return;
    if (K <= 0) {
        for (int64_t i = 0; i < M; i++)
            for (int64_t j = 0; j < N; j++)
                C[i * ldc + j] = beta == 0 ? 0 : beta * C[i * ldc + j];
        return;
    }
    if (M == 1) {   /* C's row = op(B)^T times op(A)'s row, which is strided when A is transposed */
        GEMV(CblasRowMajor, tb ? CblasNoTrans : CblasTrans, (blasint)(tb ? N : K), (blasint)(tb ? K : N), (T)1,
             B, (blasint)ldb, A, (blasint)(ta ? lda : 1), beta, C, 1);
        return;
    }
    if (N == 1) {   /* C's column = op(A) times op(B)'s column, strided unless B is transposed */
        GEMV(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, (blasint)(ta ? K : M), (blasint)(ta ? M : K), (T)1,
             A, (blasint)lda, B, (blasint)(tb ? 1 : ldb), beta, C, (blasint)ldc);
        return;
    }
    const double flops = 2.0 * (double)M * (double)N * (double)K;
    if (flops < GEMM_SPLIT_FLOPS || max64(M, N) < 2 * GEMM_SPLIT_ALIGN) {
        GEMM(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
             (blasint)M, (blasint)N, (blasint)K, (T)1, A, (blasint)lda, B, (blasint)ldb, beta, C, (blasint)ldc);
        return;
    }
    SFX(gemm_job) j = {ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc, N >= M};
    const int64_t split = j.by_columns ? N : M;
    tdcrt_parallel_for((split + GEMM_SPLIT_ALIGN - 1) / GEMM_SPLIT_ALIGN, flops, SFX(gemm_part), &j);
}

/* ---- matrix products ---------------------------------------------------------------- */

void SFX(tdc_linear)(const T *x, const T *w, const T *b, int64_t has_bias, T *out,
                     int64_t M, int64_t K, int64_t N)
{
    SFX(tdcrt_gemm)(0, 1, M, N, K, x, K, w, K, 0, out, N);
    if (has_bias)
        for (int64_t i = 0; i < M; i++)
            for (int64_t j = 0; j < N; j++)
                out[i * N + j] += b[j];
}

void SFX(tdc_matmul)(const T *a, const T *b, T *out, int64_t M, int64_t K, int64_t N)
{
    SFX(tdcrt_gemm)(0, 0, M, N, K, a, K, b, N, 0, out, N);
}

void SFX(tdc_matmul_batched)(const T *a, const T *b, T *out, int64_t B, int64_t M, int64_t K,
                             int64_t N, const int64_t *ia, const int64_t *ib)
{
    for (int64_t i = 0; i < B; i++)
        SFX(tdcrt_gemm)(0, 0, M, N, K, a + ia[i] * M * K, K, b + ib[i] * K * N, N, 0, out + i * M * N, N);
}

#endif
