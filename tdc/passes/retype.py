"""Change a float dtype throughout a graph (e.g. f32 -> f64 for gradient checking)."""
from __future__ import annotations

import numpy as np

from ..ir.graph import Graph
from ..ir.types import TensorType

# Attributes that name a dtype or hold a typed value.
_DTYPE_ATTRS = ("to", "dtype")


def retype(graph: Graph, src: str = "f32", dst: str = "f64") -> Graph:
    g = Graph(graph.name)
    vmap = {}
    for a in graph.args:
        t = a.type.with_dtype(dst) if a.type.dtype == src else a.type
        vmap[a] = g.add_arg(a.name, t, a.kind, a.attrs)
    for n in graph.nodes:
        attrs = dict(n.attrs)
        for k in _DTYPE_ATTRS:
            if attrs.get(k) == src:
                attrs[k] = dst
        if isinstance(attrs.get("value"), np.ndarray) and attrs["value"].dtype == TensorType(src, ()).np_dtype:
            attrs["value"] = attrs["value"].astype(TensorType(dst, ()).np_dtype)
        outs = g.emit(n.op, [vmap[v] for v in n.inputs], attrs, n.placement, n.loc,
                      names=[v.name for v in n.outputs])
        vmap.update(zip(n.outputs, outs))
    for name, v in graph.outputs:
        g.add_output(name, vmap[v])
    for t, v in graph.updates:
        g.add_update(vmap[t], vmap[v])
    return g
