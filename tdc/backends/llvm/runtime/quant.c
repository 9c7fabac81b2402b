/* tdc runtime: int8 kernels (tdc/ops/quant.py): quantize, dequantize, qlinear, qconv2d, and
 * maxpool2d on i8.
 *
 * Both products are one GEMM, C[r, c] = sum_k A[r, k] * B[k, c], where A ("rows") is u8 and read
 * 4 bytes at a time (broadcast to every lane) and B is the i8 weights, packed so that one
 * 64-byte load holds 4 consecutive k of 16 consecutive output channels (`pack_weights`). The
 * i8 activations become u8 by adding 128 (x ^ 0x80), which u8 x i8 instructions need; the
 * epilogue takes (128 + x_zero) * sum_k w[c, k] back off, adds the bias, and requantizes:
 *   AVX-512 VNNI   vpdpbusd zmm: 16 channels x 4 k per instruction;
 *   AVX-VNNI       vpdpbusd ymm (Alder Lake and later, Zen 5);
 *   AVX2           vpmaddubsw + vpmaddwd. vpmaddubsw saturates its i16 pair sums (255 * 127 * 2 >
 *                  32767), so each u8 is split as lo + 128 * hi (lo < 128, hi in {0, 1}): both
 *                  halves' pair sums fit an i16, and the result is exact;
 *   otherwise      scalar C.
 * Every path gives the same int32 accumulators, so every path matches the numpy reference bit
 * for bit (the requantization is the reference's float32 arithmetic, see quant.py).
 *
 * qconv2d needs no im2col: each image (one group's channels) is copied once into a padded NHWC
 * u8 image, where the KW taps times C channels of one kernel row are contiguous when the
 * dilation along x is 1 (else each tap's C channels, padded to 4). A GEMM row is an output pixel,
 * its k-groups are offsets from the pixel's top-left corner (goff), and the weights are packed in
 * the same k order. Bytes read past a segment's end meet zero weights.
 */
#include "internal.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define QV 16   /* output channels per packed weight block */

