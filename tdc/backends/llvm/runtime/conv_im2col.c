/* tdc runtime: convolution by im2col + GEMM (also the tdc_conv2d* default), forward and both backward. */
#include "internal.h"

#ifndef TDC_TEMPLATE
#define TDC_SELF "conv_im2col.c"
#include "instantiate.h"

#else /* the template: T, SFX(name), GEMM */

/* ---- convolution -------------------------------------------------------------------- */

/* cols[(c*KH + i)*KW + j, y*OW + x] = x_img[c, y*sh - pt + i*dh, x*sw - pl + j*dw], 0 in the
 * padding; x_img is [cg, H, W] and ld the row stride of cols. */
void SFX(tdcrt_im2col)(const conv_geo *g, const T *x_img, int64_t cg, T *cols, int64_t ld)
{
    const int64_t H = g->H, W = g->W, OH = g->OH, OW = g->OW;
    for (int64_t c = 0; c < cg; c++)
        for (int64_t i = 0; i < g->KH; i++)
            for (int64_t j = 0; j < g->KW; j++) {
                T *row = cols + ((c * g->KH + i) * g->KW + j) * ld;
                int64_t x0, x1;
                valid_range(j * g->dw - g->pl, g->sw, W, OW, &x0, &x1);
                for (int64_t y = 0; y < OH; y++) {
                    T *dst = row + y * OW;
                    int64_t iy = y * g->sh - g->pt + i * g->dh;
                    if (iy < 0 || iy >= H) {
                        memset(dst, 0, (size_t)OW * sizeof(T));
                        continue;
                    }
                    const T *src = x_img + (c * H + iy) * W + j * g->dw - g->pl;
                    for (int64_t xx = 0; xx < x0; xx++)
                        dst[xx] = 0;
                    if (g->sw == 1)
                        memcpy(dst + x0, src + x0, (size_t)(x1 - x0) * sizeof(T));
                    else
                        for (int64_t xx = x0; xx < x1; xx++)
                            dst[xx] = src[xx * g->sw];
                    for (int64_t xx = x1; xx < OW; xx++)
                        dst[xx] = 0;
                }
            }
}

/* The adjoint of im2col: dx_img [cg, H, W] += cols scattered back (padding dropped). */
static void SFX(col2im_add)(const conv_geo *g, const T *cols, int64_t ld, int64_t cg, T *dx_img)
{
    const int64_t H = g->H, W = g->W, OH = g->OH, OW = g->OW;
    for (int64_t c = 0; c < cg; c++)
        for (int64_t i = 0; i < g->KH; i++)
            for (int64_t j = 0; j < g->KW; j++) {
                const T *row = cols + ((c * g->KH + i) * g->KW + j) * ld;
                int64_t x0, x1;
                valid_range(j * g->dw - g->pl, g->sw, W, OW, &x0, &x1);
                for (int64_t y = 0; y < OH; y++) {
                    int64_t iy = y * g->sh - g->pt + i * g->dh;
                    if (iy < 0 || iy >= H)
                        continue;
                    const T *src = row + y * OW;
                    T *dst = dx_img + (c * H + iy) * W + j * g->dw - g->pl;
                    for (int64_t xx = x0; xx < x1; xx++)
                        dst[xx * g->sw] += src[xx];
                }
            }
}

/* cols [K, nb*P]: the im2col matrices of images n0..n0+nb (channels c0..c0+cg) side by side. */
static void SFX(chunk_cols)(const conv_geo *g, const T *x, int64_t n0, int64_t nb, int64_t c0, T *cols)
{
    const int64_t P = g->OH * g->OW, cg = g->C / g->groups;
    for (int64_t n = 0; n < nb; n++)
        SFX(tdcrt_im2col)(g, x + ((n0 + n) * g->C + c0) * g->H * g->W, cg, cols + n * P, nb * P);
}

/* gm [cog, nb*P]: channels o0..o0+cog of images n0..n0+nb of gy, in the layout of chunk_cols. */
static void SFX(chunk_rows)(const conv_geo *g, const T *gy, int64_t n0, int64_t nb, int64_t o0, T *gm)
{
    const int64_t P = g->OH * g->OW, cog = g->CO / g->groups;
    for (int64_t n = 0; n < nb; n++)
        for (int64_t o = 0; o < cog; o++)
            memcpy(gm + o * nb * P + n * P, gy + ((n0 + n) * g->CO + o0 + o) * P, (size_t)P * sizeof(T));
}

typedef struct {
    conv_geo g;
    const T *x, *w, *b;
    int64_t has_bias;
    T *out;
} SFX(conv_job);

