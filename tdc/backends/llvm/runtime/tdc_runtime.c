/* tdc runtime: the kernels declared in tdc_runtime.h.
 *
 * The file is its own template: the first pass (TDC_TEMPLATE undefined) holds the
 * dtype-independent helpers, then includes itself twice with T, SFX and GEMM defined,
 * once for float (_f32) and once for double (_f64). Everything below `#else` is the
 * template; read it as if T were float.
 *
 * Scratch memory (conv's column and result matrices) is malloc'ed once per call and freed
 * before returning, so no state is shared between calls or threads. The batch is cut into
 * chunks of images whose column matrices sit side by side (one larger GEMM per group and
 * chunk, which BLAS runs far better than one small GEMM per image); a chunk holds as many
 * images as fit in SCRATCH_BYTES, at least one.
 *
 * Build: gcc -O3 -march=native -fPIC -Wall -Wextra -std=c11 -I<openblas include> -c tdc_runtime.c
 * (tdc/backends/llvm/runtime.py does this). Never build with -ffast-math: the kernels rely
 * on NaN comparisons.
 */
#ifndef TDC_TEMPLATE

#define _POSIX_C_SOURCE 200809L   /* pthreads and sysconf under -std=c11 */
#include "tdc_runtime.h"

#include <cblas.h>
#include <limits.h>
#include <pthread.h>
#include <unistd.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SCRATCH_BYTES ((int64_t)8 << 20)

