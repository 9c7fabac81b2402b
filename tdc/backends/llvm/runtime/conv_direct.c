/* tdc runtime: direct convolution, forward and both backward: shifted GEMMs over zero-padded
 * planes at unit strides and dilations, loop nests for any other geometry. */
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

/* Strides and dilations of 1: what the shifted-GEMM kernels compute (any padding, groups, sizes). */
static inline int unit_steps(int64_t sh, int64_t sw, int64_t dh, int64_t dw)
{
    return sh == 1 && sw == 1 && dh == 1 && dw == 1;
}

#define TDC_SELF "conv_direct.c"
#include "instantiate.h"

#else /* the template: T, SFX(name), GEMM */

/* ---- convolution: direct loop nests (strided or dilated) ---------------------------------
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

/* ---- stride 1, dilation 1: shifted GEMMs over zero-padded planes ---------------------------
 * With unit strides, tap (c, i, j) of every output of an image plane is one shift of the padded
 * input: laid out with row width Wp, out[o, y*Wp + x] = sum_k w[o, k] * xp[off[k] + y*Wp + x],
 * off[(c, i, j)] = (c*Hp + i)*Wp + j. So a convolution is a GEMM whose B rows are windows of one
 * buffer (no column matrix is built): SG_MR output channels by SG_NB grid points are held in
 * registers while k runs over the taps. Columns x >= OW of the grid are computed and dropped.
 * Each output sums its cg*KH*KW products in T, in tap order, like im2col's GEMM. */

#ifdef __AVX512F__
#define SG_MR 8       /* 8 x 32 floats: 16 of the 32 zmm registers */
#else
#define SG_MR 4       /* 4 x 32 floats: 16 ymm registers */
#endif
#define SG_NB (128 / (int)sizeof(T))

static inline __attribute__((always_inline)) void SFX(sg_block)(const int mr, int64_t K, const T *restrict a,
                                                                 int64_t lda, const T *restrict src,
                                                                 const int64_t *restrict off, T *restrict c,
                                                                 int64_t ldc, int64_t nb)
{
    T acc[SG_MR][SG_NB];
    for (int m = 0; m < mr; m++)
        for (int q = 0; q < SG_NB; q++)
            acc[m][q] = 0;
    for (int64_t k = 0; k < K; k++) {
        const T *restrict s = src + off[k];
        for (int m = 0; m < mr; m++) {
            const T wv = a[m * lda + k];
            for (int q = 0; q < SG_NB; q++)
                acc[m][q] += wv * s[q];
        }
    }
    for (int m = 0; m < mr; m++)
        for (int64_t q = 0; q < nb; q++)
            c[m * ldc + q] = acc[m][q];
}

/* c[m, p] = sum_k a[m*lda + k] * src[off[k] + p] for m < M, p < N (c's row stride ldc); src must
 * be readable SG_NB elements past the last window. */
static void SFX(shifted_gemm)(int64_t M, int64_t K, int64_t N, const T *a, int64_t lda, const T *src,
                              const int64_t *off, T *c, int64_t ldc)
{
    for (int64_t m0 = 0; m0 < M; m0 += SG_MR) {
        const int mr = (int)min64(SG_MR, M - m0);
        for (int64_t p = 0; p < N; p += SG_NB) {
            const int64_t nb = min64(SG_NB, N - p);
            const T *am = a + m0 * lda;
            T *cm = c + m0 * ldc + p;
            switch (mr) {   /* constant row counts, so each case keeps its tile in registers */
            case 1: SFX(sg_block)(1, K, am, lda, src + p, off, cm, ldc, nb); break;
            case 2: SFX(sg_block)(2, K, am, lda, src + p, off, cm, ldc, nb); break;
            case 3: SFX(sg_block)(3, K, am, lda, src + p, off, cm, ldc, nb); break;
            case 4: SFX(sg_block)(4, K, am, lda, src + p, off, cm, ldc, nb); break;
#if SG_MR > 4
            case 5: SFX(sg_block)(5, K, am, lda, src + p, off, cm, ldc, nb); break;
            case 6: SFX(sg_block)(6, K, am, lda, src + p, off, cm, ldc, nb); break;
            case 7: SFX(sg_block)(7, K, am, lda, src + p, off, cm, ldc, nb); break;
            case 8: SFX(sg_block)(8, K, am, lda, src + p, off, cm, ldc, nb); break;
#endif
            }
        }
    }
}

