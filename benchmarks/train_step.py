"""Training-step benchmark: tdc against a handwritten numpy step and PyTorch.

Two workloads, each one full step (forward, softmax cross-entropy, backward, SGD update):
  mlp    784-300-100-10 ReLU MLP, batch 128, x f32[128,784]
  lenet  LeNet-5 (conv5x5x6 pad 2, pool, conv5x5x16, pool, fc120, fc84, fc10), batch 64, x f32[64,1,28,28]

Implementations:
  tdc-llvm       tdc.train_step(...) compiled with backend="llvm" (the default of tdc train)
  tdc-numba      tdc.train_step(...) compiled with backend="numba"
  tdc-reference  the same graph on the reference interpreter (--reference; slow)
  numpy          a handwritten numpy step (the baseline): matmuls, im2col convs, argmax-mask pooling
  torch-eager    PyTorch eager, functional ops, torch.autograd.grad + manual SGD   (if torch imports)
  torch-compile  torch.compile of the same step function                         (if it works)

Every implementation starts from tdc's initialised params and sees the same batch. Before timing,
one step of each is checked against tdc's reference backend (loss, and the param update).

Run (OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, when set, can slow BLAS down a lot):
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/train_step.py

With --isolate each implementation runs in a process of its own, one after another, and one
table gathers their times: no thread pool of one framework (OpenMP's spin, numba's workers,
tdc's pool) is then awake beside another's, at the cost of the rounds no longer interleaving
implementations (background load that comes and goes falls on whichever runs then).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# ---- options, then thread counts: the BLAS env vars must be set before numpy is imported -------
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--reps", type=int, default=50, help="timed steps per implementation (default 50)")
parser.add_argument("--warmup", type=int, default=3,
                    help="untimed steps per implementation after the correctness check (default 3)")
parser.add_argument("--rounds", type=int, default=5,
                    help="split the timed steps into this many blocks per implementation, taken in turn (default 5)")
parser.add_argument("--only", choices=("mlp", "lenet"), help="run one workload only")
parser.add_argument("--threads", type=int, default=2, help="threads for numba, BLAS and torch (default 2)")
parser.add_argument("--reference", action="store_true", help="also time tdc's reference backend (slow)")
parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even if it is installed")
parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (its first call compiles for a while)")
parser.add_argument("--seed", type=int, default=0, help="seed for the params and the data (default 0)")
parser.add_argument("--isolate", action="store_true",
                    help="run each implementation in a process of its own, one after another, into one table")
parser.add_argument("--impl", help=argparse.SUPPRESS)   # a child of --isolate: time this implementation, print JSON
parser.add_argument("--omp-passive", action="store_true",
                    help="set OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep instead of spinning), "
                         "to see how much thread-pool contention costs; affects numba's and torch's OpenMP")
args = parser.parse_args()
if args.reps < 1 or args.warmup < 0 or args.threads < 1 or args.rounds < 1:
    parser.error("--reps, --rounds and --threads must be >= 1, --warmup >= 0")

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ[var] = str(args.threads)
if args.omp_passive:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import numpy as np  # noqa: E402

try:
    from threadpoolctl import threadpool_info, threadpool_limits
    _blas_limits = threadpool_limits(limits=args.threads)   # kept alive for the whole run
except ImportError:
    threadpool_info = threadpool_limits = None

import numba  # noqa: E402

_numba_threads = min(args.threads, numba.config.NUMBA_NUM_THREADS)
numba.set_num_threads(_numba_threads)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
sys.path.insert(0, os.path.join(HERE, ".."))

import tdc  # noqa: E402
from mlp import mlp  # noqa: E402
from lenet import lenet  # noqa: E402

LR = 0.01
LOSS_RTOL = 1e-4      # step-1 loss vs tdc's reference backend
UPDATE_RTOL = 1e-3    # ||update - reference update|| / ||reference update||, over all params

WORKLOADS = {
    "mlp": dict(model=mlp, batch=128, x_shape=(128, 784), title="MLP 784-300-100-10, batch 128"),
    "lenet": dict(model=lenet, batch=64, x_shape=(64, 1, 28, 28), title="LeNet-5 1x28x28, batch 64"),
}


# ===================================================================================================
# Handwritten numpy training steps (the baseline). float32 throughout, params updated in place.
# ===================================================================================================

def _sce_forward_backward(z: np.ndarray, y: np.ndarray):
    """Mean softmax cross-entropy of logits z [B, C] and its gradient w.r.t. z."""
    b = z.shape[0]
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    rows = np.arange(b)
    loss = np.log(s[:, 0]).sum(dtype=np.float64) - z[rows, y].sum(dtype=np.float64)
    dz = e
    dz /= s
    dz[rows, y] -= 1.0
    dz *= np.float32(1.0 / b)
    return np.float32(loss / b), dz


def _dense_backward(dz, a_in, w, b, lr, need_input_grad=True):
    """Gradients of z = a_in @ w.T + b; SGD-updates w and b in place; returns d a_in."""
    da = dz @ w if need_input_grad else None      # uses the pre-update w
    gw = dz.T @ a_in
    gb = dz.sum(axis=0)
    gw *= lr
    w -= gw
    gb *= lr
    b -= gb
    return da


class NumpyMLP:
    def __init__(self, params: dict[str, np.ndarray]):
        self.p = {k: np.array(v, np.float32, copy=True) for k, v in params.items()}

    def step(self, x, y, lr):
        p = self.p
        h1 = x @ p["fc1.weight"].T
        h1 += p["fc1.bias"]
        np.maximum(h1, 0, out=h1)                 # a1 (h1 > 0 is the ReLU mask)
        h2 = h1 @ p["fc2.weight"].T
        h2 += p["fc2.bias"]
        np.maximum(h2, 0, out=h2)
        z = h2 @ p["fc3.weight"].T
        z += p["fc3.bias"]
        loss, dz = _sce_forward_backward(z, y)
        d2 = _dense_backward(dz, h2, p["fc3.weight"], p["fc3.bias"], lr)
        d2 *= h2 > 0
        d1 = _dense_backward(d2, h1, p["fc2.weight"], p["fc2.bias"], lr)
        d1 *= h1 > 0
        _dense_backward(d1, x, p["fc1.weight"], p["fc1.bias"], lr, need_input_grad=False)
        return loss


# LeNet activations are kept channel-major, [C, B, H, W] ("CNHW"): a conv is then one GEMM
# W[O, C*k*k] @ cols[C*k*k, B*OH*OW] whose result is already CNHW, and the im2col copy runs
# along whole image rows.

def _im2col(x, k, pad):
    """x [C, B, H, W] -> cols [C*k*k, B*OH*OW] (rows in (c, i, j) order, like a [O, C, k, k] weight)."""
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))   # [C, B, OH, OW, k, k]
    c, b, oh, ow = win.shape[:4]
    return win.transpose(0, 4, 5, 1, 2, 3).reshape(c * k * k, b * oh * ow), (b, oh, ow)


def _col2im(dcols, x_shape, k, pad, out_hw):
    """The adjoint of _im2col: dcols [C*k*k, B*OH*OW] -> dx [C, B, H, W]."""
    c, b, h, w = x_shape
    oh, ow = out_hw
    d = dcols.reshape(c, k, k, b, oh, ow)
    dxp = np.zeros((c, b, h + 2 * pad, w + 2 * pad), dcols.dtype)
    for i in range(k):
        for j in range(k):
            dxp[:, :, i:i + oh, j:j + ow] += d[:, i, j]
    return dxp[:, :, pad:pad + h, pad:pad + w] if pad else dxp


def _maxpool2(x):
    """2x2 stride-2 max pooling of [..., H, W]: the output and the argmax masks of the four window
    positions (row-major order; on ties the first maximum wins, as in tdc)."""
    taps = (x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2])
    out = np.maximum(np.maximum(taps[0], taps[1]), np.maximum(taps[2], taps[3]))
    masks, taken = [], None
    for t in taps[:3]:
        m = t == out
        if taken is None:
            taken = m.copy()
        else:
            m &= ~taken
            taken |= m
        masks.append(m)
    masks.append(~taken)
    return out, masks


def _maxpool2_backward(g, masks, x_shape):
    """Route g [..., OH, OW] to each window's argmax: dx at each window position = mask * g."""
    dx = np.empty(x_shape, g.dtype)
    for (i, j), m in zip(((0, 0), (0, 1), (1, 0), (1, 1)), masks):
        np.multiply(g, m, out=dx[..., i::2, j::2])
    return dx


