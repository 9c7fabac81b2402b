"""Magnitude pruning (Deep Compression, Han et al. 2016, part 1): masks in the training graph.

The `prune` pass runs after the optimizer. For every prunable weight W (a param that is the
weight input of a linear, matmul or conv2d node; not biases, not normalization params) it adds
a state value `W.mask` (0 or 1 per weight, initially all ones) and rewrites the step's updates

    W <- new_W * W.mask        W.<slot> <- new_slot * W.mask   (velocity, cache, m, v)

Every optimizer's rule is elementwise in the weight, so masking the results of the step is
enough: a pruned weight and its state are zero after every step whatever the gradient was, and
momentum or Adam moments cannot bring it back (masking the gradient too would change nothing).
The graph never writes the masks; the trainer does when its schedule re-prunes (runtime/prune.py),
and they are saved in checkpoints like batchnorm's running statistics.
"""
from __future__ import annotations

from ..errors import TdcError
from ..ir.graph import Graph
from ..ops.tensor import Builder, Tensor
from .optimizer import SLOTS

MASK = ".mask"
WEIGHT_OF = {"linear": (1,), "conv2d": (1,), "matmul": (0, 1)}   # which inputs of the op are weights


def prunable(graph: Graph) -> list[str]:
    """Names of the params that are weights of linear, matmul or conv2d nodes, in signature order."""
    found = {v.name for n in graph.nodes if n.op in WEIGHT_OF
             for i in WEIGHT_OF[n.op] if i < len(n.inputs)
             for v in [n.inputs[i]] if v.is_arg and v.kind == "param" and v.type.rank >= 2}
    return [p.name for p in graph.params if p.name in found]


def add_masks(graph: Graph) -> Graph:
    g, _ = graph.map_copy()
    weights = prunable(g)
    if not weights:
        raise TdcError(f"graph {g.name} has no linear, matmul or conv2d weights to prune")
    updated = {t.name: i for i, (t, _) in enumerate(g.updates)}
    slot_names = {s for slots in SLOTS.values() for s in slots}
    with Builder(g) as b:
        for w in weights:
            if w not in updated:
                raise TdcError(f"param {w} has no update: run the optimizer before the prune pass")
            wv = g.arg(w)
            mask = b.arg(w + MASK, wv.type, "state", init="ones")
            for name in [w] + [f"{w}.{s}" for s in sorted(slot_names)]:
                if name in updated:
                    i = updated[name]
                    target, new = g.updates[i]
                    g.updates[i] = (target, (Tensor(new, b) * mask).value)
    return g
