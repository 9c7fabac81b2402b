/* tdc runtime: softmax and log-softmax. */
#include "internal.h"

#ifndef TDC_TEMPLATE
#define TDC_SELF "reduce.c"
#include "instantiate.h"

#else /* the template: T, SFX(name), GEMM */

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

#endif
