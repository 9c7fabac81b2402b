/* tdc runtime: convolution by FFT, forward and both backward. */
#include "internal.h"

#ifndef TDC_TEMPLATE

/* ---- FFT (double precision, shared by both dtypes) ---------------------------------------
 * Iterative radix-2 complex FFT on split re/im arrays of power-of-two length. A 2-D transform
 * of a [Fh, Fw] array is row FFTs (only the rows holding data, on the forward side; only the
 * rows read back, on the inverse side) and column FFTs whose butterflies combine whole rows
 * (vectorised along the row). Two real planes a, b go through one complex transform of a + ib
 * and are separated into the half spectra (Fw/2 + 1 columns) of each. */

typedef struct {
    int64_t n;          /* a power of two */
    double *cr, *ci;    /* cos(2 pi k / n), -sin(2 pi k / n) for k < n/2 */
    int64_t *rev;       /* bit-reversal permutation */
} fft_plan;

static int64_t pow2_at_least(int64_t n)
{
    int64_t p = 1;
    while (p < n)
        p <<= 1;
    return p;
}

/* e^{sign 2 pi i (k / n)} with k reduced mod n first, so large k lose no accuracy */
static inline void unit_root(int64_t k, int64_t n, int sign, double *re, double *im)
{
    k %= n;
    if (k < 0)
        k += n;
    const double t = 6.283185307179586476925286766559 * (double)k / (double)n;
    *re = cos(t);
    *im = sign * sin(t);
}

static void fft_plan_init(fft_plan *p, int64_t n)
{
    p->n = n;
    p->cr = tdcrt_malloc(max64(1, n / 2) * (int64_t)sizeof(double));
    p->ci = tdcrt_malloc(max64(1, n / 2) * (int64_t)sizeof(double));
    p->rev = tdcrt_malloc(n * (int64_t)sizeof(int64_t));
    for (int64_t k = 0; k < n / 2; k++)
        unit_root(k, n, -1, &p->cr[k], &p->ci[k]);
    int bits = 0;
    while (((int64_t)1 << bits) < n)
        bits++;
    for (int64_t i = 0; i < n; i++) {
        int64_t r = 0;
        for (int b = 0; b < bits; b++)
            r |= ((i >> b) & 1) << (bits - 1 - b);
        p->rev[i] = r;
    }
}

static void fft_plan_free(fft_plan *p)
{
    free(p->cr);
    free(p->ci);
    free(p->rev);
}

/* In-place 1-D FFT of re + i im (length p->n); inv: the e^{+i} transform, unscaled. */
static void fft_1d(const fft_plan *p, double *re, double *im, int inv)
{
    const int64_t n = p->n;
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = p->rev[i];
        if (i < r) {
            double t = re[i]; re[i] = re[r]; re[r] = t;
            t = im[i]; im[i] = im[r]; im[r] = t;
        }
    }
    for (int64_t len = 2; len <= n; len <<= 1) {
        const int64_t half = len / 2, step = n / len;
        for (int64_t i = 0; i < n; i += len)
            for (int64_t k = 0; k < half; k++) {
                const double wr = p->cr[k * step], wi = inv ? -p->ci[k * step] : p->ci[k * step];
                const int64_t a = i + k, b = a + half;
                const double tr = re[b] * wr - im[b] * wi, ti = re[b] * wi + im[b] * wr;
                re[b] = re[a] - tr;
                im[b] = im[a] - ti;
                re[a] += tr;
                im[a] += ti;
            }
    }
}

/* In-place FFT along the first axis of the [p->n, width] arrays re, im: each butterfly
 * combines two whole rows. */
