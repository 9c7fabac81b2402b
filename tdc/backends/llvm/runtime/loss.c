/* tdc runtime: softmax cross-entropy, one-hot and mean squared error. */
#include "internal.h"

#ifndef TDC_TEMPLATE
#define TDC_SELF "loss.c"
#include "instantiate.h"

#else /* the template: T, SFX(name), GEMM */

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

#endif
