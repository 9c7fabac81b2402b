/* tdc runtime: batch normalisation and dropout. */
#include "internal.h"

#ifndef TDC_TEMPLATE

static inline uint64_t splitmix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

#define TDC_SELF "norm.c"
#include "instantiate.h"

#else /* the template: T, SFX(name), GEMM */

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

#endif