static inline int64_t rup(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/* ---- weights ---------------------------------------------------------------------------- */

/* packed [nv][ng][16][4] from w [n][K] (row stride ldw): w[c][k] goes to k position kpos[k]
 * (kpos NULL: k); wsum[c] = sum_k w[c][k] (nv * 16 entries; zero beyond n). */
static void pack_weights(const int8_t *w, int64_t n, int64_t K, int64_t ldw, const int64_t *kpos, int64_t ng,
                         int8_t *packed, int64_t *wsum)
{
    const int64_t nv = rup(n, QV) / QV;
    memset(packed, 0, (size_t)(nv * ng * 64));
    for (int64_t c = 0; c < nv * QV; c++)
        wsum[c] = 0;
    if (!kpos) {    /* the identity order (qlinear, every call): written in packed order, 4 bytes at a time */
        for (int64_t c = 0; c < n; c++) {
            const int8_t *restrict src = w + c * ldw;
            int8_t *restrict dst = packed + (c / QV * ng * QV + c % QV) * 4;
            int64_t s = 0;
            for (int64_t k = 0; k < K; k++)
                s += src[k];
            wsum[c] = s;
            for (int64_t g = 0; g < K / 4; g++)
                memcpy(dst + g * QV * 4, src + 4 * g, 4);
            for (int64_t k = K / 4 * 4; k < K; k++)
                dst[(k / 4) * QV * 4 + k % 4] = src[k];
        }
        return;
    }
    for (int64_t c = 0; c < n; c++)
        for (int64_t k = 0; k < K; k++) {
            const int64_t p = kpos ? kpos[k] : k;
            const int8_t v = w[c * ldw + k];
            packed[((c / QV * ng + p / 4) * QV + c % QV) * 4 + p % 4] = v;
            wsum[c] += v;
        }
}

/* ---- the GEMM tile: MR rows x NV blocks of 16 channels, int32 ------------------------------ */

static inline int32_t load4(const uint8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

#if defined(__AVX512VNNI__) && defined(__AVX512F__)
#define Q_PATH "avx512-vnni"
#define MR1 12
#define MR2 8
#define MR4 4
static inline __attribute__((always_inline)) void tile(int MR, int NV, const uint8_t *const *rows,
                                                       const int64_t *goff, int64_t ng, const int8_t *wp,
                                                       int64_t vstride, int32_t *out)
{
    __m512i acc[MR1][4];
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < NV; v++)
            acc[i][v] = _mm512_setzero_si512();
    for (int64_t g = 0; g < ng; g++) {
        __m512i b[4];
        for (int v = 0; v < NV; v++)
            b[v] = _mm512_loadu_si512((const void *)(wp + v * vstride + g * 64));
        const int64_t o = goff[g];
        for (int i = 0; i < MR; i++) {
            const __m512i a = _mm512_set1_epi32(load4(rows[i] + o));
            for (int v = 0; v < NV; v++)
                acc[i][v] = _mm512_dpbusd_epi32(acc[i][v], a, b[v]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < NV; v++)
            _mm512_storeu_si512((void *)(out + (i * NV + v) * QV), acc[i][v]);
}
#elif defined(__AVX2__)
#if defined(__AVXVNNI__)
#define Q_PATH "avx-vnni"
#define DOT4(acc, a, b) _mm256_dpbusd_avx_epi32(acc, a, b)
#else
#define Q_PATH "avx2"
#endif
#define MR1 6
#define MR2 3
#define MR4 1
static inline __attribute__((always_inline)) void tile(int MR, int NV, const uint8_t *const *rows,
                                                       const int64_t *goff, int64_t ng, const int8_t *wp,
                                                       int64_t vstride, int32_t *out)
{
    __m256i acc[MR1][8];
#ifndef DOT4
    const __m256i ones = _mm256_set1_epi16(1), k128 = _mm256_set1_epi16(128);
#endif
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < 2 * NV; v++)
            acc[i][v] = _mm256_setzero_si256();
    for (int64_t g = 0; g < ng; g++) {
        __m256i b[8];
        for (int v = 0; v < 2 * NV; v++)
            b[v] = _mm256_loadu_si256((const __m256i *)(wp + (v / 2) * vstride + g * 64 + (v % 2) * 32));
        const int64_t o = goff[g];
        for (int i = 0; i < MR; i++) {
            const int32_t a32 = load4(rows[i] + o);
#ifdef DOT4
            const __m256i a = _mm256_set1_epi32(a32);
            for (int v = 0; v < 2 * NV; v++)
                acc[i][v] = DOT4(acc[i][v], a, b[v]);
#else
            const __m256i lo = _mm256_set1_epi32(a32 & 0x7f7f7f7f);
            const __m256i hi = _mm256_set1_epi32((int32_t)(((uint32_t)a32 >> 7) & 0x01010101u));
            for (int v = 0; v < 2 * NV; v++) {
                const __m256i plo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, b[v]), ones);
                const __m256i phi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, b[v]), k128);
                acc[i][v] = _mm256_add_epi32(acc[i][v], _mm256_add_epi32(plo, phi));
            }
#endif
        }
    }
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < 2 * NV; v++)
            _mm256_storeu_si256((__m256i *)(out + (i * NV * 2 + v) * 8), acc[i][v]);
}
#else
#define Q_PATH "scalar"
#define MR1 4
#define MR2 2
#define MR4 1
static inline void tile(int MR, int NV, const uint8_t *const *rows, const int64_t *goff, int64_t ng,
                        const int8_t *wp, int64_t vstride, int32_t *out)
{
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < NV; v++)
            for (int l = 0; l < QV; l++) {
                int32_t s = 0;
                for (int64_t g = 0; g < ng; g++) {
                    const uint8_t *a = rows[i] + goff[g];
                    const int8_t *b = wp + v * vstride + g * 64 + l * 4;
                    s += a[0] * b[0] + a[1] * b[1] + a[2] * b[2] + a[3] * b[3];
                }
                out[(i * NV + v) * QV + l] = s;
            }
}
#endif

const char *tdc_quant_path(void) { return Q_PATH; }

/* ---- GEMM with the requantizing epilogue ------------------------------------------------------ */

typedef struct {
    /* rows: row r reads rbase + (r / rw) * ry + (r % rw) * rx (an output pixel (y, x), or a row) */
    const uint8_t *rbase;
    int64_t rw, ry, rx;
    const int64_t *goff;
    int64_t ng;
    const int8_t *packed;       /* [nv][ng][64] */
    int64_t n;                  /* output channels */
    const uint32_t *off;        /* per channel, padded to whole blocks: bias - (128 + x_zero) * wsum, mod 2^32 */
    const float *mult;          /* per channel, padded likewise */
    int32_t y_zero, lo;         /* i8 output: clamp to [lo, 127] */
    int relu, out_f32;
    void *out;                  /* element (r, c) at r * ors + c * ocs */
    int64_t ors, ocs;
} qgemm;

