/* tdc runtime: convolution by Winograd F(2x2,3x3) and F(4x4,3x3), forward and both backward. */
#include "internal.h"

#ifndef TDC_TEMPLATE

/* Winograd F(m x m, 3 x 3) matrices (Lavin and Gray), 1-D y = A^T [(G g) . (B^T d)], as in
 * tdc/backends/numba/conv_algos.py: F(2,3) interpolates at 0, 1, -1, inf; F(4,3) at
 * 0, 1, -1, 2, -2, inf. A^T is [m, alpha], G [alpha, 3], B^T [alpha, alpha], alpha = m + 2. */
static const double WINO_AT2[2 * 4] = {1, 1, 1, 0, 0, 1, -1, -1};
static const double WINO_G2[4 * 3] = {1, 0, 0, .5, .5, .5, .5, -.5, .5, 0, 0, 1};
static const double WINO_BT2[4 * 4] = {1, 0, -1, 0, 0, 1, 1, 0, 0, -1, 1, 0, 0, 1, 0, -1};
static const double WINO_AT4[4 * 6] = {1, 1, 1, 1, 1, 0, 0, 1, -1, 2, -2, 0,
                                       0, 1, 1, 4, 4, 0, 0, 1, -1, 8, -8, 1};
static const double WINO_G4[6 * 3] = {1. / 4, 0, 0, -1. / 6, -1. / 6, -1. / 6, -1. / 6, 1. / 6, -1. / 6,
                                      1. / 24, 1. / 12, 1. / 6, 1. / 24, -1. / 12, 1. / 6, 0, 0, 1};
static const double WINO_BT4[6 * 6] = {4, 0, -5, 0, 1, 0, 0, -4, -4, 1, 1, 0, 0, 4, -4, -1, 1, 0,
                                       0, -2, -1, 2, 1, 0, 0, 2, -1, -2, 1, 0, 0, 4, 0, -5, 0, 1};
#define WINO_MAXA 6
#define WINO_BUDGET ((int64_t)32 << 20)   /* tile scratch (V and M) per image chunk */

/* Winograd applies: 3x3 kernel, stride 1, dilation 1. */
static inline int wino_ok(int64_t KH, int64_t KW, int64_t sh, int64_t sw, int64_t dh, int64_t dw)
{
    return KH == 3 && KW == 3 && sh == 1 && sw == 1 && dh == 1 && dw == 1;
}

#define TDC_SELF "conv_winograd.c"
#include "instantiate.h"

#else /* the template: T, SFX(name), GEMM */

/* ---- convolution: Winograd F(2x2,3x3) and F(4x4,3x3) ---------------------------------
 * Output tiles of m x m (alpha x alpha input tiles, alpha = m + 2, overlapping by 2):
 * Y = A^T [sum_c (G g G^T) . (B^T d B)] A. The filter transform U = G g G^T is computed per
 * call; the input tiles' transform V = B^T d B, for all tiles of a chunk of images, is laid out
 * [alpha^2, channels, tiles], so the sum over channels is one GEMM per transform point and
 * group, M[k] = U[k] @ V[k] (BLAS); then the output transform A^T M A, plus bias, cut to the
 * output's size (partial edge tiles read zeros past the input and drop what lies past the
 * output). The backward-input pass is the same algorithm on the rotated, transposed filter
 * (padding 2 - pad); the backward-weight pass is its transpose,
 * dW = G^T [sum_tiles (A dY A^T) . (B^T X B)] G, the tile sum being a GEMM per point.
 * Error: F(2,3) is near im2col's (coefficients 0, +-1, 1/2); F(4,3)'s transforms have
 * coefficients up to 8 and 1/24 and cost roughly one more decimal digit (about 1e-5 of max|y|
 * in f32 instead of 1e-6). Geometries other than 3x3 / stride 1 / dilation 1 go to im2col. */

typedef struct {
    int64_t m, A;
    T AT[WINO_MAXA * WINO_MAXA], G[WINO_MAXA * 3], BT[WINO_MAXA * WINO_MAXA], AM[WINO_MAXA * 4];
} SFX(wino_mats);

