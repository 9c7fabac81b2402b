"""The LLVM backend's C runtime (tdc/backends/llvm/runtime/*.c), called through
ctypes and checked against the numpy references of the ops (tdc/ops), f32 and f64.

Products (GEMM, conv) are checked against an error bound: the reference evaluated on
absolute values bounds every partial sum, so |got - ref| <= rtol * ref(|a|, |b|).
Outputs start filled with NaN (or a sentinel) so a kernel that skips an element fails.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from tdc.backends.llvm.runtime import build_runtime
from tdc.lower.plan import avgpool_counts
from tdc.errors import ShapeError, TdcError
from tdc.ir.types import TensorType
from tdc.ops.norm import dropout_keep
from tdc.ir.opdef import get_op

SETTINGS = settings(max_examples=40, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
DTYPES = {"f32": np.float32, "f64": np.float64}
RTOL = {"f32": 1e-5, "f64": 1e-12}
EPS = {"f32": float(np.finfo(np.float32).eps), "f64": float(np.finfo(np.float64).eps)}

# argument kinds per function (p: array / pointer, i: int64, d: double), and the result type
SIGS = {
    "linear": "pppipiii", "matmul": "pppiii", "matmul_batched": "pppiiiipp",
    "conv2d": "pppip" + "i" * 16, "conv2d_grad_input": "ppp" + "i" * 16, "conv2d_grad_weight": "ppp" + "i" * 16,
    "maxpool2d": "pp" + "i" * 14, "maxpool2d_grad": "ppp" + "i" * 14, "maxpool2d_gather": "ppp" + "i" * 14,
    "avgpool2d": "pp" + "i" * 12 + "pp", "avgpool2d_grad": "pp" + "i" * 12 + "pp",
    "global_avgpool": "ppii", "softmax": "ppiiii", "softmax_cross_entropy": "ppipii", "one_hot": "pipii",
    "mse": "pppi", "batchnorm_infer": "pppppdpiii", "batchnorm_train": "pppppddpppiii", "dropout": "ppidipi",
}
RETURNS_INT = ("softmax_cross_entropy", "one_hot")
_CT = {"p": ctypes.c_void_p, "i": ctypes.c_int64, "d": ctypes.c_double}


@pytest.fixture(scope="module")
def lib():
    dll = ctypes.CDLL(str(build_runtime().shared_lib_path))
    for name, sig in SIGS.items():
        for sfx in DTYPES:
            fn = getattr(dll, f"tdc_{name}_{sfx}")
            fn.argtypes = [_CT[k] for k in sig]
            fn.restype = ctypes.c_int64 if name in RETURNS_INT else None
    dll.tdc_runtime_set_threads.argtypes = [ctypes.c_int64]
    dll.tdc_runtime_set_threads.restype = None
    return dll


def call(lib, name, dt, *args):
    """Call tdc_<name>_<dt>; numpy arrays are passed as pointers (they must be C-contiguous)."""
    conv = []
    for kind, a in zip(SIGS[name], args, strict=True):
        if kind == "p":
            if a is None:
                conv.append(None)
            else:
                assert isinstance(a, np.ndarray) and a.flags.c_contiguous
                conv.append(a.ctypes.data)
        else:
            conv.append(a)
    return getattr(lib, f"tdc_{name}_{dt}")(*conv)


def ref(op_name, *arrays, **attrs):
    """The op's numpy reference; ShapeError (rejected by type inference) when attrs are invalid."""
    op = get_op(op_name)
    a = op.normalize_attrs(attrs)
    op.infer_types([TensorType.of(x) for x in arrays], a)
    return op.ref(*arrays, **a)


def nan_like(shape, dt):
    return np.full(shape, np.nan, DTYPES[dt])