/* Images n0..n0+nb of src [*, ci, h, w] (channels c_off..c_off+planes), stacked per channel:
 * dst[c*ld + (n*Hp + r0 + y)*Wp + c0 + x] = src[n0 + n, c_off + c, y, x], zeros elsewhere (rows
 * and columns falling outside an image's Hp x Wp block are dropped), then `slack` zeros; the
 * channel stride ld is at least nb*Hp*Wp. */
static void SFX(stack_planes)(const T *src, int64_t n0, int64_t nb, int64_t ci, int64_t c_off, int64_t planes,
                              int64_t h, int64_t w, T *dst, int64_t ld, int64_t Hp, int64_t Wp, int64_t r0,
                              int64_t c0, int64_t slack)
{
    memset(dst, 0, (size_t)(planes * ld + slack) * sizeof(T));
    int64_t x0, x1, y0, y1;
    valid_range(c0, 1, Wp, w, &x0, &x1);     /* source columns x with 0 <= x + c0 < Wp */
    valid_range(r0, 1, Hp, h, &y0, &y1);
    if (x1 <= x0)
        return;
    for (int64_t c = 0; c < planes; c++)
        for (int64_t n = 0; n < nb; n++)
            for (int64_t y = y0; y < y1; y++)
                memcpy(dst + c * ld + (n * Hp + y + r0) * Wp + x0 + c0,
                       src + (((n0 + n) * ci + c_off + c) * h + y) * w + x0, (size_t)(x1 - x0) * sizeof(T));
}

/* Images per stack: the stacked input planes stay within about 128 KB (L2). */
static inline int64_t SFX(stack_images)(int64_t count, int64_t planes, int64_t Hp, int64_t Wp)
{
    return max64(1, min64(count, ((int64_t)128 << 10) / (int64_t)sizeof(T) / max64(1, planes * Hp * Wp)));
}

typedef struct {
    conv_geo g;
    const T *x, *wt, *b;      /* wt: the forward's w, or grad_input's flipped, transposed filters */
    int64_t has_bias;
    T *out;
    int grad_input;
} SFX(shifted_job);

/* Images [n_begin, n_end) of a unit-stride forward convolution or input gradient, one shifted GEMM
 * per image and group (stacking images, as the weight gradient does, would add the Hp - oh rows
 * between them to every grid: slower on LeNet's layers). The input gradient is the forward
 * convolution of gy, padded by KH-1-pt rows and KW-1-pl columns, with each filter flipped and its
 * channel axes swapped: dx[c, iy, ix] = sum_{o, i', j'} w[o, c, KH-1-i', KW-1-j'] gyp[o, iy + i', ix + j']. */
static void SFX(shifted_images)(void *ctx, int64_t n_begin, int64_t n_end)
{
    const SFX(shifted_job) *j = ctx;
    const conv_geo *g = &j->g;
    const int64_t KH = g->KH, KW = g->KW, groups = g->groups;
    /* as a forward convolution: in [ci, ih, iw] planes -> out [co, oh, ow] planes, per group */
    const int64_t ci = j->grad_input ? g->CO : g->C, co = j->grad_input ? g->C : g->CO;
    const int64_t ih = j->grad_input ? g->OH : g->H, iw = j->grad_input ? g->OW : g->W;
    const int64_t oh = j->grad_input ? g->H : g->OH, ow = j->grad_input ? g->W : g->OW;
    const int64_t r0 = j->grad_input ? KH - 1 - g->pt : g->pt, c0 = j->grad_input ? KW - 1 - g->pl : g->pl;
    const int64_t cig = ci / groups, cog = co / groups, K = cig * KH * KW;
    /* the padded plane holds every output's taps: rows y + i < Hp, columns x + j < Wp */
    const int64_t Hp = max64(ih + r0, oh + KH - 1), Wp = max64(iw + c0, ow + KW - 1);
    const int64_t plane = Hp * Wp, grid = oh * Wp, slack = KW + SG_NB;
    T *xp = tdcrt_malloc((cig * plane + slack) * (int64_t)sizeof(T));
    T *res = tdcrt_malloc(cog * grid * (int64_t)sizeof(T));
    int64_t *off = tdcrt_malloc(K * (int64_t)sizeof(int64_t));
    for (int64_t c = 0; c < cig; c++)
        for (int64_t i = 0; i < KH; i++)
            for (int64_t jj = 0; jj < KW; jj++)
                off[(c * KH + i) * KW + jj] = c * plane + i * Wp + jj;
    for (int64_t n = n_begin; n < n_end; n++)
        for (int64_t gi = 0; gi < groups; gi++) {
            SFX(stack_planes)(j->x, n, 1, ci, gi * cig, cig, ih, iw, xp, plane, Hp, Wp, r0, c0, slack);
            SFX(shifted_gemm)(cog, K, grid, j->wt + gi * cog * K, K, xp, off, res, grid);
            for (int64_t o = 0; o < cog; o++) {
                const T bias = j->has_bias ? j->b[gi * cog + o] : (T)0;
                T *dst = j->out + (n * co + gi * cog + o) * oh * ow;
                for (int64_t y = 0; y < oh; y++)
                    for (int64_t x = 0; x < ow; x++)
                        dst[y * ow + x] = res[o * grid + y * Wp + x] + bias;
            }
        }
    free(xp);
    free(res);
    free(off);
}