class NumpyLeNet:
    """LeNet-5 with CNHW activations inside; the params keep tdc's layout ([O, C, k, k] and [out, in])."""

    def __init__(self, params: dict[str, np.ndarray]):
        self.p = {k: np.array(v, np.float32, copy=True) for k, v in params.items()}

    def _conv_relu(self, x, name, k, pad):
        w = self.p[name + ".weight"]
        cols, (b, oh, ow) = _im2col(x, k, pad)
        y = w.reshape(w.shape[0], -1) @ cols               # [O, B*OH*OW]
        y += self.p[name + ".bias"][:, None]
        np.maximum(y, 0, out=y)
        return cols, y.reshape(w.shape[0], b, oh, ow)

    def _conv_backward(self, dy, cols, name, lr, x_shape=None, k=5, pad=0):
        """dy [O, B, OH, OW], already through the ReLU mask. SGD-updates the conv's params in
        place; returns the input gradient when x_shape is given."""
        w, bias = self.p[name + ".weight"], self.p[name + ".bias"]
        o = w.shape[0]
        dy2 = dy.reshape(o, -1)
        wm = w.reshape(o, -1)                              # a view: updating it updates w
        dx = None
        if x_shape is not None:
            dx = _col2im(wm.T @ dy2, x_shape, k, pad, dy.shape[2:])
        gw = dy2 @ cols.T
        gb = dy2.sum(axis=1)
        gw *= lr
        wm -= gw
        gb *= lr
        bias -= gb
        return dx

    def step(self, x, y, lr):
        p = self.p
        b = x.shape[0]
        x = x.reshape(1, b, 28, 28)                        # C = 1: NCHW -> CNHW is a reshape
        cols1, a1 = self._conv_relu(x, "conv1", 5, 2)      # [6, B, 28, 28]
        p1, m1 = _maxpool2(a1)                             # [6, B, 14, 14]
        cols2, a2 = self._conv_relu(p1, "conv2", 5, 0)     # [16, B, 10, 10]
        p2, m2 = _maxpool2(a2)                             # [16, B, 5, 5]
        f = p2.transpose(1, 0, 2, 3).reshape(b, 400)       # flatten in NCHW order (c, h, w)
        h1 = f @ p["fc1.weight"].T
        h1 += p["fc1.bias"]
        np.maximum(h1, 0, out=h1)
        h2 = h1 @ p["fc2.weight"].T
        h2 += p["fc2.bias"]
        np.maximum(h2, 0, out=h2)
        z = h2 @ p["fc3.weight"].T
        z += p["fc3.bias"]
        loss, dz = _sce_forward_backward(z, y)
        d2 = _dense_backward(dz, h2, p["fc3.weight"], p["fc3.bias"], lr)
        d2 *= h2 > 0
        d1 = _dense_backward(d2, h1, p["fc2.weight"], p["fc2.bias"], lr)
        d1 *= h1 > 0
        df = _dense_backward(d1, f, p["fc1.weight"], p["fc1.bias"], lr)
        dp2 = df.reshape(b, 16, 5, 5).transpose(1, 0, 2, 3)
        da2 = _maxpool2_backward(dp2, m2, a2.shape)
        da2 *= a2 > 0
        dp1 = self._conv_backward(da2, cols2, "conv2", lr, x_shape=p1.shape)
        da1 = _maxpool2_backward(dp1, m1, a1.shape)
        da1 *= a1 > 0
        self._conv_backward(da1, cols1, "conv1", lr)
        return loss