def rand(rng, shape, dt, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(DTYPES[dt])


def assert_bound(got, want, bound, dt, what=""):
    """|got - want| <= rtol * bound (+ a denormal-sized floor), elementwise; NaN must match NaN."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.array_equal(np.isnan(got), np.isnan(want)), what
    ok = ~np.isnan(want)
    tol = RTOL[dt] * np.asarray(bound, np.float64) + 1e-30
    err = np.abs(got - want)
    bad = ok & ~(err <= np.broadcast_to(tol, err.shape))
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off, max err {err[ok].max()} (first at {np.argwhere(bad)[0]})"


# ---- build --------------------------------------------------------------------------

def test_build_is_cached_and_link_args(lib):
    b = build_runtime()
    assert b.object_path.is_file() and b.shared_lib_path.is_file()
    assert (b.include_dir / "tdc_runtime.h").is_file()
    args = b.link_args()
    assert args[0] == str(b.object_path) and "-lscipy_openblas" in args and "-lm" in args
    assert any(a.startswith("-L") and a[2:] == str(b.openblas_lib_dir) for a in args)
    assert build_runtime() is b


def test_missing_gcc_is_a_tdc_error(monkeypatch, tmp_path):
    from tdc.backends.llvm import runtime as R
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TdcError, match="gcc not found"):
        R._build(str(tmp_path / "cache"))


def test_executable_links_against_runtime(tmp_path):
    """A C program calling the runtime, linked with link_args(), runs and prints the right numbers."""
    import subprocess
    b = build_runtime()
    src = tmp_path / "main.c"
    src.write_text('#include <stdio.h>\n#include "tdc_runtime.h"\n'
                   "int main(void){ float a[4]={1,2,3,4}, b[4]={5,6,7,8}, o[4];\n"
                   " tdc_runtime_set_threads(1); tdc_matmul_f32(a,b,o,2,2,2);\n"
                   ' printf("%g %g %g %g\\n",o[0],o[1],o[2],o[3]); return 0; }\n')
    exe = tmp_path / "main"
    subprocess.run(["gcc", "-O1", f"-I{b.include_dir}", str(src), "-o", str(exe), *b.link_args()], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["19", "22", "43", "50"]


# ---- matrix products -------------------------------------------------------------------

@pytest.mark.parametrize("dt", DTYPES)
@SETTINGS
@given(M=st.integers(0, 9), K=st.integers(0, 9), N=st.integers(0, 9), bias=st.booleans(), seed=st.integers(0, 99))
def test_linear_matmul(lib, dt, M, K, N, bias, seed):
    rng = np.random.default_rng(seed)
    x, w, b, a2 = rand(rng, (M, K), dt), rand(rng, (N, K), dt), rand(rng, (N,), dt), rand(rng, (K, N), dt)
    out = nan_like((M, N), dt)
    call(lib, "linear", dt, x, w, b if bias else None, int(bias), out, M, K, N)
    args = (x, w, b) if bias else (x, w)
    assert_bound(out, ref("linear", *args), ref("linear", *[np.abs(t) for t in args]), dt, "linear")
    out = nan_like((M, N), dt)
    call(lib, "matmul", dt, x, a2, out, M, K, N)
    assert_bound(out, ref("matmul", x, a2), ref("matmul", np.abs(x), np.abs(a2)), dt, "matmul")


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("ashape,bshape", [((3, 2, 4, 5), (5, 3)), ((2, 1, 4, 5), (3, 5, 2)), ((1, 3, 4), (2, 1, 4, 6)),
                                           ((2, 0, 3), (3, 4)), ((4, 3, 0), (4, 0, 2))])
def test_matmul_batched_broadcasts_via_index_maps(lib, dt, ashape, bshape):
    rng = np.random.default_rng(0)
    a, b = rand(rng, ashape, dt), rand(rng, bshape, dt)
    want = ref("matmul", a, b)
    batch = want.shape[:-2]

    def index_map(x):   # as the Numba codegen builds them
        ids = np.arange(int(np.prod(x.shape[:-2]))).reshape(x.shape[:-2]) if x.ndim > 2 else 0
        return np.ascontiguousarray(np.broadcast_to(ids, batch), np.int64).reshape(-1)

    M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
    out = nan_like(want.shape, dt)
    B = int(np.prod(batch))
    call(lib, "matmul_batched", dt, a, b, out, B, M, K, N, index_map(a), index_map(b))
    assert_bound(out, want, ref("matmul", np.abs(a), np.abs(b)), dt, "matmul_batched")


# Single-row and single-column products go to gemv (linalg.c), with every transpose and leading
# dimension tdcrt_gemm takes. Bound: any order of summing n products, with or without FMA,
# is within gamma_n = n u / (1 - n u) of the sum of their absolute values (Higham, Accuracy and
# Stability, 3.1); beta * C and a bias are one more term.

def gamma(n, dt):
    u = EPS[dt] / 2
    return n * u / (1 - n * u)


@pytest.fixture(scope="module")
def gemm(tmp_path_factory):
    """tdcrt_gemm_<dt> (hidden in the shared library) through a shim linked with the runtime object."""
    import subprocess
    b = build_runtime()
    d = tmp_path_factory.mktemp("gemm")
    (d / "shim.c").write_text("\n".join(
        f"#include <stdint.h>\nvoid tdcrt_gemm_{dt}(int, int, int64_t, int64_t, int64_t, const {t} *, int64_t, "
        f"const {t} *, int64_t, {t}, {t} *, int64_t);\n"
        f"void gemm_{dt}(int ta, int tb, int64_t M, int64_t N, int64_t K, const {t} *A, int64_t lda, const {t} *B,"
        f" int64_t ldb, double beta, {t} *C, int64_t ldc) {{ tdcrt_gemm_{dt}(ta, tb, M, N, K, A, lda, B, ldb,"
        f" ({t})beta, C, ldc); }}" for dt, t in (("f32", "float"), ("f64", "double"))))
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(d / "shim.so"), str(d / "shim.c"), *b.link_args()], check=True)
    dll = ctypes.CDLL(str(d / "shim.so"))
    i, p = ctypes.c_int64, ctypes.c_void_p
    for dt in DTYPES:
        getattr(dll, f"gemm_{dt}").argtypes = [ctypes.c_int, ctypes.c_int, i, i, i, p, i, p, i, ctypes.c_double, p, i]
    return dll


VEC_DIMS = st.sampled_from([1, 2, 3, 7, 16, 33, 100, 300, 784])


@pytest.mark.parametrize("dt", DTYPES)
@SETTINGS
@given(one=st.sampled_from(["M", "N", "both"]), dims=st.tuples(VEC_DIMS, VEC_DIMS), ta=st.booleans(), tb=st.booleans(),
       pads=st.tuples(*[st.sampled_from([0, 3])] * 3), beta=st.sampled_from([0.0, 1.0, -0.5]), seed=st.integers(0, 99))
def test_gemm_single_row_or_column(gemm, dt, one, dims, ta, tb, pads, beta, seed):
    other, K = dims
    M, N = {"M": (1, other), "N": (other, 1), "both": (1, 1)}[one]
    check_gemm(gemm, dt, M, N, K, ta, tb, pads, beta, seed)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("M,N,K", [(300, 129, 300), (129, 300, 300), (33, 2000, 160), (2000, 47, 160)])
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_split_over_the_pool(gemm, dt, M, N, K, ta, tb):
    """Products of 2e7 flops or more are cut by rows (M > N) or columns over the pool's threads
    (linalg.c), each on its slice of A or B: edge slices that are no multiple of the block,
    transposed and padded operands, and beta all come out right."""
    check_gemm(gemm, dt, M, N, K, ta, tb, (3, 5, 2), -0.5, M + N)
    check_gemm(gemm, dt, M, N, K, ta, tb, (0, 0, 0), 0.0, K)


def check_gemm(gemm, dt, M, N, K, ta, tb, pads, beta, seed):
    """tdcrt_gemm against float64 within gamma_{K+1}, leaving C's padding untouched."""
    rng = np.random.default_rng(seed)
    # stored shapes (op(A) = A.T when ta), padded past their rows to a leading dimension
    a_rows, a_cols = (K, M) if ta else (M, K)
    b_rows, b_cols = (N, K) if tb else (K, N)
    A, B = rand(rng, (a_rows, a_cols + pads[0]), dt), rand(rng, (b_rows, b_cols + pads[1]), dt)
    C = rand(rng, (M, N + pads[2]), dt)
    if beta == 0:
        C[:, :N] = np.nan          # not to be read
    opA, opB = A[:, :a_cols].astype(np.float64), B[:, :b_cols].astype(np.float64)
    opA, opB = (opA.T if ta else opA), (opB.T if tb else opB)
    c0 = C[:, :N].astype(np.float64)
    want = opA @ opB + (beta * c0 if beta else 0)
    bound = gamma(K + 1, dt) * (np.abs(opA) @ np.abs(opB) + (np.abs(beta * c0) if beta else 0))
    padding = C[:, N:].copy()
    getattr(gemm, f"gemm_{dt}")(int(ta), int(tb), M, N, K, A.ctypes.data, A.shape[1], B.ctypes.data, B.shape[1],
                                beta, C.ctypes.data, C.shape[1])
    err = np.abs(C[:, :N] - want)
    assert (err <= bound + 1e-30).all(), f"max err {err.max()}, bound there {bound.flat[err.argmax()]}"
    assert np.array_equal(C[:, N:], padding)   # past N in each row of C: untouched


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("M,K,N", [(1, 784, 300), (1, 300, 100), (1, 100, 10), (1, 1, 1), (1, 1, 300), (300, 1, 1),
                                   (128, 300, 1), (1, 128, 300), (300, 1, 784), (1, 784, 1)])
def test_linear_matmul_vector_shapes(lib, dt, M, K, N):
    """The exported products at batch 1 and their gradients' shapes (1 row, 1 column, or K = 1)."""
    rng = np.random.default_rng(M * K * N)
    x, w, b, a2 = rand(rng, (M, K), dt), rand(rng, (N, K), dt), rand(rng, (N,), dt), rand(rng, (K, N), dt)
    x64, w64, b64, a64 = (t.astype(np.float64) for t in (x, w, b, a2))
    bound = gamma(K + 1, dt) * (np.abs(x64) @ np.abs(w64).T + np.abs(b64))
    out = nan_like((M, N), dt)
    call(lib, "linear", dt, x, w, b, 1, out, M, K, N)
    assert (np.abs(out - (x64 @ w64.T + b64)) <= bound).all()
    bound = gamma(K, dt) * (np.abs(x64) @ np.abs(a64))
    out = nan_like((M, N), dt)
    call(lib, "matmul", dt, x, a2, out, M, K, N)
    assert (np.abs(out - x64 @ a64) <= bound).all()
    out = nan_like((3, M, N), dt)
    xs = np.ascontiguousarray(np.stack([x, -x, 2 * x]))
    call(lib, "matmul_batched", dt, xs, a2, out, 3, M, K, N, np.arange(3, dtype=np.int64), np.zeros(3, np.int64))
    assert (np.abs(out - xs.astype(np.float64) @ a64) <= 2 * bound).all()


# ---- convolution ---------------------------------------------------------------------------

conv_cases = st.fixed_dictionaries({
    "N": st.integers(1, 3), "groups": st.integers(1, 3), "cg": st.integers(1, 3), "cog": st.integers(1, 3),
    "H": st.integers(1, 8), "W": st.integers(1, 8), "KH": st.integers(1, 3), "KW": st.integers(1, 3),
    "stride": st.tuples(st.integers(1, 3), st.integers(1, 3)),
    "pad": st.tuples(*[st.integers(0, 2)] * 4), "dilation": st.tuples(st.integers(1, 2), st.integers(1, 2)),
    "bias": st.booleans(), "seed": st.integers(0, 999)})


def check_conv(lib, dt, N, groups, cg, cog, H, W, KH, KW, stride, pad, dilation, bias, seed):
    rng = np.random.default_rng(seed)
    C, CO = cg * groups, cog * groups
    x, w, b = rand(rng, (N, C, H, W), dt), rand(rng, (CO, cg, KH, KW), dt), rand(rng, (CO,), dt)
    geo = dict(stride=stride, pad=pad, dilation=dilation, groups=groups)
    try:
        want = ref("conv2d", *((x, w, b) if bias else (x, w)), **geo)
    except ShapeError:
        return False
    OH, OW = want.shape[2:]
    dims = (N, C, H, W, CO, KH, KW, OH, OW, stride[0], stride[1], pad[0], pad[1], dilation[0], dilation[1], groups)
    ax, aw, ab = np.abs(x), np.abs(w), np.abs(b)

    out = nan_like(want.shape, dt)
    call(lib, "conv2d", dt, x, w, b if bias else None, int(bias), out, *dims)
    assert_bound(out, want, ref("conv2d", *((ax, aw, ab) if bias else (ax, aw)), **geo), dt, "conv2d")

    gy = rand(rng, want.shape, dt)
    dx = nan_like(x.shape, dt)
    call(lib, "conv2d_grad_input", dt, gy, w, dx, *dims)
    assert_bound(dx, ref("conv2d_grad_input", gy, w, input_shape=x.shape, **geo),
                 ref("conv2d_grad_input", np.abs(gy), aw, input_shape=x.shape, **geo), dt, "conv2d_grad_input")

    dw = nan_like(w.shape, dt)
    call(lib, "conv2d_grad_weight", dt, x, gy, dw, *dims)
    assert_bound(dw, ref("conv2d_grad_weight", x, gy, weight_shape=w.shape, **geo),
                 ref("conv2d_grad_weight", ax, np.abs(gy), weight_shape=w.shape, **geo), dt, "conv2d_grad_weight")
    return True


@pytest.mark.parametrize("dt", DTYPES)
@SETTINGS
@given(case=conv_cases)
def test_conv2d_and_grads(lib, dt, case):
    assume(check_conv(lib, dt, **case))


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("case", [
    # LeNet conv1 / conv2
    dict(N=4, groups=1, cg=1, cog=6, H=28, W=28, KH=5, KW=5, stride=(1, 1), pad=(2, 2, 2, 2), dilation=(1, 1)),
    dict(N=3, groups=1, cg=6, cog=16, H=14, W=14, KH=5, KW=5, stride=(1, 1), pad=(0, 0, 0, 0), dilation=(1, 1)),
    # depthwise, strided, asymmetric padding, dilation
    dict(N=2, groups=8, cg=1, cog=2, H=11, W=9, KH=3, KW=3, stride=(2, 3), pad=(1, 0, 2, 1), dilation=(2, 1)),
    # big enough that the batch is cut into several chunks (one with fewer images), and split
    # unevenly over the runtime's threads (above its 2 MFLOP threshold)
    dict(N=5, groups=2, cg=8, cog=3, H=64, W=64, KH=3, KW=3, stride=(1, 1), pad=(1, 1, 1, 1), dilation=(1, 1)),
])
def test_conv2d_fixed_shapes(lib, dt, case):
    assert check_conv(lib, dt, bias=True, seed=1, **case)


# ---- convolution algorithms: tdc_<op>_<algo>_<dtype> ----------------------------------------
# Bounds on max|got - ref| / max|ref| over each output (ref: the float64 reference on the float64
# copies of the same inputs), per algorithm and dtype. Measured maxima over ~300 random geometries
# and the fixed shapes below (f32 / f64): im2col 7.7e-7 / 2.8e-15, direct 1.7e-6 / 3.7e-15,
# winograd_f2 9.0e-7 / 1.7e-15, winograd_f4 1.5e-5 / 2.8e-14, fft 5.6e-8 / 1.3e-15 (fft's f64
# backward passes reach 2.6e-13 only on results that are exactly zero, against the floor).

CONV_ALGOS = ("im2col", "direct", "winograd_f2", "winograd_f4", "fft")
ALGO_TOL = {
    "im2col": {"f32": 1e-5, "f64": 5e-14},
    "direct": {"f32": 1e-5, "f64": 5e-14},
    "winograd_f2": {"f32": 1e-5, "f64": 5e-14},
    "winograd_f4": {"f32": 1e-4, "f64": 3e-13},
    "fft": {"f32": 1e-6, "f64": 1e-12},
}
WINOGRAD = ("winograd_f2", "winograd_f4")
for _a in CONV_ALGOS:
    SIGS[f"conv2d_{_a}"] = SIGS["conv2d"]
    SIGS[f"conv2d_grad_input_{_a}"] = SIGS["conv2d_grad_input"]
    SIGS[f"conv2d_grad_weight_{_a}"] = SIGS["conv2d_grad_weight"]


def algo_errors(lib, dt, algo, N, groups, cg, cog, H, W, KH, KW, stride, pad, dilation, bias, seed, scale=1.0):
    """Run the three conv ops by `algo`; {op: max|got - ref| / max|ref|}, ref in float64 on the
    same (rounded) inputs (max|ref| floored at 1e-3 of the reference on absolute values and of
    max|a| * max|b|, for results that vanish). None when the geometry is invalid."""
    rng = np.random.default_rng(seed)
    C, CO = cg * groups, cog * groups
    x, w, b = rand(rng, (N, C, H, W), dt, scale), rand(rng, (CO, cg, KH, KW), dt), rand(rng, (CO,), dt)
    geo = dict(stride=stride, pad=pad, dilation=dilation, groups=groups)
    f64 = lambda a: a.astype(np.float64)   # noqa: E731
    try:
        want = ref("conv2d", *((f64(x), f64(w), f64(b)) if bias else (f64(x), f64(w))), **geo)
    except ShapeError:
        return None
    OH, OW = want.shape[2:]
    dims = (N, C, H, W, CO, KH, KW, OH, OW, stride[0], stride[1], pad[0], pad[1], dilation[0], dilation[1], groups)
    gy = rand(rng, want.shape, dt)
    errs = {}

    def rel(op, got, want, absref, a, b):
        # the floor only matters when the result is (nearly) all zeros, e.g. every window in the padding
        assert got.shape == want.shape and not np.isnan(got).any(), op
        scale = max(np.abs(want).max(), 1e-3 * absref.max(), 1e-3 * np.abs(a).max() * np.abs(b).max(), 1e-300)
        errs[op] = float(np.abs(got.astype(np.float64) - want).max() / scale)

    ax, aw, agy = (np.abs(f64(t)) for t in (x, w, gy))
    out = nan_like(want.shape, dt)
    call(lib, f"conv2d_{algo}", dt, x, w, b if bias else None, int(bias), out, *dims)
    rel("conv2d", out, want, ref("conv2d", ax, aw, **geo), x, w)
    dx = nan_like(x.shape, dt)
    call(lib, f"conv2d_grad_input_{algo}", dt, gy, w, dx, *dims)
    rel("conv2d_grad_input", dx, ref("conv2d_grad_input", f64(gy), f64(w), input_shape=x.shape, **geo),
        ref("conv2d_grad_input", agy, aw, input_shape=x.shape, **geo), gy, w)
    dw = nan_like(w.shape, dt)
    call(lib, f"conv2d_grad_weight_{algo}", dt, x, gy, dw, *dims)
    rel("conv2d_grad_weight", dw, ref("conv2d_grad_weight", f64(x), f64(gy), weight_shape=w.shape, **geo),
        ref("conv2d_grad_weight", ax, agy, weight_shape=w.shape, **geo), x, gy)
    return errs


def check_algo(lib, dt, algo, **case):
    errs = algo_errors(lib, dt, algo, **case)
    if errs is None:
        return False
    tol = ALGO_TOL[algo][dt]
    bad = {op: e for op, e in errs.items() if not e <= tol}
    assert not bad, f"{algo} {dt}: relative errors {bad} above {tol} for {case}"
    return True


wino_cases = st.fixed_dictionaries({
    "N": st.integers(1, 3), "groups": st.integers(1, 3), "cg": st.integers(1, 4), "cog": st.integers(1, 4),
    "H": st.integers(1, 13), "W": st.integers(1, 13), "KH": st.just(3), "KW": st.just(3),
    "stride": st.just((1, 1)), "pad": st.tuples(*[st.integers(0, 3)] * 4), "dilation": st.just((1, 1)),
    "bias": st.booleans(), "seed": st.integers(0, 999)})


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("algo", ["direct", "fft"])
@SETTINGS
@given(case=conv_cases)
def test_conv_algo_any_geometry(lib, dt, algo, case):
    assume(check_algo(lib, dt, algo, **case))


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("algo", CONV_ALGOS)
@SETTINGS
@given(case=wino_cases)
def test_conv_algo_3x3(lib, dt, algo, case):
    assume(check_algo(lib, dt, algo, **case))


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("algo", WINOGRAD)
@pytest.mark.parametrize("case", [
    dict(KH=5, KW=5, stride=(1, 1), dilation=(1, 1)), dict(KH=3, KW=3, stride=(2, 1), dilation=(1, 1)),
    dict(KH=3, KW=3, stride=(1, 1), dilation=(1, 2)), dict(KH=3, KW=1, stride=(1, 1), dilation=(1, 1))])
def test_winograd_falls_back_off_3x3(lib, dt, algo, case):
    assert check_algo(lib, dt, algo, N=2, groups=2, cg=3, cog=2, H=9, W=8, pad=(1, 0, 2, 1), bias=True, seed=3, **case)


CONV_ALGO_SHAPES = [
    # a ResNet-like layer; N > 1 and groups > 1 with channel counts that are not multiples of 8
    dict(N=2, groups=1, cg=16, cog=24, H=20, W=18, KH=3, KW=3, stride=(1, 1), pad=(1, 1, 1, 1), dilation=(1, 1)),
    dict(N=3, groups=3, cg=5, cog=7, H=17, W=23, KH=3, KW=3, stride=(1, 1), pad=(0, 2, 3, 1), dilation=(1, 1)),
    # depthwise, strided, dilated, asymmetric padding; LeNet conv1
    dict(N=2, groups=8, cg=1, cog=2, H=11, W=9, KH=3, KW=3, stride=(2, 3), pad=(1, 0, 2, 1), dilation=(2, 1)),
    dict(N=4, groups=1, cg=1, cog=6, H=28, W=28, KH=5, KW=5, stride=(1, 1), pad=(2, 2, 2, 2), dilation=(1, 1)),
    # enough images that Winograd / FFT cut the batch into chunks; a large 7x7 stride-2 stem
    dict(N=9, groups=2, cg=32, cog=16, H=40, W=40, KH=3, KW=3, stride=(1, 1), pad=(1, 1, 1, 1), dilation=(1, 1)),
    dict(N=1, groups=1, cg=3, cog=8, H=45, W=38, KH=7, KW=7, stride=(2, 2), pad=(3, 3, 2, 3), dilation=(1, 1)),
]


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("algo", CONV_ALGOS)
@pytest.mark.parametrize("case", range(len(CONV_ALGO_SHAPES)))
def test_conv_algo_fixed_shapes(lib, dt, algo, case):
    assert check_algo(lib, dt, algo, bias=True, seed=case, **CONV_ALGO_SHAPES[case])


# ---- pooling ----------------------------------------------------------------------------------

pool_cases = st.fixed_dictionaries({
    "N": st.integers(1, 2), "C": st.integers(1, 3), "H": st.integers(1, 9), "W": st.integers(1, 9),
    "kernel": st.tuples(st.integers(1, 3), st.integers(1, 3)),
    "stride": st.tuples(st.integers(1, 3), st.integers(1, 3)),
    "pad": st.tuples(*[st.integers(0, 2)] * 4), "dilation": st.tuples(st.integers(1, 2), st.integers(1, 2)),
    "ceil_mode": st.booleans(), "nan": st.booleans(), "seed": st.integers(0, 999)})


def check_maxpool(lib, dt, N, C, H, W, kernel, stride, pad, dilation, ceil_mode, nan, seed):
    rng = np.random.default_rng(seed)
    # few distinct values: many ties, which the first maximum must win
    x = rng.integers(-3, 3, (N, C, H, W)).astype(DTYPES[dt])
    # -inf only as part of a finite window: in a window whose real elements are all -inf the
    # reference's argmax can land on the (-inf) padding, the Numba kernel and this runtime on
    # the first real element
    x[rng.random(x.shape) < 0.1] = -1e30
    if nan:
        x[rng.random(x.shape) < 0.15] = np.nan
    attrs = dict(kernel=kernel, stride=stride, pad=pad, dilation=dilation, ceil_mode=ceil_mode)
    try:
        want = ref("maxpool2d", x, **attrs)
    except ShapeError:
        return False
    OH, OW = want.shape[2:]
    dims = (N, C, H, W, OH, OW, *kernel, *stride, pad[0], pad[1], *dilation)
    out = np.full(want.shape, 1234.5, DTYPES[dt])
    call(lib, "maxpool2d", dt, x, out, *dims)
    np.testing.assert_array_equal(out, want)

    # integer-valued gradients: the sums are exact, so any order gives the reference bit for bit
    gy = rng.integers(-4, 5, want.shape).astype(DTYPES[dt])
    dx = nan_like(x.shape, dt)
    call(lib, "maxpool2d_grad", dt, gy, x, dx, *dims)
    np.testing.assert_array_equal(dx, ref("maxpool2d_grad", gy, x, **attrs))

    h = rand(rng, x.shape, dt)
    got = nan_like(want.shape, dt)
    call(lib, "maxpool2d_gather", dt, h, x, got, *dims)
    np.testing.assert_array_equal(got, ref("maxpool2d_gather", h, x, **attrs))
    return True


@pytest.mark.parametrize("dt", DTYPES)
@SETTINGS
@given(case=pool_cases)
def test_maxpool2d_grad_gather(lib, dt, case):
    assume(check_maxpool(lib, dt, **case))


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("nan", [False, True])
@pytest.mark.parametrize("H,W,ceil_mode", [(8, 8, False), (5, 7, True), (5, 7, False), (1, 2, True)])
def test_maxpool2d_tiled_windows(lib, dt, nan, H, W, ceil_mode):
    """2x2 stride 2 (the fast path), also with a last partial window (ceil_mode) and odd sizes."""
    assert check_maxpool(lib, dt, 2, 3, H, W, (2, 2), (2, 2), (0, 0, 0, 0), (1, 1), ceil_mode, nan, 7)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("nan", [False, True])
def test_maxpool2d_grad_split_over_threads(lib, dt, nan):
    """15 planes of 30x30: enough work that the gradient's planes are split (unevenly) over the
    runtime's threads, through the 2x2 path and the general one."""
    assert check_maxpool(lib, dt, 3, 5, 30, 30, (2, 2), (2, 2), (0, 0, 0, 0), (1, 1), False, nan, 3)
    assert check_maxpool(lib, dt, 3, 5, 30, 30, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), True, nan, 4)