/* One channel vector (16 lanes) of the epilogue: acc + off wraps mod 2^32 like numpy's int64 ->
 * int32 astype (the accumulator itself always fits), then the reference's float32 steps. */
static inline void requant16(const qgemm *q, const int32_t *t, int64_t c, int8_t *q8, float *f)
{
#if defined(__AVX512F__)
    const __m512i a = _mm512_add_epi32(_mm512_loadu_si512((const void *)t),
                                       _mm512_loadu_si512((const void *)(q->off + c)));
    const __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_loadu_ps(q->mult + c));
    if (q->out_f32) {
        _mm512_storeu_ps(f, q->relu ? _mm512_max_ps(y, _mm512_setzero_ps()) : y);
        return;
    }
    __m512 r = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-256.0f)), _mm512_set1_ps(256.0f));
    __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(r), _mm512_set1_epi32(q->y_zero));
    v = _mm512_min_epi32(_mm512_max_epi32(v, _mm512_set1_epi32(q->lo)), _mm512_set1_epi32(127));
    _mm_storeu_si128((__m128i *)q8, _mm512_cvtepi32_epi8(v));
#else
    for (int l = 0; l < QV; l++) {
        const float y = (float)(int32_t)((uint32_t)t[l] + q->off[c + l]) * q->mult[c + l];
        if (q->out_f32) {
            f[l] = q->relu && y < 0 ? 0.0f : y;
            continue;
        }
        float r = rintf(y);
        r = r < -256.0f ? -256.0f : r > 256.0f ? 256.0f : r;
        const int32_t v = (int32_t)r + q->y_zero;
        q8[l] = (int8_t)(v < q->lo ? q->lo : v > 127 ? 127 : v);
    }
#endif
}

static inline void epilogue(const qgemm *q, const int32_t *t, int64_t r0, int64_t mr, int64_t c0, int64_t nc,
                            int64_t ld)
{
    int8_t q8[MR1 * QV * 4];
    float f[MR1 * QV * 4];
    for (int64_t i = 0; i < mr; i++)
        for (int64_t j = 0; j < nc; j += QV)
            requant16(q, t + i * ld + j, c0 + j, q8 + i * ld + j, f + i * ld + j);
    const int64_t es = q->out_f32 ? 4 : 1;
    char *out = (char *)q->out;
    if (q->ocs == 1) {          /* rows of channels: contiguous runs */
        for (int64_t i = 0; i < mr; i++)
            memcpy(out + ((r0 + i) * q->ors + c0) * es, q->out_f32 ? (void *)(f + i * ld) : (void *)(q8 + i * ld),
                   (size_t)(nc * es));
    } else if (q->out_f32) {
        for (int64_t j = 0; j < nc; j++)
            for (int64_t i = 0; i < mr; i++)
                ((float *)out)[(r0 + i) * q->ors + (c0 + j) * q->ocs] = f[i * ld + j];
    } else {
        for (int64_t j = 0; j < nc; j++)
            for (int64_t i = 0; i < mr; i++)
                ((int8_t *)out)[(r0 + i) * q->ors + (c0 + j) * q->ocs] = q8[i * ld + j];
    }
}

/* rows [r0, r1), every channel */
static void qgemm_rows(const qgemm *q, int64_t r0, int64_t r1)
{
    const int64_t nv = rup(q->n, QV) / QV, vstride = q->ng * 64;
    int32_t t[MR1 * QV * 4];
    const uint8_t *rows[MR1];
    for (int64_t v0 = 0; v0 < nv;) {
        const int NV = nv - v0 >= 4 ? 4 : nv - v0 >= 2 ? 2 : 1;
        const int MR = NV == 4 ? MR4 : NV == 2 ? MR2 : MR1;
        const int8_t *wp = q->packed + v0 * vstride;
        for (int64_t r = r0; r < r1; r += MR) {
            const int64_t mr = min64(MR, r1 - r);
            for (int i = 0; i < MR; i++) {   /* rows past the end repeat the last one; not stored */
                const int64_t rr = r + min64(i, mr - 1);
                rows[i] = q->rbase + (rr / q->rw) * q->ry + (rr % q->rw) * q->rx;
            }
            if (NV == 4)
                tile(MR4, 4, rows, q->goff, q->ng, wp, vstride, t);
            else if (NV == 2)
                tile(MR2, 2, rows, q->goff, q->ng, wp, vstride, t);
            else
                tile(MR1, 1, rows, q->goff, q->ng, wp, vstride, t);
            epilogue(q, t, r, mr, v0 * QV, min64(NV * QV, q->n - v0 * QV), NV * QV);
        }
        v0 += NV;
    }
}

