/* tdc runtime: sparse_linear, a dense x times a CSR weight (pruned layers).
 *
 * out[M,N] = x[M,K] @ W^T (+ b) with W [N,K] in CSR (values, cols, rowptr; int32 indices). The
 * CSR arrays were checked when the executable bound them (tdc/ops/sparse.py: check_csr), so the
 * kernels index without bounds checks.
 *
 * Without -ffast-math gcc neither reorders a floating sum nor (under -std=c11) contracts a * b + c
 * into an FMA, and plain loops over a CSR row measured 4-5x slower than the kernels below, which
 * spell out the independent lanes with gcc's vector extensions (lowered to AVX-512 or AVX2 by
 * -march=native):
 *   - few rows of x (M < 4): two outputs at a time, each output's nonzeros summed in four
 *     partial sums, added at the end of the row;
 *   - a batch: x is transposed block by block into xt [K, MB] (MB rows of x side by side, 8x8
 *     tiles transposed in registers), and a nonzero (n, k) adds v * xt[k, 0:MB] to row n's MB
 *     accumulators: contiguous loads, one broadcast, MB / VL independent multiply-adds per
 *     nonzero. The results go to yt [N, MB] and are transposed into out the same way. MB is the
 *     smallest of VL, 2 VL, 4 VL that covers the batch (4 VL, in blocks, for larger batches), so a
 *     small batch pays for little padding. */
#include "internal.h"

#ifndef TDC_TEMPLATE
#define VBYTES 64   /* one AVX-512 register; two or four operations where vectors are narrower */
typedef int32_t lane_f32;   /* shuffle masks have the element width of the data */
typedef int64_t lane_f64;
#define fma_f32 __builtin_fmaf   /* inlined: -march=native has FMA where the CPU does */
#define fma_f64 __builtin_fma
#define SPARSE_CHUNK_BYTES ((int64_t)512 << 10)   /* a chunk of sparse_conv2d's im2col columns */
#define TDC_SELF "sparse.c"
#include "instantiate.h"

#else /* the template: T, SFX(name) */

typedef T SFX(vec) __attribute__((vector_size(VBYTES)));
typedef T SFX(v8) __attribute__((vector_size(8 * sizeof(T))));
typedef SFX(lane) SFX(m8) __attribute__((vector_size(8 * sizeof(T))));
#define VL ((int64_t)(VBYTES / sizeof(T)))

/* dst[c * ldd + r] = src[r * lds + c] for an 8x8 tile: three rounds of two-vector shuffles. */
static inline void SFX(transpose8)(const T *src, int64_t lds, T *dst, int64_t ldd)
{
    typedef SFX(v8) V;
    typedef SFX(m8) Mk;
    V r[8], t[8], u[8];
    for (int i = 0; i < 8; i++)
        __builtin_memcpy(&r[i], src + i * lds, sizeof(V));
    const Mk lo1 = {0, 8, 1, 9, 4, 12, 5, 13}, hi1 = {2, 10, 3, 11, 6, 14, 7, 15};
    const Mk lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
    const Mk lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
    for (int i = 0; i < 8; i += 2) {
        t[i] = __builtin_shuffle(r[i], r[i + 1], lo1);
        t[i + 1] = __builtin_shuffle(r[i], r[i + 1], hi1);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = __builtin_shuffle(t[i], t[i + 2], lo2);
        u[i + 1] = __builtin_shuffle(t[i], t[i + 2], hi2);
        u[i + 2] = __builtin_shuffle(t[i + 1], t[i + 3], lo2);
        u[i + 3] = __builtin_shuffle(t[i + 1], t[i + 3], hi2);
    }
    for (int i = 0; i < 4; i++) {
        V c0 = __builtin_shuffle(u[i], u[i + 4], lo4), c4 = __builtin_shuffle(u[i], u[i + 4], hi4);
        __builtin_memcpy(dst + i * ldd, &c0, sizeof(V));
        __builtin_memcpy(dst + (i + 4) * ldd, &c4, sizeof(V));
    }
}

/* dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols; tiles of 8x8 where they fit. */
static void SFX(transpose)(const T *src, int64_t lds, T *dst, int64_t ldd, int64_t rows, int64_t cols)
{
    const int64_t r8 = rows & ~(int64_t)7, c8 = cols & ~(int64_t)7;
    for (int64_t r = 0; r < r8; r += 8)
        for (int64_t c = 0; c < c8; c += 8)
            SFX(transpose8)(src + r * lds + c, lds, dst + c * ldd + r, ldd);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = r < r8 ? c8 : 0; c < cols; c++)
            dst[c * ldd + r] = src[r * lds + c];
}

/* Output rows n and n+1 are summed together, four partial sums each: with one row at a time, the
 * row's end (a short, data-dependent trip count) drains the pipeline, and two interleaved rows
 * measured 15-25% faster on the MLP's layers at 90% sparsity (eight chains for one row, AVX-512
 * and AVX2 gathers of x measured 10-50% slower than scalar loads; benchmarks/README.md). */
#define CSR_FMA4(a, j)                                                                                  \
    do {                                                                                               \
        a[0] = SFX(fma)(values[j], x[cols[j]], a[0]);                                                  \
        a[1] = SFX(fma)(values[j + 1], x[cols[j + 1]], a[1]);                                          \
        a[2] = SFX(fma)(values[j + 2], x[cols[j + 2]], a[2]);                                          \
        a[3] = SFX(fma)(values[j + 3], x[cols[j + 3]], a[3]);                                          \
    } while (0)

static inline T SFX(csr_tail)(const T *x, const T *values, const int32_t *cols, int64_t j, int64_t hi, T a[4])
{
    for (; j + 4 <= hi; j += 4)
        CSR_FMA4(a, j);
    for (; j < hi; j++)
        a[0] = SFX(fma)(values[j], x[cols[j]], a[0]);
    return (a[0] + a[1]) + (a[2] + a[3]);
}

static void SFX(csr_rows)(const T *x, const T *values, const int32_t *cols, const int32_t *rowptr,
                          const T *b, int64_t has_bias, T *out, int64_t N)
{
    int64_t n = 0;
    for (; n + 2 <= N; n += 2) {
        int64_t j = rowptr[n], k = rowptr[n + 1];
        const int64_t hj = k, hk = rowptr[n + 2];
        T a[4] = {0, 0, 0, 0}, c[4] = {0, 0, 0, 0};
        for (; j + 4 <= hj && k + 4 <= hk; j += 4, k += 4) {
            CSR_FMA4(a, j);
            CSR_FMA4(c, k);
        }
        const T y0 = SFX(csr_tail)(x, values, cols, j, hj, a), y1 = SFX(csr_tail)(x, values, cols, k, hk, c);
        out[n] = has_bias ? y0 + b[n] : y0;
        out[n + 1] = has_bias ? y1 + b[n + 1] : y1;
    }
    if (n < N) {
        T a[4] = {0, 0, 0, 0};
        const T y = SFX(csr_tail)(x, values, cols, rowptr[n], rowptr[n + 1], a);
        out[n] = has_bias ? y + b[n] : y;
    }
}
#undef CSR_FMA4

/* y[n - r0, 0 : NV VL] = b[n] + the sum over row n's nonzeros j of values[j] * (NV vectors at ROW), for
 * the rows n in [r0, r1), into y (row stride ldy): ROW is xm + cols[j] * ldx for a dense matrix xm
 * (csr_strip), or xm + offs[j] for offsets computed once per call (csr_strip_at). A nonzero costs one
 * broadcast and NV independent multiply-adds on contiguous loads; the accumulators stay in registers
 * for the whole row. */