/* The weight gradient with unit steps: dw[o, (c, i, j)] = sum over images and grid points p of
 * gyg[o, p] * xp[off[(c, i, j)] + p], where gyg is gy laid out on the padded grid (zeros at columns
 * x >= OW). GW_OR x GW_KR dot products are held in vector registers of GW_VL lanes; each lane sums
 * its share of the image's products in T, the lanes are added in T, and the images' sums in T. */
#define GW_VL (64 / (int)sizeof(T))
#define GW_OR 4
#ifdef __AVX512F__
#define GW_KR 4
#else
#define GW_KR 2
#endif

static inline __attribute__((always_inline)) void SFX(gw_block)(const int orr, const int kr, int64_t len,
                                                                 const T *restrict gyg, int64_t ldg,
                                                                 const T *restrict xp, const int64_t *restrict off,
                                                                 T *restrict dw, int64_t ldw)
{
    T acc[GW_OR][GW_KR][GW_VL];
    for (int a = 0; a < orr; a++)
        for (int k = 0; k < kr; k++)
            for (int q = 0; q < GW_VL; q++)
                acc[a][k][q] = 0;
    for (int64_t p = 0; p < len; p += GW_VL)
        for (int k = 0; k < kr; k++) {
            const T *restrict s = xp + off[k] + p;
            for (int a = 0; a < orr; a++)
                for (int q = 0; q < GW_VL; q++)
                    acc[a][k][q] += gyg[a * ldg + p + q] * s[q];
        }
    for (int a = 0; a < orr; a++)
        for (int k = 0; k < kr; k++) {
            T t = 0;
            for (int q = 0; q < GW_VL; q++)
                t += acc[a][k][q];
            dw[a * ldw + k] += t;
        }
}