static void fft_cols(const fft_plan *p, double *re, double *im, int64_t width, int inv)
{
    const int64_t n = p->n;
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = p->rev[i];
        if (i < r)
            for (int64_t x = 0; x < width; x++) {
                double t = re[i * width + x]; re[i * width + x] = re[r * width + x]; re[r * width + x] = t;
                t = im[i * width + x]; im[i * width + x] = im[r * width + x]; im[r * width + x] = t;
            }
    }
    for (int64_t len = 2; len <= n; len <<= 1) {
        const int64_t half = len / 2, step = n / len;
        for (int64_t i = 0; i < n; i += len)
            for (int64_t k = 0; k < half; k++) {
                const double wr = p->cr[k * step], wi = inv ? -p->ci[k * step] : p->ci[k * step];
                double *restrict ar = re + (i + k) * width, *restrict ai = im + (i + k) * width;
                double *restrict br = re + (i + k + half) * width, *restrict bi = im + (i + k + half) * width;
                for (int64_t x = 0; x < width; x++) {
                    const double tr = br[x] * wr - bi[x] * wi, ti = br[x] * wi + bi[x] * wr;
                    br[x] = ar[x] - tr;
                    bi[x] = ai[x] - ti;
                    ar[x] += tr;
                    ai[x] += ti;
                }
            }
    }
}

/* A 2-D transform size with its work arrays zr, zi [Fh, Fw]; half spectra are [Fh, HF]. */
typedef struct {
    int64_t Fh, Fw, HF;
    fft_plan ph, pw;
    double *zr, *zi;
} fft2;

static void fft2_init(fft2 *f, int64_t Fh, int64_t Fw)
{
    f->Fh = Fh;
    f->Fw = Fw;
    f->HF = Fw / 2 + 1;
    fft_plan_init(&f->ph, Fh);
    fft_plan_init(&f->pw, Fw);
    f->zr = tdcrt_malloc(Fh * Fw * (int64_t)sizeof(double));
    f->zi = tdcrt_malloc(Fh * Fw * (int64_t)sizeof(double));
}

static void fft2_free(fft2 *f)
{
    fft_plan_free(&f->ph);
    fft_plan_free(&f->pw);
    free(f->zr);
    free(f->zi);
}

/* zr = a, zi = b (real planes, nonzero only in rows < rows) -> half spectra A, B [Fh, HF]
 * (B skipped when br is NULL). Uses Z[-k] = conj(A[k]) - i conj(B[k]) for real a, b. */
static void fft2_forward_pair(fft2 *f, int64_t rows, double *ar, double *ai, double *br, double *bi)
{
    const int64_t Fh = f->Fh, Fw = f->Fw, HF = f->HF;
    for (int64_t r = 0; r < rows; r++)
        fft_1d(&f->pw, f->zr + r * Fw, f->zi + r * Fw, 0);
    fft_cols(&f->ph, f->zr, f->zi, Fw, 0);
    for (int64_t k1 = 0; k1 < Fh; k1++) {
        const int64_t m1 = (Fh - k1) & (Fh - 1);
        const double *zr = f->zr + k1 * Fw, *zi = f->zi + k1 * Fw;
        const double *mr = f->zr + m1 * Fw, *mi = f->zi + m1 * Fw;
        for (int64_t k2 = 0; k2 < HF; k2++) {
            const int64_t m2 = (Fw - k2) & (Fw - 1);
            ar[k1 * HF + k2] = 0.5 * (zr[k2] + mr[m2]);
            ai[k1 * HF + k2] = 0.5 * (zi[k2] - mi[m2]);
            if (br) {
                br[k1 * HF + k2] = 0.5 * (zi[k2] + mi[m2]);
                bi[k1 * HF + k2] = -0.5 * (zr[k2] - mr[m2]);
            }
        }
    }
}

/* The inverse of fft2_forward_pair, unscaled: zr = a * Fh*Fw, zi = b * Fh*Fw in the rows r with
 * need[r] (other rows hold partial results). B may be NULL (b = 0). */
