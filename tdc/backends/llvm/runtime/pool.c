/* tdc runtime: max and average pooling and their gradients. */
#include "internal.h"

#ifndef TDC_TEMPLATE
#define TDC_SELF "pool.c"
#include "instantiate.h"

#else /* the template: T, SFX(name), GEMM */

/* ---- pooling ------------------------------------------------------------------------ */

/* Flat index (iy*W + ix) into the [H, W] image src of the first maximum of window (y, x);
 * a NaN, once found, stays (numpy's argmax). -1 if the window covers no input. */
static inline int64_t SFX(argmax_window)(const T *src, int64_t H, int64_t W, int64_t y, int64_t xx,
                                         int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt,
                                         int64_t pl, int64_t dh, int64_t dw)
{
    T best = -INFINITY;
    int64_t arg = -1;
    for (int64_t i = 0; i < kh; i++) {
        const int64_t iy = y * sh - pt + i * dh;
        if (iy < 0 || iy >= H)
            continue;
        for (int64_t j = 0; j < kw; j++) {
            const int64_t ix = xx * sw - pl + j * dw;
            if (ix < 0 || ix >= W)
                continue;
            const T v = src[iy * W + ix];
            /* selects, not a branch: on real data which element wins is a coin toss, and
               mispredicted branches made LeNet's pooling take 1.7 ms at batch 64 */
            const int take = (arg < 0) | (v > best) | ((v != v) & (best == best));
            best = take ? v : best;
            arg = take ? iy * W + ix : arg;
        }
    }
    return arg;
}

void SFX(tdc_maxpool2d)(const T *x, T *out, int64_t N, int64_t C, int64_t H, int64_t W,
                        int64_t OH, int64_t OW, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                        int64_t pt, int64_t pl, int64_t dh, int64_t dw)
{
    /* windows that tile the input without padding or overhang (2x2 stride 2): no bounds checks */
    const int tiled = kh == sh && kw == sw && pt == 0 && pl == 0 && dh == 1 && dw == 1
                      && OH * kh <= H && OW * kw <= W;
    if (tiled && kh == 2 && kw == 2) {   /* LeNet's and VGG's pooling: a loop gcc vectorises */
        for (int64_t nc = 0; nc < N * C; nc++)
            for (int64_t y = 0; y < OH; y++) {
                const T *r0 = x + nc * H * W + 2 * y * W, *r1 = r0 + W;
                T *o = out + nc * OH * OW + y * OW;
                for (int64_t xx = 0; xx < OW; xx++) {
                    const T a = r0[2 * xx], b = r0[2 * xx + 1], c = r1[2 * xx], d = r1[2 * xx + 1];
                    const T ab = a > b ? a : b, cd = c > d ? c : d;
                    const int nan = (a != a) | (b != b) | (c != c) | (d != d);
                    o[xx] = nan ? (T)NAN : (ab > cd ? ab : cd);
                }
            }
        return;
    }
    for (int64_t nc = 0; nc < N * C; nc++) {
        const T *src = x + nc * H * W;
        T *dst = out + nc * OH * OW;
        for (int64_t y = 0; y < OH; y++)
            for (int64_t xx = 0; xx < OW; xx++) {
                if (tiled) {
                    T m = src[y * kh * W + xx * kw];
                    int nan = 0;
                    for (int64_t i = 0; i < kh; i++)
                        for (int64_t j = 0; j < kw; j++) {
                            const T v = src[(y * kh + i) * W + xx * kw + j];
                            m = v > m ? v : m;          /* a select (see argmax_window) */
                            nan |= v != v;
                        }
                    dst[y * OW + xx] = nan ? (T)NAN : m;
                } else {
                    const int64_t a = SFX(argmax_window)(src, H, W, y, xx, kh, kw, sh, sw, pt, pl, dh, dw);
                    dst[y * OW + xx] = a < 0 ? (T)-INFINITY : src[a];
                }
            }
    }
}

typedef struct {
    const T *gy, *x;
    T *dx;
    int64_t H, W, OH, OW, kh, kw, sh, sw, pt, pl, dh, dw;
} SFX(maxpool_grad_job);

