"""Spatial partitioning: each image split by rows across the ranks, halos exchanged at the borders.

The DistBelief picture of model parallelism for convolutional layers: rank r holds rows
[a_r, b_r) of every feature map of the convolutional part of the network. A window op (conv2d,
maxpool2d, avgpool2d) on rank r computes its own output rows [o_a, o_b) from input rows

    [o_a * stride - pad_top,  (o_b - 1) * stride - pad_top + dilation * (kernel - 1) + 1)

which it has in part: the rows beyond its own come from the ranks that hold them (a slice
there and a transfer: the halo, (kernel - 1) / 2 rows for a "same" convolution, more with a
stride), and only the ranks at the image's top and bottom pad. So any kernel, stride,
dilation and padding the op accepts works, with uneven row counts. Elementwise ops run on each
rank's rows; a training-mode batchnorm adds its per-rank sums over the ranks (sum_ranks) for
the batch mean and variance. Where an op is not row-local (flatten, a layer whose output has
fewer rows than there are ranks) the rows are gathered (concat_ranks) and the rest of the
step runs whole on every rank. Params stay whole on every rank; autodiff adds their per-rank
gradients with sum_ranks, and the backward pass sends each halo's gradient back.
"""
from __future__ import annotations

from ..errors import TdcError
from ..ir.graph import Graph, Node, Value, ranks_placement
from ..ops import functional as F
from ..ops.tensor import Builder, Tensor
from .partition import LITERALS, Partition, placed

WINDOW_OPS = ("conv2d", "maxpool2d", "avgpool2d")


def row_bounds(n: int, k: int) -> list[tuple[int, int]]:
    """Rows [0, n) in k contiguous parts differing by at most one row (the first ones larger)."""
    base, extra = divmod(n, k)
    out, at = [], 0
    for r in range(k):
        size = base + (r < extra)
        out.append((at, at + size))
        at += size
    return out


def _h_free(v: Value) -> bool:
    """A value that is the same for every row (a scalar, a per-channel vector [1, C, 1, 1])."""
    s = v.type.shape
    return len(s) < 2 or s[-2] == 1


def spatial(graph: Graph, cfg: Partition) -> Graph:
    """Place `graph` on cfg.ranks ranks with its NCHW feature maps split by rows (see the module's
    docstring)."""
    k = cfg.ranks
    every = ranks_placement(range(k))
    g = Graph(graph.name)
    vmap: dict[Value, Value] = {a: g.add_arg(a.name, a.type, a.kind, a.attrs) for a in graph.args}
    pieces: dict[Value, list[Value]] = {}     # a value split by rows: rank r's rows
    rows: dict[Value, list[tuple[int, int]]] = {}
    split_any = False
    with Builder(g) as b:
        def whole(v: Value) -> Value:
            if v not in vmap:
                with placed(g, every):
                    vmap[v] = F.apply("concat_ranks", *[Tensor(p, b) for p in pieces[v]], axis=2).value
            return vmap[v]

        def gather_rows(v: Value, r: int, lo: int, hi: int) -> Tensor:
            """Rows [lo, hi) of v on rank r: its own, halos from the ranks holding the others."""
            if v not in pieces:
                src = Tensor(whole(v), b)
                if (lo, hi) == (0, v.type.shape[2]):
                    return src
                with placed(g, f"rank:{r}"):
                    return F.slice(src, [0, 0, lo, 0], [src.shape[0], src.shape[1], hi, src.shape[3]])
            parts = []
            for q, (qa, qb) in enumerate(rows[v]):
                a, z = max(lo, qa), min(hi, qb)
                if a >= z:
                    continue
                p = Tensor(pieces[v][q], b)
                with placed(g, f"rank:{q}"):
                    if (a, z) != (qa, qb):
                        p = F.slice(p, [0, 0, a - qa, 0], [p.shape[0], p.shape[1], z - qa, p.shape[3]])
                if q != r:
                    with placed(g, ranks_placement({q, r})):
                        p = F.apply("transfer", p, src=q, dst=r)
                parts.append(p)
            if len(parts) == 1:
                return parts[0]
            with placed(g, f"rank:{r}"):
                return F.concat(parts, 2)

        for n in graph.nodes:
            how = _row_local(n, pieces, rows, k)
            if how == "window":
                _window(g, n, k, gather_rows, [Tensor(vmap[v], b) for v in n.inputs[1:]], pieces, rows)
                split_any = True
            elif how == "elementwise":
                src = next(v for v in n.inputs if v in pieces)
                outs = []
                for r in range(k):
                    ins = [pieces[v][r] if v in pieces else vmap[v] for v in n.inputs]
                    with placed(g, f"rank:{r}"):
                        outs.append(g.emit(n.op, ins, dict(n.attrs), loc=n.loc))
                for i, v in enumerate(n.outputs):
                    pieces[v] = [o[i] for o in outs]
                    rows[v] = rows[src]
            elif how == "batchnorm":
                _batchnorm(g, b, n, k, pieces, rows, vmap)
            else:
                with placed(g, every):
                    outs = g.emit(n.op, [whole(v) for v in n.inputs], dict(n.attrs), loc=n.loc,
                                  names=[v.name for v in n.outputs])
                vmap.update(zip(n.outputs, outs))
        if not split_any:
            raise TdcError(f"--parallel spatial: {graph.name} has no convolution or pooling whose output has at least "
                           f"{k} rows to split over {k} ranks (rows that are not all padding)")
        for name, v in graph.outputs:
            g.add_output(name, whole(v))
        for t, v in graph.updates:
            g.add_update(vmap[t], whole(v) if v in pieces else vmap[v])
    return g