static void fft2_inverse_pair(fft2 *f, const double *ar, const double *ai, const double *br, const double *bi,
                              const unsigned char *need)
{
    const int64_t Fh = f->Fh, Fw = f->Fw, HF = f->HF;
    for (int64_t k1 = 0; k1 < Fh; k1++) {
        const int64_t m1 = (Fh - k1) & (Fh - 1);
        double *zr = f->zr + k1 * Fw, *zi = f->zi + k1 * Fw;
        for (int64_t k2 = 0; k2 < HF; k2++) {            /* Z = A + iB */
            const int64_t q = k1 * HF + k2;
            zr[k2] = ar[q] - (br ? bi[q] : 0);
            zi[k2] = ai[q] + (br ? br[q] : 0);
        }
        for (int64_t k2 = HF; k2 < Fw; k2++) {           /* Z = conj(A') + i conj(B') at (-k1, -k2) */
            const int64_t q = m1 * HF + Fw - k2;
            zr[k2] = ar[q] + (br ? bi[q] : 0);
            zi[k2] = -ai[q] + (br ? br[q] : 0);
        }
    }
    fft_cols(&f->ph, f->zr, f->zi, Fw, 1);
    for (int64_t r = 0; r < Fh; r++)
        if (need[r])
            fft_1d(&f->pw, f->zr + r * Fw, f->zi + r * Fw, 1);
}

/* (yr + i yi)[f] += (ar + i ai)[f] * (br + i bi)[f], or * conj(b) when conj_b. */
static void cmac(double *restrict yr, double *restrict yi, const double *restrict ar, const double *restrict ai,
                 const double *restrict br, const double *restrict bi, int64_t n, int conj_b)
{
    if (conj_b)
        for (int64_t f = 0; f < n; f++) {
            yr[f] += ar[f] * br[f] + ai[f] * bi[f];
            yi[f] += ai[f] * br[f] - ar[f] * bi[f];
        }
    else
        for (int64_t f = 0; f < n; f++) {
            yr[f] += ar[f] * br[f] - ai[f] * bi[f];
            yi[f] += ai[f] * br[f] + ar[f] * bi[f];
        }
}

/* e[t, k] = e^{sign 2 pi i k (t*d + off) / n} for t < K, k < nk (real and imaginary parts). */
static void dft_table(int64_t K, int64_t d, int64_t off, int64_t n, int64_t nk, int sign, double *er, double *ei)
{
    for (int64_t t = 0; t < K; t++)
        for (int64_t k = 0; k < nk; k++)
            unit_root(k * (t * d + off), n, sign, &er[t * nk + k], &ei[t * nk + k]);
}

/* Half spectrum S [Fh, HF] of a small kernel f [KH, KW] (double) placed at rows i*dh, columns
 * j*dw, by the DFT's definition (cheaper than an FFT for a few taps): Q = f E2 then S = E1^T Q.
 * e1 [KH, Fh], e2 [KW, HF] from dft_table; q [KH, HF] x 2 scratch. */
static void kernel_spectrum(const double *fk, int64_t KH, int64_t KW, int64_t Fh, int64_t HF, const double *e1r,
                            const double *e1i, const double *e2r, const double *e2i, double *qr, double *qi,
                            double *sr, double *si)
{
    for (int64_t i = 0; i < KH; i++) {
        double *restrict a = qr + i * HF, *restrict b = qi + i * HF;
        for (int64_t k = 0; k < HF; k++)
            a[k] = b[k] = 0;
        for (int64_t j = 0; j < KW; j++) {
            const double v = fk[i * KW + j];
            for (int64_t k = 0; k < HF; k++) {
                a[k] += v * e2r[j * HF + k];
                b[k] += v * e2i[j * HF + k];
            }
        }
    }
    for (int64_t k1 = 0; k1 < Fh; k1++) {
        double *restrict a = sr + k1 * HF, *restrict b = si + k1 * HF;
        for (int64_t k = 0; k < HF; k++)
            a[k] = b[k] = 0;
        for (int64_t i = 0; i < KH; i++) {
            const double cr = e1r[i * Fh + k1], ci = e1i[i * Fh + k1];
            const double *restrict pr = qr + i * HF, *restrict pi = qi + i * HF;
            for (int64_t k = 0; k < HF; k++) {
                a[k] += cr * pr[k] - ci * pi[k];
                b[k] += cr * pi[k] + ci * pr[k];
            }
        }
    }
}

#define FFT_BUDGET ((int64_t)64 << 20)   /* spectra per image chunk */
#define FFT_OB 8                          /* output planes per accumulator block (even) */