static void SFX(wino_init)(SFX(wino_mats) *w, int64_t m)
{
    const double *AT = m == 2 ? WINO_AT2 : WINO_AT4, *G = m == 2 ? WINO_G2 : WINO_G4;
    const double *BT = m == 2 ? WINO_BT2 : WINO_BT4;
    const int64_t A = m + 2;
    w->m = m;
    w->A = A;
    for (int64_t i = 0; i < m * A; i++)
        w->AT[i] = (T)AT[i];
    for (int64_t i = 0; i < A * 3; i++)
        w->G[i] = (T)G[i];
    for (int64_t i = 0; i < A * A; i++)
        w->BT[i] = (T)BT[i];
    for (int64_t a = 0; a < A; a++)          /* AM = A = (A^T)^T, [alpha, m] */
        for (int64_t r = 0; r < m; r++)
            w->AM[a * m + r] = (T)AT[r * A + a];
}

/* U[(a*A + b)*P*Q + p*Q + q] = (G f G^T)[a, b] for the P x Q filters of one group:
 * f = w[p, q] (w is this group's [P, Q, 3, 3]), or with flip, f = w[q, p] rotated by 180 degrees
 * (w is [Q, P, 3, 3]). Vectorised over q; wt is [9, Q], t1 [alpha, 3, Q] scratch. */
static void SFX(wino_filter)(const SFX(wino_mats) *wm, const T *w, int64_t P, int64_t Q, int flip, T *U,
                             T *wt, T *t1)
{
    const int64_t A = wm->A;
    for (int64_t p = 0; p < P; p++) {
        for (int64_t q = 0; q < Q; q++)
            for (int64_t k = 0; k < 9; k++)
                wt[k * Q + q] = flip ? w[(q * P + p) * 9 + 8 - k] : w[(p * Q + q) * 9 + k];
        for (int64_t a = 0; a < A; a++)
            for (int64_t j = 0; j < 3; j++) {
                T *restrict dst = t1 + (a * 3 + j) * Q;
                for (int64_t q = 0; q < Q; q++)
                    dst[q] = 0;
                for (int64_t i = 0; i < 3; i++) {
                    const T cf = wm->G[a * 3 + i];
                    const T *restrict src = wt + (i * 3 + j) * Q;
                    if (cf != 0)
                        for (int64_t q = 0; q < Q; q++)
                            dst[q] += cf * src[q];
                }
            }
        for (int64_t a = 0; a < A; a++)
            for (int64_t b = 0; b < A; b++) {
                T *restrict dst = U + (a * A + b) * P * Q + p * Q;
                for (int64_t q = 0; q < Q; q++)
                    dst[q] = 0;
                for (int64_t j = 0; j < 3; j++) {
                    const T cf = wm->G[b * 3 + j];
                    const T *restrict src = t1 + (a * 3 + j) * Q;
                    if (cf != 0)
                        for (int64_t q = 0; q < Q; q++)
                            dst[q] += cf * src[q];
                }
            }
    }
}

/* dw[p, q, i, j] = (G^T Mw[:, p, q] G)[i, j]: the backward-weight pass's last step for one group
 * (Mw is [alpha^2, P, Q], dw this group's [P, Q, 3, 3]). t2 is [alpha, 3, Q], acc [Q] scratch. */
static void SFX(wino_filter_inverse)(const SFX(wino_mats) *wm, const T *Mw, int64_t P, int64_t Q, T *dw,
                                     T *t2, T *acc)
{
    const int64_t A = wm->A;
    for (int64_t p = 0; p < P; p++) {
        for (int64_t a = 0; a < A; a++)
            for (int64_t j = 0; j < 3; j++) {
                T *restrict dst = t2 + (a * 3 + j) * Q;
                for (int64_t q = 0; q < Q; q++)
                    dst[q] = 0;
                for (int64_t b = 0; b < A; b++) {
                    const T cf = wm->G[b * 3 + j];
                    const T *restrict src = Mw + (a * A + b) * P * Q + p * Q;
                    if (cf != 0)
                        for (int64_t q = 0; q < Q; q++)
                            dst[q] += cf * src[q];
                }
            }
        for (int64_t i = 0; i < 3; i++)
            for (int64_t j = 0; j < 3; j++) {
                for (int64_t q = 0; q < Q; q++)
                    acc[q] = 0;
                for (int64_t a = 0; a < A; a++) {
                    const T cf = wm->G[a * 3 + i];
                    const T *restrict src = t2 + (a * 3 + j) * Q;
                    if (cf != 0)
                        for (int64_t q = 0; q < Q; q++)
                            acc[q] += cf * src[q];
                }
                for (int64_t q = 0; q < Q; q++)
                    dw[(p * Q + q) * 9 + i * 3 + j] = acc[q];
            }
    }
}