/* Planes [nc_begin, nc_end) (image x channel) of the max-pooling gradient. */
static void SFX(maxpool2d_grad_planes)(void *ctx, int64_t nc_begin, int64_t nc_end)
{
    const SFX(maxpool_grad_job) *j = ctx;
    const T *gy = j->gy, *x = j->x;
    T *dx = j->dx;
    const int64_t H = j->H, W = j->W, OH = j->OH, OW = j->OW, kh = j->kh, kw = j->kw, sh = j->sh, sw = j->sw;
    const int64_t pt = j->pt, pl = j->pl, dh = j->dh, dw = j->dw;
    const int tiled2 = kh == 2 && kw == 2 && sh == 2 && sw == 2 && pt == 0 && pl == 0 && dh == 1 && dw == 1
                       && OH * 2 <= H && OW * 2 <= W;
    for (int64_t nc = nc_begin; nc < nc_end; nc++) {
        const T *src = x + nc * H * W, *g = gy + nc * OH * OW;
        T *d = dx + nc * H * W;
        memset(d, 0, (size_t)(H * W) * sizeof(T));
        int has_nan = 0;     /* NaN inputs take the general path (a NaN wins its window) */
        for (int64_t i = 0; i < H * W; i++)
            has_nan |= src[i] != src[i];
        if (tiled2 && !has_nan) {   /* 2x2 stride 2: the window's first maximum gets the gradient */
            for (int64_t y = 0; y < OH; y++) {
                const T *restrict r0 = src + 2 * y * W, *restrict r1 = r0 + W, *restrict gr = g + y * OW;
                T *restrict d0 = d + 2 * y * W, *restrict d1 = d0 + W;
                for (int64_t xx = 0; xx < OW; xx++) {
                    const T a = r0[2 * xx], b = r0[2 * xx + 1], c = r1[2 * xx], e = r1[2 * xx + 1];
                    /* strict comparisons: on a tie the earlier element keeps the gradient */
                    const int ba = b > a, ec = e > c;
                    const T m1 = ba ? b : a, m2 = ec ? e : c;
                    const int second = m2 > m1;
                    /* the gradient's bits masked by the winner flags: gcc vectorises these loads and
                       stores, where selects on the stored values became mispredicted branches */
                    UT gv;
                    memcpy(&gv, &gr[xx], sizeof gv);
                    const UT k0 = -(UT)((!second) & (!ba)), k1 = -(UT)((!second) & ba);
                    const UT k2 = -(UT)(second & (!ec)), k3 = -(UT)(second & ec);
                    const UT o0 = gv & k0, o1 = gv & k1, o2 = gv & k2, o3 = gv & k3;
                    memcpy(&d0[2 * xx], &o0, sizeof o0);
                    memcpy(&d0[2 * xx + 1], &o1, sizeof o1);
                    memcpy(&d1[2 * xx], &o2, sizeof o2);
                    memcpy(&d1[2 * xx + 1], &o3, sizeof o3);
                }
            }
            continue;
        }
        for (int64_t y = 0; y < OH; y++)
            for (int64_t xx = 0; xx < OW; xx++) {
                const int64_t a = SFX(argmax_window)(src, H, W, y, xx, kh, kw, sh, sw, pt, pl, dh, dw);
                if (a >= 0)
                    d[a] += g[y * OW + xx];
            }
    }
}

void SFX(tdc_maxpool2d_grad)(const T *gy, const T *x, T *dx, int64_t N, int64_t C, int64_t H,
                             int64_t W, int64_t OH, int64_t OW, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                             int64_t pt, int64_t pl, int64_t dh, int64_t dw)
{
    SFX(maxpool_grad_job) j = {gy, x, dx, H, W, OH, OW, kh, kw, sh, sw, pt, pl, dh, dw};
    /* about 3 ns per input element (LeNet at batch 64: 0.84 ms), worth 250 flops of GEMM */
    tdcrt_parallel_for(N * C, 250.0 * N * C * H * W, SFX(maxpool2d_grad_planes), &j);
}

void SFX(tdc_maxpool2d_gather)(const T *h, const T *x, T *out, int64_t N, int64_t C, int64_t H,
                               int64_t W, int64_t OH, int64_t OW, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                               int64_t pt, int64_t pl, int64_t dh, int64_t dw)
{
    for (int64_t nc = 0; nc < N * C; nc++) {
        const T *src = x + nc * H * W, *hs = h + nc * H * W;
        T *dst = out + nc * OH * OW;
        for (int64_t y = 0; y < OH; y++)
            for (int64_t xx = 0; xx < OW; xx++) {
                const int64_t a = SFX(argmax_window)(src, H, W, y, xx, kh, kw, sh, sw, pt, pl, dh, dw);
                dst[y * OW + xx] = a < 0 ? (T)0 : hs[a];
            }
    }
}

void SFX(tdc_avgpool2d)(const T *x, T *out, int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH,
                        int64_t OW, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                        const double *cy, const double *cx)
{
    for (int64_t nc = 0; nc < N * C; nc++) {
        const T *src = x + nc * H * W;
        T *dst = out + nc * OH * OW;
        for (int64_t y = 0; y < OH; y++) {
            const int64_t y0 = max64(0, y * sh - pt), y1 = min64(H, y * sh - pt + kh);
            for (int64_t xx = 0; xx < OW; xx++) {
                const int64_t x0 = max64(0, xx * sw - pl), x1 = min64(W, xx * sw - pl + kw);
                double s = 0.0;
                for (int64_t iy = y0; iy < y1; iy++)
                    for (int64_t ix = x0; ix < x1; ix++)
                        s += src[iy * W + ix];
                dst[y * OW + xx] = (T)(s / (cy[y] * cx[xx]));
            }
        }
    }
}

void SFX(tdc_avgpool2d_grad)(const T *gy, T *dx, int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH,
                             int64_t OW, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                             const double *cy, const double *cx)
{
    for (int64_t nc = 0; nc < N * C; nc++) {
        const T *g = gy + nc * OH * OW;
        T *d = dx + nc * H * W;
        memset(d, 0, (size_t)(H * W) * sizeof(T));
        for (int64_t y = 0; y < OH; y++) {
            const int64_t y0 = max64(0, y * sh - pt), y1 = min64(H, y * sh - pt + kh);
            for (int64_t xx = 0; xx < OW; xx++) {
                const int64_t x0 = max64(0, xx * sw - pl), x1 = min64(W, xx * sw - pl + kw);
                const double v = g[y * OW + xx] / (cy[y] * cx[xx]);
                for (int64_t iy = y0; iy < y1; iy++)
                    for (int64_t ix = x0; ix < x1; ix++)
                        d[iy * W + ix] = (T)(d[iy * W + ix] + v);
            }
        }
    }
}

void SFX(tdc_global_avgpool)(const T *x, T *out, int64_t NC, int64_t HW)
{
    for (int64_t i = 0; i < NC; i++) {
        double s = 0.0;
        for (int64_t j = 0; j < HW; j++)
            s += x[i * HW + j];
        out[i] = (T)(s / (double)HW);
    }
}

#endif