/* Per-channel offsets: bias - (128 + x_zero) * sum_k w, mod 2^32 */
static void offsets(const int32_t *bias, int64_t has_bias, const int64_t *wsum, int64_t n, int64_t x_zero,
                    uint32_t *off)
{
    for (int64_t c = 0; c < n; c++)
        off[c] = (uint32_t)((has_bias ? bias[c] : 0) - (128 + x_zero) * wsum[c]);
}

/* mult padded to whole channel blocks (the epilogue reads 16 at a time) */
static float *padded_mult(const float *mult, int64_t n)
{
    float *m = tdcrt_malloc(rup(n, QV) * (int64_t)sizeof(float));
    memcpy(m, mult, (size_t)n * sizeof(float));
    for (int64_t c = n; c < rup(n, QV); c++)
        m[c] = 0.0f;
    return m;
}

/* ---- qlinear -------------------------------------------------------------------------------- */

typedef struct {
    qgemm q;
    const int8_t *x;
    int64_t K, Kp;
} qlinear_job;

static void qlinear_rows(void *ctx, int64_t r0, int64_t r1)
{
    const qlinear_job *j = ctx;
    if (r1 <= r0)
        return;
    uint8_t *xu = tdcrt_malloc((r1 - r0) * j->Kp + 64);
    for (int64_t r = r0; r < r1; r++) {
        uint8_t *restrict d = xu + (r - r0) * j->Kp;
        const uint8_t *restrict s = (const uint8_t *)(j->x + r * j->K);
        for (int64_t k = 0; k < j->K; k++)
            d[k] = s[k] ^ 0x80;
        for (int64_t k = j->K; k < j->Kp; k++)
            d[k] = 0x80;
    }
    qgemm q = j->q;
    q.rbase = xu;
    q.out = (char *)q.out + r0 * q.ors * (q.out_f32 ? 4 : 1);
    qgemm_rows(&q, 0, r1 - r0);
    free(xu);
}

/* y[M, N] = requantize(x[M, K] @ w[N, K]^T + bias). `prepacked` (or NULL: packed here) is
 * pack_weights' output followed by the int64 wsum, as tdc/backends/llvm/qpack.py writes it. */
void tdc_qlinear_i8(const int8_t *x, const int8_t *w, const int32_t *bias, int64_t has_bias,
                    const int8_t *prepacked, int64_t use_prepacked, const float *mult, void *out,
                    int64_t M, int64_t K, int64_t N,
                    int64_t x_zero, int64_t y_zero, int64_t relu, int64_t out_f32)
{
    if (M <= 0 || N <= 0)
        return;
    const int64_t Kp = rup(K > 0 ? K : 1, 4), ng = Kp / 4, nv = rup(N, QV) / QV;
    int8_t *packed = NULL;
    const int64_t *wsum;
    int64_t *own_sum = NULL;
    if (!use_prepacked)
        prepacked = NULL;
    if (prepacked) {
        wsum = (const int64_t *)(prepacked + nv * ng * 64);
    } else {
        packed = tdcrt_malloc(nv * ng * 64);
        own_sum = tdcrt_malloc(nv * QV * (int64_t)sizeof(int64_t));
        pack_weights(w, N, K, K, NULL, ng, packed, own_sum);
        wsum = own_sum;
    }
    uint32_t *off = calloc((size_t)(nv * QV), sizeof(uint32_t));
    float *m = padded_mult(mult, N);
    int64_t *goff = tdcrt_malloc(ng * (int64_t)sizeof(int64_t));
    if (!off) {
        fprintf(stderr, "tdc runtime: out of memory\n");
        exit(1);
    }
    offsets(bias, has_bias, wsum, N, x_zero, off);
    for (int64_t g = 0; g < ng; g++)
        goff[g] = 4 * g;
    qlinear_job j = {{NULL, 1, Kp, 0, goff, ng, prepacked ? prepacked : packed, N, off, m, (int32_t)y_zero,
                      relu ? (int32_t)y_zero : -128, (int)relu, (int)out_f32, out, N, 1},
                     x, K, Kp};
    tdcrt_parallel_for(M, 2.0 * M * N * Kp, qlinear_rows, &j);
    free(packed);
    free(own_sum);
    free(off);
    free(m);
    free(goff);
}