/* Scratch of wino_tiles for tiles tw wide: rows [L, Wt], tmp [A, Wt], d [L, tw]. */
static int64_t SFX(wino_tiles_scratch)(int64_t A, int64_t step, int64_t tw)
{
    const int64_t Wt = (tw - 1) * step + A;
    return 2 * A * Wt + A * tw;
}

/* V[(a*A + b)*ks + ty*tw + tx] = sum_ij Bm[a,i] Bm[b,j] src[ty*step - py + i, tx*step - px + j] for
 * the th x tw tiles of one plane src [Hs, Ws] (zero outside it). Bm is [A, L]: B^T with
 * L = alpha (input tiles) or A with L = m (output-gradient tiles). The row transform runs along
 * whole padded rows, the column transform over the row's tiles (deinterleaved): both vectorise. */
static void SFX(wino_tiles)(const T *src, int64_t Hs, int64_t Ws, const T *Bm, int64_t A, int64_t L, int64_t step,
                            int64_t py, int64_t px, int64_t th, int64_t tw, T *V, int64_t ks, T *scratch)
{
    const int64_t Wt = (tw - 1) * step + L;
    const int64_t u0 = max64(0, px), u1 = min64(Wt, px + Ws);   /* padded-row columns holding input */
    T *rows = scratch, *tmp = scratch + L * Wt, *d = tmp + A * Wt;
    for (int64_t ty = 0; ty < th; ty++) {
        for (int64_t i = 0; i < L; i++) {
            T *r = rows + i * Wt;
            const int64_t iy = ty * step - py + i;
            memset(r, 0, (size_t)Wt * sizeof(T));
            if (iy >= 0 && iy < Hs && u1 > u0)
                memcpy(r + u0, src + iy * Ws + u0 - px, (size_t)(u1 - u0) * sizeof(T));
        }
        for (int64_t a = 0; a < A; a++) {
            T *restrict ta = tmp + a * Wt;
            memset(ta, 0, (size_t)Wt * sizeof(T));
            for (int64_t i = 0; i < L; i++) {
                const T cf = Bm[a * L + i];
                const T *restrict ri = rows + i * Wt;
                if (cf != 0)
                    for (int64_t u = 0; u < Wt; u++)
                        ta[u] += cf * ri[u];
            }
        }
        for (int64_t a = 0; a < A; a++) {
            const T *ta = tmp + a * Wt;
            for (int64_t j = 0; j < L; j++)
                for (int64_t tx = 0; tx < tw; tx++)
                    d[j * tw + tx] = ta[tx * step + j];
            for (int64_t b = 0; b < A; b++) {
                T *restrict dst = V + (a * A + b) * ks + ty * tw;
                for (int64_t tx = 0; tx < tw; tx++)
                    dst[tx] = 0;
                for (int64_t j = 0; j < L; j++) {
                    const T cf = Bm[b * L + j];
                    const T *restrict dj = d + j * tw;
                    if (cf != 0)
                        for (int64_t tx = 0; tx < tw; tx++)
                            dst[tx] += cf * dj[tx];
                }
            }
        }
    }
}

/* dst [Ho, Wo] = (A^T M[:, tile] A)[r, s] + bias at (ty*m + r, tx*m + s), cut to Ho x Wo; M points
 * ks apart, tiles th x tw from M. Scratch: R [A, m, tw], yv [tw]. */
