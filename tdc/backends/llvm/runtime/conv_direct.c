/* tdc runtime: convolution by direct loop nests, forward and both backward. */
#include "internal.h"

#ifndef TDC_TEMPLATE

/* For each kernel column j: the output columns [xs[2j], xs[2j+1]) whose tap j lies inside the
 * image (the direct kernels' inner loops run over these). Freed by the caller. */
static int64_t *column_ranges(int64_t KW, int64_t W, int64_t OW, int64_t sw, int64_t pl, int64_t dw)
{
    int64_t *xs = tdcrt_malloc(2 * KW * (int64_t)sizeof(int64_t));
    for (int64_t j = 0; j < KW; j++)
        valid_range(j * dw - pl, sw, W, OW, &xs[2 * j], &xs[2 * j + 1]);
    return xs;
}

#define TDC_SELF "conv_direct.c"
#include "instantiate.h"

#else /* the template: T, SFX(name), GEMM */

/* ---- convolution: direct loop nests --------------------------------------------------
 * The plain sums of the definition, in the order of a row of outputs: every inner loop is
 * an axpy (acc[x] += w * src[x]) along an output or input row, which gcc vectorises without
 * reassociating anything. Error: like im2col + GEMM (each output is a dot product of
 * cg*KH*KW terms summed in T; grad_weight sums N*OH partial rows in T, then the row in
 * double). No scratch beyond a few rows of accumulators. */

#define DIRECT_OB 8               /* output (or input) channels per accumulator block */
#define DIRECT_ACC_BYTES 32768    /* accumulator block: kept within L1 */

/* a[i] += w * s[i * stride], i < n */
static inline void SFX(axpy)(T *restrict a, const T *restrict s, T w, int64_t n, int64_t stride)
{
    if (stride == 1)
        for (int64_t i = 0; i < n; i++)
            a[i] += w * s[i];
    else
        for (int64_t i = 0; i < n; i++)
            a[i] += w * s[i * stride];
}

/* a[i * stride] += w * s[i], i < n */
static inline void SFX(axpy_scatter)(T *restrict a, const T *restrict s, T w, int64_t n, int64_t stride)
{
    if (stride == 1)
        for (int64_t i = 0; i < n; i++)
            a[i] += w * s[i];
    else
        for (int64_t i = 0; i < n; i++)
            a[i * stride] += w * s[i];
}

/* Forward: per (image, group, block of DIRECT_OB output channels, block of output rows),
 * acc[k, y, x] += w[o0+k, c, i, j] * x[c, y*sh - pt + i*dh, x*sw - pl + j*dw]. */
void SFX(tdc_conv2d_direct)(const T *x, const T *w, const T *b, int64_t has_bias, T *out,
                            int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t KH, int64_t KW,
                            int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                            int64_t dh, int64_t dw, int64_t groups)
{
    const int64_t cg = C / groups, cog = CO / groups, KK = KH * KW;
    const int64_t rb = max64(1, min64(OH, DIRECT_ACC_BYTES / (int64_t)sizeof(T) / max64(1, DIRECT_OB * OW)));
    T *acc = tdcrt_malloc(DIRECT_OB * rb * OW * (int64_t)sizeof(T));
    int64_t *xs = column_ranges(KW, W, OW, sw, pl, dw);
    for (int64_t n = 0; n < N; n++)
        for (int64_t gi = 0; gi < groups; gi++)
            for (int64_t ob = 0; ob < cog; ob += DIRECT_OB) {
                const int64_t o0 = gi * cog + ob, k1 = min64(DIRECT_OB, cog - ob);
                for (int64_t y0 = 0; y0 < OH; y0 += rb) {
                    const int64_t y1 = min64(OH, y0 + rb);
                    memset(acc, 0, (size_t)(DIRECT_OB * rb * OW) * sizeof(T));
                    for (int64_t c = 0; c < cg; c++) {
                        const T *xc = x + (n * C + gi * cg + c) * H * W;
                        for (int64_t i = 0; i < KH; i++)
                            for (int64_t j = 0; j < KW; j++) {
                                const int64_t x0 = xs[2 * j], x1 = xs[2 * j + 1], off = x0 * sw + j * dw - pl;
                                if (x1 <= x0)
                                    continue;
                                for (int64_t y = y0; y < y1; y++) {
                                    const int64_t iy = y * sh - pt + i * dh;
                                    if (iy < 0 || iy >= H)
                                        continue;
                                    const T *src = xc + iy * W + off;
                                    for (int64_t k = 0; k < k1; k++)
                                        SFX(axpy)(acc + (k * rb + y - y0) * OW + x0, src,
                                                  w[((o0 + k) * cg + c) * KK + i * KW + j], x1 - x0, sw);
                                }
                            }
                    }
                    for (int64_t k = 0; k < k1; k++) {
                        const T bias = has_bias ? b[o0 + k] : (T)0;
                        T *dst = out + ((n * CO + o0 + k) * OH + y0) * OW;
                        const T *src = acc + k * rb * OW;
                        for (int64_t p = 0; p < (y1 - y0) * OW; p++)
                            dst[p] = src[p] + bias;
                    }
                }
            }
    free(acc);
    free(xs);
}

