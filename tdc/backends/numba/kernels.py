"""Hand-written Numba kernels for the ops that are not plain loops over elements.

Each kernel writes into preallocated output arrays (the executable's planned buffers).
Generated code (codegen.py) calls these, and the scalar helpers at the top are used
inside generated elementwise loops. `cache=True` keeps compiled code on disk.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

# Work is split over the batch only when there is enough of it to pay for waking threads.
PARALLEL_MIN = 1 << 15


# ---- scalar helpers for generated elementwise code --------------------------------

@njit(cache=True, inline="always")
def fmax(a, b):
    # numpy semantics: NaN wins
    if a != a:
        return a
    if b != b:
        return b
    return a if a >= b else b


@njit(cache=True, inline="always")
def fmin(a, b):
    if a != a:
        return a
    if b != b:
        return b
    return a if a <= b else b


@njit(cache=True, inline="always")
def relu(a):
    return a if a > 0 or a != a else a * 0


# bf16 is stored as its uint16 bits (Numba has no bfloat16); an f32's bits are reinterpreted by an
# LLVM bitcast, since Numba has no scalar view between float32 and uint32.
@intrinsic
def _f32_bits(typingctx, x):
    return types.uint32(types.float32), lambda ctx, b, sig, args: b.bitcast(args[0], ir.IntType(32))


@intrinsic
def _bits_f32(typingctx, u):
    return types.float32(types.uint32), lambda ctx, b, sig, args: b.bitcast(args[0], ir.FloatType())


@njit(cache=True, inline="always")
def bf16_to_f32(h):
    return _bits_f32(np.uint32(h) << np.uint32(16))


@njit(cache=True, inline="always")
def f32_to_bf16(x):
    # nearest even: 0x7FFF plus the kept half's lowest bit carries into it past one half, and at
    # one half when it is odd; a NaN keeps its top bits with the quiet bit set (never inf)
    bits = _f32_bits(x)
    if x != x:
        return np.uint16((bits >> np.uint32(16)) | np.uint32(0x40))
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    return np.uint16((bits + np.uint32(0x7FFF) + lsb) >> np.uint32(16))


@njit(cache=True, inline="always")
def sigmoid(x):
    e = np.exp(-abs(x))
    return 1 / (1 + e) if x >= 0 else e / (1 + e)


@njit(cache=True, inline="always")
def idiv(a, b):
    # C semantics: truncate toward zero (numpy's reference does the same for tdc); x / 0 is 0 and
    # MIN / -1 wraps to MIN, as in the reference, where Numba would raise or the CPU trap
    if b == 0:
        return a - a
    if b == -1:
        return -a
    q = a // b
    if q < 0 and q * b != a:
        q += 1
    return q


@njit(cache=True, inline="always")
def udiv(a, b):
    # its own kernel: idiv's `q += 1` would type q as float64 for uint64 (Numba's int64 + uint64),
    # rounding quotients above 2**53; floor and truncation agree on unsigned values
    if b == 0:
        return a - a    # not the literal 0: int64 and uint64 unify to float64
    return a // b


# ---- matrix products ----------------------------------------------------------------
# BLAS runs single-threaded under this backend (see NumbaExecutable). Splitting a GEMM's rows
# over Numba's threads measured slower than one single-threaded call (0.53 vs 0.43 ms for
# 128x784x300): each part repacks b, and OpenBLAS serialises concurrent calls on a buffer lock.

@njit(cache=True)
def linear(x2, w, b, has_bias, out2):
    """out2 = x2 @ w.T (+ b); x2 [M, K], w [N, K]."""
    np.dot(x2, w.T, out2)
    if has_bias:
        M, N = out2.shape
        for i in range(M):
            for j in range(N):
                out2[i, j] += b[j]


@njit(cache=True)
def matmul2d(a, b, out):
    np.dot(a, b, out)


@njit(cache=True)
def matmul_batched(a3, b3, out3, ia, ib):
    """out3[i] = a3[ia[i]] @ b3[ib[i]]: batch dims flattened, broadcasting via index maps."""
    for i in range(out3.shape[0]):
        np.dot(a3[ia[i]], b3[ib[i]], out3[i])


@njit(cache=True)
def int_matmul2d(a, b, out):
    """matmul on integers (Numba's np.dot takes floats only): sums wrap in the output dtype, as
    numpy's integer matmul does."""
    out[...] = 0
    for i in range(a.shape[0]):
        for p in range(a.shape[1]):
            x = a[i, p]
            for j in range(b.shape[1]):
                out[i, j] += x * b[p, j]


@njit(cache=True)
def int_matmul_batched(a3, b3, out3, ia, ib):
    for i in range(out3.shape[0]):
        int_matmul2d(a3[ia[i]], b3[ib[i]], out3[i])


# ---- sparse products (pruned layers) ----------------------------------------------------
# Without fastmath LLVM keeps every floating sum in order, so the kernels spell out independent
# lanes, as the C runtime's sparse.c does: SPARSE_LANES partial sums per output of a single row
# (vectorised with gathers), and for a batch, blocks of SPARSE_MB rows of x transposed into
# xt [K, SPARSE_MB] so each nonzero adds v * xt[k, :] to SPARSE_MB accumulators.
SPARSE_LANES = 16
SPARSE_MB = 32


@njit(cache=True)
def _csr_rows(x, values, cols, rowptr, b, has_bias, out):
    part = np.zeros(SPARSE_LANES, x.dtype)
    zero = np.zeros(1, x.dtype)[0]
    for n in range(out.shape[0]):
        lo, hi = rowptr[n], rowptr[n + 1]
        part[:] = 0
        j = lo
        while j + SPARSE_LANES <= hi:
            for i in range(SPARSE_LANES):
                part[i] += values[j + i] * x[cols[j + i]]
            j += SPARSE_LANES
        acc = zero
        for jj in range(j, hi):
            acc += values[jj] * x[cols[jj]]
        for i in range(SPARSE_LANES):
            acc += part[i]
        out[n] = acc + b[n] if has_bias else acc


@njit(cache=True)
def sparse_linear(x2, values, cols, rowptr, b, has_bias, out2):
    """out2 = x2 @ W.T (+ b), W [N, K] in CSR; x2 [M, K], out2 [M, N]."""
    M, K = x2.shape
    N = out2.shape[1]
    if M < 4:
        for m in range(M):
            _csr_rows(x2[m], values, cols, rowptr, b, has_bias, out2[m])
        return
    xt = np.zeros((max(K, 1), SPARSE_MB), x2.dtype)
    acc = np.zeros(SPARSE_MB, x2.dtype)
    for m0 in range(0, M, SPARSE_MB):
        rows = min(SPARSE_MB, M - m0)
        for k in range(K):
            for i in range(rows):
                xt[k, i] = x2[m0 + i, k]
            for i in range(rows, SPARSE_MB):
                xt[k, i] = 0
        for n in range(N):
            acc[:] = 0
            for j in range(rowptr[n], rowptr[n + 1]):
                v, c = values[j], cols[j]     # indexed, not sliced: a view per nonzero costs more than its work
                for i in range(SPARSE_MB):
                    acc[i] += v * xt[c, i]
            bn = b[n] if has_bias else b[0] * 0   # without bias b is a placeholder of zeros
            for i in range(rows):
                out2[m0 + i, n] = acc[i] + bn


@njit(cache=True)
def csr_transpose(values, cols, rowptr, k):
    """(values, cols, rowptr) of W's transpose [K, N], for W [N, K] in CSR (a counting sort)."""
    n = len(rowptr) - 1
    tr = np.zeros(k + 1, np.int32)
    for j in range(len(cols)):
        tr[cols[j] + 1] += 1
    for c in range(k):
        tr[c + 1] += tr[c]
    fill = tr[:-1].copy()
    tv = np.empty_like(values)
    tc = np.empty(len(cols), np.int32)
    for r in range(n):
        for j in range(rowptr[r], rowptr[r + 1]):
            q = fill[cols[j]]
            tv[q] = values[j]
            tc[q] = r
            fill[cols[j]] += 1
    return tv, tc, tr


@njit(cache=True)
def sparse_linear_grad_input(g2, values, cols, rowptr, dx2):
    """dx2 = g2 @ W for W [N, K] in CSR: the forward kernel on W's transpose."""
    tv, tc, tr = csr_transpose(values, cols, rowptr, dx2.shape[1])
    sparse_linear(g2, tv, tc, tr, np.zeros(1, g2.dtype), False, dx2)


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
def sparse_linear_grad_values(x2, g2, cols, rowptr, dv):
    """dv[j] = sum_m g2[m, row(j)] * x2[m, cols[j]]: one dot product over the batch per nonzero, on
    transposed copies so that both operands are contiguous. The sum may be reordered (vectorised):
    in order it is one chain of dependent adds per nonzero, 5x slower; the error stays within a few
    ulps of the sum of |terms| (tests/test_sparse.py)."""
    xt = np.ascontiguousarray(x2.T)
    gt = np.ascontiguousarray(g2.T)
    M = x2.shape[0]
    for r in prange(len(rowptr) - 1):
        for j in range(rowptr[r], rowptr[r + 1]):
            c = cols[j]
            acc = gt[r, 0] * 0
            for m in range(M):
                acc += gt[r, m] * xt[c, m]
            dv[j] = acc


# ---- convolution ----------------------------------------------------------------------

@njit(cache=True)
def _im2col(x, n, c0, cg, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, cols):
    """cols[(c*kh + i)*kw + j, y*ow + x] = padded x[n, c0 + c, y*sh + i*dh, x*sw + j*dw]."""
    H, W = x.shape[2], x.shape[3]
    for c in range(cg):
        for i in range(kh):
            for j in range(kw):
                row = (c * kh + i) * kw + j
                for y in range(oh):
                    iy = y * sh - pt + i * dh
                    base = y * ow
                    if iy < 0 or iy >= H:
                        for xx in range(ow):
                            cols[row, base + xx] = 0
                        continue
                    for xx in range(ow):
                        ix = xx * sw - pl + j * dw
                        cols[row, base + xx] = x[n, c0 + c, iy, ix] if 0 <= ix < W else 0


@njit(cache=True, parallel=True)
def sparse_conv2d(x, values, cols, rowptr, b, has_bias, out, kh, kw, sh, sw, pt, pl, dh, dw, groups):
    """out = conv2d(x, W) (+ b) with W [CO, C/groups*kh*kw] in CSR: each image's im2col columns, then
    every output channel's nonzeros times their column rows (contiguous over the pixels)."""
    N, C = x.shape[0], x.shape[1]
    CO, oh, ow = out.shape[1], out.shape[2], out.shape[3]
    P, cg, cog = oh * ow, C // groups, CO // groups
    chunks = min(CHUNKS, N)
    for t in prange(chunks):
        n0, n1 = _chunk_span(t, chunks, N)
        if n0 >= n1:
            continue
        xm = np.empty((max(cg * kh * kw, 1), P), x.dtype)
        for n in range(n0, n1):
            for g in range(groups):
                _im2col(x, n, g * cg, cg, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, xm)
                for o in range(g * cog, (g + 1) * cog):
                    dst = out[n, o].reshape(P)
                    bias = b[o] if has_bias else b[0] * 0   # without bias b is a placeholder of zeros
                    for p in range(P):
                        dst[p] = bias
                    for j in range(rowptr[o], rowptr[o + 1]):
                        v, c = values[j], cols[j]
                        for p in range(P):
                            dst[p] += v * xm[c, p]


@njit(cache=True)
def _col2im_add(cols, dx, n, c0, cg, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow):
    """The adjoint of _im2col: dx[n, c0 + c, ...] += cols scattered back."""
    H, W = dx.shape[2], dx.shape[3]
    for c in range(cg):
        for i in range(kh):
            for j in range(kw):
                row = (c * kh + i) * kw + j
                for y in range(oh):
                    iy = y * sh - pt + i * dh
                    if iy < 0 or iy >= H:
                        continue
                    for xx in range(ow):
                        ix = xx * sw - pl + j * dw
                        if 0 <= ix < W:
                            dx[n, c0 + c, iy, ix] += cols[row, y * ow + xx]


# The batch is cut into a few chunks of images (in parallel); within a chunk, the im2col
# matrices of its images sit side by side so each group needs one larger GEMM, which BLAS
# runs far better than one tiny GEMM per image (LeNet's conv1 is [6,25] x [25,784]).
CHUNKS = 4


@njit(cache=True, inline="always")
def _chunk_span(t, chunks, N):
    """Images [n0, n1) of chunk t when N images are cut into `chunks` near-equal chunks."""
    size = (N + chunks - 1) // chunks
    return t * size, min(N, (t + 1) * size)


@njit(cache=True)
def _chunk_cols(x, n0, n1, c0, cg, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, cols):
    P = oh * ow
    part = np.empty((cg * kh * kw, P), x.dtype)
    for n in range(n0, n1):
        _im2col(x, n, c0, cg, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, part)
        cols[:, (n - n0) * P:(n - n0 + 1) * P] = part


@njit(cache=True)
def _chunk_rows(gy, n0, n1, c0, cog, gm):
    """gm [cog, (n1-n0)*P]: channels c0.. of images n0..n1 side by side (the layout of _chunk_cols)."""
    P = gy.shape[2] * gy.shape[3]
    for n in range(n0, n1):
        for o in range(cog):
            gm[o, (n - n0) * P:(n - n0 + 1) * P] = gy[n, c0 + o].reshape(P)


@njit(cache=True, parallel=True)
def conv2d(x, w, b, has_bias, out, sh, sw, pt, pl, dh, dw, groups):
    N = x.shape[0]
    co, cg, kh, kw = w.shape
    oh, ow = out.shape[2], out.shape[3]
    P = oh * ow
    cog = co // groups
    K = cg * kh * kw
    wm = w.reshape(co, K)
    chunks = min(CHUNKS, N)
    for t in prange(chunks):
        n0, n1 = _chunk_span(t, chunks, N)
        if n0 >= n1:
            continue
        cols = np.empty((K, (n1 - n0) * P), x.dtype)
        res = np.empty((cog, (n1 - n0) * P), x.dtype)
        for g in range(groups):
            _chunk_cols(x, n0, n1, g * cg, cg, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, cols)
            np.dot(np.ascontiguousarray(wm[g * cog:(g + 1) * cog]), cols, res)
            for n in range(n0, n1):
                for o in range(cog):
                    bias = b[g * cog + o] if has_bias else 0
                    dst = out[n, g * cog + o].reshape(P)
                    src = res[o, (n - n0) * P:(n - n0 + 1) * P]
                    for p in range(P):
                        dst[p] = src[p] + bias


@njit(cache=True, parallel=True)
def conv2d_grad_input(gy, w, dx, sh, sw, pt, pl, dh, dw, groups):
    N = gy.shape[0]
    co, cg, kh, kw = w.shape
    oh, ow = gy.shape[2], gy.shape[3]
    P = oh * ow
    cog = co // groups
    K = cg * kh * kw
    wm = w.reshape(co, K)
    chunks = min(CHUNKS, N)
    for t in prange(chunks):
        n0, n1 = _chunk_span(t, chunks, N)
        if n0 >= n1:
            continue
        for n in range(n0, n1):
            dx[n] = 0
        gm = np.empty((cog, (n1 - n0) * P), gy.dtype)
        cols = np.empty((K, (n1 - n0) * P), gy.dtype)
        for g in range(groups):
            _chunk_rows(gy, n0, n1, g * cog, cog, gm)
            np.dot(np.ascontiguousarray(wm[g * cog:(g + 1) * cog].T), gm, cols)
            for n in range(n0, n1):
                _col2im_add(cols[:, (n - n0) * P:(n - n0 + 1) * P], dx, n, g * cg, cg, kh, kw,
                            sh, sw, pt, pl, dh, dw, oh, ow)


@njit(cache=True, parallel=True)
def conv2d_grad_weight(x, gy, dw_out, sh, sw, pt, pl, dh, dw, groups):
    """dw = sum over chunks of gy_chunk @ cols_chunk.T; chunks run in parallel, then add up."""
    co, cg, kh, kw = dw_out.shape
    N = x.shape[0]
    oh, ow = gy.shape[2], gy.shape[3]
    P = oh * ow
    cog = co // groups
    K = cg * kh * kw
    chunks = min(CHUNKS, N)
    partial = np.zeros((chunks, co, K), x.dtype)
    for t in prange(chunks):
        n0, n1 = _chunk_span(t, chunks, N)
        if n0 >= n1:
            continue
        cols = np.empty((K, (n1 - n0) * P), x.dtype)
        gm = np.empty((cog, (n1 - n0) * P), x.dtype)
        res = np.empty((cog, K), x.dtype)
        for g in range(groups):
            _chunk_cols(x, n0, n1, g * cg, cg, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, cols)
            _chunk_rows(gy, n0, n1, g * cog, cog, gm)
            np.dot(gm, cols.T, res)
            partial[t, g * cog:(g + 1) * cog] = res
    dwm = dw_out.reshape(co, K)
    dwm[:] = 0
    for t in range(chunks):
        dwm += partial[t]


# ---- pooling -----------------------------------------------------------------------

@njit(cache=True, inline="always")
def _argmax_window(x, n, c, y, xx, kh, kw, sh, sw, pt, pl, dh, dw):
    """Flat index (iy*W + ix) of the first maximum of a window, -1 if it covers no input."""
    H, W = x.shape[2], x.shape[3]
    best = -np.inf
    arg = -1
    for i in range(kh):
        iy = y * sh - pt + i * dh
        if iy < 0 or iy >= H:
            continue
        for j in range(kw):
            ix = xx * sw - pl + j * dw
            if ix < 0 or ix >= W:
                continue
            v = x[n, c, iy, ix]
            # the first maximum wins; a NaN, once found, stays (numpy's argmax does the same)
            if arg < 0 or v > best or (v != v and best == best):
                best = v
                arg = iy * W + ix
    return arg


@njit(cache=True, inline="always")
def _tiled(kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, H, W):
    """Windows that tile the input exactly (LeNet's and VGG's 2x2 stride 2): a fast path. With
    ceil_mode a last, partial window would read past the image: those take the general path."""
    return kh == sh and kw == sw and pt == 0 and pl == 0 and dh == 1 and dw == 1 and oh * kh <= H and ow * kw <= W


@njit(cache=True, parallel=True)
def maxpool2d(x, out, kh, kw, sh, sw, pt, pl, dh, dw):
    N, C = x.shape[0], x.shape[1]
    W = x.shape[3]
    oh, ow = out.shape[2], out.shape[3]
    tiled = _tiled(kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, x.shape[2], W)
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        src = x[n, c]
        dst = out[n, c]
        if tiled:
            for y in range(oh):
                for xx in range(ow):
                    m = src[y * kh, xx * kw]
                    for i in range(kh):
                        for j in range(kw):
                            v = src[y * kh + i, xx * kw + j]
                            if v > m or v != v:
                                m = v
                    dst[y, xx] = m
            continue
        for y in range(oh):
            for xx in range(ow):
                a = _argmax_window(x, n, c, y, xx, kh, kw, sh, sw, pt, pl, dh, dw)
                dst[y, xx] = src[a // W, a % W]


@njit(cache=True, parallel=True)
def maxpool2d_grad(gy, x, dx, kh, kw, sh, sw, pt, pl, dh, dw):
    N, C = x.shape[0], x.shape[1]
    W = x.shape[3]
    oh, ow = gy.shape[2], gy.shape[3]
    tiled = _tiled(kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, x.shape[2], W)
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        d = dx[n, c]
        d[:, :] = 0
        src = x[n, c]
        g = gy[n, c]
        if tiled:
            for y in range(oh):
                for xx in range(ow):
                    bi = y * kh
                    bj = xx * kw
                    m = src[bi, bj]
                    for i in range(kh):
                        for j in range(kw):
                            v = src[y * kh + i, xx * kw + j]
                            if v > m or (v != v and m == m):
                                m = v
                                bi = y * kh + i
                                bj = xx * kw + j
                    d[bi, bj] += g[y, xx]
            continue
        for y in range(oh):
            for xx in range(ow):
                a = _argmax_window(x, n, c, y, xx, kh, kw, sh, sw, pt, pl, dh, dw)
                d[a // W, a % W] += g[y, xx]


@njit(cache=True, parallel=True)
def maxpool2d_gather(h, x, out, kh, kw, sh, sw, pt, pl, dh, dw):
    N, C = x.shape[0], x.shape[1]
    W = x.shape[3]
    oh, ow = out.shape[2], out.shape[3]
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        for y in range(oh):
            for xx in range(ow):
                a = _argmax_window(x, n, c, y, xx, kh, kw, sh, sw, pt, pl, dh, dw)
                out[n, c, y, xx] = h[n, c, a // W, a % W]


@njit(cache=True, parallel=True)
def avgpool2d(x, out, kh, kw, sh, sw, pt, pl, cy, cx):
    N, C, H, W = x.shape
    oh, ow = out.shape[2], out.shape[3]
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        for y in range(oh):
            for xx in range(ow):
                s = 0.0
                for i in range(kh):
                    iy = y * sh - pt + i
                    if iy < 0 or iy >= H:
                        continue
                    for j in range(kw):
                        ix = xx * sw - pl + j
                        if 0 <= ix < W:
                            s += x[n, c, iy, ix]
                out[n, c, y, xx] = s / (cy[y] * cx[xx])


@njit(cache=True, parallel=True)
def avgpool2d_grad(gy, dx, kh, kw, sh, sw, pt, pl, cy, cx):
    N, C, H, W = dx.shape
    oh, ow = gy.shape[2], gy.shape[3]
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        dx[n, c] = 0
        for y in range(oh):
            for xx in range(ow):
                v = gy[n, c, y, xx] / (cy[y] * cx[xx])
                for i in range(kh):
                    iy = y * sh - pt + i
                    if iy < 0 or iy >= H:
                        continue
                    for j in range(kw):
                        ix = xx * sw - pl + j
                        if 0 <= ix < W:
                            dx[n, c, iy, ix] += v


@njit(cache=True, parallel=True)
def global_avgpool(x, out):
    N, C, H, W = x.shape
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        s = 0.0
        for i in range(H):
            for j in range(W):
                s += x[n, c, i, j]
        out[n, c, 0, 0] = s / (H * W)


# ---- softmax and losses ----------------------------------------------------------------

@njit(cache=True, parallel=True)
def softmax(x3, out3, log):
    """Softmax over the middle dim of [outer, n, inner] views."""
    A, M, B = x3.shape
    for a in prange(A):
        for b in range(B):
            m = -np.inf
            for i in range(M):
                m = max(m, x3[a, i, b])
            s = 0.0
            for i in range(M):
                s += np.exp(x3[a, i, b] - m)
            if log:
                ls = np.log(s)
                for i in range(M):
                    out3[a, i, b] = x3[a, i, b] - m - ls
            else:
                for i in range(M):
                    out3[a, i, b] = np.exp(x3[a, i, b] - m) / s


@njit(cache=True)
def softmax_cross_entropy(logits, labels, out):
    N, C = logits.shape
    total = 0.0
    for n in range(N):
        lab = labels[n]
        if lab < 0 or lab >= C:
            raise ValueError("label out of range: labels must be in [0, number of classes)")
        m = -np.inf
        for c in range(C):
            m = max(m, np.float64(logits[n, c]))
        s = 0.0
        for c in range(C):
            s += np.exp(np.float64(logits[n, c]) - m)
        total += np.log(s) + m - logits[n, lab]
    out[0] = total / N


@njit(cache=True)
def one_hot(idx, out2, depth):
    M = idx.shape[0]
    for i in range(M):
        k = idx[i]
        if k < 0 or k >= depth:
            raise ValueError("label out of range: labels must be in [0, number of classes)")
        for j in range(depth):
            out2[i, j] = 1 if j == k else 0


@njit(cache=True)
def gather(data3, idx, out3):
    """out3[o, j, i] = data3[o, idx[j], i]; data3 is [outer, n, inner]."""
    n = data3.shape[1]
    for j in range(idx.shape[0]):
        k = idx[j] + n if idx[j] < 0 else idx[j]
        if k < 0 or k >= n:
            raise ValueError("gather index out of range: indices must be in [-n, n) for a dim of n")
        for o in range(data3.shape[0]):
            out3[o, j, :] = data3[o, k, :]


@njit(cache=True)
def gather_grad(g3, idx, out3):
    """The adjoint of gather: out3 [outer, n, inner] = 0, then out3[o, idx[j], i] += g3[o, j, i]."""
    n = out3.shape[1]
    out3[...] = 0
    for j in range(idx.shape[0]):
        k = idx[j] + n if idx[j] < 0 else idx[j]
        if k < 0 or k >= n:
            raise ValueError("gather index out of range: indices must be in [-n, n) for a dim of n")
        for o in range(g3.shape[0]):
            out3[o, k, :] += g3[o, j, :]


@njit(cache=True)
def mse(p, t, out):
    s = 0.0
    for i in range(p.shape[0]):
        d = np.float64(p[i]) - np.float64(t[i])
        s += d * d
    out[0] = s / max(p.shape[0], 1)


# ---- batchnorm and dropout ------------------------------------------------------------

@njit(cache=True, parallel=True)
def batchnorm_infer(x3, gamma, beta, mean, var, eps, out3):
    """x3 is [N, C, inner]."""
    N, C, I = x3.shape
    for c in prange(C):
        scale = gamma[c] / np.sqrt(var[c] + eps)
        shift = beta[c] - mean[c] * scale
        for n in range(N):
            for i in range(I):
                out3[n, c, i] = x3[n, c, i] * scale + shift


@njit(cache=True, parallel=True)
def batchnorm_train(x3, gamma, beta, mean, var, eps, momentum, out3, new_mean, new_var):
    N, C, I = x3.shape
    m = N * I
    for c in prange(C):
        s = 0.0
        for n in range(N):
            for i in range(I):
                s += x3[n, c, i]
        mu = s / m
        s2 = 0.0
        for n in range(N):
            for i in range(I):
                d = x3[n, c, i] - mu
                s2 += d * d
        v = s2 / m
        scale = gamma[c] / np.sqrt(v + eps)
        for n in range(N):
            for i in range(I):
                out3[n, c, i] = (x3[n, c, i] - mu) * scale + beta[c]
        new_mean[c] = momentum * mean[c] + (1 - momentum) * mu
        new_var[c] = momentum * var[c] + (1 - momentum) * v


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(cache=True, inline="always")
def _splitmix64(z):
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@njit(cache=True, parallel=True)
def dropout(x, key, rate, seed, out):
    """The same counter-based hash as the reference (tdc/ops/norm.py)."""
    base = _splitmix64(np.uint64(seed) * _GOLDEN + np.uint64(key[0]))
    scale = 1.0 / (1.0 - rate)
    n = x.shape[0]
    for i in prange(n):
        h = _splitmix64(np.uint64(i) + base)
        u = np.float64(h >> np.uint64(40)) * (1.0 / 16777216.0)
        out[i] = x[i] * scale if u >= rate else 0