/* Images per chunk when each needs `planes` half spectra. */
static int64_t fft_chunk(int64_t N, int64_t planes, int64_t F)
{
    return max64(1, min64(N, FFT_BUDGET / max64(1, planes * F * 2 * (int64_t)sizeof(double))));
}

#define TDC_SELF "conv_fft.c"
#include "instantiate.h"

#else /* the template: T, SFX(name), GEMM */

/* ---- convolution: FFT ----------------------------------------------------------------
 * Linear correlation / convolution as products of 2-D spectra, in double for both dtypes.
 * The transform size Fh x Fw (powers of two) covers the input plus the kernel's reach, so the
 * circular result never wraps onto an output that is read. Each input plane is transformed
 * once per call (two real planes per complex FFT); each kernel's spectrum is built from its
 * KH*KW taps by the DFT's definition once per image chunk; products are accumulated over
 * input channels in the frequency domain, and two output planes share one inverse FFT.
 * Stride: the stride-1 result is subsampled (forward), or the output gradient is upsampled
 * with zeros (backward passes); dilation: the kernel's taps sit dh, dw apart.
 * Error: outputs are rounded to T once; the rest is double (relative error ~1e-15 * log2(Fh*Fw)
 * of the largest terms), so f32 results are about as good as a float64 reference rounded
 * to f32. Cost grows with Fh*Fw*(C + CO) + C*CO*Fh*(Fw/2+1)*(KH + 8): poor for 3x3 kernels on
 * large channel counts, good for large kernels. */

/* Half spectra of planes src[(n*cs + c)*Hs*Ws] for n < nc, c < P, into S[(n*P + c)*F] (F = Fh*HF),
 * each plane placed with its rows uh apart and columns uw apart (zero upsampling). */
static void SFX(fft_planes)(fft2 *f, const T *src, int64_t nc, int64_t P, int64_t cs, int64_t Hs, int64_t Ws,
                            int64_t uh, int64_t uw, double *Sr, double *Si)
{
    const int64_t Fw = f->Fw, F = f->Fh * f->HF, rows = (Hs - 1) * uh + 1;
    for (int64_t n = 0; n < nc; n++)
        for (int64_t c = 0; c < P; c += 2) {
            const int two = c + 1 < P;
            memset(f->zr, 0, (size_t)(rows * Fw) * sizeof(double));
            memset(f->zi, 0, (size_t)(rows * Fw) * sizeof(double));
            memset(f->zr + rows * Fw, 0, (size_t)((f->Fh - rows) * Fw) * sizeof(double));
            memset(f->zi + rows * Fw, 0, (size_t)((f->Fh - rows) * Fw) * sizeof(double));
            for (int k = 0; k <= two; k++) {
                const T *s = src + (n * cs + c + k) * Hs * Ws;
                double *z = k ? f->zi : f->zr;
                for (int64_t y = 0; y < Hs; y++)
                    for (int64_t x = 0; x < Ws; x++)
                        z[y * uh * Fw + x * uw] = s[y * Ws + x];
            }
            const int64_t q = (n * P + c) * F;
            fft2_forward_pair(f, rows, Sr + q, Si + q, two ? Sr + q + F : NULL, two ? Si + q + F : NULL);
        }
}

/* Tables and scratch for kernel spectra of KH x KW kernels with taps dh, dw apart. */
typedef struct {
    double *e1r, *e1i, *e2r, *e2i, *qr, *qi, *fk;
} SFX(kspec);

static void SFX(kspec_init)(SFX(kspec) *k, const fft2 *f, int64_t KH, int64_t KW, int64_t dh, int64_t dw, int sign)
{
    k->e1r = tdcrt_malloc(KH * f->Fh * (int64_t)sizeof(double));
    k->e1i = tdcrt_malloc(KH * f->Fh * (int64_t)sizeof(double));
    k->e2r = tdcrt_malloc(KW * f->HF * (int64_t)sizeof(double));
    k->e2i = tdcrt_malloc(KW * f->HF * (int64_t)sizeof(double));
    k->qr = tdcrt_malloc(KH * f->HF * (int64_t)sizeof(double));
    k->qi = tdcrt_malloc(KH * f->HF * (int64_t)sizeof(double));
    k->fk = tdcrt_malloc(KH * KW * (int64_t)sizeof(double));
    dft_table(KH, dh, 0, f->Fh, f->Fh, sign, k->e1r, k->e1i);
    dft_table(KW, dw, 0, f->Fw, f->HF, sign, k->e2r, k->e2i);
}