NUMPY_IMPLS = {"mlp": NumpyMLP, "lenet": NumpyLeNet}


# ===================================================================================================
# PyTorch: the same step, functional ops + torch.autograd.grad + manual SGD
# ===================================================================================================

def torch_step_fn(torch, workload: str, params: dict):
    F = torch.nn.functional
    names = list(params)
    plist = [params[n] for n in names]

    def forward(x):
        p = params
        if workload == "mlp":
            h = F.relu(F.linear(x, p["fc1.weight"], p["fc1.bias"]))
            h = F.relu(F.linear(h, p["fc2.weight"], p["fc2.bias"]))
            return F.linear(h, p["fc3.weight"], p["fc3.bias"])
        h = F.max_pool2d(F.relu(F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=2)), 2)
        h = F.max_pool2d(F.relu(F.conv2d(h, p["conv2.weight"], p["conv2.bias"])), 2)
        h = torch.flatten(h, 1)
        h = F.relu(F.linear(h, p["fc1.weight"], p["fc1.bias"]))
        h = F.relu(F.linear(h, p["fc2.weight"], p["fc2.bias"]))
        return F.linear(h, p["fc3.weight"], p["fc3.bias"])

    def step(x, y, lr: float):
        loss = F.cross_entropy(forward(x), y)
        grads = torch.autograd.grad(loss, plist)
        with torch.no_grad():
            torch._foreach_add_(plist, grads, alpha=-lr)
        return loss.detach()

    return step