def test_maxpool2d_nan_and_ties_explicitly(lib):
    x = np.array([[[[1, 3, 3, np.nan], [3, 2, np.nan, 0]]]], np.float32)   # [1,1,2,4], 2x2 windows
    dims = (1, 1, 2, 4, 1, 2, 2, 2, 2, 2, 0, 0, 1, 1)
    out = nan_like((1, 1, 1, 2), "f32")
    call(lib, "maxpool2d", "f32", x, out, *dims)
    assert out[0, 0, 0, 0] == 3 and np.isnan(out[0, 0, 0, 1])
    dx = nan_like(x.shape, "f32")
    call(lib, "maxpool2d_grad", "f32", np.array([[[[10, 20]]]], np.float32), x, dx, *dims)
    # the first 3 (row 0, col 1) and the first NaN (row 0, col 3) get the gradients
    np.testing.assert_array_equal(dx, [[[[0, 10, 0, 20], [0, 0, 0, 0]]]])


def test_maxpool2d_ties_without_nan_take_the_first(lib):
    """The 2x2 fast path (no NaN in the image) breaks ties like the general path."""
    x = np.array([[[[1, 3, 3, 0], [3, 2, 5, 5]]]], np.float32)
    dims = (1, 1, 2, 4, 1, 2, 2, 2, 2, 2, 0, 0, 1, 1)
    dx = nan_like(x.shape, "f32")
    call(lib, "maxpool2d_grad", "f32", np.array([[[[10, 20]]]], np.float32), x, dx, *dims)
    np.testing.assert_array_equal(dx, [[[[0, 10, 0, 0], [0, 0, 20, 0]]]])