/* ---- qconv2d -------------------------------------------------------------------------------- */

typedef struct {
    qgemm q;                    /* rbase, out set per image and group */
    const int8_t *x;
    const int8_t *packed;       /* [groups][nv][ng][64] */
    const uint32_t *off;        /* [CO + QV] */
    int64_t C, H, W, CO, OH, OW, pt, pl, groups, cs, hp, wp, x_zero;
} qconv_job;

static void qconv_images(void *ctx, int64_t n0, int64_t n1)
{
    const qconv_job *j = ctx;
    const int64_t cg = j->C / j->groups, cog = j->CO / j->groups, P = j->OH * j->OW;
    const int64_t img_bytes = j->hp * j->wp * j->cs + 64;
    const int64_t nv = rup(cog, QV) / QV;
    uint8_t *img = tdcrt_malloc(img_bytes);
    const uint8_t pad = (uint8_t)(j->x_zero + 128);
    for (int64_t n = n0; n < n1; n++)
        for (int64_t gi = 0; gi < j->groups; gi++) {
            memset(img, pad, (size_t)img_bytes);
            for (int64_t c = 0; c < cg; c++) {
                const int8_t *src = j->x + ((n * j->C) + gi * cg + c) * j->H * j->W;
                for (int64_t y = 0; y < j->H; y++) {
                    uint8_t *d = img + ((y + j->pt) * j->wp + j->pl) * j->cs + c;
                    for (int64_t xx = 0; xx < j->W; xx++)
                        d[xx * j->cs] = (uint8_t)src[y * j->W + xx] ^ 0x80;
                }
            }
            qgemm q = j->q;
            q.rbase = img;
            q.packed = j->packed + gi * nv * q.ng * 64;
            q.off = j->off + gi * cog;
            q.mult = j->q.mult + gi * cog;
            q.out = (char *)j->q.out + ((n * j->CO + gi * cog) * P) * (j->q.out_f32 ? 4 : 1);
            qgemm_rows(&q, 0, P);
        }
    free(img);
}