static void SFX(wino_output)(const SFX(wino_mats) *wm, const T *M, int64_t ks, int64_t th, int64_t tw, T bias,
                             T *dst, int64_t Ho, int64_t Wo, T *R, T *yv)
{
    const int64_t A = wm->A, m = wm->m;
    for (int64_t ty = 0; ty < th; ty++) {
        for (int64_t a = 0; a < A; a++)
            for (int64_t s = 0; s < m; s++) {
                T *restrict rs = R + (a * m + s) * tw;
                for (int64_t tx = 0; tx < tw; tx++)
                    rs[tx] = 0;
                for (int64_t b = 0; b < A; b++) {
                    const T cf = wm->AT[s * A + b];
                    const T *restrict src = M + (a * A + b) * ks + ty * tw;
                    if (cf != 0)
                        for (int64_t tx = 0; tx < tw; tx++)
                            rs[tx] += cf * src[tx];
                }
            }
        for (int64_t r = 0; r < m && ty * m + r < Ho; r++) {
            T *row = dst + (ty * m + r) * Wo;
            for (int64_t s = 0; s < m; s++) {
                for (int64_t tx = 0; tx < tw; tx++)
                    yv[tx] = bias;
                for (int64_t a = 0; a < A; a++) {
                    const T cf = wm->AT[r * A + a];
                    const T *restrict ra = R + (a * m + s) * tw;
                    if (cf != 0)
                        for (int64_t tx = 0; tx < tw; tx++)
                            yv[tx] += cf * ra[tx];
                }
                for (int64_t tx = 0; tx < tw && tx * m + s < Wo; tx++)
                    row[tx * m + s] = yv[tx];
            }
        }
    }
}

/* out[N, groups*q, Ho, Wo] = the 3x3 stride-1 correlation of in[N, groups*p, Hi, Wi] (padding
 * py, px before; may be negative) with the filters whose transforms are U [groups, alpha^2, q, p],
 * plus b when has_bias. The forward pass and the backward-input pass. */
static void SFX(wino_conv)(const SFX(wino_mats) *wm, const T *in, int64_t N, int64_t p, int64_t Hi, int64_t Wi,
                           const T *U, const T *b, int64_t has_bias, T *out, int64_t q, int64_t Ho, int64_t Wo,
                           int64_t groups, int64_t py, int64_t px)
{
    const int64_t m = wm->m, A = wm->A, AA = A * A;
    const int64_t th = (Ho + m - 1) / m, tw = (Wo + m - 1) / m, tiles = th * tw;
    const int64_t per_image = AA * (p + q) * tiles * (int64_t)sizeof(T);
    int64_t nb = max64(1, min64(N, WINO_BUDGET / max64(1, per_image)));
    nb = min64(nb, max64(1, INT_MAX / max64(1, tiles)));
    const int64_t Tc = nb * tiles;
    T *V = tdcrt_malloc(AA * p * Tc * (int64_t)sizeof(T));
    T *M = tdcrt_malloc(AA * q * Tc * (int64_t)sizeof(T));
    T *scratch = tdcrt_malloc((SFX(wino_tiles_scratch)(A, m, tw) + A * m * tw + tw) * (int64_t)sizeof(T));
    for (int64_t n0 = 0; n0 < N; n0 += nb) {
        const int64_t nc = min64(nb, N - n0), Tn = nc * tiles;   /* this chunk's tiles */
        for (int64_t gi = 0; gi < groups; gi++) {
            for (int64_t n = 0; n < nc; n++)
                for (int64_t c = 0; c < p; c++)
                    SFX(wino_tiles)(in + ((n0 + n) * groups * p + gi * p + c) * Hi * Wi, Hi, Wi, wm->BT, A, A, m,
                                    py, px, th, tw, V + c * Tn + n * tiles, p * Tn, scratch);
            for (int64_t k = 0; k < AA; k++)
                SFX(tdcrt_gemm)(0, 0, q, Tn, p, U + (gi * AA + k) * q * p, p, V + k * p * Tn, Tn, 0, M + k * q * Tn, Tn);
            for (int64_t n = 0; n < nc; n++)
                for (int64_t o = 0; o < q; o++) {
                    const int64_t oc = gi * q + o;
                    SFX(wino_output)(wm, M + o * Tn + n * tiles, q * Tn, th, tw, has_bias ? b[oc] : (T)0,
                                     out + ((n0 + n) * groups * q + oc) * Ho * Wo, Ho, Wo, scratch,
                                     scratch + A * m * tw);
                }
        }
    }
    free(V);
    free(M);
    free(scratch);
}