def avg_counts(in_hw, out_hw, kernel, stride, pad, include):
    """cy, cx as the Numba codegen computes them (avgpool_divisors)."""
    cy = avgpool_counts(in_hw[0], kernel[0], stride[0], pad[0], pad[2], out_hw[0], include)
    cx = avgpool_counts(in_hw[1], kernel[1], stride[1], pad[1], pad[3], out_hw[1], include)
    return cy.astype(np.float64), cx.astype(np.float64)


@pytest.mark.parametrize("dt", DTYPES)
@SETTINGS
@given(case=pool_cases, include=st.booleans())
def test_avgpool2d_and_grad(lib, dt, case, include):
    N, C, H, W = case["N"], case["C"], case["H"], case["W"]
    kernel, stride, pad = case["kernel"], case["stride"], case["pad"]
    rng = np.random.default_rng(case["seed"])
    x = rand(rng, (N, C, H, W), dt)
    attrs = dict(kernel=kernel, stride=stride, pad=pad, ceil_mode=case["ceil_mode"], count_include_pad=include)
    try:
        want = ref("avgpool2d", x, **attrs)
    except ShapeError:
        assume(False)
    OH, OW = want.shape[2:]
    cy, cx = avg_counts((H, W), (OH, OW), kernel, stride, pad, include)
    dims = (N, C, H, W, OH, OW, *kernel, *stride, pad[0], pad[1])
    out = nan_like(want.shape, dt)
    call(lib, "avgpool2d", dt, x, out, *dims, cy, cx)
    assert_bound(out, want, ref("avgpool2d", np.abs(x), **attrs), dt, "avgpool2d")

    gy = rand(rng, want.shape, dt)
    dx = nan_like(x.shape, dt)
    call(lib, "avgpool2d_grad", dt, gy, dx, *dims, cy, cx)
    ga = dict(attrs, input_shape=x.shape)
    assert_bound(dx, ref("avgpool2d_grad", gy, **ga), ref("avgpool2d_grad", np.abs(gy), **ga), dt, "avgpool2d_grad")


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1, 1), (3, 2, 1, 9)])
def test_global_avgpool(lib, dt, shape):
    x = rand(np.random.default_rng(0), shape, dt, 10)
    out = nan_like(shape[:2] + (1, 1), dt)
    call(lib, "global_avgpool", dt, x, out, shape[0] * shape[1], shape[2] * shape[3])
    assert_bound(out, ref("global_avgpool", x), ref("global_avgpool", np.abs(x)), dt, "global_avgpool")


