/* tdc runtime: what the kernel families (one .c file per family of tdc/ops) share.
 *
 * Each family file is its own template: its first part (TDC_TEMPLATE undefined) holds the
 * dtype-independent helpers, then instantiate.h includes the file twice with T, SFX, GEMM and GEMV
 * defined, once for float (_f32) and once for double (_f64). Read the template part as if T
 * were float.
 *
 * Scratch memory (conv's column and result matrices) is malloc'ed once per call and freed
 * before returning, so no state is shared between calls or threads. The batch is cut into
 * chunks of images whose column matrices sit side by side (one larger GEMM per group and
 * chunk, which BLAS runs far better than one small GEMM per image); a chunk holds as many
 * images as fit in SCRATCH_BYTES, at least one.
 *
 * Build: every .c but main.c with gcc -O3 -march=native -fPIC -Wall -Wextra -std=c11
 * -I<openblas include>, then one relocatable object (tdc/backends/llvm/runtime.py does this).
 * Never build with -ffast-math: the kernels rely on NaN comparisons.
 *
 * Functions shared between families are named tdcrt_* and hidden from the shared library. */
#ifndef TDC_INTERNAL_H
#define TDC_INTERNAL_H

#define _POSIX_C_SOURCE 200809L   /* pthreads and sysconf under -std=c11 */
#include "tdc_runtime.h"

#include <cblas.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HIDDEN __attribute__((visibility("hidden")))
#define SCRATCH_BYTES ((int64_t)8 << 20)

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* malloc that ends the process with a message when memory runs out (common.c). */
HIDDEN void *tdcrt_malloc(int64_t bytes);

/* fn(ctx, begin, end) over contiguous parts of [0, n), one per thread of the runtime's pool,
 * when `work` (about the flops) pays for waking the threads (common.c). */
typedef void (*range_fn)(void *ctx, int64_t begin, int64_t end);
HIDDEN void tdcrt_parallel_for(int64_t n, double work, range_fn fn, void *ctx);

/* The pool's threads (the caller included) if `work` pays for waking them and the pool is free
 * now, else 1: how many partial results a reduction over the pool should keep (common.c). */
HIDDEN int tdcrt_parallel_parts(double work);

/* Images per chunk: the column matrix [K, nb * P] stays within SCRATCH_BYTES and the GEMM's
 * column count within a BLAS int (common.c). */
HIDDEN int64_t tdcrt_chunk_images(int64_t N, int64_t K, int64_t P, int64_t elem);

/* C[M,N] = op(A) @ op(B) + beta * C, row-major; ta/tb transpose A/B; empty sizes allowed (linalg.c). */
HIDDEN void tdcrt_gemm_f32(int ta, int tb, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                           const float *B, int64_t ldb, float beta, float *C, int64_t ldc);
HIDDEN void tdcrt_gemm_f64(int ta, int tb, int64_t M, int64_t N, int64_t K, const double *A, int64_t lda,
                           const double *B, int64_t ldb, double beta, double *C, int64_t ldc);

/* The outputs o in [*lo, *hi) of n whose tap o * s + off lies in [0, size). */
static inline void valid_range(int64_t off, int64_t s, int64_t size, int64_t n, int64_t *lo, int64_t *hi)
{
    int64_t a = off >= 0 ? 0 : (-off + s - 1) / s;
    int64_t b = size - off <= 0 ? 0 : (size - off + s - 1) / s;
    a = min64(a, n);
    *lo = a;
    *hi = max64(a, min64(b, n));
}

/* Signed integer i of an array of `bytes`-wide integers; *ok = 0 for an unsupported width. */
static inline int64_t load_int(const void *p, int64_t bytes, int64_t i, int *ok)
{
    switch (bytes) {
    case 1: return ((const int8_t *)p)[i];
    case 2: return ((const int16_t *)p)[i];
    case 4: return ((const int32_t *)p)[i];
    case 8: return ((const int64_t *)p)[i];
    default: *ok = 0; return 0;
    }
}

/* Convolution geometry, shared by the three conv kernels. */
typedef struct {
    int64_t N, C, H, W, CO, KH, KW, OH, OW, sh, sw, pt, pl, dh, dw, groups;
} conv_geo;
#define CONV_GEO {N, C, H, W, CO, KH, KW, OH, OW, sh, sw, pt, pl, dh, dw, groups}

/* A weight gradient split over the pool by images: part p of `parts` sums the gradient of images
 * [N p / parts, N (p+1) / parts) into dwt (p = 0) or partials + (p - 1) * CO * cg * KH * KW; the
 * arrays have the dtype of the kernel that fills them. */
typedef struct {
    conv_geo g;
    const void *x, *gy;
    void *dwt, *partials;
    int64_t parts;
} grad_weight_job;

/* dwt = the weight gradient of g's convolution, part_fn(job, p_begin, p_end) summing parts over
 * the pool, then the partials added to dwt in part order: the result depends on the thread count,
 * not the timing (conv_im2col.c). */
HIDDEN void tdcrt_grad_weight_by_parts_f32(const conv_geo *g, const float *x, const float *gy, float *dwt,
                                           range_fn part_fn);
HIDDEN void tdcrt_grad_weight_by_parts_f64(const conv_geo *g, const double *x, const double *gy, double *dwt,
                                           range_fn part_fn);

/* cols[(c*KH + i)*KW + j, y*OW + x] = x_img[c, y*sh - pt + i*dh, x*sw - pl + j*dw], 0 in the
 * padding; x_img is [cg, H, W] and ld the row stride of cols (conv_im2col.c; sparse.c's conv too). */
HIDDEN void tdcrt_im2col_f32(const conv_geo *g, const float *x_img, int64_t cg, float *cols, int64_t ld);
HIDDEN void tdcrt_im2col_f64(const conv_geo *g, const double *x_img, int64_t cg, double *cols, int64_t ld);

#endif