#define CSR_STRIP(NV, NAME, ROW)                                                                       \
static void SFX(NAME##NV)(const T *values, const int32_t *cols, const int64_t *offs,                   \
                          const int32_t *rowptr, const T *b, int64_t has_bias, int64_t r0, int64_t r1,  \
                          const T *xm, int64_t ldx, T *y, int64_t ldy)                                  \
{                                                                                                      \
    typedef SFX(vec) V;                                                                                \
    (void)cols, (void)offs, (void)ldx;                                                                 \
    for (int64_t n = r0; n < r1; n++) {                                                                \
        V acc[NV];                                                                                     \
        for (int q = 0; q < NV; q++)                                                                   \
            acc[q] = (V){0};                                                                           \
        for (int64_t j = rowptr[n]; j < rowptr[n + 1]; j++) {                                          \
            const T v = values[j];                                                                     \
            const T *r = xm + (ROW);                                                                   \
            for (int q = 0; q < NV; q++) {                                                             \
                V t;                                                                                   \
                __builtin_memcpy(&t, r + q * VL, sizeof(V));                                           \
                acc[q] += v * t;                                                                       \
            }                                                                                          \
        }                                                                                              \
        const T bn = has_bias ? b[n] : 0;                                                              \
        for (int q = 0; q < NV; q++) {                                                                 \
            V t = acc[q] + bn;                                                                         \
            __builtin_memcpy(y + (n - r0) * ldy + q * VL, &t, sizeof(V));                              \
        }                                                                                              \
    }                                                                                                  \
}
CSR_STRIP(1, csr_strip, (int64_t)cols[j] * ldx)
CSR_STRIP(2, csr_strip, (int64_t)cols[j] * ldx)
CSR_STRIP(4, csr_strip, (int64_t)cols[j] * ldx)
CSR_STRIP(1, csr_strip_at, offs[j])
CSR_STRIP(4, csr_strip_at, offs[j])

