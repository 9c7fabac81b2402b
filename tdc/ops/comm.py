"""Communication between ranks. In the reference interpreter ranks are simulated:
a collective's reference function sees every participating rank's inputs at once
(`ref(per_rank_inputs, ranks=..., **attrs)` -> one output per rank)."""
from __future__ import annotations

import numpy as np

from ..errors import ShapeError
from ..ir.types import TensorType
from . import functional as F
from ..ir.opdef import Attr, defop
from .common import fail, norm_axis, numel
from .compress import round_trip

_REDUCERS = {"sum": np.add, "max": np.maximum, "min": np.minimum}


def _compressed(per_rank, ranks, compress):
    """Each rank's input as it arrives compressed (runtime: a seed per rank; no error feedback)."""
    if compress == "none":
        return per_rank
    return [[round_trip(compress, ins[0], r)] + ins[1:] if ins[0] is not None else ins
            for r, ins in zip(ranks, per_rank)]


def _allreduce_ref(per_rank, ranks, op, algo="auto", world=0, compress="none"):
    xs = [ins[0] for ins in _compressed(per_rank, ranks, compress)]
    if op == "mean":
        total = np.sum(xs, axis=0, dtype=xs[0].dtype) / len(xs)
    else:
        total = _REDUCERS[op].reduce(np.stack(xs), axis=0)
    return [total.astype(xs[0].dtype) for _ in ranks]


def _allreduce_grad(ctx, x):
    op = ctx.attrs["op"]
    if op not in ("sum", "mean"):
        raise ShapeError(f"allreduce with op={op!r} has no gradient rule (only sum and mean do)")
    return [F.allreduce(ctx.g, op)]


def _same(ins, **a):
    return ins[0]


def _comm_cost(ins, outs, **a):
    return numel(ins[0].shape) if ins else 0


ALLREDUCE_ALGOS = ("auto", "mpi", "ring", "doubling", "tree")
_ALLREDUCE_ATTRS = {
    "op": Attr("str", "sum", choices=("sum", "mean", "max", "min")),
    "algo": Attr("str", "auto", choices=ALLREDUCE_ALGOS,
                 doc="mpi: the MPI library's MPI_Allreduce; ring: reduce-scatter then allgather; doubling: "
                     "recursive doubling; tree: binomial reduce then broadcast; auto: not chosen yet"),
    "world": Attr("int", 0, doc="the number of ranks the step was compiled for (0: any)"),
}
_COMPRESS_ATTR = Attr("str", "none", doc="how each rank's value is compressed on the wire (ops/compress.py); "
                                          "a compressed allreduce is an allgather of the messages")

defop("allreduce", "comm", attrs={**_ALLREDUCE_ATTRS, "compress": _COMPRESS_ATTR},
      infer=_same, ref=_allreduce_ref, grad=_allreduce_grad, collective=True, cost=_comm_cost,
      doc="every rank gets the reduction over all ranks")


# A split allreduce, so that other work runs while the message is on the wire: allreduce_start
# hands its input to the communicator and returns the buffer in flight (its value is not defined
# until the wait); allreduce_wait(h) blocks until the reduction into h is complete and returns
# it. Every use of the result goes through the wait, so the buffer lives from start to wait.
def _start_grad(ctx, x):
    return [F.apply("allreduce", ctx.g, **ctx.attrs)]


defop("allreduce_start", "comm", attrs=_ALLREDUCE_ATTRS, infer=_same, ref=_allreduce_ref, grad=_start_grad,
      collective=True, cost=_comm_cost,
      doc="start an allreduce of x; its result is read through allreduce_wait")
defop("allreduce_wait", "comm", infer=_same, ref=lambda h: h.copy(), grad=lambda ctx, h: [ctx.g],
      cost=_comm_cost, doc="wait for the allreduce started by allreduce_start(h) and return the reduction "
                           "(h itself when nothing is in flight)")


# ---- a parameter server's push and pull (passes/parameter_server.py) --------------------------------
# Placed on the server and its workers. push: the workers' values reach the server, which gets
# their mean (in synchronous mode; the runtime's asynchronous modes apply one worker's at a
# time); a worker's result is its own value. pull: the server's value reaches every worker.

def _push_ref(per_rank, ranks, server, workers=1, world=0, compress="none"):
    workers = [ins[0] for r, ins in zip(ranks, _compressed(per_rank, ranks, compress)) if r != server]
    if not workers or server not in ranks:
        fail(f"push to server {server}: the participants {ranks} need the server and at least one worker")
    mean = (np.sum(workers, axis=0, dtype=np.float64) / len(workers)).astype(workers[0].dtype)
    return [mean if r == server else ins[0] for r, ins in zip(ranks, per_rank)]


