/* tdc runtime: gather (ONNX Gather, numpy take) and its adjoint. Arrays are viewed as
 * [outer, n, inner] around the gathered axis; m indices (any integer width, negative ones
 * counting from the end) pick rows of n. */
#include "internal.h"

#ifndef TDC_TEMPLATE
#include <stdlib.h>
#include <string.h>

/* Every index checked (and made non-negative) before anything is written: (i + 1) names the
 * first bad one, -1 a bad index width. */
static int64_t rows_of(const void *idx, int64_t idx_bytes, int64_t m, int64_t n, int64_t *rows)
{
    int ok = 1;
    for (int64_t j = 0; j < m; j++) {
        int64_t k = load_int(idx, idx_bytes, j, &ok);
        if (!ok)
            return -1;
        k += k < 0 ? n : 0;
        if (k < 0 || k >= n)
            return j + 1;
        rows[j] = k;
    }
    return 0;
}

/* Any dtype: rows are moved as bytes (elem = the dtype's size). */
int64_t tdc_gather(const void *data, int64_t elem, const void *idx, int64_t idx_bytes, void *out,
                   int64_t outer, int64_t n, int64_t m, int64_t inner)
{
    int64_t *rows = tdcrt_malloc(max64(m, 1) * (int64_t)sizeof(int64_t));
    const int64_t bad = rows_of(idx, idx_bytes, m, n, rows);
    const size_t row = (size_t)(inner * elem);
    for (int64_t o = 0; o < outer && !bad; o++)
        for (int64_t j = 0; j < m; j++)
            memcpy((char *)out + (size_t)(o * m + j) * row, (const char *)data + (size_t)(o * n + rows[j]) * row, row);
    free(rows);
    return bad;
}

#define TDC_SELF "gather.c"
#include "instantiate.h"

#else /* the template: T, SFX(name) */

int64_t SFX(tdc_gather_grad)(const T *g, const void *idx, int64_t idx_bytes, T *out, int64_t outer, int64_t n,
                             int64_t m, int64_t inner)
{
    int64_t *rows = tdcrt_malloc(max64(m, 1) * (int64_t)sizeof(int64_t));
    const int64_t bad = rows_of(idx, idx_bytes, m, n, rows);
    if (!bad) {
        memset(out, 0, (size_t)(outer * n * inner) * sizeof(T));
        for (int64_t o = 0; o < outer; o++)
            for (int64_t j = 0; j < m; j++) {
                const T *src = g + (o * m + j) * inner;
                T *dst = out + (o * n + rows[j]) * inner;
                for (int64_t i = 0; i < inner; i++)
                    dst[i] += src[i];
            }
    }
    free(rows);
    return bad;
}

#endif