/* Images [n_begin, n_end) of a forward convolution, in chunks whose columns sit side by side. */
static void SFX(conv2d_images)(void *ctx, int64_t n_begin, int64_t n_end)
{
    const SFX(conv_job) *j = ctx;
    const conv_geo *g = &j->g;
    const int64_t P = g->OH * g->OW, groups = g->groups, cg = g->C / groups, CO = g->CO, cog = CO / groups;
    const int64_t K = cg * g->KH * g->KW;
    const int64_t nb = tdcrt_chunk_images(n_end - n_begin, K, P, sizeof(T));
    T *cols = tdcrt_malloc(K * nb * P * (int64_t)sizeof(T));
    T *res = tdcrt_malloc(cog * nb * P * (int64_t)sizeof(T));
    for (int64_t n0 = n_begin; n0 < n_end; n0 += nb) {
        const int64_t m = min64(nb, n_end - n0);
        for (int64_t gi = 0; gi < groups; gi++) {
            SFX(chunk_cols)(g, j->x, n0, m, gi * cg, cols);
            SFX(tdcrt_gemm)(0, 0, cog, m * P, K, j->w + gi * cog * K, K, cols, m * P, 0, res, m * P);
            for (int64_t n = 0; n < m; n++)
                for (int64_t o = 0; o < cog; o++) {
                    const T bias = j->has_bias ? j->b[gi * cog + o] : (T)0;
                    const T *src = res + o * m * P + n * P;
                    T *dst = j->out + ((n0 + n) * CO + gi * cog + o) * P;
                    for (int64_t p = 0; p < P; p++)
                        dst[p] = src[p] + bias;
                }
        }
    }
    free(cols);
    free(res);
}

void SFX(tdc_conv2d)(const T *x, const T *w, const T *b, int64_t has_bias, T *out,
                     int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t KH, int64_t KW,
                     int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                     int64_t dh, int64_t dw, int64_t groups)
{
    SFX(conv_job) j = {CONV_GEO, x, w, b, has_bias, out};
    const double flops = 2.0 * N * CO * OH * OW * (C / groups) * KH * KW;
    tdcrt_parallel_for(N, flops, SFX(conv2d_images), &j);    /* the images are split over the threads */
}

typedef struct {
    conv_geo g;
    const T *gy, *w;
    T *dx;
} SFX(conv_grad_input_job);

/* Images [n_begin, n_end) of the input gradient: each image's dx is its own, so threads never
   share an output element. */
static void SFX(conv2d_grad_input_images)(void *ctx, int64_t n_begin, int64_t n_end)
{
    const SFX(conv_grad_input_job) *j = ctx;
    const conv_geo *g = &j->g;
    const int64_t C = g->C, H = g->H, W = g->W, groups = g->groups;
    const int64_t P = g->OH * g->OW, cg = C / groups, cog = g->CO / groups, K = cg * g->KH * g->KW;
    const int64_t nb = tdcrt_chunk_images(n_end - n_begin, K, P, sizeof(T));
    memset(j->dx + n_begin * C * H * W, 0, (size_t)((n_end - n_begin) * C * H * W) * sizeof(T));
    T *cols = tdcrt_malloc(K * nb * P * (int64_t)sizeof(T));
    T *gm = tdcrt_malloc(cog * nb * P * (int64_t)sizeof(T));
    for (int64_t n0 = n_begin; n0 < n_end; n0 += nb) {
        const int64_t m = min64(nb, n_end - n0);
        for (int64_t gi = 0; gi < groups; gi++) {
            SFX(chunk_rows)(g, j->gy, n0, m, gi * cog, gm);
            /* cols [K, m*P] = w_g^T [K, cog] @ gm [cog, m*P] */
            SFX(tdcrt_gemm)(1, 0, K, m * P, cog, j->w + gi * cog * K, K, gm, m * P, 0, cols, m * P);
            for (int64_t n = 0; n < m; n++)
                SFX(col2im_add)(g, cols + n * P, m * P, cg, j->dx + ((n0 + n) * C + gi * cg) * H * W);
        }
    }
    free(cols);
    free(gm);
}

void SFX(tdc_conv2d_grad_input)(const T *gy, const T *w, T *dx,
                                int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t KH, int64_t KW,
                                int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                                int64_t dh, int64_t dw, int64_t groups)
{
    SFX(conv_grad_input_job) j = {CONV_GEO, gy, w, dx};
    const double flops = 2.0 * N * CO * OH * OW * (C / groups) * KH * KW;
    tdcrt_parallel_for(N, flops, SFX(conv2d_grad_input_images), &j);
}