/* U [groups, alpha^2, P, Q] for all groups (see wino_filter). */
static T *SFX(wino_filters)(const SFX(wino_mats) *wm, const T *w, int64_t groups, int64_t P, int64_t Q, int flip)
{
    const int64_t AA = wm->A * wm->A;
    T *U = tdcrt_malloc(groups * AA * P * Q * (int64_t)sizeof(T));
    T *scr = tdcrt_malloc((9 + 3 * wm->A) * Q * (int64_t)sizeof(T));
    for (int64_t gi = 0; gi < groups; gi++)
        SFX(wino_filter)(wm, w + gi * P * Q * 9, P, Q, flip, U + gi * AA * P * Q, scr, scr + 9 * Q);
    free(scr);
    return U;
}

static void SFX(wino_forward)(int64_t m, const T *x, const T *w, const T *b, int64_t has_bias, T *out,
                              int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t OH, int64_t OW,
                              int64_t pt, int64_t pl, int64_t groups)
{
    SFX(wino_mats) wm;
    SFX(wino_init)(&wm, m);
    const int64_t cg = C / groups, cog = CO / groups;
    T *U = SFX(wino_filters)(&wm, w, groups, cog, cg, 0);
    SFX(wino_conv)(&wm, x, N, cg, H, W, U, b, has_bias, out, cog, OH, OW, groups, pt, pl);
    free(U);
}

/* dx = the 3x3 correlation of gy with w rotated by 180 degrees and transposed, padding 2 - pad. */
static void SFX(wino_grad_input)(int64_t m, const T *gy, const T *w, T *dx, int64_t N, int64_t C, int64_t H,
                                 int64_t W, int64_t CO, int64_t OH, int64_t OW, int64_t pt, int64_t pl,
                                 int64_t groups)
{
    SFX(wino_mats) wm;
    SFX(wino_init)(&wm, m);
    const int64_t cg = C / groups, cog = CO / groups;
    T *U = SFX(wino_filters)(&wm, w, groups, cg, cog, 1);
    SFX(wino_conv)(&wm, gy, N, cog, OH, OW, U, NULL, 0, dx, cg, H, W, groups, 2 - pt, 2 - pl);
    free(U);
}

static void SFX(wino_grad_weight)(int64_t m, const T *x, const T *gy, T *dwt, int64_t N, int64_t C, int64_t H,
                                  int64_t W, int64_t CO, int64_t OH, int64_t OW, int64_t pt, int64_t pl,
                                  int64_t groups)
{
    SFX(wino_mats) wm;
    SFX(wino_init)(&wm, m);
    const int64_t A = m + 2, AA = A * A, cg = C / groups, cog = CO / groups;
    const int64_t th = (OH + m - 1) / m, tw = (OW + m - 1) / m, tiles = th * tw;
    const int64_t per_image = AA * (cg + cog) * tiles * (int64_t)sizeof(T);
    int64_t nb = max64(1, min64(N, WINO_BUDGET / max64(1, per_image)));
    nb = min64(nb, max64(1, INT_MAX / max64(1, tiles)));
    T *Z = tdcrt_malloc(AA * cog * nb * tiles * (int64_t)sizeof(T));   /* A dY A^T tiles */
    T *V = tdcrt_malloc(AA * cg * nb * tiles * (int64_t)sizeof(T));    /* B^T X B tiles */
    T *Mw = tdcrt_malloc(AA * cog * cg * (int64_t)sizeof(T));
    T *scratch = tdcrt_malloc((SFX(wino_tiles_scratch)(A, m, tw) + 3 * A * cg + cg) * (int64_t)sizeof(T));
    for (int64_t gi = 0; gi < groups; gi++) {
        for (int64_t n0 = 0; n0 < N; n0 += nb) {
            const int64_t nc = min64(nb, N - n0), Tn = nc * tiles;
            for (int64_t n = 0; n < nc; n++) {
                for (int64_t c = 0; c < cg; c++)
                    SFX(wino_tiles)(x + ((n0 + n) * C + gi * cg + c) * H * W, H, W, wm.BT, A, A, m, pt, pl,
                                    th, tw, V + c * Tn + n * tiles, cg * Tn, scratch);
                for (int64_t o = 0; o < cog; o++)
                    SFX(wino_tiles)(gy + ((n0 + n) * CO + gi * cog + o) * OH * OW, OH, OW, wm.AM, A, m, m, 0, 0,
                                    th, tw, Z + o * Tn + n * tiles, cog * Tn, scratch);
            }
            /* Mw[k] (+)= Z[k] [cog, Tn] @ V[k]^T [Tn, cg] */
            for (int64_t k = 0; k < AA; k++)
                SFX(tdcrt_gemm)(0, 1, cog, cg, Tn, Z + k * cog * Tn, Tn, V + k * cg * Tn, Tn, n0 > 0 ? 1 : 0,
                          Mw + k * cog * cg, cg);
        }
        SFX(wino_filter_inverse)(&wm, Mw, cog, cg, dwt + gi * cog * cg * 9, scratch, scratch + 3 * A * cg);
    }
    free(Z);
    free(V);
    free(Mw);
    free(scratch);
}