static void SFX(kspec_free)(SFX(kspec) *k)
{
    free(k->e1r); free(k->e1i); free(k->e2r); free(k->e2i); free(k->qr); free(k->qi); free(k->fk);
}

/* S [Fh, HF] = the spectrum of kernel w [KH, KW] (sign -1; sign +1 gives its conjugate). */
static void SFX(kernel_spec)(SFX(kspec) *k, const fft2 *f, const T *w, int64_t KH, int64_t KW, double *sr, double *si)
{
    for (int64_t t = 0; t < KH * KW; t++)
        k->fk[t] = w[t];
    kernel_spectrum(k->fk, KH, KW, f->Fh, f->HF, k->e1r, k->e1i, k->e2r, k->e2i, k->qr, k->qi, sr, si);
}

/* The shared loop of the forward and backward-input passes: for each group and chunk of images,
 * Y[n, q] = sum_p In[n, p] * K(q, p) over the group's p input planes (spectra In), K(q, p) the
 * spectrum of the kernel at w + (g*q*p + q*wq + p*wp)*KH*KW (conjugated when sign is +1), then two
 * planes per inverse FFT, handed to `emit` as unscaled z. */
typedef void (*SFX(fft_emit_fn))(void *ctx, int64_t n, int64_t q, const double *z, int64_t Fw, double scale);

static void SFX(fft_conv_loop)(fft2 *f, const T *in, int64_t N, int64_t groups, int64_t p, int64_t q, int64_t Hs,
                               int64_t Ws, int64_t uh, int64_t uw, const T *w, int64_t wq, int64_t wp,
                               int64_t KH, int64_t KW, int64_t dh, int64_t dw, int sign,
                               const unsigned char *need, SFX(fft_emit_fn) emit, void *ctx)
{
    const int64_t F = f->Fh * f->HF, KK = KH * KW;
    const int64_t nb = fft_chunk(N, p + FFT_OB, F);
    const double scale = 1.0 / ((double)f->Fh * (double)f->Fw);
    double *Xr = tdcrt_malloc(nb * p * F * (int64_t)sizeof(double)), *Xi = tdcrt_malloc(nb * p * F * (int64_t)sizeof(double));
    double *Yr = tdcrt_malloc(nb * FFT_OB * F * (int64_t)sizeof(double)), *Yi = tdcrt_malloc(nb * FFT_OB * F * (int64_t)sizeof(double));
    double *Kr = tdcrt_malloc(FFT_OB * F * (int64_t)sizeof(double)), *Ki = tdcrt_malloc(FFT_OB * F * (int64_t)sizeof(double));
    SFX(kspec) ks;
    SFX(kspec_init)(&ks, f, KH, KW, dh, dw, sign);
    for (int64_t gi = 0; gi < groups; gi++)
        for (int64_t n0 = 0; n0 < N; n0 += nb) {
            const int64_t nc = min64(nb, N - n0);
            SFX(fft_planes)(f, in + (n0 * groups * p + gi * p) * Hs * Ws, nc, p, groups * p, Hs, Ws, uh, uw, Xr, Xi);
            for (int64_t q0 = 0; q0 < q; q0 += FFT_OB) {
                const int64_t kb = min64(FFT_OB, q - q0);
                memset(Yr, 0, (size_t)(nc * FFT_OB * F) * sizeof(double));
                memset(Yi, 0, (size_t)(nc * FFT_OB * F) * sizeof(double));
                for (int64_t c = 0; c < p; c++) {
                    for (int64_t k = 0; k < kb; k++)   /* kernel (q0+k, c) of this group */
                        SFX(kernel_spec)(&ks, f, w + (gi * q * p + (q0 + k) * wq + c * wp) * KK, KH, KW,
                                         Kr + k * F, Ki + k * F);
                    for (int64_t n = 0; n < nc; n++)
                        for (int64_t k = 0; k < kb; k++)
                            cmac(Yr + (n * FFT_OB + k) * F, Yi + (n * FFT_OB + k) * F, Xr + (n * p + c) * F,
                                 Xi + (n * p + c) * F, Kr + k * F, Ki + k * F, F, 0);
                }
                for (int64_t n = 0; n < nc; n++)
                    for (int64_t k = 0; k < kb; k += 2) {
                        const int two = k + 1 < kb;
                        const int64_t y = (n * FFT_OB + k) * F;
                        fft2_inverse_pair(f, Yr + y, Yi + y, two ? Yr + y + F : NULL, two ? Yi + y + F : NULL, need);
                        emit(ctx, n0 + n, gi * q + q0 + k, f->zr, f->Fw, scale);
                        if (two)
                            emit(ctx, n0 + n, gi * q + q0 + k + 1, f->zi, f->Fw, scale);
                    }
            }
        }
    SFX(kspec_free)(&ks);
    free(Xr); free(Xi); free(Yr); free(Yi); free(Kr); free(Ki);
}