void tdc_qconv2d_i8(const int8_t *x, const int8_t *w, const int32_t *bias, int64_t has_bias,
                    const float *mult, void *out, int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO,
                    int64_t KH, int64_t KW, int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt,
                    int64_t pl, int64_t pb, int64_t pr, int64_t dh, int64_t dw, int64_t groups,
                    int64_t x_zero, int64_t y_zero, int64_t relu, int64_t out_f32)
{
    if (N <= 0 || CO <= 0 || OH <= 0 || OW <= 0)
        return;
    const int64_t cg = C / groups, cog = CO / groups, K = cg * KH * KW;
    const int64_t hp = H + pt + pb, wp = W + pl + pr;
    /* k order: per kernel row, the KW * cg contiguous bytes (dw == 1), or per tap, cg channels
     * padded to 4 in an image of that many channels */
    const int64_t cs = dw == 1 ? cg : rup(cg, 4);
    const int64_t seg = dw == 1 ? rup(KW * cg, 4) : cs;
    const int64_t nseg = dw == 1 ? KH : KH * KW;
    const int64_t ng = nseg * seg / 4, nv = rup(cog, QV) / QV;
    int64_t *kpos = tdcrt_malloc(K * (int64_t)sizeof(int64_t));
    int64_t *goff = tdcrt_malloc(ng * (int64_t)sizeof(int64_t));
    for (int64_t c = 0; c < cg; c++)
        for (int64_t i = 0; i < KH; i++)
            for (int64_t jj = 0; jj < KW; jj++)
                kpos[(c * KH + i) * KW + jj] = dw == 1 ? i * seg + jj * cg + c : (i * KW + jj) * seg + c;
    for (int64_t s = 0; s < nseg; s++) {
        const int64_t i = dw == 1 ? s : s / KW, jj = dw == 1 ? 0 : s % KW;
        for (int64_t t = 0; t < seg / 4; t++)
            goff[s * (seg / 4) + t] = (i * dh * wp + jj * dw) * cs + 4 * t;
    }
    int8_t *packed = tdcrt_malloc(groups * nv * ng * 64);
    int64_t *wsum = tdcrt_malloc(nv * QV * (int64_t)sizeof(int64_t));
    uint32_t *off = calloc((size_t)(CO + QV), sizeof(uint32_t));
    float *m = tdcrt_malloc((CO + QV) * (int64_t)sizeof(float));
    if (!off) {
        fprintf(stderr, "tdc runtime: out of memory\n");
        exit(1);
    }
    memcpy(m, mult, (size_t)CO * sizeof(float));
    for (int64_t c = CO; c < CO + QV; c++)
        m[c] = 0.0f;
    for (int64_t gi = 0; gi < groups; gi++) {
        pack_weights(w + gi * cog * K, cog, K, K, kpos, ng, packed + gi * nv * ng * 64, wsum);
        offsets(has_bias ? bias + gi * cog : NULL, has_bias, wsum, cog, x_zero, off + gi * cog);
    }
    qconv_job j = {{NULL, OW, sh * wp * cs, sw * cs, goff, ng, NULL, cog, NULL, m, (int32_t)y_zero,
                    relu ? (int32_t)y_zero : -128, (int)relu, (int)out_f32, out, 1, OH * OW},
                   x, packed, off, C, H, W, CO, OH, OW, pt, pl, groups, cs, hp, wp, x_zero};
    tdcrt_parallel_for(N, 2.0 * N * CO * OH * OW * K, qconv_images, &j);
    free(kpos);
    free(goff);
    free(packed);
    free(wsum);
    free(off);
    free(m);
}

/* ---- quantize, dequantize ---------------------------------------------------------------------- */

/* channel of element i: (i / inner) % nc, with nc parameters (1: per tensor) */
void tdc_quantize_f32(const float *x, int8_t *q, int64_t n, int64_t inner, int64_t nc, const float *scale,
                      const int32_t *zero)
{
    for (int64_t i = 0; i < n; i++) {
        const int64_t c = nc == 1 ? 0 : (i / inner) % nc;
        float r = rintf(x[i] / scale[c]);
        r = r < -65536.0f ? -65536.0f : r > 65536.0f ? 65536.0f : r;   /* NaN too becomes -128 below */
        const int32_t v = (int32_t)r + zero[c];
        q[i] = (int8_t)(v < -128 ? -128 : v > 127 ? 127 : v);
    }
}

void tdc_dequantize_i8(const int8_t *q, float *x, int64_t n, int64_t inner, int64_t nc, const float *scale,
                       const int32_t *zero)
{
    for (int64_t i = 0; i < n; i++) {
        const int64_t c = nc == 1 ? 0 : (i / inner) % nc;
        x[i] = (float)(q[i] - zero[c]) * scale[c];
    }
}

/* fake_quant in float32: (clamp(rint(x / s) + z, qmin, qmax) - z) * s; its gradient passes g where
 * the code is inside [qmin, qmax] (the straight-through estimator) */
static inline int32_t fq_code(float x, float s, int32_t z)
{
    float r = rintf(x / s);
    r = r < -65536.0f ? -65536.0f : r > 65536.0f ? 65536.0f : r;
    return (int32_t)r + z;
}

void tdc_fake_quant_f32(const float *x, float *y, int64_t n, int64_t inner, int64_t nc, const float *scale,
                        const int32_t *zero, int64_t qmin, int64_t qmax)
{
    for (int64_t i = 0; i < n; i++) {
        const int64_t c = nc == 1 ? 0 : (i / inner) % nc;
        int32_t v = fq_code(x[i], scale[c], zero[c]);
        v = v < qmin ? (int32_t)qmin : v > qmax ? (int32_t)qmax : v;
        y[i] = (float)(v - zero[c]) * scale[c];
    }
}