#define WINO_ENTRY(M)                                                                                        \
void SFX(tdc_conv2d_winograd_f##M)(const T *x, const T *w, const T *b, int64_t has_bias, T *out,                \
                                   int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t KH,           \
                                   int64_t KW, int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt,       \
                                   int64_t pl, int64_t dh, int64_t dw, int64_t groups)                           \
{                                                                                                               \
    if (!wino_ok(KH, KW, sh, sw, dh, dw))                                                                       \
        SFX(tdc_conv2d)(x, w, b, has_bias, out, N, C, H, W, CO, KH, KW, OH, OW, sh, sw, pt, pl, dh, dw, groups); \
    else                                                                                                        \
        SFX(wino_forward)(M, x, w, b, has_bias, out, N, C, H, W, CO, OH, OW, pt, pl, groups);                    \
}                                                                                                               \
void SFX(tdc_conv2d_grad_input_winograd_f##M)(const T *gy, const T *w, T *dx,                                   \
                                              int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO,            \
                                              int64_t KH, int64_t KW, int64_t OH, int64_t OW, int64_t sh,        \
                                              int64_t sw, int64_t pt, int64_t pl, int64_t dh, int64_t dw,        \
                                              int64_t groups)                                                    \
{                                                                                                               \
    if (!wino_ok(KH, KW, sh, sw, dh, dw))                                                                       \
        SFX(tdc_conv2d_grad_input)(gy, w, dx, N, C, H, W, CO, KH, KW, OH, OW, sh, sw, pt, pl, dh, dw, groups);  \
    else                                                                                                        \
        SFX(wino_grad_input)(M, gy, w, dx, N, C, H, W, CO, OH, OW, pt, pl, groups);                              \
}                                                                                                               \
void SFX(tdc_conv2d_grad_weight_winograd_f##M)(const T *x, const T *gy, T *dwt,                                 \
                                               int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO,           \
                                               int64_t KH, int64_t KW, int64_t OH, int64_t OW, int64_t sh,       \
                                               int64_t sw, int64_t pt, int64_t pl, int64_t dh, int64_t dw,       \
                                               int64_t groups)                                                   \
{                                                                                                               \
    if (!wino_ok(KH, KW, sh, sw, dh, dw))                                                                       \
        SFX(tdc_conv2d_grad_weight)(x, gy, dwt, N, C, H, W, CO, KH, KW, OH, OW, sh, sw, pt, pl, dh, dw, groups); \
    else                                                                                                        \
        SFX(wino_grad_weight)(M, x, gy, dwt, N, C, H, W, CO, OH, OW, pt, pl, groups);                            \
}

WINO_ENTRY(2)
WINO_ENTRY(4)
#undef WINO_ENTRY

#endif
