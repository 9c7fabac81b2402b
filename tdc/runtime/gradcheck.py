"""Gradient checking: autodiff against central finite differences, in float64."""
from __future__ import annotations

import numpy as np

from ..backends.reference import run_placed as run
from ..errors import TdcError
from ..ir.graph import Graph
from ..passes.autodiff import GRAD_PREFIX, autodiff, pick_loss
from ..passes.retype import retype


def gradcheck(graph: Graph, values: dict[str, np.ndarray], loss: str | None = None, wrt: list[str] | None = None,
              eps: float = 1e-6, max_entries: int = 30, seed: int = 0) -> dict[str, float]:
    """Relative error ||autodiff - finite difference|| / max(||autodiff||, ||fd||) per differentiated arg.

    `values` gives every argument (inputs, params, state) by name. The graph is converted
    to float64 first. At most `max_entries` randomly chosen entries of each arg are checked.
    A graph placed on ranks runs on the reference's simulated ranks.
    """
    g64 = retype(graph, "f32", "f64")
    loss = pick_loss(g64, loss)
    dg = autodiff(g64, loss, wrt)
    names = [n[len(GRAD_PREFIX):] for n, _ in dg.outputs if n.startswith(GRAD_PREFIX)]
    vals = {}
    for a in g64.args:
        if a.name not in values:
            raise TdcError(f"gradcheck needs a value for {a.kind} {a.name}")
        x = np.asarray(values[a.name])
        vals[a.name] = x.astype(np.float64) if x.dtype == np.float32 else x.copy()

    def feed(graph, v):
        return {a: v[a.name] for a in graph.args}

    env = run(dg, feed(dg, vals))
    out = dict((n, env[v]) for n, v in dg.outputs)
    loss_v = g64.output(loss)

    def loss_at(v):
        return float(run(g64, feed(g64, v))[loss_v])

    rng = np.random.default_rng(seed)
    errors = {}
    for name in names:
        analytic = out[GRAD_PREFIX + name].reshape(-1)
        x = vals[name]
        n = x.size
        idx = np.arange(n) if n <= max_entries else rng.choice(n, max_entries, replace=False)
        numeric = np.empty(len(idx))
        flat = x.reshape(-1)
        for j, i in enumerate(idx):
            orig = flat[i]
            flat[i] = orig + eps
            up = loss_at(vals)
            flat[i] = orig - eps
            down = loss_at(vals)
            flat[i] = orig
            numeric[j] = (up - down) / (2 * eps)
        a = analytic[idx]
        scale = max(np.linalg.norm(a), np.linalg.norm(numeric), 1e-12)
        errors[name] = float(np.linalg.norm(a - numeric) / scale)
    return errors
