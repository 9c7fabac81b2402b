"""A training step as one graph: forward, loss, backward and update.

    step = tdc.train_step(model, loss="softmax_cross_entropy", optimizer=Optimizer("adam", lr=1e-3))

The step graph takes the model's inputs plus `y` (labels, or targets for mse) and
`lr`; it returns `loss` and the model's output `out`, and updates params and state.
Each stage is a pass, so `tdc dump --after loss|autodiff|optimizer` shows it.
"""
from __future__ import annotations

from functools import partial

from ..errors import TdcError
from ..ops import functional as F
from ..frontend.model import Model
from ..ops.tensor import Builder, Tensor
from ..ir.graph import Graph
from ..ir.types import TensorType
from .autodiff import autodiff
from .data_parallel import DataParallel, data_parallel, sync_batchnorm
from .manager import Pass, PassContext, Pipeline, get_pass
from .optimizer import Optimizer, add_optimizer
from .parameter_server import ParameterServer, parameter_server

LOSSES = ("softmax_cross_entropy", "mse")


def add_loss(graph: Graph, loss: str = "softmax_cross_entropy", output: str | None = None) -> Graph:
    """Append a loss on the model's output: a `y` input (integer labels for softmax_cross_entropy,
    a target like the output for mse) and a scalar output `loss`."""
    if loss not in LOSSES:
        raise TdcError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
    g, _ = graph.map_copy()
    if output is None:
        if len(g.outputs) != 1:
            raise TdcError(f"model {g.name} has several outputs ({', '.join(n for n, _ in g.outputs)}); "
                           "say which one the loss applies to")
        output = g.outputs[0][0]
    out = g.output(output)
    with Builder(g) as b:
        pred = Tensor(out, b)
        if loss == "softmax_cross_entropy":
            if out.type.rank != 2:
                raise TdcError(f"softmax_cross_entropy needs [batch, classes] logits; output {output} is {out.type}")
            y = b.arg("y", TensorType("i64", out.type.shape[:1]), "input")
            value = F.softmax_cross_entropy(pred, y)
        else:
            y = b.arg("y", out.type, "input")
            value = F.mse(pred, y)
        g.add_output("loss", value.value)
    return g


SIMPLIFY = ("fold", "simplify", "cse", "dce")


def training_pipeline(loss: str = "softmax_cross_entropy", optimizer: Optimizer | None = None,
                      simplify: bool = True, parallel: DataParallel | ParameterServer | None = None) -> Pipeline:
    """loss, autodiff, optimizer (and simplification). With `parallel` a DataParallel, the step of
    one of `parallel.ranks` data-parallel ranks: sync_batchnorm (if asked) before autodiff and
    data_parallel after it; a ParameterServer, the step placed on workers and servers, the
    optimizer on the servers."""
    opt = optimizer or Optimizer()
    passes = [Pass("loss", partial(add_loss, loss=loss), "append the loss and its label input")]
    if isinstance(parallel, DataParallel) and parallel.sync_bn:
        passes.append(Pass("sync_batchnorm", partial(sync_batchnorm, cfg=parallel),
                           "batchnorm with batch statistics averaged over the ranks"))
    passes.append(Pass("autodiff", partial(autodiff, loss="loss"), "reverse-mode gradients of the loss"))
    if isinstance(parallel, ParameterServer):
        passes.append(Pass("parameter_server", partial(parameter_server, cfg=parallel, opt=opt),
                           f"{parallel.workers} workers push gradients to {parallel.servers} servers, which "
                           f"run the {opt.name} updates"))
    else:
        if parallel is not None:
            passes.append(Pass("data_parallel", partial(data_parallel, cfg=parallel),
                               f"average gradients over {parallel.ranks} ranks (bucketed allreduce)"))
        passes.append(Pass("optimizer", partial(add_optimizer, opt=opt), f"{opt.name} updates of every param"))
    if simplify:
        passes += [get_pass(n) for n in SIMPLIFY]
    return Pipeline(passes)


def train_step(model: Model | Graph, loss: str = "softmax_cross_entropy", optimizer: Optimizer | None = None,
               batch: int | None = None, ctx: PassContext | None = None,
               parallel: DataParallel | ParameterServer | None = None) -> Graph:
    """One graph doing forward, backward and update for `model` (a @tdc.model or a training-mode
    Graph). With `parallel`, a model is traced at the batch of one rank (batch / ranks, or
    batch / workers with a parameter server; batch: the global batch, by default the model's)."""
    if isinstance(model, Model):
        if parallel is not None:
            batch = parallel.split_batch(batch or model.batch)
        g = model.trace(batch, training=True)
    else:
        g = model
    return training_pipeline(loss, optimizer, parallel=parallel).run(g, ctx)