static void SFX(shifted_grad_weight_parts)(void *ctx, int64_t p_begin, int64_t p_end)
{
    const grad_weight_job *j = ctx;
    const conv_geo *g = &j->g;
    const int64_t KH = g->KH, KW = g->KW, groups = g->groups, OH = g->OH, OW = g->OW;
    const int64_t cg = g->C / groups, cog = g->CO / groups, K = cg * KH * KW;
    const int64_t Hp = max64(g->H + g->pt, OH + KH - 1), Wp = max64(g->W + g->pl, OW + KW - 1);
    const int64_t nb = SFX(stack_images)(g->N, cg, Hp, Wp), cap = nb * Hp * Wp + GW_VL;
    const int64_t slack = KH * Wp + KW + GW_VL;
    T *xp = tdcrt_malloc((cg * nb * Hp * Wp + slack) * (int64_t)sizeof(T));
    T *gyg = tdcrt_malloc(cog * cap * (int64_t)sizeof(T));
    int64_t *off = tdcrt_malloc(K * (int64_t)sizeof(int64_t));
    for (int64_t part = p_begin; part < p_end; part++) {
        const int64_t n_begin = g->N * part / j->parts, n_end = g->N * (part + 1) / j->parts;
        T *dst = part == 0 ? (T *)j->dwt : (T *)j->partials + (part - 1) * g->CO * K;
        memset(dst, 0, (size_t)(g->CO * K) * sizeof(T));
        for (int64_t n0 = n_begin; n0 < n_end; n0 += nb) {
            const int64_t m = min64(nb, n_end - n0);
            const int64_t len = (m * Hp * Wp + GW_VL - 1) / GW_VL * GW_VL;
            for (int64_t c = 0; c < cg; c++)
                for (int64_t i = 0; i < KH; i++)
                    for (int64_t jj = 0; jj < KW; jj++)
                        off[(c * KH + i) * KW + jj] = (c * m * Hp + i) * Wp + jj;
            for (int64_t gi = 0; gi < groups; gi++) {
                SFX(stack_planes)((const T *)j->x, n0, m, g->C, gi * cg, cg, g->H, g->W, xp, m * Hp * Wp, Hp, Wp, g->pt,
                                  g->pl, slack);
                /* gy on the same grid, rows len apart: zero at rows y >= OH and columns x >= OW of
                   each block, and past the last block up to len */
                SFX(stack_planes)((const T *)j->gy, n0, m, g->CO, gi * cog, cog, OH, OW, gyg, len, Hp, Wp, 0, 0, 0);
                T *dwg = dst + gi * cog * K;
                for (int64_t o0 = 0; o0 < cog; o0 += GW_OR) {
                    const int orr = (int)min64(GW_OR, cog - o0);
                    for (int64_t k0 = 0; k0 < K; k0 += GW_KR) {
                        const int kr = (int)min64(GW_KR, K - k0);
                        const T *ga = gyg + o0 * len;
                        T *d = dwg + o0 * K + k0;
                        if (orr == GW_OR && kr == GW_KR)   /* the full tile, with constant sizes */
                            SFX(gw_block)(GW_OR, GW_KR, len, ga, len, xp, off + k0, d, K);
                        else
                            SFX(gw_block)(orr, kr, len, ga, len, xp, off + k0, d, K);
                    }
                }
            }
        }
    }
    free(xp);
    free(gyg);
    free(off);
}

/* Forward: per (image, group, block of DIRECT_OB output channels, block of output rows),
 * acc[k, y, x] += w[o0+k, c, i, j] * x[c, y*sh - pt + i*dh, x*sw - pl + j*dw]. */
void SFX(tdc_conv2d_direct)(const T *x, const T *w, const T *b, int64_t has_bias, T *out,
                            int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t KH, int64_t KW,
                            int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                            int64_t dh, int64_t dw, int64_t groups)
{
    if (unit_steps(sh, sw, dh, dw)) {
        SFX(shifted_job) j = {CONV_GEO, x, w, b, has_bias, out, 0};
        tdcrt_parallel_for(N, 2.0 * N * CO * OH * OW * (C / groups) * KH * KW, SFX(shifted_images), &j);
        return;
    }
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
    if (unit_steps(sh, sw, dh, dw)) {
        /* wt[gi][c, (o, i', j')] = w[gi*cog + o, c, KH-1-i', KW-1-j'] */
        T *wt = tdcrt_malloc(CO * cg * KK * (int64_t)sizeof(T));
        for (int64_t gi = 0; gi < groups; gi++)
            for (int64_t c = 0; c < cg; c++)
                for (int64_t o = 0; o < cog; o++)
                    for (int64_t k = 0; k < KK; k++)
                        wt[((gi * cg + c) * cog + o) * KK + k] = w[((gi * cog + o) * cg + c) * KK + KK - 1 - k];
        SFX(shifted_job) j = {CONV_GEO, gy, wt, NULL, 0, dx, 1};
        tdcrt_parallel_for(N, 2.0 * N * CO * OH * OW * cg * KK, SFX(shifted_images), &j);
        free(wt);
        return;
    }
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
    if (unit_steps(sh, sw, dh, dw)) {
        const conv_geo g = CONV_GEO;
        SFX(tdcrt_grad_weight_by_parts)(&g, x, gy, dwt, SFX(shifted_grad_weight_parts));
        return;
    }
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
