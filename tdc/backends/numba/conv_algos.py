"""Convolution algorithms for the numba backend, beside im2col + GEMM (kernels.py):

  * direct: a loop nest over (image, block of 4 output channels) in parallel; the innermost loop
    is an axpy along an output row, which LLVM vectorises (no float reassociation needed);
  * Winograd F(m x m, 3 x 3), m = 2 or 4 (Lavin and Gray): filter, input-tile and output-tile
    transforms as Numba loops vectorised over a row of tiles or over channels, and one GEMM per
    point of the alpha x alpha transform grid (alpha = m + 2) done by BLAS. The backward-input
    pass is the same algorithm on the flipped, transposed filter (a 3x3 stride-1 convolution);
    the backward-weight pass is the transposed algorithm, dW = G^T [sum_tiles (B^T X B) . (A dY A^T)] G;
  * FFT: numpy.fft at Python level (Numba compiles no FFT), batched over images and channels with
    one complex matrix product per frequency; sizes cover the padded input, so circular
    correlation never wraps. Stride is a subsample of the stride-1 result, dilation a dilated kernel.

Every kernel writes into preallocated outputs; Winograd's scratch buffers (transformed filters,
tiles, products) come from the executable too (see `winograd_scratch`).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

# ---- Winograd transform matrices ---------------------------------------------------------------
# F(2,3) interpolates at 0, 1, -1, inf; F(4,3) at 0, 1, -1, 2, -2, inf. 1-D: y = A^T[(G g) . (B^T d)].


def winograd_matrices(m: int):
    """(A^T [m, alpha], G [alpha, 3], B^T [alpha, alpha]) in float64 for F(m, 3)."""
    if m == 2:
        AT = [[1, 1, 1, 0], [0, 1, -1, -1]]
        G = [[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]]
        BT = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    elif m == 4:
        AT = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
        G = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
             [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
        BT = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
              [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
    else:
        raise ValueError(f"Winograd F({m}x{m},3x3) is not implemented; m is 2 or 4")
    return np.array(AT, np.float64), np.array(G, np.float64), np.array(BT, np.float64)


WINOGRAD_M = {"winograd_f2": 2, "winograd_f4": 4}


def winograd_scratch(op: str, algo: str, x_shape, w_shape, out_shape, groups: int, dtype) -> tuple:
    """(m, AT, G, BT, AM, U, V, M, ustate): the matrices in `dtype` and the scratch buffers one
    Winograd call of `op` needs. ustate[0] says whether U holds the current filter transform."""
    m = WINOGRAD_M[algo]
    a = m + 2
    AT, G, BT = (np.ascontiguousarray(t, dtype) for t in winograd_matrices(m))
    AM = np.ascontiguousarray(AT.T)
    co, cg = w_shape[0], w_shape[1]
    cog = co // groups
    if op == "conv2d":            # tiles over the output; x -> V, U = filter, M -> output
        n, oh, ow = out_shape[0], out_shape[2], out_shape[3]
        t = n * (-(-oh // m)) * (-(-ow // m))
        U, V, M = (a * a, groups, cog, cg), (a * a, groups, cg, t), (a * a, groups, cog, t)
    elif op == "conv2d_grad_input":   # x_shape is gy, out_shape is dx
        n, h, w = out_shape[0], out_shape[2], out_shape[3]
        t = n * (-(-h // m)) * (-(-w // m))
        U, V, M = (a * a, groups, cg, cog), (a * a, groups, cog, t), (a * a, groups, cg, t)
    else:                         # grad_weight: x_shape is x, out_shape is gy; U holds gy's tiles
        n, oh, ow = out_shape[0], out_shape[2], out_shape[3]
        t = n * (-(-oh // m)) * (-(-ow // m))
        U, V, M = (a * a, groups, cog, t), (a * a, groups, cg, t), (a * a, groups, cog, cg)
    return (m, AT, G, BT, AM, np.empty(U, dtype), np.empty(V, dtype), np.empty(M, dtype), np.zeros(1, np.int64))


@njit(cache=True, parallel=True)
def wino_filter(w, Gm, flip, U):
    """U[a*A+b, g, p, q] = (Gm f Gm^T)[a, b] for the 3x3 filter f of (p, q) in group g:
    f = w[g*P + p, q] (flip False: P out, Q in channels), or, for the backward-input pass,
    f = w[g*Q + q, p] rotated by 180 degrees (P in, Q out channels)."""
    A = Gm.shape[0]
    AA, NG, P, Q = U.shape
    for t in prange(NG * P):
        g = t // P
        p = t % P
        wt = np.empty((9, Q), U.dtype)
        for q in range(Q):
            for k in range(9):
                if flip:
                    wt[k, q] = w[g * Q + q, p, 2 - k // 3, 2 - k % 3]
                else:
                    wt[k, q] = w[g * P + p, q, k // 3, k % 3]
        t1 = np.zeros((A, 3, Q), U.dtype)
        for a in range(A):
            for i in range(3):
                cf = Gm[a, i]
                if cf != 0:
                    for j in range(3):
                        src = wt[i * 3 + j]
                        dst = t1[a, j]
                        for q in range(Q):
                            dst[q] += cf * src[q]
        for a in range(A):
            for b in range(A):
                dst = U[a * A + b, g, p]
                dst[:] = 0
                for j in range(3):
                    cf = Gm[b, j]
                    if cf != 0:
                        src = t1[a, j]
                        for q in range(Q):
                            dst[q] += cf * src[q]


@njit(cache=True, parallel=True)
def wino_filter_inverse(Mw, Gm, dw):
    """dw[g*P + p, q, i, j] = (Gm^T Mw[:, g, p, q] Gm)[i, j] (the backward-weight pass's last step)."""
    A = Gm.shape[0]
    AA, NG, P, Q = Mw.shape
    for t in prange(NG * P):
        g = t // P
        p = t % P
        t2 = np.zeros((A, 3, Q), Mw.dtype)
        for a in range(A):
            for b in range(A):
                src = Mw[a * A + b, g, p]
                for j in range(3):
                    cf = Gm[b, j]
                    if cf != 0:
                        dst = t2[a, j]
                        for q in range(Q):
                            dst[q] += cf * src[q]
        acc = np.zeros(Q, Mw.dtype)
        for i in range(3):
            for j in range(3):
                acc[:] = 0
                for a in range(A):
                    cf = Gm[a, i]
                    if cf != 0:
                        src = t2[a, j]
                        for q in range(Q):
                            acc[q] += cf * src[q]
                for q in range(Q):
                    dw[g * P + p, q, i, j] = acc[q]


@njit(cache=True, parallel=True)
def wino_tiles(x, Bm, step, lo_y, lo_x, th, tw, V):
    """V[a*A+b, g, c, (n*th + ty)*tw + tx] = sum_ij Bm[a,i] Bm[b,j] x[n, g*C+c, ty*step-lo_y+i, tx*step-lo_x+j],
    x zero outside. Bm is [A, L]: B^T with L = alpha (input tiles, overlapping) or A with L = m
    (output-gradient tiles). One task per (image, channel): the column transform runs along whole
    padded rows, the row transform over all the image's tiles at once (deinterleaved first), so
    both inner loops are long and vectorise."""
    A, L = Bm.shape
    N, CC, H, W = x.shape
    AA, NG, C, T = V.shape
    Wt = (tw - 1) * step + L
    nt = th * tw
    u0 = max(0, lo_x)                 # columns of a padded row that hold input
    u1 = min(Wt, lo_x + W)
    for task in prange(N * CC):
        n = task // CC
        ci = task % CC
        g = ci // C
        c = ci % C
        rows = np.zeros((L, Wt), V.dtype)
        tmp = np.empty(Wt, V.dtype)
        d = np.empty((A, L, nt), V.dtype)
        for ty in range(th):
            y0 = ty * step - lo_y
            for i in range(L):
                r = rows[i]
                r[:] = 0
                iy = y0 + i
                if 0 <= iy < H and u1 > u0:
                    r[u0:u1] = x[n, ci, iy][u0 - lo_x:u1 - lo_x]
            for a in range(A):
                tmp[:] = 0
                for i in range(L):
                    cf = Bm[a, i]
                    if cf != 0:
                        ri = rows[i]
                        for u in range(Wt):
                            tmp[u] += cf * ri[u]
                for j in range(L):
                    dj = d[a, j]
                    for tx in range(tw):
                        dj[ty * tw + tx] = tmp[tx * step + j]
        base = n * nt
        for a in range(A):
            for b in range(A):
                dst = V[a * A + b, g, c][base:base + nt]   # (a 1-D slice of a row: it vectorises)
                dst[:] = 0
                for j in range(L):
                    cf = Bm[b, j]
                    if cf != 0:
                        dj = d[a, j]
                        for t in range(nt):
                            dst[t] += cf * dj[t]


@njit(cache=True, parallel=True)
def wino_output(M, AT, b, has_bias, th, tw, out):
    """out[n, g*P+p, ty*m+r, tx*m+s] = (AT M[:, g, p, tile] AT^T)[r, s] (+ b), cut to out's size.
    One task per (image, output channel), vectorised over the image's tiles."""
    m, A = AT.shape
    N, CO, OH, OW = out.shape
    AA, NG, P, T = M.shape
    nt = th * tw
    for task in prange(N * CO):
        n = task // CO
        oc = task % CO
        g = oc // P
        p = oc % P
        bias = b[oc] if has_bias else 0
        R = np.empty((A, m, nt), M.dtype)
        yv = np.empty(nt, M.dtype)
        dst = out[n, oc]
        base = n * nt
        for a in range(A):
            for s in range(m):
                rs = R[a, s]
                rs[:] = 0
                for bb in range(A):
                    cf = AT[s, bb]
                    if cf != 0:
                        src = M[a * A + bb, g, p][base:base + nt]
                        for t in range(nt):
                            rs[t] += cf * src[t]
        for r in range(m):
            for s in range(m):
                yv[:] = bias
                for a in range(A):
                    cf = AT[r, a]
                    if cf != 0:
                        ra = R[a, s]
                        for t in range(nt):
                            yv[t] += cf * ra[t]
                for ty in range(th):
                    y = ty * m + r
                    if y >= OH:
                        break
                    row = dst[y]
                    for tx in range(tw):
                        xx = tx * m + s
                        if xx >= OW:
                            break
                        row[xx] = yv[ty * tw + tx]


@njit(cache=True, parallel=True)
def wino_gemm(U, V, M, trans_v):
    """M[k, g] = U[k, g] @ V[k, g] (or @ V[k, g].T): one BLAS GEMM per transform point and group."""
    AA, NG = U.shape[0], U.shape[1]
    for t in prange(AA * NG):
        k = t // NG
        g = t % NG
        if trans_v:
            np.dot(U[k, g], V[k, g].T, M[k, g])
        else:
            np.dot(U[k, g], V[k, g], M[k, g])


@njit(cache=True)
def winograd_conv2d(x, w, b, has_bias, out, pt, pl, m, AT, G, BT, AM, U, V, M, ustate):
    """Forward conv2d, 3x3 stride 1 dilation 1. The filter transform is skipped when ustate[0] == 2
    (an inference executable whose weights have not changed since it was computed); ustate 1
    computes it and keeps it, 0 computes it every call (training)."""
    th = (out.shape[2] + m - 1) // m
    tw = (out.shape[3] + m - 1) // m
    if ustate[0] != 2:
        wino_filter(w, G, False, U)
        if ustate[0] == 1:
            ustate[0] = 2
    wino_tiles(x, BT, m, pt, pl, th, tw, V)
    wino_gemm(U, V, M, False)
    wino_output(M, AT, b, has_bias, th, tw, out)


@njit(cache=True)
def winograd_conv2d_grad_input(gy, w, dx, pt, pl, m, AT, G, BT, AM, U, V, M, ustate):
    """dx = conv2d(gy, w rotated and transposed, pad 2 - pad): Winograd again (pads may be negative)."""
    th = (dx.shape[2] + m - 1) // m
    tw = (dx.shape[3] + m - 1) // m
    if ustate[0] != 2:
        wino_filter(w, G, True, U)
        if ustate[0] == 1:
            ustate[0] = 2
    wino_tiles(gy, BT, m, 2 - pt, 2 - pl, th, tw, V)
    wino_gemm(U, V, M, False)
    wino_output(M, AT, np.zeros(1, dx.dtype), False, th, tw, dx)


@njit(cache=True)
def winograd_conv2d_grad_weight(x, gy, dw, pt, pl, m, AT, G, BT, AM, U, V, M, ustate):
    """The transposed algorithm: per transform point, M = (A dY A^T tiles) @ (B^T X B tiles)^T summed
    over tiles by the GEMM, then dw = G^T M G."""
    th = (gy.shape[2] + m - 1) // m
    tw = (gy.shape[3] + m - 1) // m
    wino_tiles(x, BT, m, pt, pl, th, tw, V)
    wino_tiles(gy, AM, m, 0, 0, th, tw, U)
    wino_gemm(U, V, M, True)
    wino_filter_inverse(M, G, dw)


# ---- direct ----------------------------------------------------------------------------------------

OB = 4   # output (or input) channels per task: each input row loaded feeds this many accumulators


@njit(cache=True, inline="always")
def _span(size_in, n_out, s, off):
    """Output positions [lo, hi) whose input index p*s + off lies in [0, size_in)."""
    lo = 0 if off >= 0 else (-off + s - 1) // s
    hi = (size_in - 1 - off) // s + 1 if size_in - 1 - off >= 0 else 0
    return lo, max(lo, min(n_out, hi))


@njit(cache=True, parallel=True)
def direct_conv2d(x, w, b, has_bias, out, sh, sw, pt, pl, dh, dw, groups):
    N, C, H, W = x.shape
    CO, cg, kh, kw = w.shape
    oh, ow = out.shape[2], out.shape[3]
    cog = CO // groups
    nb = (cog + OB - 1) // OB
    for task in prange(N * groups * nb):
        n = task // (groups * nb)
        g = task // nb % groups
        o0 = g * cog + task % nb * OB
        k1 = min(OB, (g + 1) * cog - o0)
        acc = np.zeros((OB, oh, ow), out.dtype)
        for c in range(cg):
            ci = g * cg + c
            for i in range(kh):
                for j in range(kw):
                    off = j * dw - pl
                    x0, x1 = _span(W, ow, sw, off)
                    for y in range(oh):
                        iy = y * sh - pt + i * dh
                        if iy < 0 or iy >= H:
                            continue
                        if sw == 1:     # unit-stride slices stay contiguous: the axpys vectorise
                            src = x[n, ci, iy][x0 + off:x1 + off]
                            for k in range(k1):
                                wv = w[o0 + k, c, i, j]
                                dst = acc[k, y][x0:x1]
                                for xx in range(x1 - x0):
                                    dst[xx] += wv * src[xx]
                        else:
                            srcs = x[n, ci, iy][x0 * sw + off:(x1 - 1) * sw + off + 1:sw]
                            for k in range(k1):
                                wv = w[o0 + k, c, i, j]
                                dst = acc[k, y][x0:x1]
                                for xx in range(x1 - x0):
                                    dst[xx] += wv * srcs[xx]
        for k in range(k1):
            bias = b[o0 + k] if has_bias else 0
            out[n, o0 + k] = acc[k] + bias


@njit(cache=True, parallel=True)
def direct_conv2d_grad_input(gy, w, dx, sh, sw, pt, pl, dh, dw, groups):
    N, C, H, W = dx.shape
    CO, cg, kh, kw = w.shape
    oh, ow = gy.shape[2], gy.shape[3]
    cog = CO // groups
    nb = (cg + OB - 1) // OB
    for task in prange(N * groups * nb):
        n = task // (groups * nb)
        g = task // nb % groups
        c0 = task % nb * OB            # within the group
        k1 = min(OB, cg - c0)
        acc = np.zeros((OB, H, W), dx.dtype)
        for o in range(g * cog, (g + 1) * cog):
            for i in range(kh):
                for j in range(kw):
                    off = j * dw - pl
                    x0, x1 = _span(W, ow, sw, off)
                    for y in range(oh):
                        iy = y * sh - pt + i * dh
                        if iy < 0 or iy >= H:
                            continue
                        src = gy[n, o, y][x0:x1]
                        for k in range(k1):
                            wv = w[o, c0 + k, i, j]
                            if sw == 1:
                                dst = acc[k, iy][x0 + off:x1 + off]
                                for xx in range(x1 - x0):
                                    dst[xx] += wv * src[xx]
                            else:
                                dsts = acc[k, iy][x0 * sw + off:(x1 - 1) * sw + off + 1:sw]
                                for xx in range(x1 - x0):
                                    dsts[xx] += wv * src[xx]
        for k in range(k1):
            dx[n, g * cg + c0 + k] = acc[k]


@njit(cache=True, parallel=True)
def direct_conv2d_grad_weight(x, gy, dw_out, sh, sw, pt, pl, dh, dw, groups):
    N, C, H, W = x.shape
    CO, cg, kh, kw = dw_out.shape
    oh, ow = gy.shape[2], gy.shape[3]
    cog = CO // groups
    for o in prange(CO):
        g = o // cog
        acc = np.empty(ow, dw_out.dtype)     # partial sums along a row: the loop vectorises
        for c in range(cg):
            ci = g * cg + c
            for i in range(kh):
                for j in range(kw):
                    off = j * dw - pl
                    x0, x1 = _span(W, ow, sw, off)
                    acc[:] = 0
                    for n in range(N):
                        for y in range(oh):
                            iy = y * sh - pt + i * dh
                            if iy < 0 or iy >= H:
                                continue
                            gr = gy[n, o, y][x0:x1]
                            if sw == 1:
                                src = x[n, ci, iy][x0 + off:x1 + off]
                                for xx in range(x1 - x0):
                                    acc[xx] += gr[xx] * src[xx]
                            else:
                                srcs = x[n, ci, iy][x0 * sw + off:(x1 - 1) * sw + off + 1:sw]
                                for xx in range(x1 - x0):
                                    acc[xx] += gr[xx] * srcs[xx]
                    dw_out[o, c, i, j] = acc.sum()


# ---- FFT (Python level: numpy.fft) ----------------------------------------------------------------

def fast_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c 7^d >= n (sizes pocketfft transforms fastest)."""
    best = 1 << max(0, (n - 1).bit_length())
    p7 = 1
    while p7 < best:
        p5 = p7
        while p5 < best:
            p3 = p5
            while p3 < best:
                p2 = p3
                while p2 < n:
                    p2 *= 2
                best = min(best, p2)
                p3 *= 3
            p5 *= 5
        p7 *= 7
    return best


def _dilate(w: np.ndarray, dil) -> np.ndarray:
    if dil == (1, 1):
        return w
    co, cg, kh, kw = w.shape
    wd = np.zeros((co, cg, (kh - 1) * dil[0] + 1, (kw - 1) * dil[1] + 1), w.dtype)
    wd[:, :, ::dil[0], ::dil[1]] = w
    return wd


def _pad(x, pad):
    t, l, b, r = pad
    return np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)))


def _freq_matmul(a, b):
    """a [F, G, P, K] @ b [F, G, K, Q] -> [F, G, P, Q] (complex; one product per frequency and group)."""
    return np.matmul(a, b)


def fft_conv2d(x, w, bias, stride, pad, dilation, groups, out):
    n, c = x.shape[:2]
    co, cg = w.shape[:2]
    cog = co // groups
    oh, ow = out.shape[2:]
    xp = _pad(x, pad)
    wd = _dilate(w, dilation)
    fh, fw = fast_size(xp.shape[2]), fast_size(xp.shape[3])
    X = np.fft.rfft2(xp, s=(fh, fw))                 # [N, C, fh, fw2]
    Kf = np.fft.rfft2(wd, s=(fh, fw))                # [Co, cg, fh, fw2]
    F = fh * X.shape[3]
    Xm = X.reshape(n, groups, cg, F).transpose(3, 1, 0, 2)          # [F, G, N, cg]
    Km = np.conj(Kf).reshape(groups, cog, cg, F).transpose(3, 0, 2, 1)   # [F, G, cg, cog]
    Y = _freq_matmul(Xm, Km)                                          # [F, G, N, cog]
    Y = Y.transpose(2, 1, 3, 0).reshape(n, co, fh, X.shape[3])
    y = np.fft.irfft2(Y, s=(fh, fw))
    out[...] = y[:, :, :(oh - 1) * stride[0] + 1:stride[0], :(ow - 1) * stride[1] + 1:stride[1]]
    if bias is not None:
        out += bias[:, None, None]


def fft_conv2d_grad_input(gy, w, dx, stride, pad, dilation, groups):
    n, c, h, wd_ = dx.shape
    co, cg = w.shape[:2]
    cog = co // groups
    oh, ow = gy.shape[2:]
    t, l, b, r = pad
    hp, wp = h + t + b, wd_ + l + r
    gu = np.zeros((n, co, (oh - 1) * stride[0] + 1, (ow - 1) * stride[1] + 1), gy.dtype)
    gu[:, :, ::stride[0], ::stride[1]] = gy
    wdl = _dilate(w, dilation)
    fh, fw = fast_size(hp), fast_size(wp)
    Gf = np.fft.rfft2(gu, s=(fh, fw))                # [N, Co, fh, fw2]
    Kf = np.fft.rfft2(wdl, s=(fh, fw))               # [Co, cg, fh, fw2]
    F = fh * Gf.shape[3]
    Gm = Gf.reshape(n, groups, cog, F).transpose(3, 1, 0, 2)          # [F, G, N, cog]
    Km = Kf.reshape(groups, cog, cg, F).transpose(3, 0, 1, 2)          # [F, G, cog, cg]
    D = _freq_matmul(Gm, Km).transpose(2, 1, 3, 0).reshape(n, c, fh, Gf.shape[3])
    dxp = np.fft.irfft2(D, s=(fh, fw))              # the full convolution: rows 0 .. span-1 hold dxp
    dx[...] = dxp[:, :, t:t + h, l:l + wd_]
    # rows of dxp past the last window's reach are zero by construction (they come out ~0 here)
    reach_h = (oh - 1) * stride[0] + (w.shape[2] - 1) * dilation[0] + 1
    reach_w = (ow - 1) * stride[1] + (w.shape[3] - 1) * dilation[1] + 1
    if reach_h < t + h:
        dx[:, :, max(0, reach_h - t):] = 0
    if reach_w < l + wd_:
        dx[:, :, :, max(0, reach_w - l):] = 0


def fft_conv2d_grad_weight(x, gy, dw, stride, pad, dilation, groups):
    n, c = x.shape[:2]
    co, cg, kh, kw = dw.shape
    cog = co // groups
    oh, ow = gy.shape[2:]
    xp = _pad(x, pad)
    gu = np.zeros((n, co, (oh - 1) * stride[0] + 1, (ow - 1) * stride[1] + 1), gy.dtype)
    gu[:, :, ::stride[0], ::stride[1]] = gy
    fh, fw = fast_size(xp.shape[2]), fast_size(xp.shape[3])
    X = np.fft.rfft2(xp, s=(fh, fw))                 # [N, C, fh, fw2]
    Gf = np.fft.rfft2(gu, s=(fh, fw))                # [N, Co, fh, fw2]
    F = fh * X.shape[3]
    Gm = np.conj(Gf).reshape(n, groups, cog, F).transpose(3, 1, 2, 0)   # [F, G, cog, N]
    Xm = X.reshape(n, groups, cg, F).transpose(3, 1, 0, 2)               # [F, G, N, cg]
    R = _freq_matmul(Gm, Xm).transpose(1, 2, 3, 0).reshape(co, cg, fh, X.shape[3])
    r = np.fft.irfft2(R, s=(fh, fw))
    dw[...] = r[:, :, :(kh - 1) * dilation[0] + 1:dilation[0], :(kw - 1) * dilation[1] + 1:dilation[1]]


def fft_step(node):
    """A Python-level step running conv op `node` by FFT on (inputs..., output) arrays."""
    a = node.attrs
    geo = (a["stride"], a["pad"], a["dilation"], a["groups"])
    if node.op == "conv2d":
        has_bias = len(node.inputs) == 3
        return lambda x, w, *rest: fft_conv2d(x, w, rest[0] if has_bias else None, *geo, rest[-1])
    if node.op == "conv2d_grad_input":
        return lambda gy, w, dx: fft_conv2d_grad_input(gy, w, dx, *geo)
    return lambda x, gy, dw: fft_conv2d_grad_weight(x, gy, dw, *geo)


def time_conv(node, algo: str, reps: int = 3) -> float:
    """Seconds one run of conv op `node` takes by `algo` on random data (best of `reps`, after a
    first run that compiles). For autotuning: the node's attributes other than algo are kept."""
    from ...ir.graph import Node
    from ...passes.target import best_time
    from . import prepare_runtime
    from .codegen import LIBRARY
    prepare_runtime()      # BLAS on one thread, as the kernels run it
    rng = np.random.default_rng(0)
    ins = [rng.standard_normal(v.type.shape).astype(v.type.np_dtype) for v in node.inputs]
    outs = [np.empty(v.type.shape, v.type.np_dtype) for v in node.outputs]
    trial = Node(node.op, node.inputs, {**node.attrs, "algo": algo}, node.placement, node.loc)
    trial.outputs = node.outputs
    if algo == "fft":
        step = fft_step(trial)
        run = lambda: step(*ins, *outs)   # noqa: E731
    else:
        fn, args = LIBRARY[node.op](trial, ins, outs, None)
        run = lambda: fn(*args)           # noqa: E731
    return best_time(run, reps)
