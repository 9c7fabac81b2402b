"""Communication between ranks. In the reference interpreter ranks are simulated:
a collective's reference function sees every participating rank's inputs at once
(`ref(per_rank_inputs, ranks=..., **attrs)` -> one output per rank)."""
from __future__ import annotations

import numpy as np

from ..errors import ShapeError
from ..ir.types import TensorType
from . import functional as F
from ..ir.opdef import Attr, defop
from .common import fail, numel

_REDUCERS = {"sum": np.add, "max": np.maximum, "min": np.minimum}


def _allreduce_ref(per_rank, ranks, op, algo="auto", world=0):
    xs = [ins[0] for ins in per_rank]
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

defop("allreduce", "comm", attrs=_ALLREDUCE_ATTRS,
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


defop("broadcast", "comm", attrs={"root": Attr("int", 0)}, infer=_same, ref=_broadcast_ref,
      grad=lambda ctx, x: [F.apply("reduce_to", ctx.g, root=ctx.attrs["root"])], collective=True,
      cost=_comm_cost, doc="every rank gets root's value")
defop("reduce_to", "comm", attrs={"root": Attr("int", 0)}, infer=_same, ref=_reduce_to_ref,
      grad=lambda ctx, x: [F.broadcast(ctx.g, ctx.attrs["root"])], collective=True,
      cost=_comm_cost, doc="root gets the sum over ranks; the others get zeros")


def _send_infer(ins, dst, tag):
    return []


defop("send", "comm", attrs={"dst": Attr("int"), "tag": Attr("int", 0)}, infer=_send_infer,
      ref=lambda x, dst, tag: (), side_effect=True, cost=_comm_cost,
      doc="send x to rank dst (no outputs); matched by a recv with the same src and tag")


def _recv_infer(ins, src, tag, shape, dtype):
    return TensorType(dtype, shape)


defop("recv", "comm", arity=(0, 0),
      attrs={"src": Attr("int"), "tag": Attr("int", 0), "shape": Attr("ints"), "dtype": Attr("dtype", "f32")},
      infer=_recv_infer, ref=lambda **a: fail("recv runs only inside the rank interpreter"),
      cost=lambda ins, outs, **a: numel(outs[0].shape), doc="receive a tensor sent by rank src")