class TorchImpl:
    def __init__(self, torch, workload, init, x, y, compiled: bool):
        self.torch = torch
        self.params = {k: torch.from_numpy(np.array(v, np.float32, copy=True)).requires_grad_(True)
                       for k, v in init.items()}
        fn = torch_step_fn(torch, workload, self.params)
        self.fn = torch.compile(fn) if compiled else fn
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def step(self):
        return float(self.fn(self.x, self.y, LR))

    def state(self):
        return {k: v.detach().numpy() for k, v in self.params.items()}


# ===================================================================================================
# Running, checking, timing
# ===================================================================================================

class Impl:
    """name, run() -> loss of one step, params() -> current params (name -> array), and the
    number of BLAS threads it runs with."""

    def __init__(self, name, run, params, blas_threads=None):
        self.name, self.run, self.params = name, run, params
        self.blas_threads = blas_threads or args.threads
        self.note = ""
        self.times: list[float] = []
        self.check = ""

    def enter(self):
        """Put the process's BLAS thread pools in this implementation's configuration."""
        set_blas_threads(self.blas_threads)


def blas_threads_now() -> int | None:
    """The BLAS thread count currently in force (the smallest over the loaded BLAS libraries)."""
    if threadpool_info is None:
        return None
    counts = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    return min(counts) if counts else None


OWN_BLAS_THREADS: dict[str, int | None] = {}   # implementation -> the BLAS threads it chose itself


def set_blas_threads(n: int | None):
    if threadpool_limits is not None and n is not None:
        threadpool_limits(limits=n, user_api="blas")


def flop_count(graph) -> int:
    return int(sum(n.opdef.cost([v.type for v in n.inputs], [v.type for v in n.outputs], **n.attrs)
                   for n in graph.nodes if n.opdef.cost))


