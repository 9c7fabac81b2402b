/* tdc runtime: the non-elementwise kernels the LLVM backend calls (one .c file per family of
 * ops: linalg.c, conv_*.c, pool.c, reduce.c, loss.c, norm.c, gather.c; common.c for memory and threads).
 *
 * One function per op and dtype: suffix _f32 (T = float) or _f64 (T = double); the two
 * families have identical argument lists. Every array is C-contiguous; every integer
 * argument is int64_t and every scalar float attribute is a double. Kernels write into
 * caller-allocated outputs and keep no state between calls (scratch is malloc'ed per call),
 * so they may run concurrently on different data. GEMMs go to OpenBLAS (scipy-openblas32).
 * Semantics match tdc/backends/numba/kernels.py and the numpy references in tdc/ops.
 *
 * Geometry names: x is [N, C, H, W], a conv weight [CO, C/groups, KH, KW], an output
 * [N, CO or C, OH, OW]; s* = stride, pt/pl = top/left padding (bottom/right are implied by
 * OH/OW), d* = dilation. Pooling windows that reach past the input are clipped to it.
 * Functions returning int64_t return 0 on success, (i + 1) when element i of the label /
 * index array is out of range, and -1 when *_bytes is not 1, 2, 4 or 8.
 */
#ifndef TDC_RUNTIME_H
#define TDC_RUNTIME_H

#include <stdint.h>

/* gather of any dtype: elem is its size in bytes */
int64_t tdc_gather(const void *data, int64_t elem, const void *idx, int64_t idx_bytes, void *out,
                   int64_t outer, int64_t n, int64_t m, int64_t inner);