# ---- softmax and losses ---------------------------------------------------------------------------

@pytest.mark.parametrize("dt", DTYPES)
@SETTINGS
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), data=st.data(), log=st.booleans(),
       seed=st.integers(0, 999), scale=st.sampled_from([1.0, 30.0]))
def test_softmax_any_axis(lib, dt, shape, data, log, seed, scale):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    rng = np.random.default_rng(seed)
    x = rand(rng, shape, dt, scale)
    ax = axis % len(shape)
    A, B, C = int(np.prod(shape[:ax])), shape[ax], int(np.prod(shape[ax + 1:]))
    out = nan_like(x.shape, dt)
    call(lib, "softmax", dt, x, out, A, B, C, int(log))
    op = "log_softmax" if log else "softmax"
    want = ref(op, x, axis=axis)
    # the kernel works in double: within an ulp or so of the float64 result
    exact = ref(op, x.astype(np.float64), axis=axis)
    mag = np.abs(exact) + (np.abs(x).max(axis=axis, keepdims=True) + 1 if log else 0)
    assert_bound(out, exact, mag * (B + 4) * EPS[dt] / RTOL[dt] + 1e-300, dt, op)
    assert_bound(out, want, np.abs(want) + (np.abs(x).max() if log else 1e-3), dt, op)