def check_step(impl: Impl, loss, init, ref_loss, ref_after) -> bool:
    """One step from the initial params: its loss and its update against tdc's reference backend."""
    after = impl.params()
    num = den = 0.0
    for k, want in ref_after.items():
        got = np.asarray(after[k], np.float64)
        d_ref = np.asarray(want, np.float64) - init[k]
        num += float(np.sum((got - init[k] - d_ref) ** 2))
        den += float(np.sum(d_ref ** 2))
    upd_err = (num / den) ** 0.5 if den else float(num > 0)
    loss_err = abs(float(loss) - ref_loss) / abs(ref_loss)
    ok = bool(np.isfinite(loss)) and loss_err <= LOSS_RTOL and upd_err <= UPDATE_RTOL
    impl.check = f"loss {float(loss):.7f} (rel err {loss_err:.1e}), update rel err {upd_err:.1e}"
    print(f"  check {impl.name:<14} {impl.check}  {'OK' if ok else 'MISMATCH'}", flush=True)
    return ok


def time_impls(impls: list[Impl], reps: int, warmup: int, rounds: int):
    """Time `reps` steps of each implementation, in `rounds` blocks: in each round every
    implementation in turn gets its BLAS threads set, a pause (so the previous one's spinning
    thread pools go idle), one untimed step, then its share of the timed steps back to back, as
    in a training loop. The rounds spread slow phases of background load over all implementations;
    contiguous blocks keep numpy's OpenBLAS, numba's pool and torch's OpenMP pool from spinning
    against each other step by step. `warmup` untimed steps come first."""
    rounds = max(1, min(rounds, reps))
    share = [reps // rounds + (r < reps % rounds) for r in range(rounds)]
    for r, n in enumerate(share):
        for im in impls:
            im.enter()
            time.sleep(0.1)
            for _ in range(warmup if r == 0 else 1):
                im.run()
            for _ in range(n):
                t0 = time.perf_counter()
                im.run()
                im.times.append(time.perf_counter() - t0)


def stats(times):
    t = np.asarray(times) * 1e3
    q1, med, q3 = np.percentile(t, [25, 50, 75])
    return med, q3 - q1


def run_workload(name: str, torch, torch_note: str) -> list[Impl]:
    w = WORKLOADS[name]
    print(f"\n=== {w['title']} ===", flush=True)
    t0 = time.perf_counter()
    graph = tdc.train_step(w["model"], loss="softmax_cross_entropy", optimizer=tdc.Optimizer("sgd", lr=LR),
                           batch=w["batch"])
    flops = flop_count(graph)
    rng = np.random.default_rng(args.seed)
    x = rng.random(w["x_shape"], dtype=np.float32)            # pixel-like data in [0, 1)
    y = rng.integers(0, 10, w["batch"]).astype(np.int64)
    lr32 = np.float32(LR)

    # tdc reference: the oracle (and the source of the initial params)
    ref = tdc.compile(graph, backend="reference", seed=args.seed)
    param_names = [a.name for a in graph.args if a.kind == "param"]
    init = {k: np.array(ref.state[k], np.float64) for k in param_names}
    init32 = {k: np.array(ref.state[k], np.float32, copy=True) for k in param_names}
    ref_loss = float(ref(x=x, y=y, lr=lr32)["loss"])
    ref_after = {k: np.array(ref.state[k], copy=True) for k in param_names}
    print(f"  tdc reference: step-1 loss {ref_loss:.7f}; {flops / 1e6:.1f} MFLOP/step (op registry costs)")

    impls: list[Impl] = []
    failed: list[tuple[str, str]] = []

    def add(name, make, own_blas_threads=False):
        """make() -> (run, params); runs one checked step from the initial params. With
        own_blas_threads, the implementation keeps the BLAS thread count it set up itself
        (tdc's numba backend runs BLAS single-threaded and parallelises with numba's threads)."""
        if args.impl and name != args.impl:
            return
        try:
            t = time.perf_counter()
            set_blas_threads(OWN_BLAS_THREADS.get(name, args.threads))
            run, params = make()
            blas = None
            if own_blas_threads:   # what the first make() set up, kept for later workloads
                blas = OWN_BLAS_THREADS.setdefault(name, blas_threads_now())
            im = Impl(name, run, params, blas)
            im.enter()
            loss = run()                                    # also the JIT / compile call
            im.note = f"first step {time.perf_counter() - t:.1f}s"
            if im.blas_threads != args.threads:
                im.note += f"; BLAS on {im.blas_threads} thread(s)"
        except Exception as e:                               # report, keep benchmarking the others
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"  {name}: FAILED - {msg}", flush=True)
            failed.append((name, msg))
            return
        if check_step(im, loss, init, ref_loss, ref_after):
            impls.append(im)
        else:
            failed.append((name, "wrong result: " + im.check))

    def make_tdc(backend):
        def make():
            exe = tdc.compile(graph, backend=backend, params={k: v.copy() for k, v in init32.items()},
                              seed=args.seed)
            return (lambda: float(exe(x=x, y=y, lr=lr32)["loss"])), (lambda: exe.state)
        return make

    def make_numpy():
        net = NUMPY_IMPLS[name](init32)
        return (lambda: float(net.step(x, y, lr32))), (lambda: net.p)

    def make_torch(compiled):
        def make():
            t = TorchImpl(torch, name, init32, x, y, compiled)
            return t.step, t.state
        return make

    add("tdc-llvm", make_tdc("llvm"), own_blas_threads=True)
    add("tdc-numba", make_tdc("numba"), own_blas_threads=True)
    if args.reference:
        add("tdc-reference", make_tdc("reference"))
    add("numpy", make_numpy)
    if torch is not None:
        add("torch-eager", make_torch(False))
        if not args.no_compile:
            add("torch-compile", make_torch(True))
    elif torch_note:
        print(f"  torch: skipped ({torch_note})")

    time_impls(impls, args.reps, args.warmup, args.rounds)
    if args.impl:
        print("RESULT " + json.dumps({"impls": [{"name": im.name, "times": im.times, "note": im.note} for im in impls],
                                      "failed": failed}))
        return impls
    print_table(w["title"], impls, flops, failed)
    print(f"  ({time.perf_counter() - t0:.0f}s for this workload)", flush=True)
    return impls


