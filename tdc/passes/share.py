"""Weight sharing (Deep Compression, Han et al. 2016, part 2): weights read from a few centroids.

The `share` pass rewrites each shared weight W of a (forward) graph into

    W = gather(concat(W.centroids, [0]), W.codes)

where W.centroids [k] is a param and W.codes (W's shape, i32) a const: the cluster of each weight,
-1 where pruned, which gather reads as the appended zero (negative indices count from the end).
Autodiff then gives the centroids gather's adjoint: each centroid's gradient is the sum of the
gradients of the weights in its cluster, which is the paper's centroid fine-tuning; pruned
weights stay exactly zero, and the codes never change.
"""
from __future__ import annotations

import numpy as np

from ..errors import TdcError
from ..ir.graph import Graph
from ..ir.types import TensorType
from ..ops import functional as F
from ..ops.tensor import Builder

CENTROIDS = ".centroids"
CODES = ".codes"


def share_weights(graph: Graph, ks: dict[str, int]) -> Graph:
    """`graph` with each param named in `ks` read from that many centroids (codes and centroids
    are the new args' values: see shared_values)."""
    g, _ = graph.map_copy()
    new_of = {}
    with Builder(g) as b:
        for name, k in ks.items():
            w = g.arg(name)
            if w.kind != "param" or w.type.dtype != "f32":
                raise TdcError(f"{name} is a {w.type} {w.kind}: weight sharing is for f32 params")
            if k < 1:
                raise TdcError(f"{name}: weight sharing needs k >= 1 centroids, got {k}")
            c = b.arg(name + CENTROIDS, TensorType("f32", (k,)), "param", init="zeros")
            codes = b.arg(name + CODES, TensorType("i32", w.type.shape), "const", init="zeros")
            table = F.concat([c, b.constant(np.zeros(1, np.float32))])
            new_of[w] = F.gather(table, codes).value
    for n in g.nodes:
        n.inputs = [new_of.get(v, v) for v in n.inputs]
    g.outputs = [(o, new_of.get(v, v)) for o, v in g.outputs]
    g.args = [a for a in g.args if a not in new_of]
    g.toposort()
    return g


def shared_values(codes: np.ndarray, centroids: np.ndarray, name: str) -> dict[str, np.ndarray]:
    """The values of `name`'s centroids and codes args."""
    return {name + CENTROIDS: np.asarray(centroids, np.float32), name + CODES: np.asarray(codes, np.int32)}