/* Parts [p_begin, p_end) of the weight gradient: part p sums images [N p / parts, N (p+1) / parts). */
static void SFX(conv2d_grad_weight_parts)(void *ctx, int64_t p_begin, int64_t p_end)
{
    const grad_weight_job *j = ctx;
    const conv_geo *g = &j->g;
    const int64_t N = g->N, groups = g->groups, P = g->OH * g->OW, cg = g->C / groups, cog = g->CO / groups;
    const int64_t K = cg * g->KH * g->KW;
    for (int64_t p = p_begin; p < p_end; p++) {
        const int64_t n_begin = N * p / j->parts, n_end = N * (p + 1) / j->parts;
        T *dst = p == 0 ? (T *)j->dwt : (T *)j->partials + (p - 1) * g->CO * K;
        memset(dst, 0, (size_t)(g->CO * K) * sizeof(T));
        const int64_t nb = tdcrt_chunk_images(n_end - n_begin, K, P, sizeof(T));
        T *cols = tdcrt_malloc(K * nb * P * (int64_t)sizeof(T));
        T *gm = tdcrt_malloc(cog * nb * P * (int64_t)sizeof(T));
        for (int64_t n0 = n_begin; n0 < n_end; n0 += nb) {
            const int64_t m = min64(nb, n_end - n0);
            for (int64_t gi = 0; gi < groups; gi++) {
                SFX(chunk_cols)(g, (const T *)j->x, n0, m, gi * cg, cols);
                SFX(chunk_rows)(g, (const T *)j->gy, n0, m, gi * cog, gm);
                /* dw_g [cog, K] += gm [cog, m*P] @ cols^T [m*P, K] */
                SFX(tdcrt_gemm)(0, 1, cog, K, m * P, gm, m * P, cols, m * P, 1, dst + gi * cog * K, K);
            }
        }
        free(cols);
        free(gm);
    }
}

void SFX(tdcrt_grad_weight_by_parts)(const conv_geo *g, const T *x, const T *gy, T *dwt, range_fn part_fn)
{
    const int64_t size = g->CO * (g->C / g->groups) * g->KH * g->KW;
    const double flops = 2.0 * g->N * g->OH * g->OW * size;
    const int64_t parts = max64(1, min64(g->N, tdcrt_parallel_parts(flops)));
    T *partials = parts > 1 ? tdcrt_malloc((parts - 1) * size * (int64_t)sizeof(T)) : NULL;
    grad_weight_job j = {*g, x, gy, dwt, partials, parts};
    tdcrt_parallel_for(parts, flops, part_fn, &j);
    for (int64_t p = 1; p < parts; p++)
        for (int64_t i = 0; i < size; i++)
            dwt[i] += partials[(p - 1) * size + i];
    free(partials);
}

/* The images are split over the threads, each summing its own partial gradient. */
void SFX(tdc_conv2d_grad_weight)(const T *x, const T *gy, T *dwt,
                                 int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t KH, int64_t KW,
                                 int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                                 int64_t dh, int64_t dw, int64_t groups)
{
    const conv_geo g = CONV_GEO;
    SFX(tdcrt_grad_weight_by_parts)(&g, x, gy, dwt, SFX(conv2d_grad_weight_parts));
}

/* The im2col + GEMM functions under the names tdc_<op>_<algo>_<dtype>. */
void SFX(tdc_conv2d_im2col)(const T *x, const T *w, const T *b, int64_t has_bias, T *out,
                            int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t KH, int64_t KW,
                            int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                            int64_t dh, int64_t dw, int64_t groups)
{
    SFX(tdc_conv2d)(x, w, b, has_bias, out, N, C, H, W, CO, KH, KW, OH, OW, sh, sw, pt, pl, dh, dw, groups);
}

void SFX(tdc_conv2d_grad_input_im2col)(const T *gy, const T *w, T *dx,
                                       int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t KH,
                                       int64_t KW, int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt,
                                       int64_t pl, int64_t dh, int64_t dw, int64_t groups)
{
    SFX(tdc_conv2d_grad_input)(gy, w, dx, N, C, H, W, CO, KH, KW, OH, OW, sh, sw, pt, pl, dh, dw, groups);
}

void SFX(tdc_conv2d_grad_weight_im2col)(const T *x, const T *gy, T *dwt,
                                        int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t KH,
                                        int64_t KW, int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt,
                                        int64_t pl, int64_t dh, int64_t dw, int64_t groups)
{
    SFX(tdc_conv2d_grad_weight)(x, gy, dwt, N, C, H, W, CO, KH, KW, OH, OW, sh, sw, pt, pl, dh, dw, groups);
}

#endif
