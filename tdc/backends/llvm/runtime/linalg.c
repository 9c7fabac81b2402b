/* tdc runtime: matrix products (linear, matmul) through OpenBLAS. */
#include "internal.h"

#ifndef TDC_TEMPLATE
#define TDC_SELF "linalg.c"
#include "instantiate.h"

#else /* the template: T, SFX(name), GEMM, GEMV */

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
    GEMM(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
         (blasint)M, (blasint)N, (blasint)K, (T)1, A, (blasint)lda, B, (blasint)ldb, beta, C, (blasint)ldc);
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