/* Rows [0, mb) of x (mb <= NV * VL) into out; xt and yt are scratch of K and N times NV * VL. */
#define BLOCK_KERNEL(NV)                                                                               \
static void SFX(csr_block##NV)(const T *x, const T *values, const int32_t *cols, const int32_t *rowptr,  \
                               const T *b, int64_t has_bias, T *out, int64_t mb, int64_t K, int64_t N,  \
                               T *xt, T *yt)                                                            \
{                                                                                                      \
    const int64_t MB = NV * VL;                                                                        \
    if (mb < MB)                                                                                       \
        for (int64_t k = 0; k < K; k++)                                                                \
            for (int64_t i = mb; i < MB; i++)                                                          \
                xt[k * MB + i] = 0;                                                                    \
    SFX(transpose)(x, K, xt, MB, mb, K);                                                               \
    SFX(csr_strip##NV)(values, cols, NULL, rowptr, b, has_bias, 0, N, xt, MB, yt, MB);                       \
    SFX(transpose)(yt, MB, out, N, N, mb);                                                             \
}
BLOCK_KERNEL(1)
BLOCK_KERNEL(2)
BLOCK_KERNEL(4)

void SFX(tdc_sparse_linear)(const T *x, const T *values, const int32_t *cols, const int32_t *rowptr,
                            const T *b, int64_t has_bias, T *out, int64_t M, int64_t K, int64_t N)
{
    if (M <= 0 || N <= 0)
        return;
    if (M < 4) {   /* gathers per nonzero and row cost less than padding a block to VL rows */
        for (int64_t m = 0; m < M; m++)
            SFX(csr_rows)(x + m * K, values, cols, rowptr, b, has_bias, out + m * N, N);
        return;
    }
    const int64_t nv = M <= VL ? 1 : M <= 2 * VL ? 2 : 4, mb = nv * VL;
    /* 64-byte aligned: a row of xt is whole vectors, and a load split over two cache lines
       made the block kernel 15% slower */
    void *raw = tdcrt_malloc((K + N) * mb * (int64_t)sizeof(T) + 64);
    T *xt = (T *)(((uintptr_t)raw + 63) & ~(uintptr_t)63);
    T *yt = xt + K * mb;
    for (int64_t m0 = 0; m0 < M; m0 += mb) {
        const int64_t rows = min64(mb, M - m0);
        const T *xb = x + m0 * K;
        T *ob = out + m0 * N;
        if (nv == 1)
            SFX(csr_block1)(xb, values, cols, rowptr, b, has_bias, ob, rows, K, N, xt, yt);
        else if (nv == 2)
            SFX(csr_block2)(xb, values, cols, rowptr, b, has_bias, ob, rows, K, N, xt, yt);
        else
            SFX(csr_block4)(xb, values, cols, rowptr, b, has_bias, ob, rows, K, N, xt, yt);
    }
    free(raw);
}

/* ---- sparse_linear's gradients ------------------------------------------------------------------- */

/* dx [M, K] = g [M, N] @ W for W [N, K] in CSR: the forward kernel on W's transpose, built per call
 * by a counting sort (O(nnz + K), against the product's O(M nnz)). */
void SFX(tdc_sparse_linear_grad_input)(const T *g, const T *values, const int32_t *cols, const int32_t *rowptr,
                                       T *dx, int64_t M, int64_t K, int64_t N)
{
    const int64_t nnz = rowptr[N];
    int32_t *tr = tdcrt_malloc((K + 1) * (int64_t)sizeof(int32_t));
    int32_t *fill = tdcrt_malloc((K + 1) * (int64_t)sizeof(int32_t));
    int32_t *tc = tdcrt_malloc(max64(nnz, 1) * (int64_t)sizeof(int32_t));
    T *tv = tdcrt_malloc(max64(nnz, 1) * (int64_t)sizeof(T));
    memset(tr, 0, (size_t)(K + 1) * sizeof(int32_t));
    for (int64_t j = 0; j < nnz; j++)
        tr[cols[j] + 1]++;
    for (int64_t c = 0; c < K; c++)
        tr[c + 1] += tr[c];
    memcpy(fill, tr, (size_t)(K + 1) * sizeof(int32_t));
    for (int64_t r = 0; r < N; r++)
        for (int64_t j = rowptr[r]; j < rowptr[r + 1]; j++) {
            const int32_t q = fill[cols[j]]++;
            tv[q] = values[j];
            tc[q] = (int32_t)r;
        }
    SFX(tdc_sparse_linear)(g, tv, tc, tr, NULL, 0, dx, M, N, K);
    free(tr);
    free(fill);
    free(tc);
    free(tv);
}

/* dv[j] = sum_m g[m, row(j)] * x[m, cols[j]]: x and g transposed into xt [K, ld] and gt [N, ld] (ld whole
 * vectors, zero past M), then one dot product of contiguous rows per nonzero. */
void SFX(tdc_sparse_linear_grad_values)(const T *x, const T *g, const int32_t *cols, const int32_t *rowptr,
                                        T *dv, int64_t M, int64_t K, int64_t N)
{
    typedef SFX(vec) V;
    const int64_t ld = (M + VL - 1) / VL * VL;
    void *raw = tdcrt_malloc((K + N) * ld * (int64_t)sizeof(T) + 64);
    T *xt = (T *)(((uintptr_t)raw + 63) & ~(uintptr_t)63), *gt = xt + K * ld;
    memset(xt, 0, (size_t)((K + N) * ld) * sizeof(T));
    SFX(transpose)(x, K, xt, ld, M, K);
    SFX(transpose)(g, N, gt, ld, M, N);
    for (int64_t r = 0; r < N; r++)
        for (int64_t j = rowptr[r]; j < rowptr[r + 1]; j++) {
            const T *a = gt + r * ld, *b = xt + (int64_t)cols[j] * ld;
            V acc = (V){0};
            for (int64_t m = 0; m < ld; m += VL) {
                V u, w;
                __builtin_memcpy(&u, a + m, sizeof(V));
                __builtin_memcpy(&w, b + m, sizeof(V));
                acc += u * w;
            }
            T sum = 0;
            for (int q = 0; q < VL; q++)
                sum += acc[q];
            dv[j] = sum;
        }
    free(raw);
}

/* ---- sparse_conv2d ---------------------------------------------------------------------------------
 * Stride 1 ("wide" outputs): each image is copied once into a zero-padded xp [C, Hp, Wp]. Output row
 * y's pixel x, computed at y * Wp + x, reads tap (c, i, j) at c * Hp * Wp + (y + i dh) * Wp + x + j dw,
 * so every nonzero's taps are one contiguous run at a fixed offset (offs, per call): the CSR strips
 * run over OH * Wp positions, of which the Wp - OW per row past the output are computed and dropped
 * (their taps stay within xp and its zero tail). No column matrix is built.
 * Other strides: im2col, then the strips over the column matrix (chunks of images side by side). */

typedef struct {
    conv_geo g;
    const T *x, *values, *b;
    const int32_t *cols, *rowptr;
    const int64_t *offs;      /* the wide path's tap offsets, one per nonzero */
    int64_t has_bias;
    T *out;
} SFX(sparse_conv_job);

/* res [rows, width] by strips of four vectors, then one (width a whole number of vectors). */
static void SFX(csr_strips)(const SFX(sparse_conv_job) *j, int64_t r0, int64_t r1, const T *xm, int64_t ldx,
                            T *res, int64_t width)
{
    int64_t q = 0;
    if (j->offs) {
        for (; q + 4 * VL <= width; q += 4 * VL)
            SFX(csr_strip_at4)(j->values, j->cols, j->offs, j->rowptr, j->b, j->has_bias, r0, r1, xm + q, 0, res + q, width);
        for (; q < width; q += VL)
            SFX(csr_strip_at1)(j->values, j->cols, j->offs, j->rowptr, j->b, j->has_bias, r0, r1, xm + q, 0, res + q, width);
    } else {
        for (; q + 4 * VL <= width; q += 4 * VL)
            SFX(csr_strip4)(j->values, j->cols, NULL, j->rowptr, j->b, j->has_bias, r0, r1, xm + q, ldx, res + q, width);
        for (; q < width; q += VL)
            SFX(csr_strip1)(j->values, j->cols, NULL, j->rowptr, j->b, j->has_bias, r0, r1, xm + q, ldx, res + q, width);
    }
}

static inline int64_t SFX(whole_vectors)(int64_t n) { return (n + VL - 1) / VL * VL; }

static void *SFX(aligned)(int64_t elems, T **p)
{
    void *raw = tdcrt_malloc(elems * (int64_t)sizeof(T) + 64);
    *p = (T *)(((uintptr_t)raw + 63) & ~(uintptr_t)63);
    return raw;
}

/* Images [n_begin, n_end) by the wide path (stride 1). */
static void SFX(sparse_conv2d_wide)(void *ctx, int64_t n_begin, int64_t n_end)
{
    const SFX(sparse_conv_job) *j = ctx;
    const conv_geo *g = &j->g;
    const int64_t C = g->C, H = g->H, W = g->W, OH = g->OH, OW = g->OW, CO = g->CO;
    const int64_t Hp = OH + (g->KH - 1) * g->dh, Wp = OW + (g->KW - 1) * g->dw, plane = Hp * Wp;
    const int64_t cg = C / g->groups, cog = CO / g->groups, width = SFX(whole_vectors)(OH * Wp);
    const int64_t xp_elems = C * plane + (g->KW - 1) * g->dw + VL;   /* the tail the last runs read */
    T *xp, *res;
    void *raw_x = SFX(aligned)(xp_elems, &xp), *raw_r = SFX(aligned)(cog * width, &res);
    memset(xp, 0, (size_t)xp_elems * sizeof(T));
    /* the rows and columns of x inside the padded window [-pt, Hp - pt) x [-pl, Wp - pl) */
    const int64_t y0 = max64(0, -g->pt), y1 = min64(H, Hp - g->pt), x0 = max64(0, -g->pl), x1 = min64(W, Wp - g->pl);
    for (int64_t n = n_begin; n < n_end; n++) {
        for (int64_t c = 0; c < C; c++)
            for (int64_t y = y0; y < y1; y++)
                memcpy(xp + c * plane + (y + g->pt) * Wp + x0 + g->pl, j->x + ((n * C + c) * H + y) * W + x0,
                       (size_t)max64(x1 - x0, 0) * sizeof(T));
        for (int64_t gi = 0; gi < g->groups; gi++) {
            const int64_t r0 = gi * cog;
            SFX(csr_strips)(j, r0, r0 + cog, xp + gi * cg * plane, 0, res, width);
            for (int64_t o = 0; o < cog; o++)
                for (int64_t y = 0; y < OH; y++)
                    memcpy(j->out + ((n * CO + r0 + o) * OH + y) * OW, res + o * width + y * Wp, (size_t)OW * sizeof(T));
        }
    }
    free(raw_x);
    free(raw_r);
}

/* Images [n_begin, n_end) by im2col: chunks whose columns sit side by side in xm [K, ld] (ld whole
 * vectors, the columns past the images zero), kept near the L2 size rather than conv2d's 8 MB, since
 * every strip reads K of their rows once per group. */
static void SFX(sparse_conv2d_cols)(void *ctx, int64_t n_begin, int64_t n_end)
{
    const SFX(sparse_conv_job) *j = ctx;
    const conv_geo *g = &j->g;
    const int64_t P = g->OH * g->OW, groups = g->groups, cg = g->C / groups, CO = g->CO, cog = CO / groups;
    const int64_t K = cg * g->KH * g->KW;
    const int64_t fit = SPARSE_CHUNK_BYTES / max64(K * P * (int64_t)sizeof(T), 1);
    const int64_t nb = max64(1, min64(fit, n_end - n_begin));
    const int64_t ld = SFX(whole_vectors)(nb * P);
    T *xm;
    void *raw = SFX(aligned)((K + cog) * ld, &xm);
    T *res = xm + K * ld;
    for (int64_t n0 = n_begin; n0 < n_end; n0 += nb) {
        const int64_t m = min64(nb, n_end - n0), used = m * P, width = SFX(whole_vectors)(used);
        for (int64_t gi = 0; gi < groups; gi++) {
            for (int64_t n = 0; n < m; n++)
                SFX(tdcrt_im2col)(g, j->x + ((n0 + n) * g->C + gi * cg) * g->H * g->W, cg, xm + n * P, ld);
            for (int64_t k = 0; k < K; k++)
                memset(xm + k * ld + used, 0, (size_t)(width - used) * sizeof(T));
            const int64_t r0 = gi * cog;
            SFX(csr_strips)(j, r0, r0 + cog, xm, ld, res, ld);
            for (int64_t n = 0; n < m; n++)
                for (int64_t o = 0; o < cog; o++)
                    memcpy(j->out + ((n0 + n) * CO + r0 + o) * P, res + o * ld + n * P, (size_t)P * sizeof(T));
        }
    }
    free(raw);
}

void SFX(tdc_sparse_conv2d)(const T *x, const T *values, const int32_t *cols, const int32_t *rowptr,
                            const T *b, int64_t has_bias, T *out,
                            int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t KH, int64_t KW,
                            int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                            int64_t dh, int64_t dw, int64_t groups)
{
    const int64_t nnz = rowptr[CO], wide = sh == 1 && sw == 1;
    int64_t *offs = NULL;
    if (wide) {
        const int64_t Hp = OH + (KH - 1) * dh, Wp = OW + (KW - 1) * dw;
        offs = tdcrt_malloc(max64(nnz, 1) * (int64_t)sizeof(int64_t));
        for (int64_t q = 0; q < nnz; q++) {
            const int64_t c = cols[q] / (KH * KW), i = cols[q] / KW % KH, jj = cols[q] % KW;
            offs[q] = (c * Hp + i * dh) * Wp + jj * dw;
        }
    }
    SFX(sparse_conv_job) j = {CONV_GEO, x, values, b, cols, rowptr, offs, has_bias, out};
    const double work = 2.0 * N * OH * OW * nnz;
    /* the images are split over the threads */
    tdcrt_parallel_for(N, work, wide ? SFX(sparse_conv2d_wide) : SFX(sparse_conv2d_cols), &j);
    free(offs);
}

#undef BLOCK_KERNEL
#undef VL
#endif
