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
from .partition import Partition, place_rest, route_outputs
from .pipeline import place_stages, schedule_pipeline
from .prune import add_masks
from .quantize import insert_fake_quant
from .spatial import spatial
from .tensor_parallel import tensor_parallel

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


def partition_passes(cfg: Partition, training: bool = True) -> list[Pass]:
    """The pass that places the forward graph on cfg.ranks ranks for cfg's strategy."""
    k = cfg.ranks
    if cfg.strategy in ("model", "pipeline"):
        what = f"{k} stages chosen by the cost model" if cfg.partitioner == "auto" else f"{k} stages of equal layer counts"
        if cfg.strategy == "pipeline":
            what += f", {cfg.microbatches} micro-batches"
        return [Pass("partition", partial(place_stages, cfg=cfg, training=training), what + "; transfers at the cuts")]
    if cfg.strategy == "tensor":
        return [Pass("tensor_parallel", partial(tensor_parallel, cfg=cfg, training=training),
                     f"linear layers split over {k} ranks where the cost model says")]
    return [Pass("spatial", partial(spatial, cfg=cfg), f"feature maps split by rows over {k} ranks, halos exchanged")]


def partition_report(graph: Graph, cfg: Partition, training: bool = True) -> str:
    """How cfg partitions `graph` (the forward graph, with its loss for training) and what the
    cost model says of it: `tdc dump --partition`."""
    from .partition import plan_stages, stages_report
    from .spatial import describe_rows
    from .tensor_parallel import describe_layouts
    head = f"{cfg.strategy} on {cfg.ranks} ranks, network {cfg.net.name} (alpha {cfg.net.alpha * 1e6:g} us, " \
           f"{1 / cfg.net.beta / 1e9:g} GB/s); compute priced by " + \
           ("the backend's calibrated rates" if cfg.target is not None else "nominal rates")
    if cfg.strategy in ("model", "pipeline"):
        chosen, naive = plan_stages(graph, cfg, training)
        body = stages_report(chosen, naive)
        if cfg.strategy == "pipeline":
            k, m = cfg.ranks, cfg.microbatches
            body += (f"\n{m} micro-batches of {graph.inputs[0].type.shape[0]}, schedule {cfg.schedule}: bubble "
                     f"(K-1)/(M+K-1) = {(k - 1) / (m + k - 1):.3f} of a step for equal stages")
    elif cfg.strategy == "tensor":
        body = describe_layouts(graph, cfg, training)
    else:
        body = describe_rows(graph, cfg)
    return head + "\n" + body


def place_and_route(graph: Graph) -> Graph:
    """The nodes passes added without a placement, placed where their inputs are; the outputs
    taken to rank 0."""
    return route_outputs(place_rest(graph))


def partitioned_inference(graph: Graph, cfg: Partition) -> Graph:
    """An inference graph placed on cfg.ranks ranks (tdc compile --ranks K --parallel ...)."""
    return Pipeline(partition_passes(cfg, training=False)
                    + [Pass("place", place_and_route, "outputs to rank 0")]
                    + [get_pass(n) for n in SIMPLIFY]).run(graph)


def training_pipeline(loss: str = "softmax_cross_entropy", optimizer: Optimizer | None = None,
                      simplify: bool = True,
                      parallel: DataParallel | ParameterServer | Partition | None = None,
                      prune: bool = False, qat: bool = False) -> Pipeline:
    """loss, autodiff, optimizer (and simplification); with `prune`, then the prune pass's masks;
    with `qat`, fake_quant on the forward graph before autodiff (passes/quantize.py). With `parallel` a DataParallel, the step of
    one of `parallel.ranks` data-parallel ranks: sync_batchnorm (if asked) before autodiff and
    data_parallel after it; a ParameterServer, the step placed on workers and servers, the
    optimizer on the servers; a Partition, the forward graph placed on the ranks (model,
    pipeline, tensor or spatial) before autodiff, a pipeline's schedule after it, and the
    optimizer's nodes placed with their params."""
    opt = optimizer or Optimizer()
    if prune and parallel is not None:
        raise TdcError("pruning masks are in single-process training steps only: drop --ranks/--ps with --prune")
    if qat and parallel is not None:
        raise TdcError("quantization-aware training runs in one process: drop --ranks/--ps with --qat")
    passes = [Pass("loss", partial(add_loss, loss=loss), "append the loss and its label input")]
    if qat:
        passes.append(Pass("fake_quant", insert_fake_quant, "int8 rounding of weights (per channel) and "
                           "activations (running ranges), straight-through gradients"))
    if isinstance(parallel, Partition):
        passes += partition_passes(parallel)
        passes.append(Pass("autodiff", partial(autodiff, loss="loss"), "reverse-mode gradients of the loss, placed "
                           "with their forward nodes"))
        if parallel.strategy == "pipeline" and parallel.microbatches > 1:
            passes.append(Pass("pipeline_schedule", partial(schedule_pipeline, m=parallel.microbatches,
                                                            schedule=parallel.schedule),
                               f"each rank's order: {parallel.schedule}"))
        passes.append(Pass("optimizer", partial(add_optimizer, opt=opt), f"{opt.name} updates of every param"))
        passes.append(Pass("place", place_and_route, "the optimizer's nodes with their params; outputs to rank 0"))
        if simplify:
            passes += [get_pass(n) for n in SIMPLIFY]
        return Pipeline(passes)
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
    if prune:
        passes.append(Pass("prune", add_masks, "pruned weights and their optimizer state kept zero by masks"))
    if simplify:
        passes += [get_pass(n) for n in SIMPLIFY]
    return Pipeline(passes)


def train_step(model: Model | Graph, loss: str = "softmax_cross_entropy", optimizer: Optimizer | None = None,
               batch: int | None = None, ctx: PassContext | None = None,
               parallel: DataParallel | ParameterServer | Partition | None = None, prune: bool = False,
               qat: bool = False) -> Graph:
    """One graph doing forward, backward and update for `model` (a @tdc.model or a training-mode
    Graph); with `prune`, masked (passes/prune.py); with `qat`, fake-quantized (passes/quantize.py). With `parallel`, a model is traced at the batch of one rank (batch / ranks, or
    batch / workers with a parameter server; batch: the global batch, by default the model's)."""
    if isinstance(model, Model):
        if parallel is not None:
            batch = parallel.split_batch(batch or model.batch)
        g = model.trace(batch, training=True)
    else:
        g = model
    return training_pipeline(loss, optimizer, parallel=parallel, prune=prune, qat=qat).run(g, ctx)