@pytest.mark.parametrize("dt", DTYPES)
def test_softmax_nan_and_inf_rows(lib, dt):
    x = np.array([[1, np.nan, 2], [-np.inf, 0, 1], [-np.inf, -np.inf, -np.inf]], DTYPES[dt])
    for log in (0, 1):
        out = np.zeros_like(x)
        call(lib, "softmax", dt, x, out, 3, 3, 1, log)
        with np.errstate(invalid="ignore"):
            want = ref("log_softmax" if log else "softmax", x, axis=1)
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("lab_dt", [np.int32, np.int64])
@pytest.mark.parametrize("N,K", [(1, 1), (5, 3), (8, 10), (3, 40)])
def test_softmax_cross_entropy(lib, dt, lab_dt, N, K):
    rng = np.random.default_rng(N * K)
    logits = rand(rng, (N, K), dt, 5)
    labels = rng.integers(0, K, N).astype(lab_dt)
    out = nan_like((1,), dt)
    assert call(lib, "softmax_cross_entropy", dt, logits, labels, labels.itemsize, out, N, K) == 0
    want = ref("softmax_cross_entropy", logits, labels)
    scale = np.abs(want) + np.abs(logits).max()
    assert_bound(out[0], want, scale * 4 * EPS[dt] / RTOL[dt], dt, "softmax_cross_entropy")


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("bad", [-1, 3, 100, -(2 ** 31)])
@pytest.mark.parametrize("lab_dt", [np.int32, np.int64])
def test_softmax_cross_entropy_bad_label(lib, dt, bad, lab_dt):
    logits = rand(np.random.default_rng(0), (4, 3), dt)
    labels = np.array([0, 2, bad, bad], lab_dt)
    out = np.full(1, 7.0, DTYPES[dt])
    assert call(lib, "softmax_cross_entropy", dt, logits, labels, labels.itemsize, out, 4, 3) == 3
    assert out[0] == 7.0
    with pytest.raises(TdcError):
        ref("softmax_cross_entropy", logits, labels)
    assert call(lib, "softmax_cross_entropy", dt, logits, labels, 3, out, 4, 3) == -1


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("idx_dt", [np.int8, np.int32, np.int64])
def test_one_hot(lib, dt, idx_dt):
    idx = np.array([[0, 4, 2], [1, 1, 3]], idx_dt)
    out = nan_like(idx.shape + (5,), dt)
    assert call(lib, "one_hot", dt, idx, idx.itemsize, out, idx.size, 5) == 0
    np.testing.assert_array_equal(out, ref("one_hot", idx, depth=5, dtype=dt))
    bad = np.array([0, 1, 5, -1], idx_dt)
    out = nan_like((4, 5), dt)
    assert call(lib, "one_hot", dt, bad, bad.itemsize, out, 4, 5) == 3
    bad[2] = 0
    assert call(lib, "one_hot", dt, bad, bad.itemsize, out, 4, 5) == 4


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_mse(lib, dt, n):
    rng = np.random.default_rng(n)
    p, t = rand(rng, (n,), dt), rand(rng, (n,), dt)
    out = nan_like((1,), dt)
    call(lib, "mse", dt, p, t, out, n)
    want = ref("mse", p, t) if n else np.zeros((), DTYPES[dt])
    # a double sum of n squares (numpy's is pairwise), rounded to the dtype
    assert_bound(out[0], want, np.abs(want) * (2 * EPS[dt] + n * EPS["f64"]) / RTOL[dt], dt, "mse")