def run_isolated(name: str, torch, torch_note: str):
    """Each implementation of workload `name` timed by a child process of this script."""
    w = WORKLOADS[name]
    print(f"\n=== {w['title']} (each implementation in its own process) ===", flush=True)
    t0 = time.perf_counter()
    names = ["tdc-llvm", "tdc-numba"] + ["tdc-reference"] * args.reference + ["numpy"]
    if torch is not None:
        names += ["torch-eager"] + ["torch-compile"] * (not args.no_compile)
    elif torch_note:
        print(f"  torch: skipped ({torch_note})")
    passed = [a for a in sys.argv[1:] if a != "--isolate"]   # the child's --only, given last, wins
    impls, failed = [], []
    for impl in names:
        p = subprocess.run([sys.executable, __file__, *passed, "--only", name, "--impl", impl],
                           capture_output=True, text=True)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            failed.append((impl, f"its process failed ({p.returncode}): {(p.stderr.strip().splitlines() or [''])[-1]}"))
            continue
        for ln in p.stdout.splitlines():
            if ln.startswith("  check") or "FAILED" in ln:
                print(ln, flush=True)
        got = json.loads(lines[-1][len("RESULT "):])
        for r in got["impls"]:
            im = Impl(r["name"], None, None)
            im.times, im.note = r["times"], r["note"]
            impls.append(im)
        failed += [tuple(f) for f in got["failed"]]
    graph = tdc.train_step(w["model"], loss="softmax_cross_entropy", optimizer=tdc.Optimizer("sgd", lr=LR),
                           batch=w["batch"])
    print_table(w["title"], impls, flop_count(graph), failed)
    print(f"  ({time.perf_counter() - t0:.0f}s for this workload)", flush=True)