def _pull_ref(per_rank, ranks, server, workers=1, world=0):
    if server not in ranks:
        fail(f"pull from server {server}: it is not among the participants {ranks}")
    x = per_rank[ranks.index(server)][0]
    return [x.copy() for _ in ranks]


_PS_ATTRS = {"server": Attr("int", doc="the server rank"),
             "workers": Attr("int", 1, doc="how many workers take part"),
             "world": Attr("int", 0, doc="the number of ranks the step was compiled for")}


def _ps_grad(to: str, scale):
    """push (a mean over workers) and pull (a copy to every worker) are each other's adjoints, up to
    the number of workers: d mean / d x_w = 1 / W; the copies' gradients sum over the W workers."""
    def grad(ctx, x):
        a = {k: ctx.attrs[k] for k in _PS_ATTRS}
        return [F.apply(to, ctx.g, **a) * scale(a["workers"])]
    return grad


defop("push", "comm", attrs={**_PS_ATTRS, "compress": _COMPRESS_ATTR},
      infer=_same, ref=_push_ref, collective=True, cost=_comm_cost, grad=_ps_grad("pull", lambda w: 1.0 / w),
      doc="workers send x to the server, which gets their mean (a parameter server's gradient push)")
defop("pull", "comm", attrs=_PS_ATTRS, infer=_same, ref=_pull_ref, collective=True, cost=_comm_cost,
      grad=_ps_grad("push", lambda w: float(w)),
      doc="every worker gets the server's x (a parameter server's param pull)")


def _broadcast_ref(per_rank, ranks, root):
    if root not in ranks:
        fail(f"broadcast root {root} is not among the ranks {ranks}")
    x = per_rank[ranks.index(root)][0]
    return [x.copy() for _ in ranks]


def _reduce_to_ref(per_rank, ranks, root):
    if root not in ranks:
        fail(f"reduce_to root {root} is not among the ranks {ranks}")
    total = np.sum([ins[0] for ins in per_rank], axis=0, dtype=per_rank[0][0].dtype)
    return [total if r == root else np.zeros_like(total) for r in ranks]


defop("broadcast", "comm", storage=True, attrs={"root": Attr("int", 0)}, infer=_same, ref=_broadcast_ref,
      grad=lambda ctx, x: [F.apply("reduce_to", ctx.g, root=ctx.attrs["root"])], collective=True,
      cost=_comm_cost, doc="every rank gets root's value")
defop("reduce_to", "comm", attrs={"root": Attr("int", 0)}, infer=_same, ref=_reduce_to_ref,
      grad=lambda ctx, x: [F.broadcast(ctx.g, ctx.attrs["root"])], collective=True,
      cost=_comm_cost, doc="root gets the sum over ranks; the others get zeros")


def _send_infer(ins, dst, tag):
    return []


defop("send", "comm", storage=True, attrs={"dst": Attr("int"), "tag": Attr("int", 0)}, infer=_send_infer,
      ref=lambda x, dst, tag: (), side_effect=True, cost=_comm_cost,
      doc="send x to rank dst (no outputs); matched by a recv with the same src and tag")


def _recv_infer(ins, src, tag, shape, dtype):
    return TensorType(dtype, shape)


defop("recv", "comm", storage=True, arity=(0, 0),
      attrs={"src": Attr("int"), "tag": Attr("int", 0), "shape": Attr("ints"), "dtype": Attr("dtype", "f32")},
      infer=_recv_infer, ref=lambda **a: fail("recv runs only inside the rank interpreter"),
      cost=lambda ins, outs, **a: numel(outs[0].shape), doc="receive a tensor sent by rank src")


# ---- a partitioned step: values that live on different ranks (passes/partition.py) -------------------
# In a partitioned graph every node is placed on the ranks that run it and a value lives on the
# ranks of its producer. These three ops are the only ones whose inputs live elsewhere; each is
# one node of the global graph, so autodiff differentiates through it like any op, and
# lower/ranks.py turns it into each rank's messages (send/recv, allreduce, allgather).
#   transfer(x) {src, dst}           placed on {src, dst}: x moves from src to dst
#   concat_ranks(x_0, ..., x_n-1)    placed on n ranks, x_i held by the i-th of them (in rank
#                                    order): every one gets the concatenation along `axis`
#   sum_ranks(x_0, ..., x_n-1)       the same placement: every one gets the sum
# A value held by several ranks is one value (each holds the same copy), so the gradient of a
# concatenation is each piece's slice and the gradient of a sum is the cotangent itself.

def _transfer_ref(per_rank, ranks, src, dst):
    if sorted(ranks) != sorted({src, dst}) or src == dst:
        fail(f"transfer from rank {src} to rank {dst} must be placed on exactly those two ranks, not {ranks}")
    x = per_rank[ranks.index(src)][0]
    if x is None:
        fail(f"transfer from rank {src} to rank {dst}: rank {src} does not hold the value")
    return [np.array(x) for _ in ranks]