static void *xmalloc(int64_t bytes)
{
    void *p = malloc(bytes > 0 ? (size_t)bytes : 1);
    if (!p) {
        fprintf(stderr, "tdc runtime: out of memory allocating %lld bytes\n", (long long)bytes);
        abort();
    }
    return p;
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* ---- threads ----------------------------------------------------------------------------
 * A pool of worker threads that sleep on a condition variable between calls (never spin: two
 * spinning pools on 2 vCPUs cost milliseconds per call here). parallel_for(n, work, fn, ctx)
 * runs fn(ctx, begin, end) on contiguous parts of [0, n), one per thread, the caller taking
 * part 0. Threads: TDC_THREADS, else the online CPUs (tdc_runtime_set_threads sets BLAS's). */
typedef void (*range_fn)(void *ctx, int64_t begin, int64_t end);

#define MAX_THREADS 64
static struct {
    pthread_mutex_t mu;
    pthread_cond_t wake, done;
    int threads;              /* including the caller; 0: not started */
    uint64_t generation;      /* bumped per call: each worker runs once per generation */
    int pending;
    range_fn fn;
    void *ctx;
    int64_t n;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, NULL, NULL, 0};

static void part(int64_t n, int t, int parts, int64_t *b, int64_t *e)
{
    *b = n * t / parts;
    *e = n * (t + 1) / parts;
}

static void *pool_worker(void *arg)
{
    const int t = (int)(intptr_t)arg;
    uint64_t seen = 0;
    pthread_mutex_lock(&pool.mu);
    for (;;) {
        while (pool.generation == seen)
            pthread_cond_wait(&pool.wake, &pool.mu);
        seen = pool.generation;
        range_fn fn = pool.fn;
        void *ctx = pool.ctx;
        int64_t b, e;
        part(pool.n, t, pool.threads, &b, &e);
        pthread_mutex_unlock(&pool.mu);
        if (b < e)
            fn(ctx, b, e);
        pthread_mutex_lock(&pool.mu);
        if (--pool.pending == 0)
            pthread_cond_signal(&pool.done);
    }
    return NULL;
}

static int pool_threads(void)
{
    if (pool.threads == 0) {   /* first use; callers of the runtime are single-threaded */
        const char *s = getenv("TDC_THREADS");
        long n = s ? strtol(s, NULL, 10) : sysconf(_SC_NPROCESSORS_ONLN);
        n = n < 1 ? 1 : (n > MAX_THREADS ? MAX_THREADS : n);
        int started = 1;
        for (int t = 1; t < n; t++) {
            pthread_t th;
            if (pthread_create(&th, NULL, pool_worker, (void *)(intptr_t)t) != 0)
                break;
            pthread_detach(th);
            started++;
        }
        pool.threads = started;
    }
    return pool.threads;
}

/* fn over [0, n) on the pool, when `work` (about the flops) pays for waking the threads. */
static void parallel_for(int64_t n, double work, range_fn fn, void *ctx)
{
    if (n <= 1 || work < 2e6 || pool_threads() == 1) {
        fn(ctx, 0, n);
        return;
    }
    pthread_mutex_lock(&pool.mu);
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n = n;
    pool.pending = pool.threads - 1;
    pool.generation++;
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    int64_t b, e;
    part(n, 0, pool.threads, &b, &e);
    fn(ctx, b, e);
    pthread_mutex_lock(&pool.mu);
    while (pool.pending > 0)
        pthread_cond_wait(&pool.done, &pool.mu);
    pthread_mutex_unlock(&pool.mu);
}

/* Images per chunk: the column matrix [K, nb * P] stays within SCRATCH_BYTES and the
 * GEMM's column count within a BLAS int. */
static int64_t chunk_images(int64_t N, int64_t K, int64_t P, int64_t elem)
{
    int64_t per_image = max64(1, K * P * elem);
    int64_t nb = max64(1, SCRATCH_BYTES / per_image);
    if (P > 0)
        nb = min64(nb, max64(1, INT_MAX / P));
    return max64(1, min64(nb, N));
}

/* The outputs o in [*lo, *hi) of n whose tap o * s + off lies in [0, size). */
static inline void valid_range(int64_t off, int64_t s, int64_t size, int64_t n, int64_t *lo, int64_t *hi)
{
    int64_t a = off >= 0 ? 0 : (-off + s - 1) / s;
    int64_t b = size - off <= 0 ? 0 : (size - off + s - 1) / s;
    a = min64(a, n);
    *lo = a;
    *hi = max64(a, min64(b, n));
}

/* For each kernel column j: the output columns [xs[2j], xs[2j+1]) whose tap j lies inside the
 * image (the direct kernels' inner loops run over these). Freed by the caller. */
static int64_t *column_ranges(int64_t KW, int64_t W, int64_t OW, int64_t sw, int64_t pl, int64_t dw)
{
    int64_t *xs = xmalloc(2 * KW * (int64_t)sizeof(int64_t));
    for (int64_t j = 0; j < KW; j++)
        valid_range(j * dw - pl, sw, W, OW, &xs[2 * j], &xs[2 * j + 1]);
    return xs;
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

static inline uint64_t splitmix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Convolution geometry, shared by the three conv kernels. */
typedef struct {
    int64_t N, C, H, W, CO, KH, KW, OH, OW, sh, sw, pt, pl, dh, dw, groups;
} conv_geo;

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
    p->cr = xmalloc(max64(1, n / 2) * (int64_t)sizeof(double));
    p->ci = xmalloc(max64(1, n / 2) * (int64_t)sizeof(double));
    p->rev = xmalloc(n * (int64_t)sizeof(int64_t));
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
    f->zr = xmalloc(Fh * Fw * (int64_t)sizeof(double));
    f->zi = xmalloc(Fh * Fw * (int64_t)sizeof(double));
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

void tdc_runtime_set_threads(int64_t n)
{
    scipy_openblas_set_num_threads((int)max64(1, min64(n, INT_MAX)));
}

#define TDC_TEMPLATE

#define T float
#define SFX(name) name##_f32
#define GEMM scipy_cblas_sgemm
#include __FILE__
#undef T
#undef SFX
#undef GEMM

#define T double
#define SFX(name) name##_f64
#define GEMM scipy_cblas_dgemm
#include __FILE__
#undef T
#undef SFX
#undef GEMM

#else /* ---- the template: T, SFX(name), GEMM ---------------------------------------- */

/* C[M,N] = op(A) @ op(B) + beta * C, row-major; ta/tb transpose A/B. Empty sizes are
 * handled here (BLAS rejects leading dimensions of 0). */
static void SFX(gemm)(int ta, int tb, int64_t M, int64_t N, int64_t K, const T *A, int64_t lda,
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
    GEMM(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
         (blasint)M, (blasint)N, (blasint)K, (T)1, A, (blasint)lda, B, (blasint)ldb, beta, C, (blasint)ldc);
}

/* ---- matrix products ---------------------------------------------------------------- */

void SFX(tdc_linear)(const T *x, const T *w, const T *b, int64_t has_bias, T *out,
                     int64_t M, int64_t K, int64_t N)
{
    SFX(gemm)(0, 1, M, N, K, x, K, w, K, 0, out, N);
    if (has_bias)
        for (int64_t i = 0; i < M; i++)
            for (int64_t j = 0; j < N; j++)
                out[i * N + j] += b[j];
}

void SFX(tdc_matmul)(const T *a, const T *b, T *out, int64_t M, int64_t K, int64_t N)
{
    SFX(gemm)(0, 0, M, N, K, a, K, b, N, 0, out, N);
}

void SFX(tdc_matmul_batched)(const T *a, const T *b, T *out, int64_t B, int64_t M, int64_t K,
                             int64_t N, const int64_t *ia, const int64_t *ib)
{
    for (int64_t i = 0; i < B; i++)
        SFX(gemm)(0, 0, M, N, K, a + ia[i] * M * K, K, b + ib[i] * K * N, N, 0, out + i * M * N, N);
}

/* ---- convolution -------------------------------------------------------------------- */

/* cols[(c*KH + i)*KW + j, y*OW + x] = x_img[c, y*sh - pt + i*dh, x*sw - pl + j*dw], 0 in the
 * padding; x_img is [cg, H, W] and ld the row stride of cols. */
static void SFX(im2col)(const conv_geo *g, const T *x_img, int64_t cg, T *cols, int64_t ld)
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
        SFX(im2col)(g, x + ((n0 + n) * g->C + c0) * g->H * g->W, cg, cols + n * P, nb * P);
}

/* gm [cog, nb*P]: channels o0..o0+cog of images n0..n0+nb of gy, in the layout of chunk_cols. */
static void SFX(chunk_rows)(const conv_geo *g, const T *gy, int64_t n0, int64_t nb, int64_t o0, T *gm)
{
    const int64_t P = g->OH * g->OW, cog = g->CO / g->groups;
    for (int64_t n = 0; n < nb; n++)
        for (int64_t o = 0; o < cog; o++)
            memcpy(gm + o * nb * P + n * P, gy + ((n0 + n) * g->CO + o0 + o) * P, (size_t)P * sizeof(T));
}

#define CONV_GEO {N, C, H, W, CO, KH, KW, OH, OW, sh, sw, pt, pl, dh, dw, groups}

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
    const int64_t nb = chunk_images(n_end - n_begin, K, P, sizeof(T));
    T *cols = xmalloc(K * nb * P * (int64_t)sizeof(T));
    T *res = xmalloc(cog * nb * P * (int64_t)sizeof(T));
    for (int64_t n0 = n_begin; n0 < n_end; n0 += nb) {
        const int64_t m = min64(nb, n_end - n0);
        for (int64_t gi = 0; gi < groups; gi++) {
            SFX(chunk_cols)(g, j->x, n0, m, gi * cg, cols);
            SFX(gemm)(0, 0, cog, m * P, K, j->w + gi * cog * K, K, cols, m * P, 0, res, m * P);
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
    parallel_for(N, flops, SFX(conv2d_images), &j);    /* the images are split over the threads */
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
    const int64_t nb = chunk_images(n_end - n_begin, K, P, sizeof(T));
    memset(j->dx + n_begin * C * H * W, 0, (size_t)((n_end - n_begin) * C * H * W) * sizeof(T));
    T *cols = xmalloc(K * nb * P * (int64_t)sizeof(T));
    T *gm = xmalloc(cog * nb * P * (int64_t)sizeof(T));
    for (int64_t n0 = n_begin; n0 < n_end; n0 += nb) {
        const int64_t m = min64(nb, n_end - n0);
        for (int64_t gi = 0; gi < groups; gi++) {
            SFX(chunk_rows)(g, j->gy, n0, m, gi * cog, gm);
            /* cols [K, m*P] = w_g^T [K, cog] @ gm [cog, m*P] */
            SFX(gemm)(1, 0, K, m * P, cog, j->w + gi * cog * K, K, gm, m * P, 0, cols, m * P);
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
    parallel_for(N, flops, SFX(conv2d_grad_input_images), &j);
}

void SFX(tdc_conv2d_grad_weight)(const T *x, const T *gy, T *dwt,
                                 int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t KH, int64_t KW,
                                 int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                                 int64_t dh, int64_t dw, int64_t groups)
{
    const conv_geo g = CONV_GEO;
    const int64_t P = OH * OW, cg = C / groups, cog = CO / groups, K = cg * KH * KW;
    const int64_t nb = chunk_images(N, K, P, sizeof(T));
    memset(dwt, 0, (size_t)(CO * K) * sizeof(T));
    T *cols = xmalloc(K * nb * P * (int64_t)sizeof(T));
    T *gm = xmalloc(cog * nb * P * (int64_t)sizeof(T));
    for (int64_t n0 = 0; n0 < N; n0 += nb) {
        const int64_t m = min64(nb, N - n0);
        for (int64_t gi = 0; gi < groups; gi++) {
            SFX(chunk_cols)(&g, x, n0, m, gi * cg, cols);
            SFX(chunk_rows)(&g, gy, n0, m, gi * cog, gm);
            /* dw_g [cog, K] += gm [cog, m*P] @ cols^T [m*P, K] */
            SFX(gemm)(0, 1, cog, K, m * P, gm, m * P, cols, m * P, 1, dwt + gi * cog * K, K);
        }
    }
    free(cols);
    free(gm);
}

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
    T *acc = xmalloc(DIRECT_OB * rb * OW * (int64_t)sizeof(T));
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
    T *acc = xmalloc(DIRECT_OB * rb * W * (int64_t)sizeof(T));
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
    T *acc = xmalloc(KK * OW * (int64_t)sizeof(T));
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
    T *V = xmalloc(AA * p * Tc * (int64_t)sizeof(T));
    T *M = xmalloc(AA * q * Tc * (int64_t)sizeof(T));
    T *scratch = xmalloc((SFX(wino_tiles_scratch)(A, m, tw) + A * m * tw + tw) * (int64_t)sizeof(T));
    for (int64_t n0 = 0; n0 < N; n0 += nb) {
        const int64_t nc = min64(nb, N - n0), Tn = nc * tiles;   /* this chunk's tiles */
        for (int64_t gi = 0; gi < groups; gi++) {
            for (int64_t n = 0; n < nc; n++)
                for (int64_t c = 0; c < p; c++)
                    SFX(wino_tiles)(in + ((n0 + n) * groups * p + gi * p + c) * Hi * Wi, Hi, Wi, wm->BT, A, A, m,
                                    py, px, th, tw, V + c * Tn + n * tiles, p * Tn, scratch);
            for (int64_t k = 0; k < AA; k++)
                SFX(gemm)(0, 0, q, Tn, p, U + (gi * AA + k) * q * p, p, V + k * p * Tn, Tn, 0, M + k * q * Tn, Tn);
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
    T *U = xmalloc(groups * AA * P * Q * (int64_t)sizeof(T));
    T *scr = xmalloc((9 + 3 * wm->A) * Q * (int64_t)sizeof(T));
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
    T *Z = xmalloc(AA * cog * nb * tiles * (int64_t)sizeof(T));   /* A dY A^T tiles */
    T *V = xmalloc(AA * cg * nb * tiles * (int64_t)sizeof(T));    /* B^T X B tiles */
    T *Mw = xmalloc(AA * cog * cg * (int64_t)sizeof(T));
    T *scratch = xmalloc((SFX(wino_tiles_scratch)(A, m, tw) + 3 * A * cg + cg) * (int64_t)sizeof(T));
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
                SFX(gemm)(0, 1, cog, cg, Tn, Z + k * cog * Tn, Tn, V + k * cg * Tn, Tn, n0 > 0 ? 1 : 0,
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
    k->e1r = xmalloc(KH * f->Fh * (int64_t)sizeof(double));
    k->e1i = xmalloc(KH * f->Fh * (int64_t)sizeof(double));
    k->e2r = xmalloc(KW * f->HF * (int64_t)sizeof(double));
    k->e2i = xmalloc(KW * f->HF * (int64_t)sizeof(double));
    k->qr = xmalloc(KH * f->HF * (int64_t)sizeof(double));
    k->qi = xmalloc(KH * f->HF * (int64_t)sizeof(double));
    k->fk = xmalloc(KH * KW * (int64_t)sizeof(double));
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
    double *Xr = xmalloc(nb * p * F * (int64_t)sizeof(double)), *Xi = xmalloc(nb * p * F * (int64_t)sizeof(double));
    double *Yr = xmalloc(nb * FFT_OB * F * (int64_t)sizeof(double)), *Yi = xmalloc(nb * FFT_OB * F * (int64_t)sizeof(double));
    double *Kr = xmalloc(FFT_OB * F * (int64_t)sizeof(double)), *Ki = xmalloc(FFT_OB * F * (int64_t)sizeof(double));
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
    unsigned char *need = xmalloc(o->Fh);
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
    double *Xr = xmalloc(nb * cg * F * (int64_t)sizeof(double)), *Xi = xmalloc(nb * cg * F * (int64_t)sizeof(double));
    double *Gr = xmalloc(nb * cog * F * (int64_t)sizeof(double)), *Gi = xmalloc(nb * cog * F * (int64_t)sizeof(double));
    double *Rr = xmalloc(F * (int64_t)sizeof(double)), *Ri = xmalloc(F * (int64_t)sizeof(double));
    double *Pr = xmalloc(Fh * KW * (int64_t)sizeof(double)), *Pi = xmalloc(Fh * KW * (int64_t)sizeof(double));
    double *e1r = xmalloc(KH * Fh * (int64_t)sizeof(double)), *e1i = xmalloc(KH * Fh * (int64_t)sizeof(double));
    double *e2r = xmalloc(KW * HF * (int64_t)sizeof(double)), *e2i = xmalloc(KW * HF * (int64_t)sizeof(double));
    double *acc = xmalloc(CO * cg * KK * (int64_t)sizeof(double));
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

#undef CONV_GEO

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
                    /* the winner's index from flags, written through a small array: gcc turned every
                       form with ?: on the stores into branches, mispredicted half the time */
                    const int k = 2 * second + ((ec & second) | (ba & !second));
                    /* the winner's slot from flags (gcc turned ?: on the stores into branches that
                       real data mispredicts half the time) */
                    T w[4] = {0, 0, 0, 0};
                    w[k] = gr[xx];
                    d0[2 * xx] = w[0];
                    d0[2 * xx + 1] = w[1];
                    d1[2 * xx] = w[2];
                    d1[2 * xx + 1] = w[3];
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
    parallel_for(N * C, 250.0 * N * C * H * W, SFX(maxpool2d_grad_planes), &j);
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

/* ---- softmax and losses --------------------------------------------------------------- */

void SFX(tdc_softmax)(const T *x, T *out, int64_t A, int64_t B, int64_t C, int64_t log_)
{
    for (int64_t a = 0; a < A; a++)
        for (int64_t c = 0; c < C; c++) {
            const T *xs = x + a * B * C + c;
            T *os = out + a * B * C + c;
            double m = -INFINITY;
            for (int64_t i = 0; i < B; i++) {
                const double v = xs[i * C];
                if (v > m || v != v)   /* a NaN propagates, as in np.max */
                    m = v;
            }
            double s = 0.0;
            for (int64_t i = 0; i < B; i++)
                s += exp(xs[i * C] - m);
            if (log_) {
                const double ls = log(s);
                for (int64_t i = 0; i < B; i++)
                    os[i * C] = (T)(xs[i * C] - m - ls);
            } else {
                for (int64_t i = 0; i < B; i++)
                    os[i * C] = (T)(exp(xs[i * C] - m) / s);
            }
        }
}

int64_t SFX(tdc_softmax_cross_entropy)(const T *logits, const void *labels, int64_t label_bytes, T *out,
                                       int64_t N, int64_t K)
{
    int ok = 1;
    for (int64_t n = 0; n < N; n++) {
        const int64_t lab = load_int(labels, label_bytes, n, &ok);
        if (!ok)
            return -1;
        if (lab < 0 || lab >= K)
            return n + 1;
    }
    double total = 0.0;
    for (int64_t n = 0; n < N; n++) {
        const T *z = logits + n * K;
        double m = -INFINITY;
        for (int64_t c = 0; c < K; c++)
            if (z[c] > m || z[c] != z[c])
                m = z[c];
        double s = 0.0;
        for (int64_t c = 0; c < K; c++)
            s += exp((double)z[c] - m);
        total += log(s) + m - (double)z[load_int(labels, label_bytes, n, &ok)];
    }
    out[0] = (T)(total / (double)N);   /* N == 0 gives NaN, like the mean of nothing */
    return 0;
}

int64_t SFX(tdc_one_hot)(const void *idx, int64_t idx_bytes, T *out, int64_t n, int64_t depth)
{
    int ok = 1;
    for (int64_t i = 0; i < n; i++) {
        const int64_t k = load_int(idx, idx_bytes, i, &ok);
        if (!ok)
            return -1;
        if (k < 0 || k >= depth)
            return i + 1;
    }
    memset(out, 0, (size_t)(n * depth) * sizeof(T));
    for (int64_t i = 0; i < n; i++)
        out[i * depth + load_int(idx, idx_bytes, i, &ok)] = 1;
    return 0;
}

void SFX(tdc_mse)(const T *p, const T *t, T *out, int64_t n)
{
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) {
        const double d = (double)p[i] - (double)t[i];
        s += d * d;
    }
    out[0] = (T)(s / (double)max64(n, 1));
}

/* ---- batchnorm and dropout -------------------------------------------------------------- */

void SFX(tdc_batchnorm_infer)(const T *x, const T *gamma, const T *beta, const T *mean,
                              const T *var, double eps, T *out, int64_t N, int64_t C, int64_t S)
{
    for (int64_t c = 0; c < C; c++) {
        const double scale = gamma[c] / sqrt(var[c] + eps);
        const double shift = beta[c] - mean[c] * scale;
        for (int64_t n = 0; n < N; n++) {
            const T *xs = x + (n * C + c) * S;
            T *os = out + (n * C + c) * S;
            for (int64_t i = 0; i < S; i++)
                os[i] = (T)(xs[i] * scale + shift);
        }
    }
}

void SFX(tdc_batchnorm_train)(const T *x, const T *gamma, const T *beta, const T *mean,
                              const T *var, double eps, double momentum, T *out, T *new_mean,
                              T *new_var, int64_t N, int64_t C, int64_t S)
{
    const double cnt = (double)(N * S);
    for (int64_t c = 0; c < C; c++) {
        double s = 0.0;
        for (int64_t n = 0; n < N; n++)
            for (int64_t i = 0; i < S; i++)
                s += x[(n * C + c) * S + i];
        const double mu = s / cnt;
        double s2 = 0.0;
        for (int64_t n = 0; n < N; n++)
            for (int64_t i = 0; i < S; i++) {
                const double d = x[(n * C + c) * S + i] - mu;
                s2 += d * d;
            }
        const double v = s2 / cnt;
        const double scale = gamma[c] / sqrt(v + eps);
        for (int64_t n = 0; n < N; n++)
            for (int64_t i = 0; i < S; i++)
                out[(n * C + c) * S + i] = (T)((x[(n * C + c) * S + i] - mu) * scale + beta[c]);
        new_mean[c] = (T)(momentum * mean[c] + (1 - momentum) * mu);
        new_var[c] = (T)(momentum * var[c] + (1 - momentum) * v);
    }
}

void SFX(tdc_dropout)(const T *x, const void *key, int64_t key_bytes, double rate, int64_t seed, T *out,
                      int64_t n)
{
    int ok = 1;
    const uint64_t k = (uint64_t)load_int(key, key_bytes, 0, &ok);
    const uint64_t base = splitmix64((uint64_t)seed * 0x9E3779B97F4A7C15ULL + k);
    const double scale = 1.0 / (1.0 - rate);
    for (int64_t i = 0; i < n; i++) {
        const uint64_t h = splitmix64((uint64_t)i + base);
        const double u = (double)(h >> 40) * (1.0 / 16777216.0);
        out[i] = u >= rate ? (T)(x[i] * scale) : (T)0;
    }
}

#endif /* TDC_TEMPLATE */