def describe_rows(graph: Graph, cfg: Partition) -> str:
    """The rows each rank computes of each split window op."""
    placed_graph = spatial(graph, cfg)
    lines = []
    for n in graph.nodes:
        if n.op in WINDOW_OPS and n.outputs[0].type.shape[2] >= cfg.ranks and n.inputs[0].type.rank == 4:
            bounds = row_bounds(n.outputs[0].type.shape[2], cfg.ranks)
            lines.append(f"  {n.op} {list(n.outputs[0].type.shape)}: rows " + ", ".join(
                f"rank {r} [{a}, {b})" for r, (a, b) in enumerate(bounds)))
    halos = sum(1 for n in placed_graph.nodes if n.op == "transfer")
    gathers = sum(1 for n in placed_graph.nodes if n.op == "concat_ranks")
    return "\n".join(lines + [f"  {halos} halo transfers, {gathers} gathers of whole feature maps (forward)"])


def _row_local(n: Node, pieces, rows, k: int) -> str | None:
    """How node n runs split by rows: "window", "elementwise", "batchnorm", or None (whole)."""
    if n.op in LITERALS or not n.inputs:
        return None
    x = n.inputs[0]
    if n.op in WINDOW_OPS:
        if x.type.rank != 4 or n.outputs[0].type.shape[2] < k:
            return None
        if n.op == "avgpool2d" and n.attrs["count_include_pad"] and n.attrs["ceil_mode"]:
            return None      # its divisors count padding that a rank's wider local padding would change
        if n.op == "conv2d" and any(not v.is_arg for v in n.inputs[1:]):
            return None      # a computed weight (folded batchnorm) is made whole first
        if any(lo >= hi for lo, hi in _input_rows(n, k)):
            return None      # a rank's windows would lie wholly in the padding: no rows to give it
        return "window"
    split = [v for v in n.inputs if v in pieces]
    if not split:
        return None
    if n.op == "batchnorm":
        return "batchnorm" if x in pieces and all(v not in pieces for v in n.inputs[1:]) else None
    if n.opdef.family == "elementwise" and len(n.outputs) == 1 and n.outputs[0].type == split[0].type and \
            all(rows[v] == rows[split[0]] for v in split) and \
            all(v in pieces or _h_free(v) for v in n.inputs):
        return "elementwise"
    return None