void tdc_fake_quant_grad_f32(const float *g, const float *x, float *dx, int64_t n, int64_t inner, int64_t nc,
                             const float *scale, const int32_t *zero, int64_t qmin, int64_t qmax)
{
    for (int64_t i = 0; i < n; i++) {
        const int64_t c = nc == 1 ? 0 : (i / inner) % nc;
        const int32_t v = fq_code(x[i], scale[c], zero[c]);
        dx[i] = v >= qmin && v <= qmax ? g[i] : 0.0f;
    }
}

/* ---- maxpool2d on i8 codes (max commutes with the affine map) and u8 images ------------------ */

typedef struct {
    const void *x;
    void *out;
    int64_t H, W, OH, OW, KH, KW, sh, sw, pt, pl, dh, dw;
} maxpool_int_job;

/* Planes [p0, p1) (image-channel pairs). Windows that tile the input without padding (2x2 stride 2,
 * LeNet's and VGG's) take a branch-free loop gcc vectorises; the general loop clips each window
 * to the input, and was 7 ns per output at LeNet-5's sizes, a third of its whole int8 forward. */
#define TDC_MAXPOOL2D_INT(SUFFIX, T, LOWEST)                                                             \
static void maxpool_planes_##SUFFIX(void *ctx, int64_t p0, int64_t p1)                                    \
{                                                                                                      \
    const maxpool_int_job *j = ctx;                                                                    \
    const int64_t H = j->H, W = j->W, OH = j->OH, OW = j->OW;                                          \
    const int tiled2 = j->KH == 2 && j->KW == 2 && j->sh == 2 && j->sw == 2 && j->pt == 0 && j->pl == 0  \
                       && j->dh == 1 && j->dw == 1 && 2 * OH <= H && 2 * OW <= W;                       \
    for (int64_t nc = p0; nc < p1; nc++) {                                                             \
        const T *src = (const T *)j->x + nc * H * W;                                                   \
        T *dst = (T *)j->out + nc * OH * OW;                                                           \
        if (tiled2) {                                                                                  \
            for (int64_t y = 0; y < OH; y++) {                                                         \
                const T *r0 = src + 2 * y * W, *r1 = r0 + W;                                           \
                T *o = dst + y * OW;                                                                   \
                for (int64_t xx = 0; xx < OW; xx++) {                                                  \
                    const T a = r0[2 * xx] > r0[2 * xx + 1] ? r0[2 * xx] : r0[2 * xx + 1];             \
                    const T b = r1[2 * xx] > r1[2 * xx + 1] ? r1[2 * xx] : r1[2 * xx + 1];             \
                    o[xx] = a > b ? a : b;                                                             \
                }                                                                                      \
            }                                                                                          \
            continue;                                                                                  \
        }                                                                                              \
        for (int64_t y = 0; y < OH; y++) {                                                             \
            int64_t i0, i1;                                                                            \
            valid_range(y * j->sh - j->pt, j->dh, H, j->KH, &i0, &i1);                                 \
            for (int64_t xx = 0; xx < OW; xx++) {                                                      \
                int64_t k0, k1;                                                                        \
                valid_range(xx * j->sw - j->pl, j->dw, W, j->KW, &k0, &k1);                            \
                int m = LOWEST;                                                                        \
                for (int64_t i = i0; i < i1; i++) {                                                    \
                    const T *row = src + (y * j->sh - j->pt + i * j->dh) * W + xx * j->sw - j->pl;     \
                    for (int64_t k = k0; k < k1; k++)                                                  \
                        m = row[k * j->dw] > m ? row[k * j->dw] : m;                                   \
                }                                                                                      \
                dst[y * OW + xx] = (T)m;                                                               \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
}                                                                                                      \
                                                                                                       \
void tdc_maxpool2d_##SUFFIX(const T *x, T *out, int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH,   \
                            int64_t OW, int64_t KH, int64_t KW, int64_t sh, int64_t sw, int64_t pt,      \
                            int64_t pl, int64_t dh, int64_t dw)                                         \
{                                                                                                      \
    maxpool_int_job j = {x, out, H, W, OH, OW, KH, KW, sh, sw, pt, pl, dh, dw};                        \
    tdcrt_parallel_for(N * C, 4.0 * N * C * OH * OW * KH * KW, maxpool_planes_##SUFFIX, &j);             \
}

TDC_MAXPOOL2D_INT(i8, int8_t, INT8_MIN)
TDC_MAXPOOL2D_INT(u8, uint8_t, 0)