# ---- batchnorm and dropout -------------------------------------------------------------------------

@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("shape", [(4, 3), (2, 5, 3, 4), (1, 2, 7), (6, 1, 2, 2)])
@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_batchnorm(lib, dt, shape, momentum):
    rng = np.random.default_rng(len(shape))
    C = shape[1]
    S = int(np.prod(shape[2:]))
    x = rand(rng, shape, dt, 3) + DTYPES[dt](2)
    gamma, beta, mean = rand(rng, (C,), dt), rand(rng, (C,), dt), rand(rng, (C,), dt)
    var = (np.abs(rand(rng, (C,), dt)) + 0.1).astype(DTYPES[dt])
    eps = 1e-5
    out = nan_like(shape, dt)
    call(lib, "batchnorm_infer", dt, x, gamma, beta, mean, var, eps, out, shape[0], C, S)
    want = ref("batchnorm", x, gamma, beta, mean, var, eps=eps, momentum=momentum)
    ch = (1, C) + (1,) * (len(shape) - 2)
    scale = np.abs(gamma / np.sqrt(var.astype(np.float64) + eps)).reshape(ch)
    mag = (np.abs(x) + np.abs(mean).reshape(ch)) * scale + np.abs(beta).reshape(ch)
    assert_bound(out, want, mag, dt, "batchnorm_infer")

    out, nm, nv = nan_like(shape, dt), nan_like((C,), dt), nan_like((C,), dt)
    call(lib, "batchnorm_train", dt, x, gamma, beta, mean, var, eps, momentum, out, nm, nv, shape[0], C, S)
    wy, wm, wv = ref("batchnorm", x, gamma, beta, mean, var, eps=eps, momentum=momentum, training=True)
    assert_bound(out, wy, np.abs(wy) + np.abs(x) + 1, dt, "batchnorm_train y")
    assert_bound(nm, wm, np.abs(wm) + np.abs(mean) + np.abs(x).max(), dt, "new_mean")
    assert_bound(nv, wv, np.abs(wv) + np.abs(var), dt, "new_var")


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("key_dt", [np.int32, np.int64])
@pytest.mark.parametrize("rate,seed,key", [(0.5, 0, 0), (0.1, 42, 7), (0.9, -3, -1), (0.0, 5, 2 ** 31 - 1),
                                           (0.3, 2 ** 62, -(2 ** 31))])
def test_dropout_mask_is_bit_exact(lib, dt, key_dt, rate, seed, key):
    n = 4099
    rng = np.random.default_rng(1)
    x = rand(rng, (n,), dt) + DTYPES[dt](10)    # no zeros: the mask is where the output is 0
    k = np.array(key, key_dt)
    out = nan_like((n,), dt)
    call(lib, "dropout", dt, x, k, k.itemsize, rate, seed, out, n)
    keep = dropout_keep((n,), rate, seed, key)
    np.testing.assert_array_equal(out != 0, keep)
    want = ref("dropout", x, k, rate=rate, seed=seed)
    assert_bound(out, want, np.abs(want) * 2 * EPS[dt] / RTOL[dt], dt, "dropout")
    if 0 < rate < 1:
        assert 0 < keep.sum() < n


def test_set_threads(lib):
    lib.tdc_runtime_set_threads(2)
    lib.tdc_runtime_set_threads(1)