/* Where emit writes: dst[n, q] [Ho, Wo] = z[(y*sy + oy) mod Fh, (x*sx + ox) mod Fw] * scale + b[q]
 * when the tap lies in [lo, hi] along each axis (inclusive), else b[q] (0 without bias). */
typedef struct {
    T *dst;
    const T *b;
    int64_t Q, Ho, Wo, sy, sx, oy, ox, loy, hiy, lox, hix, Fh;
} SFX(fft_out);

static void SFX(fft_emit)(void *ctx, int64_t n, int64_t q, const double *z, int64_t Fw, double scale)
{
    const SFX(fft_out) *o = ctx;
    const double bias = o->b ? (double)o->b[q] : 0.0;
    T *d = o->dst + (n * o->Q + q) * o->Ho * o->Wo;
    for (int64_t y = 0; y < o->Ho; y++) {
        const int64_t s1 = y * o->sy + o->oy;
        const int oky = s1 >= o->loy && s1 <= o->hiy;
        const double *zr = z + ((s1 % o->Fh + o->Fh) % o->Fh) * Fw;
        for (int64_t x = 0; x < o->Wo; x++) {
            const int64_t s2 = x * o->sx + o->ox;
            const int ok = oky && s2 >= o->lox && s2 <= o->hix;
            d[y * o->Wo + x] = (T)(ok ? zr[(s2 % Fw + Fw) % Fw] * scale + bias : bias);
        }
    }
}

/* Rows of z an fft_out reads. */
static unsigned char *SFX(fft_need)(const SFX(fft_out) *o)
{
    unsigned char *need = tdcrt_malloc(o->Fh);
    memset(need, 0, (size_t)o->Fh);
    for (int64_t y = 0; y < o->Ho; y++) {
        const int64_t s1 = y * o->sy + o->oy;
        if (s1 >= o->loy && s1 <= o->hiy)
            need[(s1 % o->Fh + o->Fh) % o->Fh] = 1;
    }
    return need;
}

/* Forward: out[u, v] = c[u*sh - pt, v*sw - pl] + b, c the correlation sum_ij x[s + i*dh] w[i]
 * (spectrum X * conj(W)), valid for -(KHd-1) <= s <= H-1 (zero outside: the window misses x). */