/* Backward input, gathered per input row: per (image, group, block of DIRECT_OB input
 * channels, block of input rows iy), acc[k, iy, x*sw - pl + j*dw] += w[o, c0+k, i, j] * gy[o, y, x]
 * over the (y, i) with y*sh - pt + i*dh = iy. */
void SFX(tdc_conv2d_grad_input_direct)(const T *gy, const T *w, T *dx,
                                       int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t KH,
                                       int64_t KW, int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt,
                                       int64_t pl, int64_t dh, int64_t dw, int64_t groups)
{
    const int64_t cg = C / groups, cog = CO / groups, KK = KH * KW;
    const int64_t rb = max64(1, min64(H, DIRECT_ACC_BYTES / (int64_t)sizeof(T) / max64(1, DIRECT_OB * W)));
    T *acc = tdcrt_malloc(DIRECT_OB * rb * W * (int64_t)sizeof(T));
    int64_t *xs = column_ranges(KW, W, OW, sw, pl, dw);
    for (int64_t n = 0; n < N; n++)
        for (int64_t gi = 0; gi < groups; gi++)
            for (int64_t cb = 0; cb < cg; cb += DIRECT_OB) {
                const int64_t c0 = gi * cg + cb, k1 = min64(DIRECT_OB, cg - cb);
                for (int64_t r0 = 0; r0 < H; r0 += rb) {
                    const int64_t r1 = min64(H, r0 + rb);
                    memset(acc, 0, (size_t)(DIRECT_OB * rb * W) * sizeof(T));
                    for (int64_t o = gi * cog; o < (gi + 1) * cog; o++) {
                        const T *go = gy + (n * CO + o) * OH * OW;
                        for (int64_t i = 0; i < KH; i++)
                            for (int64_t j = 0; j < KW; j++) {
                                const int64_t x0 = xs[2 * j], x1 = xs[2 * j + 1], off = x0 * sw + j * dw - pl;
                                if (x1 <= x0)
                                    continue;
                                for (int64_t iy = r0; iy < r1; iy++) {
                                    const int64_t t = iy + pt - i * dh;
                                    if (t < 0 || t % sh != 0 || t / sh >= OH)
                                        continue;
                                    const T *src = go + (t / sh) * OW + x0;
                                    for (int64_t k = 0; k < k1; k++)
                                        SFX(axpy_scatter)(acc + (k * rb + iy - r0) * W + off, src,
                                                          w[(o * cg + cb + k) * KK + i * KW + j], x1 - x0, sw);
                                }
                            }
                    }
                    for (int64_t k = 0; k < k1; k++)
                        memcpy(dx + ((n * C + c0 + k) * H + r0) * W, acc + k * rb * W,
                               (size_t)((r1 - r0) * W) * sizeof(T));
                }
            }
    free(acc);
    free(xs);
}

/* Backward weight: per (o, c), acc[i, j, x] += gy[n, o, y, x] * x[n, c, y*sh - pt + i*dh, x*sw - pl + j*dw]
 * over n and y (elementwise along output rows, so it vectorises), then each acc row is summed
 * in double. */
void SFX(tdc_conv2d_grad_weight_direct)(const T *x, const T *gy, T *dwt,
                                        int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t KH,
                                        int64_t KW, int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt,
                                        int64_t pl, int64_t dh, int64_t dw, int64_t groups)
{
    const int64_t cg = C / groups, cog = CO / groups, KK = KH * KW;
    T *acc = tdcrt_malloc(KK * OW * (int64_t)sizeof(T));
    int64_t *xs = column_ranges(KW, W, OW, sw, pl, dw);
    for (int64_t o = 0; o < CO; o++) {
        const int64_t gi = o / cog;
        for (int64_t c = 0; c < cg; c++) {
            memset(acc, 0, (size_t)(KK * OW) * sizeof(T));
            for (int64_t n = 0; n < N; n++) {
                const T *go = gy + (n * CO + o) * OH * OW, *xc = x + (n * C + gi * cg + c) * H * W;
                for (int64_t y = 0; y < OH; y++)
                    for (int64_t i = 0; i < KH; i++) {
                        const int64_t iy = y * sh - pt + i * dh;
                        if (iy < 0 || iy >= H)
                            continue;
                        for (int64_t j = 0; j < KW; j++) {
                            const int64_t x0 = xs[2 * j], x1 = xs[2 * j + 1];
                            if (x1 <= x0)
                                continue;
                            T *restrict a = acc + (i * KW + j) * OW + x0;
                            const T *restrict g = go + y * OW + x0;
                            const T *restrict s = xc + iy * W + x0 * sw + j * dw - pl;
                            if (sw == 1)
                                for (int64_t q = 0; q < x1 - x0; q++)
                                    a[q] += g[q] * s[q];
                            else
                                for (int64_t q = 0; q < x1 - x0; q++)
                                    a[q] += g[q] * s[q * sw];
                        }
                    }
            }
            for (int64_t k = 0; k < KK; k++) {
                double s = 0.0;
                for (int64_t q = 0; q < OW; q++)
                    s += acc[k * OW + q];
                dwt[(o * cg + c) * KK + k] = (T)s;
            }
        }
    }
    free(acc);
    free(xs);
}

#endif