def print_table(title, impls, flops, failed):
    base = {im.name: stats(im.times)[0] for im in impls}
    np_ms, pt_ms = base.get("numpy"), base.get("torch-eager")
    print(f"\n  {title}: {flops / 1e6:.1f} MFLOP/step, {args.reps} timed steps each, {args.threads} thread(s)")
    hdr = (f"  {'implementation':<15}{'ms/step':>9}{'IQR ms':>9}{'steps/s':>9}{'GFLOP/s':>9}"
           f"{'vs numpy':>10}{'vs torch':>10}   notes")
    print(hdr)
    print("  " + "-" * (len(hdr) - 2))
    for im in impls:
        med, iqr = stats(im.times)
        r_np = f"{np_ms / med:.2f}x" if np_ms else "-"
        r_pt = f"{pt_ms / med:.2f}x" if pt_ms else "-"
        print(f"  {im.name:<15}{med:>9.2f}{iqr:>9.2f}{1e3 / med:>9.1f}{flops / (med * 1e6):>9.2f}"
              f"{r_np:>10}{r_pt:>10}   {im.note}")
    for name, msg in failed:
        print(f"  {name:<15}{'-':>9}{'-':>9}{'-':>9}{'-':>9}{'-':>10}{'-':>10}   not timed: {msg}")
    print("  (ratios are baseline time / this time: > 1 means faster than the baseline)")


def environment_report(torch, torch_note):
    print(f"tdc train-step benchmark: {args.threads} threads, {args.reps} reps in {args.rounds} rounds, "
          f"{args.warmup} warm-up, "
          f"seed {args.seed}, cpu count {os.cpu_count()}")
    print(f"  numpy {np.__version__}, numba {numba.__version__} ({_numba_threads} threads, "
          f"layer {numba.config.THREADING_LAYER})", end="")
    print(f", torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch is not None
          else f", torch: {torch_note}")
    slow = [v for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if v in os.environ]
    if slow:
        print(f"  WARNING: {', '.join(slow)} set; they can slow BLAS. Run with "
              f"env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE")
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        print(f"  OpenMP wait: OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')}, "
              f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '-')}")
    if _numba_threads != args.threads:
        print(f"  WARNING: numba is limited to {numba.config.NUMBA_NUM_THREADS} threads (NUMBA_NUM_THREADS)")
    try:
        load = os.getloadavg()[0]
        if load > (os.cpu_count() or 1):
            print(f"  WARNING: load average {load:.1f} on {os.cpu_count()} CPUs: the machine is busy, "
                  f"timings will be noisy")
    except OSError:
        pass


def thread_pools_report():
    if threadpool_info is None:
        print("thread pools: threadpoolctl not installed; BLAS threads set by OMP/OPENBLAS_NUM_THREADS")
        return
    print("thread pools loaded (BLAS threads as last set):")
    for p in threadpool_info():
        print(f"  {p['user_api']}: {p['internal_api']} {p.get('version') or ''} {p.get('architecture') or ''} "
              f"({os.path.basename(p['filepath'])}), {p['num_threads']} threads")


def main():
    torch, torch_note = None, ""
    if args.no_torch:
        torch_note = "disabled by --no-torch"
    elif args.impl and not args.impl.startswith("torch"):
        torch_note = "not imported in this process"
    else:
        try:
            import torch
            torch.set_num_threads(args.threads)
        except Exception as e:
            torch, torch_note = None, f"not available ({type(e).__name__}: {e})"
    if not args.impl:
        environment_report(torch, torch_note)
    t0 = time.perf_counter()
    for name in ([args.only] if args.only else list(WORKLOADS)):
        (run_isolated if args.isolate else run_workload)(name, torch, torch_note)
    if args.impl:
        return
    print()
    thread_pools_report()
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