void SFX(tdc_conv2d_fft)(const T *x, const T *w, const T *b, int64_t has_bias, T *out,
                         int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t KH, int64_t KW,
                         int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                         int64_t dh, int64_t dw, int64_t groups)
{
    const int64_t cg = C / groups, cog = CO / groups, khd = (KH - 1) * dh + 1, kwd = (KW - 1) * dw + 1;
    fft2 f;
    fft2_init(&f, pow2_at_least(H + khd - 1), pow2_at_least(W + kwd - 1));
    SFX(fft_out) o = {out, has_bias ? b : NULL, CO, OH, OW, sh, sw, -pt, -pl, -(khd - 1), H - 1, -(kwd - 1), W - 1, f.Fh};
    unsigned char *need = SFX(fft_need)(&o);
    SFX(fft_conv_loop)(&f, x, N, groups, cg, cog, H, W, 1, 1, w, cg, 1, KH, KW, dh, dw, +1, need,
                       SFX(fft_emit), &o);
    free(need);
    fft2_free(&f);
}

/* Backward input: dx[iy, ix] = z[iy + pt, ix + pl], z the full convolution of the zero-upsampled
 * gy (rows y*sh) with the dilated w (spectrum G * W), nonzero for s < Lu + KHd - 1. */
void SFX(tdc_conv2d_grad_input_fft)(const T *gy, const T *w, T *dx,
                                    int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t KH,
                                    int64_t KW, int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt,
                                    int64_t pl, int64_t dh, int64_t dw, int64_t groups)
{
    const int64_t cg = C / groups, cog = CO / groups, khd = (KH - 1) * dh + 1, kwd = (KW - 1) * dw + 1;
    const int64_t luh = (OH - 1) * sh + 1, luw = (OW - 1) * sw + 1;
    fft2 f;
    fft2_init(&f, pow2_at_least(luh + khd - 1), pow2_at_least(luw + kwd - 1));
    SFX(fft_out) o = {dx, NULL, C, H, W, 1, 1, pt, pl, 0, luh + khd - 2, 0, luw + kwd - 2, f.Fh};
    unsigned char *need = SFX(fft_need)(&o);
    /* the kernel of (input channel c, output channel o) within a group is w[o, c]: c steps 1, o steps cg */
    SFX(fft_conv_loop)(&f, gy, N, groups, cog, cg, OH, OW, sh, sw, w, 1, cg, KH, KW, dh, dw, -1, need,
                       SFX(fft_emit), &o);
    free(need);
    fft2_free(&f);
}

/* Backward weight: dw[o, c, i, j] = r[i*dh - pt, j*dw - pl], r the correlation of x with the
 * zero-upsampled gy summed over images (spectrum sum_n X * conj(G)), valid for
 * -(Lu-1) <= s <= H-1; only the KH x KW taps are read back, by the inverse DFT's definition. */