#ifdef __cplusplus
extern "C" {
#endif

/* Set the number of OpenBLAS threads used by the GEMMs (n >= 1). */
void tdc_runtime_set_threads(int64_t n);
/* fn(ctx, begin, end) over parts of [0, n) on the runtime's thread pool when `work` (about the
 * flops) pays for waking it and the pool is free, else fn(ctx, 0, n): generated loop kernels. */
void tdc_parallel_for(int64_t n, double work, void (*fn)(void *, int64_t, int64_t), void *ctx);

/* ---- float32 ---------------------------------------------------------------------- */

/* out[M,N] = x[M,K] @ w[N,K]^T (+ b[N] when has_bias); b is not read otherwise (may be NULL). */
void tdc_linear_f32(const float *x, const float *w, const float *b, int64_t has_bias, float *out,
                    int64_t M, int64_t K, int64_t N);
/* out[M,N] = x[M,K] @ W^T (+ b[N]) with W [N,K] in CSR: row n is values[rowptr[n]:rowptr[n+1]] at
 * columns cols[...] (sparse.c; the arrays must describe a valid CSR matrix). */
void tdc_sparse_linear_f32(const float *x, const float *values, const int32_t *cols, const int32_t *rowptr,
                           const float *b, int64_t has_bias, float *out, int64_t M, int64_t K, int64_t N);
/* sparse_linear's gradients: dx[M,K] = g[M,N] @ W, and dv[j] = sum_m g[m, row(j)] * x[m, cols[j]]. */
void tdc_sparse_linear_grad_input_f32(const float *g, const float *values, const int32_t *cols,
                                      const int32_t *rowptr, float *dx, int64_t M, int64_t K, int64_t N);
void tdc_sparse_linear_grad_values_f32(const float *x, const float *g, const int32_t *cols, const int32_t *rowptr,
                                       float *dv, int64_t M, int64_t K, int64_t N);
/* out[N,CO,OH,OW] = conv2d(x, W) (+ b[CO]) with W [CO, C/groups*KH*KW] in CSR (sparse.c; im2col,
 * then each output channel's nonzeros times its column rows). */
void tdc_sparse_conv2d_f32(const float *x, const float *values, const int32_t *cols, const int32_t *rowptr,
                           const float *b, int64_t has_bias, float *out,
                           int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t KH, int64_t KW,
                           int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                           int64_t dh, int64_t dw, int64_t groups);
/* Seconds per call of tdc_linear_f32 / tdc_sparse_linear_f32, timed over `reps` calls in C (timing.c). */
double tdc_time_linear_f32(const float *x, const float *w, const float *b, int64_t has_bias, float *out,
                           int64_t M, int64_t K, int64_t N, int64_t reps);
double tdc_time_sparse_linear_f32(const float *x, const float *values, const int32_t *cols, const int32_t *rowptr,
                                  const float *b, int64_t has_bias, float *out, int64_t M, int64_t K, int64_t N,
                                  int64_t reps);
double tdc_prof_now(void);
void tdc_prof_add(double *slot, double t0);
double tdc_fma_peak_gflops(int64_t threads, int64_t iters);
/* out[M,N] = a[M,K] @ b[K,N]. */
void tdc_matmul_f32(const float *a, const float *b, float *out, int64_t M, int64_t K, int64_t N);
/* out[i] = a[ia[i]] @ b[ib[i]] for i < B; a is [*,M,K], b [*,K,N], out [B,M,N]. */
void tdc_matmul_batched_f32(const float *a, const float *b, float *out, int64_t B, int64_t M, int64_t K,
                            int64_t N, const int64_t *ia, const int64_t *ib);
/* out[N,CO,OH,OW] = conv2d(x[N,C,H,W], w[CO,C/groups,KH,KW]) (+ b[CO]); im2col + GEMM. */
void tdc_conv2d_f32(const float *x, const float *w, const float *b, int64_t has_bias, float *out,
                    int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t KH, int64_t KW,
                    int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                    int64_t dh, int64_t dw, int64_t groups);
/* dx[N,C,H,W] = gradient of conv2d w.r.t. x, given gy[N,CO,OH,OW] (dx is overwritten). */
void tdc_conv2d_grad_input_f32(const float *gy, const float *w, float *dx,
                               int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t KH, int64_t KW,
                               int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                               int64_t dh, int64_t dw, int64_t groups);
/* dw[CO,C/groups,KH,KW] = gradient of conv2d w.r.t. w, given x and gy (dw is overwritten). */
void tdc_conv2d_grad_weight_f32(const float *x, const float *gy, float *dwt,
                                int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t KH, int64_t KW,
                                int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                                int64_t dh, int64_t dw, int64_t groups);
/* Conv algorithms, one function per op, algorithm and dtype, named tdc_<op>_<algo>_<dtype>
 * with the argument lists of tdc_conv2d_f32 / _grad_input / _grad_weight above (whose outputs
 * they overwrite). im2col: the functions above under this name. direct: shifted GEMMs over
 * zero-padded planes (conv_direct.c) at unit strides and dilations, loop nests otherwise. winograd_f2 / winograd_f4: Winograd F(2x2,3x3) / F(4x4,3x3) with per-point GEMMs
 * (3x3, stride 1, dilation 1; any other geometry falls back to im2col). fft: 2-D FFT
 * convolution computed in double, any geometry. */
#define TDC_CONV_DIMS int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t KH, int64_t KW, \
                      int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt, int64_t pl, \
                      int64_t dh, int64_t dw, int64_t groups
void tdc_conv2d_im2col_f32(const float *x, const float *w, const float *b, int64_t has_bias, float *out, TDC_CONV_DIMS);
void tdc_conv2d_grad_input_im2col_f32(const float *gy, const float *w, float *dx, TDC_CONV_DIMS);
void tdc_conv2d_grad_weight_im2col_f32(const float *x, const float *gy, float *dwt, TDC_CONV_DIMS);
void tdc_conv2d_direct_f32(const float *x, const float *w, const float *b, int64_t has_bias, float *out, TDC_CONV_DIMS);
void tdc_conv2d_grad_input_direct_f32(const float *gy, const float *w, float *dx, TDC_CONV_DIMS);
void tdc_conv2d_grad_weight_direct_f32(const float *x, const float *gy, float *dwt, TDC_CONV_DIMS);
void tdc_conv2d_winograd_f2_f32(const float *x, const float *w, const float *b, int64_t has_bias, float *out, TDC_CONV_DIMS);
void tdc_conv2d_grad_input_winograd_f2_f32(const float *gy, const float *w, float *dx, TDC_CONV_DIMS);
void tdc_conv2d_grad_weight_winograd_f2_f32(const float *x, const float *gy, float *dwt, TDC_CONV_DIMS);
void tdc_conv2d_winograd_f4_f32(const float *x, const float *w, const float *b, int64_t has_bias, float *out, TDC_CONV_DIMS);
void tdc_conv2d_grad_input_winograd_f4_f32(const float *gy, const float *w, float *dx, TDC_CONV_DIMS);
void tdc_conv2d_grad_weight_winograd_f4_f32(const float *x, const float *gy, float *dwt, TDC_CONV_DIMS);
void tdc_conv2d_fft_f32(const float *x, const float *w, const float *b, int64_t has_bias, float *out, TDC_CONV_DIMS);
void tdc_conv2d_grad_input_fft_f32(const float *gy, const float *w, float *dx, TDC_CONV_DIMS);
void tdc_conv2d_grad_weight_fft_f32(const float *x, const float *gy, float *dwt, TDC_CONV_DIMS);
/* out[N,C,OH,OW] = max over each window (NaN wins; padding never counts). */
void tdc_maxpool2d_f32(const float *x, float *out, int64_t N, int64_t C, int64_t H, int64_t W,
                       int64_t OH, int64_t OW, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                       int64_t pt, int64_t pl, int64_t dh, int64_t dw);
/* dx[N,C,H,W] = each gy[n,c,y,x] added at its window's argmax in x (first maximum; first NaN). */
void tdc_maxpool2d_grad_f32(const float *gy, const float *x, float *dx, int64_t N, int64_t C, int64_t H,
                            int64_t W, int64_t OH, int64_t OW, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                            int64_t pt, int64_t pl, int64_t dh, int64_t dw);
/* out[N,C,OH,OW] = h[N,C,H,W] read at the argmax of each of x's windows. */
void tdc_maxpool2d_gather_f32(const float *h, const float *x, float *out, int64_t N, int64_t C, int64_t H,
                              int64_t W, int64_t OH, int64_t OW, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                              int64_t pt, int64_t pl, int64_t dh, int64_t dw);
/* out[n,c,y,x] = (sum of the window's real elements) / (cy[y] * cx[x]). */
void tdc_avgpool2d_f32(const float *x, float *out, int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH,
                       int64_t OW, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                       const double *cy, const double *cx);
/* dx[N,C,H,W] = each gy[n,c,y,x] / (cy[y] * cx[x]) spread over its window's real elements. */
void tdc_avgpool2d_grad_f32(const float *gy, float *dx, int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH,
                            int64_t OW, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                            const double *cy, const double *cx);
/* out[NC] = mean of x[NC, HW] along the last dim. */
void tdc_global_avgpool_f32(const float *x, float *out, int64_t NC, int64_t HW);
/* out = softmax (log != 0: log_softmax) of x[A,B,C] over the middle dim B. */
void tdc_softmax_f32(const float *x, float *out, int64_t A, int64_t B, int64_t C, int64_t log);
/* out[0] = mean over n of -log_softmax(logits[n,:])[labels[n]]; labels int32/int64 (label_bytes 4/8). */
int64_t tdc_softmax_cross_entropy_f32(const float *logits, const void *labels, int64_t label_bytes, float *out,
                                      int64_t N, int64_t K);
/* out[n,depth] = 1 at [i, idx[i]], 0 elsewhere; idx int8/int16/int32/int64 (idx_bytes 1/2/4/8). */
int64_t tdc_one_hot_f32(const void *idx, int64_t idx_bytes, float *out, int64_t n, int64_t depth);
int64_t tdc_gather_grad_f32(const float *g, const void *idx, int64_t idx_bytes, float *out, int64_t outer, int64_t n,
                            int64_t m, int64_t inner);
/* out[0] = mean((p - t)^2) over n elements (0 when n == 0). */
void tdc_mse_f32(const float *p, const float *t, float *out, int64_t n);
/* out[N,C,S] = (x - mean[c]) / sqrt(var[c] + eps) * gamma[c] + beta[c]. */
void tdc_batchnorm_infer_f32(const float *x, const float *gamma, const float *beta, const float *mean,
                             const float *var, double eps, float *out, int64_t N, int64_t C, int64_t S);
/* Batch statistics over N and S (biased var); new_* = momentum * running + (1 - momentum) * batch. */
void tdc_batchnorm_train_f32(const float *x, const float *gamma, const float *beta, const float *mean,
                             const float *var, double eps, double momentum, float *out, float *new_mean,
                             float *new_var, int64_t N, int64_t C, int64_t S);
/* out[i] = x[i] / (1 - rate) or 0, mask = splitmix64 hash of (seed, key, i); key int32/int64 (4/8 bytes). */
void tdc_dropout_f32(const float *x, const void *key, int64_t key_bytes, double rate, int64_t seed, float *out,
                     int64_t n);

/* ---- float64: the same functions on doubles --------------------------------------- */

void tdc_linear_f64(const double *x, const double *w, const double *b, int64_t has_bias, double *out,
                    int64_t M, int64_t K, int64_t N);
void tdc_sparse_linear_f64(const double *x, const double *values, const int32_t *cols, const int32_t *rowptr,
                           const double *b, int64_t has_bias, double *out, int64_t M, int64_t K, int64_t N);
void tdc_sparse_linear_grad_input_f64(const double *g, const double *values, const int32_t *cols,
                                      const int32_t *rowptr, double *dx, int64_t M, int64_t K, int64_t N);
void tdc_sparse_linear_grad_values_f64(const double *x, const double *g, const int32_t *cols, const int32_t *rowptr,
                                       double *dv, int64_t M, int64_t K, int64_t N);
void tdc_sparse_conv2d_f64(const double *x, const double *values, const int32_t *cols, const int32_t *rowptr,
                           const double *b, int64_t has_bias, double *out,
                           int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t KH, int64_t KW,
                           int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                           int64_t dh, int64_t dw, int64_t groups);
void tdc_matmul_f64(const double *a, const double *b, double *out, int64_t M, int64_t K, int64_t N);
void tdc_matmul_batched_f64(const double *a, const double *b, double *out, int64_t B, int64_t M, int64_t K,
                            int64_t N, const int64_t *ia, const int64_t *ib);
void tdc_conv2d_f64(const double *x, const double *w, const double *b, int64_t has_bias, double *out,
                    int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t KH, int64_t KW,
                    int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                    int64_t dh, int64_t dw, int64_t groups);
void tdc_conv2d_grad_input_f64(const double *gy, const double *w, double *dx,
                               int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t KH, int64_t KW,
                               int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                               int64_t dh, int64_t dw, int64_t groups);
void tdc_conv2d_grad_weight_f64(const double *x, const double *gy, double *dwt,
                                int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t KH, int64_t KW,
                                int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                                int64_t dh, int64_t dw, int64_t groups);
void tdc_conv2d_im2col_f64(const double *x, const double *w, const double *b, int64_t has_bias, double *out, TDC_CONV_DIMS);
void tdc_conv2d_grad_input_im2col_f64(const double *gy, const double *w, double *dx, TDC_CONV_DIMS);
void tdc_conv2d_grad_weight_im2col_f64(const double *x, const double *gy, double *dwt, TDC_CONV_DIMS);
void tdc_conv2d_direct_f64(const double *x, const double *w, const double *b, int64_t has_bias, double *out, TDC_CONV_DIMS);
void tdc_conv2d_grad_input_direct_f64(const double *gy, const double *w, double *dx, TDC_CONV_DIMS);
void tdc_conv2d_grad_weight_direct_f64(const double *x, const double *gy, double *dwt, TDC_CONV_DIMS);
void tdc_conv2d_winograd_f2_f64(const double *x, const double *w, const double *b, int64_t has_bias, double *out, TDC_CONV_DIMS);
void tdc_conv2d_grad_input_winograd_f2_f64(const double *gy, const double *w, double *dx, TDC_CONV_DIMS);
void tdc_conv2d_grad_weight_winograd_f2_f64(const double *x, const double *gy, double *dwt, TDC_CONV_DIMS);
void tdc_conv2d_winograd_f4_f64(const double *x, const double *w, const double *b, int64_t has_bias, double *out, TDC_CONV_DIMS);
void tdc_conv2d_grad_input_winograd_f4_f64(const double *gy, const double *w, double *dx, TDC_CONV_DIMS);
void tdc_conv2d_grad_weight_winograd_f4_f64(const double *x, const double *gy, double *dwt, TDC_CONV_DIMS);
void tdc_conv2d_fft_f64(const double *x, const double *w, const double *b, int64_t has_bias, double *out, TDC_CONV_DIMS);
void tdc_conv2d_grad_input_fft_f64(const double *gy, const double *w, double *dx, TDC_CONV_DIMS);
void tdc_conv2d_grad_weight_fft_f64(const double *x, const double *gy, double *dwt, TDC_CONV_DIMS);
void tdc_maxpool2d_f64(const double *x, double *out, int64_t N, int64_t C, int64_t H, int64_t W,
                       int64_t OH, int64_t OW, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                       int64_t pt, int64_t pl, int64_t dh, int64_t dw);
void tdc_maxpool2d_grad_f64(const double *gy, const double *x, double *dx, int64_t N, int64_t C, int64_t H,
                            int64_t W, int64_t OH, int64_t OW, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                            int64_t pt, int64_t pl, int64_t dh, int64_t dw);
void tdc_maxpool2d_gather_f64(const double *h, const double *x, double *out, int64_t N, int64_t C, int64_t H,
                              int64_t W, int64_t OH, int64_t OW, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                              int64_t pt, int64_t pl, int64_t dh, int64_t dw);
void tdc_avgpool2d_f64(const double *x, double *out, int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH,
                       int64_t OW, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                       const double *cy, const double *cx);
void tdc_avgpool2d_grad_f64(const double *gy, double *dx, int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH,
                            int64_t OW, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                            const double *cy, const double *cx);
void tdc_global_avgpool_f64(const double *x, double *out, int64_t NC, int64_t HW);
void tdc_softmax_f64(const double *x, double *out, int64_t A, int64_t B, int64_t C, int64_t log);
int64_t tdc_softmax_cross_entropy_f64(const double *logits, const void *labels, int64_t label_bytes, double *out,
                                      int64_t N, int64_t K);
int64_t tdc_one_hot_f64(const void *idx, int64_t idx_bytes, double *out, int64_t n, int64_t depth);
int64_t tdc_gather_grad_f64(const double *g, const void *idx, int64_t idx_bytes, double *out, int64_t outer, int64_t n,
                            int64_t m, int64_t inner);
void tdc_mse_f64(const double *p, const double *t, double *out, int64_t n);
void tdc_batchnorm_infer_f64(const double *x, const double *gamma, const double *beta, const double *mean,
                             const double *var, double eps, double *out, int64_t N, int64_t C, int64_t S);
void tdc_batchnorm_train_f64(const double *x, const double *gamma, const double *beta, const double *mean,
                             const double *var, double eps, double momentum, double *out, double *new_mean,
                             double *new_var, int64_t N, int64_t C, int64_t S);
void tdc_dropout_f64(const double *x, const void *key, int64_t key_bytes, double rate, int64_t seed, double *out,
                     int64_t n);

#ifdef __cplusplus
}
#endif

#endif /* TDC_RUNTIME_H */