def _window_rows(n: Node, k: int) -> list[tuple[int, int]]:
    """For each rank, the input rows [lo, hi) its output rows' windows span, padding included
    (lo < 0 or hi > H where they reach into it)."""
    a = n.attrs
    kh = a["kernel"][0] if n.op != "conv2d" else n.inputs[1].type.shape[2]
    sh, dh, pt = a["stride"][0], a.get("dilation", (1, 1))[0], a["pad"][0]
    return [(oa * sh - pt, (ob - 1) * sh - pt + dh * (kh - 1) + 1)
            for oa, ob in row_bounds(n.outputs[0].type.shape[2], k)]


def _input_rows(n: Node, k: int) -> list[tuple[int, int]]:
    """The real input rows each rank's windows cover."""
    h = n.inputs[0].type.shape[2]
    return [(max(lo, 0), min(hi, h)) for lo, hi in _window_rows(n, k)]


def _window(g: Graph, n: Node, k: int, gather_rows, params: list[Tensor], pieces, rows) -> None:
    """Rank r's output rows of window op n from the input rows their windows cover."""
    x = n.inputs[0]
    a = n.attrs
    _, pl, _, pr = a["pad"]
    outs, bounds = [], row_bounds(n.outputs[0].type.shape[2], k)
    for r, ((oa, ob), (lo, hi), (clo, chi)) in enumerate(zip(bounds, _window_rows(n, k), _input_rows(n, k))):
        xr = gather_rows(x, r, clo, chi)
        local = dict(a, pad=(clo - lo, pl, hi - chi, pr))
        if n.op in ("maxpool2d", "avgpool2d"):
            local["ceil_mode"] = False         # the local rows are exactly the windows' extent
        with placed(g, f"rank:{r}"):
            y = F.apply(n.op, xr, *params, **local)
        if y.shape[2] != ob - oa:
            raise TdcError(f"internal: rank {r}'s rows of {n.op} came out {y.shape[2]}, not {ob - oa}")
        outs.append(y.value)
    pieces[n.outputs[0]] = outs
    rows[n.outputs[0]] = bounds


def _batchnorm(g: Graph, b: Builder, n: Node, k: int, pieces, rows, vmap) -> None:
    """Training batchnorm over rows held by different ranks: the per-rank sums over (N, H, W) are
    added over the ranks for the mean, then for the variance (two passes, as one process's)."""
    x = n.inputs[0]
    gamma, beta, mean, var = (Tensor(vmap[v], b) for v in n.inputs[1:])
    eps, momentum = n.attrs["eps"], n.attrs["momentum"]
    c = x.type.shape[1]
    cshape = (1, c, 1, 1)
    if not n.attrs["training"]:
        ys = []
        for r in range(k):
            with placed(g, f"rank:{r}"):
                ys.append(F.batchnorm(Tensor(pieces[x][r], b), gamma, beta, mean, var, eps=eps,
                                      momentum=momentum).value)
        pieces[n.outputs[0]], rows[n.outputs[0]] = ys, rows[x]
        return
    count = x.type.size // c
    xs = [Tensor(p, b) for p in pieces[x]]
    every = ranks_placement(range(k))

    def over_ranks(parts) -> Tensor:
        with placed(g, every):
            return F.apply("sum_ranks", *parts) * (1.0 / count)
    sums = []
    for r in range(k):
        with placed(g, f"rank:{r}"):
            sums.append(F.sum(xs[r], (0, 2, 3)))
    bmean = over_ranks(sums)
    centred, squares = [], []
    for r in range(k):
        with placed(g, f"rank:{r}"):
            xc = xs[r] - F.reshape(bmean, cshape)
            centred.append(xc)
            squares.append(F.sum(xc * xc, (0, 2, 3)))
    bvar = over_ranks(squares)
    ys = []
    for r in range(k):
        with placed(g, f"rank:{r}"):
            scale = F.rsqrt(F.reshape(bvar, cshape) + eps) * F.reshape(gamma, cshape)
            ys.append((centred[r] * scale + F.reshape(beta, cshape)).value)
    with placed(g, every):
        new_mean = mean * momentum + bmean * (1.0 - momentum)
        new_var = var * momentum + bvar * (1.0 - momentum)
    pieces[n.outputs[0]], rows[n.outputs[0]] = ys, rows[x]
    vmap[n.outputs[1]], vmap[n.outputs[2]] = new_mean.value, new_var.value