void SFX(tdc_conv2d_grad_weight_fft)(const T *x, const T *gy, T *dwt,
                                     int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t KH,
                                     int64_t KW, int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt,
                                     int64_t pl, int64_t dh, int64_t dw, int64_t groups)
{
    const int64_t cg = C / groups, cog = CO / groups, KK = KH * KW;
    const int64_t luh = (OH - 1) * sh + 1, luw = (OW - 1) * sw + 1;
    fft2 f;
    fft2_init(&f, pow2_at_least(H + luh - 1), pow2_at_least(W + luw - 1));
    const int64_t Fh = f.Fh, Fw = f.Fw, HF = f.HF, F = Fh * HF;
    const int64_t nb = fft_chunk(N, cg + cog, F);
    double *Xr = tdcrt_malloc(nb * cg * F * (int64_t)sizeof(double)), *Xi = tdcrt_malloc(nb * cg * F * (int64_t)sizeof(double));
    double *Gr = tdcrt_malloc(nb * cog * F * (int64_t)sizeof(double)), *Gi = tdcrt_malloc(nb * cog * F * (int64_t)sizeof(double));
    double *Rr = tdcrt_malloc(F * (int64_t)sizeof(double)), *Ri = tdcrt_malloc(F * (int64_t)sizeof(double));
    double *Pr = tdcrt_malloc(Fh * KW * (int64_t)sizeof(double)), *Pi = tdcrt_malloc(Fh * KW * (int64_t)sizeof(double));
    double *e1r = tdcrt_malloc(KH * Fh * (int64_t)sizeof(double)), *e1i = tdcrt_malloc(KH * Fh * (int64_t)sizeof(double));
    double *e2r = tdcrt_malloc(KW * HF * (int64_t)sizeof(double)), *e2i = tdcrt_malloc(KW * HF * (int64_t)sizeof(double));
    double *acc = tdcrt_malloc(CO * cg * KK * (int64_t)sizeof(double));
    dft_table(KH, dh, -pt, Fh, Fh, +1, e1r, e1i);
    dft_table(KW, dw, -pl, Fw, HF, +1, e2r, e2i);
    for (int64_t j = 0; j < KW; j++)          /* the half spectrum stands for its mirror too */
        for (int64_t k = 0; k < HF; k++) {
            const double c = (k == 0 || 2 * k == Fw) ? 1.0 : 2.0;
            e2r[j * HF + k] *= c;
            e2i[j * HF + k] *= c;
        }
    memset(acc, 0, (size_t)(CO * cg * KK) * sizeof(double));
    for (int64_t gi = 0; gi < groups; gi++)
        for (int64_t n0 = 0; n0 < N; n0 += nb) {
            const int64_t nc = min64(nb, N - n0);
            SFX(fft_planes)(&f, x + (n0 * C + gi * cg) * H * W, nc, cg, C, H, W, 1, 1, Xr, Xi);
            SFX(fft_planes)(&f, gy + (n0 * CO + gi * cog) * OH * OW, nc, cog, CO, OH, OW, sh, sw, Gr, Gi);
            for (int64_t o = 0; o < cog; o++)
                for (int64_t c = 0; c < cg; c++) {
                    memset(Rr, 0, (size_t)F * sizeof(double));
                    memset(Ri, 0, (size_t)F * sizeof(double));
                    for (int64_t n = 0; n < nc; n++)
                        cmac(Rr, Ri, Xr + (n * cg + c) * F, Xi + (n * cg + c) * F, Gr + (n * cog + o) * F,
                             Gi + (n * cog + o) * F, F, 1);
                    /* P[k1, j] = sum_k2 R[k1, k2] e2[j, k2]; r[i, j] = Re sum_k1 e1[i, k1] P[k1, j] */
                    for (int64_t k1 = 0; k1 < Fh; k1++)
                        for (int64_t j = 0; j < KW; j++) {
                            double sr = 0, si = 0;
                            const double *rr = Rr + k1 * HF, *ri = Ri + k1 * HF;
                            const double *er = e2r + j * HF, *ei = e2i + j * HF;
                            for (int64_t k = 0; k < HF; k++) {
                                sr += rr[k] * er[k] - ri[k] * ei[k];
                                si += rr[k] * ei[k] + ri[k] * er[k];
                            }
                            Pr[k1 * KW + j] = sr;
                            Pi[k1 * KW + j] = si;
                        }
                    double *a = acc + ((gi * cog + o) * cg + c) * KK;
                    for (int64_t i = 0; i < KH; i++)
                        for (int64_t j = 0; j < KW; j++) {
                            double s = 0;
                            for (int64_t k1 = 0; k1 < Fh; k1++)
                                s += e1r[i * Fh + k1] * Pr[k1 * KW + j] - e1i[i * Fh + k1] * Pi[k1 * KW + j];
                            a[i * KW + j] += s;
                        }
                }
        }
    const double scale = 1.0 / ((double)Fh * (double)Fw);
    for (int64_t o = 0; o < CO; o++)
        for (int64_t c = 0; c < cg; c++)
            for (int64_t i = 0; i < KH; i++)
                for (int64_t j = 0; j < KW; j++) {
                    const int64_t s1 = i * dh - pt, s2 = j * dw - pl;
                    const int ok = s1 >= -(luh - 1) && s1 <= H - 1 && s2 >= -(luw - 1) && s2 <= W - 1;
                    const int64_t t = (o * cg + c) * KK + i * KW + j;
                    dwt[t] = ok ? (T)(acc[t] * scale) : (T)0;
                }
    free(Xr); free(Xi); free(Gr); free(Gi); free(Rr); free(Ri); free(Pr); free(Pi);
    free(e1r); free(e1i); free(e2r); free(e2i); free(acc);
    fft2_free(&f);
}

#endif