defop("transfer", "comm", storage=True, attrs={"src": Attr("int"), "dst": Attr("int")}, infer=_same, ref=_transfer_ref,
      grad=lambda ctx, x: [F.apply("transfer", ctx.g, src=ctx.attrs["dst"], dst=ctx.attrs["src"])],
      collective=True, cost=_comm_cost,
      doc="x moves from rank src to rank dst (placed on both): a send and a recv in the ranks' programs")


def _pieces_of(per_rank, ranks, op):
    n = len(per_rank[0])
    if n != len(ranks):
        fail(f"{op} of {n} pieces is placed on {len(ranks)} ranks ({ranks}): one piece per rank")
    xs = [per_rank[i][i] for i in range(n)]
    if any(x is None for x in xs):
        i = next(i for i, x in enumerate(xs) if x is None)
        fail(f"{op}: piece {i} is not held by rank {ranks[i]}, the {i}-th rank it is placed on")
    return xs


def _concat_ranks_infer(ins, axis):
    if len(ins) < 2:
        fail("concat_ranks takes a piece from each of at least two ranks")
    first = ins[0]
    ax = norm_axis(axis, first.rank)
    for t in ins[1:]:
        if t.dtype != first.dtype or t.rank != first.rank or \
                any(a != b for k, (a, b) in enumerate(zip(t.shape, first.shape)) if k != ax):
            fail(f"the pieces must agree except along axis {axis}")
    shape = list(first.shape)
    shape[ax] = sum(t.shape[ax] for t in ins)
    return TensorType(first.dtype, tuple(shape))


def _concat_ranks_grad(ctx, *xs):
    ax = norm_axis(ctx.attrs["axis"], xs[0].ndim)
    out, off = [], 0
    for x in xs:
        lo, hi = [0] * x.ndim, list(ctx.g.shape)
        lo[ax], hi[ax] = off, off + x.shape[ax]
        out.append(F.slice(ctx.g, lo, hi))
        off += x.shape[ax]
    return out


defop("concat_ranks", "comm", storage=True, arity=(2, None), attrs={"axis": Attr("int", 0)}, infer=_concat_ranks_infer,
      ref=lambda per_rank, ranks, axis: [np.concatenate(_pieces_of(per_rank, ranks, "concat_ranks"), axis)
                                         for _ in ranks],
      grad=_concat_ranks_grad, collective=True, cost=lambda ins, outs, **a: numel(outs[0].shape),
      doc="the i-th rank it is placed on holds piece x_i; all of them get the concatenation (an allgather)")


def _sum_ranks_infer(ins):
    if len(ins) < 2 or any(t != ins[0] for t in ins):
        fail("sum_ranks takes one value of the same type from each of at least two ranks")
    return ins[0]


def _sum_ranks_ref(per_rank, ranks):
    xs = _pieces_of(per_rank, ranks, "sum_ranks")
    total = xs[0].copy()
    for x in xs[1:]:           # in rank order, as every runtime adds them
        total = total + x
    return [total.astype(xs[0].dtype) for _ in ranks]


defop("sum_ranks", "comm", arity=(2, None), infer=_sum_ranks_infer, ref=_sum_ranks_ref,
      grad=lambda ctx, *xs: [ctx.g for _ in xs], collective=True, cost=_comm_cost,
      doc="the i-th rank it is placed on holds x_i; all of them get the sum (an allreduce)")


# ---- allgather: a rank program's part of concat_ranks (lower/ranks.py) ----------------------------

def _allgather_infer(ins, axis, sizes, world):
    x = ins[0]
    ax = norm_axis(axis, x.rank)
    if len(sizes) < 1 or min(sizes) < 0:
        fail(f"sizes {list(sizes)} must give every rank's extent along axis {axis}")
    if x.shape[ax] not in sizes:
        fail(f"this rank's piece has {x.shape[ax]} along axis {axis}, which is none of the sizes {list(sizes)}")
    shape = list(x.shape)
    shape[ax] = sum(sizes)
    return TensorType(x.dtype, tuple(shape))


def _allgather_ref(per_rank, ranks, axis, sizes, world):
    xs = [ins[0] for ins in per_rank]
    return [np.concatenate(xs, axis) for _ in ranks]


defop("allgather", "comm", storage=True, attrs={"axis": Attr("int", 0), "sizes": Attr("ints"), "world": Attr("int", 0)},
      infer=_allgather_infer, ref=_allgather_ref, collective=True, cost=lambda ins, outs, **a: numel(outs[0].shape),
      doc="every rank gets the concatenation along axis of each rank's x, in rank order (sizes: each rank's extent)")
