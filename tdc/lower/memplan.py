"""Memory planning: liveness over the kernel schedule, then offsets in one arena.

The schedule is `graph.nodes` in order, cut into kernels as the fusion pass defines them
(fuse.kernels): nodes with the same `node.group` next to each other form one kernel, a node
without a group is a kernel of its own, and literals (constant, full) are inlined into the
kernels that read them. Time is the kernel index. A value needs a buffer when it crosses a
kernel boundary or is a graph output or update value; values made and used inside one
kernel stay in registers or loop temporaries.

Buffered values live from the kernel that writes them to the last kernel that reads them
(outputs and update values to `end`, one past the last kernel, when the step returns).
Args (inputs, params, consts, state) and literal values have storage of their own and
never enter the arena.

Two kinds of in-place writes save space:
  * an update value is written straight into its param/state arg when the old value is not
    read after the kernel producing the new one (Buffer.inplace_of = the arg, offset None);
  * a kernel of elementwise ops may write an output over an input that dies in that kernel
    (Buffer.inplace_of = the input value, same offset).

    plan = plan_memory(graph)
    plan.verify(graph)
    print(memory_report(graph, plan))
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import TdcError
from ..ir.graph import Graph, Node, Value
from ..passes.autodiff import GRAD_PREFIX
from ..passes.fuse import is_literal, kernels as fused_kernels
from ..passes.optimizer import SLOTS

ALIGN = 64

# Ops where element i of the output depends only on element i of each input of the same
# size (smaller inputs are broadcast scalars or vectors, read-only), so a kernel of them can
# stream an output over an input. reshape and flatten keep the row-major order of elements.
INPLACE_OPS = frozenset({
    "add", "sub", "mul", "div", "pow", "maximum", "minimum",
    "equal", "not_equal", "less", "less_equal", "greater", "greater_equal", "where",
    "neg", "abs", "sign", "exp", "log", "sqrt", "rsqrt",
    "relu", "leaky_relu", "sigmoid", "tanh", "erf", "cast",
    "reshape", "flatten",
})

# state args "<param>.<slot>" that the optimizer pass adds: m, v, velocity, cache
OPTIMIZER_SLOTS = tuple(sorted({s for slots in SLOTS.values() for s in slots}))

MB = float(1 << 20)


class MemoryPlanError(TdcError):
    """A memory plan that would let two live values share bytes (found by MemoryPlan.verify)."""


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class Buffer:
    offset: int | None        # byte offset in the arena; None: the value lives in inplace_of's arg storage
    nbytes: int
    inplace_of: Value | None = None   # the arg (update in place) or input value (elementwise) overwritten

    @property
    def in_arena(self) -> bool:
        return self.offset is not None


@dataclass
class MemoryPlan:
    """Where every buffered value lives. Values without an entry in `assignments` are made and
    used inside one kernel, or args and literals (they have storage of their own)."""
    assignments: dict[Value, Buffer]
    intervals: dict[Value, tuple[int, int]]   # buffered value -> (first, last) kernel it is live in
    kernels: list[list[Node]]
    arena_bytes: int
    unplanned_bytes: int                      # every buffered value in its own aligned slot
    args_bytes: int = 0                       # inputs, params, consts and state: outside the arena
    literal_bytes: int = 0                    # constant and full values, made once: outside the arena

    @property
    def end(self) -> int:
        """The time after the last kernel, when outputs are returned and updates written."""
        return len(self.kernels)

    def live_at(self, kernel_index: int) -> list[Value]:
        """Buffered values live while kernel `kernel_index` runs (inputs it reads, outputs it writes,
        values waiting for later kernels), by offset; `end` gives the outputs and update values."""
        live = [v for v, (s, e) in self.intervals.items() if s <= kernel_index <= e]
        return sorted(live, key=lambda v: (self.assignments[v].offset is None, self.assignments[v].offset or 0))

    def live_bytes_at(self, kernel_index: int) -> int:
        return sum(self.assignments[v].nbytes for v in self.live_at(kernel_index)
                   if self.assignments[v].in_arena)

    @property
    def inplace_updates(self) -> int:
        return sum(1 for b in self.assignments.values() if b.inplace_of is not None and not b.in_arena)

    @property
    def inplace_reuses(self) -> int:
        return sum(1 for b in self.assignments.values() if b.inplace_of is not None and b.in_arena)

    def verify(self, graph: Graph) -> None:
        """Recompute liveness from `graph` on its own and check that no two values live at the
        same time share arena bytes (except an elementwise output written over an input that
        dies in that kernel), that in-place updates never overwrite a value still to be read,
        and that every offset is aligned and inside the arena. Raises MemoryPlanError."""
        kernels = split_kernels(graph)
        if len(kernels) != len(self.kernels):
            raise MemoryPlanError(f"the plan has {len(self.kernels)} kernels, the graph {len(kernels)}")
        truth = _brute_force_intervals(graph, kernels)
        for v, (start, last) in truth.items():
            buf = self.assignments.get(v)
            if buf is None:
                raise MemoryPlanError(f"{_name(v)} needs a buffer (it leaves its kernel) but has none")
            if buf.nbytes != v.type.nbytes:
                raise MemoryPlanError(f"{_name(v)} needs {v.type.nbytes} bytes, its buffer has {buf.nbytes}")
            if buf.in_arena and (buf.offset % ALIGN or buf.offset + buf.nbytes > self.arena_bytes):
                raise MemoryPlanError(f"{_name(v)} at offset {buf.offset} is misaligned or outside the arena")
            planned = self.intervals.get(v)
            if planned is None or planned[0] > start or planned[1] < last:
                raise MemoryPlanError(f"{_name(v)} is live in kernels {start}..{last}, the plan says {planned}")
            if buf.inplace_of is not None:
                _check_inplace(v, buf, graph, kernels, truth)

        arena = sorted((v for v in truth if self.assignments[v].in_arena), key=lambda v: self.assignments[v].offset)
        for i, a in enumerate(arena):   # sweep by offset: only neighbours that start inside a can overlap it
            ba = self.assignments[a]
            for b in arena[i + 1:]:
                bb = self.assignments[b]
                if bb.offset >= ba.offset + ba.nbytes:
                    break
                if bb.nbytes == 0 or ba.nbytes == 0:
                    continue
                (sa, ea), (sb, eb) = truth[a], truth[b]
                if sa > eb or sb > ea:
                    continue   # never live together
                if self._handover(a, b, truth) or self._handover(b, a, truth):
                    continue
                raise MemoryPlanError(f"{_name(a)} (kernels {sa}..{ea}) and {_name(b)} (kernels {sb}..{eb}) "
                                      f"are live together and share bytes at offsets {ba.offset} and {bb.offset}")

    def _handover(self, donor: Value, value: Value, truth) -> bool:
        """value was written over donor by the kernel in which donor dies (an elementwise reuse)."""
        return self.assignments[value].inplace_of is donor and truth[donor][1] == truth[value][0]


def _name(v: Value) -> str:
    where = f" from {v.producer.op}" if v.producer is not None else ""
    return f"%{v.name or '?'}{where} ({v.type})"


def split_kernels(graph: Graph) -> list[list[Node]]:
    """The kernels in schedule order (literal nodes are in none: they are inlined)."""
    return [nodes for _, nodes in fused_kernels(graph)]


def _kernel_index(kernels: list[list[Node]]) -> dict[Node, int]:
    return {n: k for k, nodes in enumerate(kernels) for n in nodes}


def _streams_through(nodes: list[Node], src: Value, dst: Value) -> bool:
    """Whether kernel `nodes` may write dst over src: dst is computed from src and element i of
    every value computed from src depends only on element i of src."""
    if src.type.dtype != dst.type.dtype or src.type.size != dst.type.size:
        return False
    reached = {src}
    for n in nodes:
        if any(v in reached for v in n.inputs):
            if n.op not in INPLACE_OPS or any(o.type.size != src.type.size for o in n.outputs):
                return False
            reached.update(n.outputs)
    return dst in reached


def plan_memory(graph: Graph) -> MemoryPlan:
    kernels = split_kernels(graph)
    kernel_of = _kernel_index(kernels)
    end = len(kernels)
    roots = graph.roots()
    root_set = set(roots)

    last_read: dict[Value, int] = {}      # args included: in-place updates need them
    crosses: set[Value] = set()
    for n in kernel_of:
        k = kernel_of[n]
        for v in n.inputs:
            last_read[v] = max(last_read.get(v, -1), k)
            if v.producer in kernel_of and kernel_of[v.producer] != k:
                crosses.add(v)
    for v in roots:
        last_read[v] = end

    intervals: dict[Value, tuple[int, int]] = {}
    for n in kernel_of:   # in schedule order
        start = kernel_of[n]
        for v in n.outputs:
            # a value nobody reads still gets written somewhere by its kernel
            if v in root_set or v in crosses or v not in last_read:
                intervals[v] = (start, max(start, last_read.get(v, start)))

    assignments: dict[Value, Buffer] = {}
    # Updates in place: the arg's old value must be dead once the new one is written.
    update_count: dict[Value, int] = {}
    for _, v in graph.updates:
        update_count[v] = update_count.get(v, 0) + 1
    outputs = {v for _, v in graph.outputs}
    for target, v in graph.updates:
        if v not in intervals or update_count[v] > 1 or v in outputs:
            continue   # an arg or literal is copied; a value updating two args or returned stays apart
        k = kernel_of[v.producer]
        old_read = last_read.get(target, -1)
        if old_read < k or (old_read == k and _streams_through(kernels[k], target, v)):
            assignments[v] = Buffer(None, v.type.nbytes, inplace_of=target)

    # Elementwise reuse: an output takes the buffer of an input that dies in its kernel.
    donor_of: dict[Value, Value] = {}
    donated: set[Value] = set()
    for k, nodes in enumerate(kernels):
        produced = {o for n in nodes for o in n.outputs}
        candidates = [v for n in nodes for v in n.inputs
                      if v in intervals and v not in produced and intervals[v][1] == k and v not in assignments]
        for n in nodes:
            for o in n.outputs:
                if o not in intervals or o in assignments:
                    continue
                for d in candidates:
                    if d not in donated and _streams_through(nodes, d, o):
                        donor_of[o] = d
                        donated.add(d)
                        break

    # Chains of reuses share one slot, live from the first value's start to the last's end.
    slot_of: dict[Value, Value] = {}
    for v in intervals:   # in schedule order, so a donor's slot is known before its receiver's
        if v in assignments:
            continue
        slot_of[v] = slot_of[donor_of[v]] if v in donor_of else v
    slots: dict[Value, list[Value]] = {}
    for v, s in slot_of.items():
        slots.setdefault(s, []).append(v)
    span = {s: (intervals[m[0]][0], max(intervals[x][1] for x in m), align(s.type.nbytes)) for s, m in slots.items()}

    offsets = _place(span)
    for s, members in slots.items():
        for v in members:
            assignments[v] = Buffer(offsets[s], v.type.nbytes, inplace_of=donor_of.get(v))

    arena = max((offsets[s] + size for s, (_, _, size) in span.items()), default=0)
    unplanned = sum(align(v.type.nbytes) for v in intervals)
    return MemoryPlan(assignments, intervals, kernels, arena, unplanned,
                      args_bytes=sum(a.type.nbytes for a in graph.args),
                      literal_bytes=sum(n.outputs[0].type.nbytes for n in graph.nodes if is_literal(n)))


def _place(span: dict[Value, tuple[int, int, int]]) -> dict[Value, int]:
    """Greedy by size: biggest slots first, each at the lowest aligned offset that is free for
    its whole lifetime. The arena never exceeds the sum of the slot sizes."""
    order = sorted(span, key=lambda s: (-span[s][2], span[s][0]))
    placed: list[tuple[int, int, int, int]] = []   # (offset, size, start, end)
    offsets: dict[Value, int] = {}
    for s in order:
        start, last, size = span[s]
        busy = sorted((o, sz) for o, sz, ps, pe in placed if ps <= last and start <= pe and sz)
        offset = 0
        for o, sz in busy:
            if offset + size <= o:
                break
            offset = max(offset, o + sz)
        offsets[s] = offset
        placed.append((offset, size, start, last))
    return offsets


def _brute_force_intervals(graph: Graph, kernels: list[list[Node]]) -> dict[Value, tuple[int, int]]:
    """Liveness recomputed the slow way, for verify: for each value, scan every kernel."""
    end = len(kernels)
    roots = graph.roots()
    out: dict[Value, tuple[int, int]] = {}
    for k, nodes in enumerate(kernels):
        for n in nodes:
            for v in n.outputs:
                readers = [j for j, ns in enumerate(kernels) if any(v in m.inputs for m in ns)]
                is_root = any(v is r for r in roots)
                if is_root or not readers or any(j != k for j in readers):
                    out[v] = (k, end if is_root else max([k] + readers))
    return out


def _check_inplace(v: Value, buf: Buffer, graph: Graph, kernels, truth) -> None:
    target = buf.inplace_of
    k = truth[v][0]
    if not buf.in_arena:
        if not any(t is target and u is v for t, u in graph.updates):
            raise MemoryPlanError(f"{_name(v)} is written into {target.name}, which it does not update")
        reads = [j for j, ns in enumerate(kernels) if any(target in m.inputs for m in ns)]
        if any(u is target for u in graph.roots()):
            reads.append(len(kernels))
        if any(j > k for j in reads) or (k in reads and not _streams_through(kernels[k], target, v)):
            raise MemoryPlanError(f"{_name(v)} overwrites {target.name} while its old value is still read")
        return
    if truth.get(target, (None, None))[1] != k or not _streams_through(kernels[k], target, v):
        raise MemoryPlanError(f"{_name(v)} reuses {_name(target)}, which is not an elementwise input dying in kernel {k}")


# ---- the memory report -------------------------------------------------------------------

@dataclass
class LayerRow:
    """One row of the memory table: a layer's output, the forward values it keeps for the
    backward pass, its params, their gradients and the optimizer's slots for them."""
    name: str
    shape: tuple[int, ...] | None = None
    act_elems: int = 0
    act_bytes: int = 0
    weight_elems: int = 0
    weight_bytes: int = 0
    grad_elems: int = 0
    grad_bytes: int = 0
    opt_elems: int = 0
    opt_bytes: int = 0

    def add(self, column: str, v: Value) -> None:
        self._bump(column, v.type.size, v.type.nbytes)

    def add_row(self, other: "LayerRow", column: str) -> None:
        self._bump(column, getattr(other, column + "_elems"), getattr(other, column + "_bytes"))

    def _bump(self, column: str, elems: int, nbytes: int) -> None:
        setattr(self, column + "_elems", getattr(self, column + "_elems") + elems)
        setattr(self, column + "_bytes", getattr(self, column + "_bytes") + nbytes)


def _layer_prefix(node: Node) -> str | None:
    """The layer a node belongs to by the params it reads: "conv1" for conv1.weight."""
    for v in node.inputs:
        if v.is_arg and v.kind in ("param", "state") and "." in (v.name or ""):
            return v.name.rsplit(".", 1)[0]
    return None


def layer_table(graph: Graph) -> tuple[list[LayerRow], bool]:
    """The rows of the memory report, and whether the graph has a backward part.

    Forward nodes are those up to the producer of the `loss` output (all nodes when there is
    none); a forward value is kept for backward when a node after the loss reads it. Without
    a loss, the activations column holds the values each layer hands to other layers."""
    loss = next((v for name, v in graph.outputs if name == "loss"), None)
    nodes = graph.nodes
    cut = nodes.index(loss.producer) + 1 if loss is not None and loss.producer is not None else len(nodes)
    forward = [n for n in nodes[:cut] if not is_literal(n)]   # literals are no layer's activations
    backward = nodes[cut:]
    training = bool(backward)

    rows: dict[str, LayerRow] = {}
    row_of: dict[Node, LayerRow] = {}
    counts: dict[str, int] = {}
    current: LayerRow | None = None
    for n in forward:
        prefix = _layer_prefix(n)
        if prefix is None and loss is not None and n is loss.producer:
            prefix = "loss"
        if prefix is None and current is not None and n.opdef.family in ("elementwise", "shape"):
            row = current    # relu, flatten, constants: part of the layer before them
        else:
            if prefix is None:
                counts[n.op] = counts.get(n.op, 0) + 1
                prefix = f"{n.op}_{counts[n.op]}"
            row = rows.setdefault(prefix, LayerRow(prefix))
        row_of[n] = row
        if n.outputs:
            row.shape = n.outputs[0].type.shape
        current = row

    if training:
        kept = {v for n in backward for v in n.inputs}
    else:   # what crosses from one layer to another (or leaves the graph)
        kept = {v for n in forward for v in n.inputs if v.producer in row_of and row_of[v.producer] is not row_of[n]}
        kept |= {v for _, v in graph.outputs}
    for n in forward:
        for v in n.outputs:
            if v in kept:
                row_of[n].add("act", v)

    by_name = {a.name: a for a in graph.args}
    trained = {t for t, _ in graph.updates}
    trained |= {by_name[n[len(GRAD_PREFIX):]] for n, _ in graph.outputs
                if n.startswith(GRAD_PREFIX) and n[len(GRAD_PREFIX):] in by_name}
    owner: dict[Value, LayerRow] = {}     # each param counts once, in the first layer reading it
    for n in forward:
        for p in n.inputs:
            if p.is_arg and p.kind == "param":
                owner.setdefault(p, row_of[n])
    for p in graph.params:
        if p not in owner:   # read only outside the forward pass: a row of its own
            prefix = p.name.rsplit(".", 1)[0]
            owner[p] = rows.setdefault(prefix, LayerRow(prefix))
    for p, row in owner.items():
        row.add("weight", p)
        if training and p in trained:
            row.add("grad", p)
        for slot in OPTIMIZER_SLOTS:
            if f"{p.name}.{slot}" in by_name:
                row.add("opt", by_name[f"{p.name}.{slot}"])
    return list(rows.values()), training


def _cell(elems: int, nbytes: int) -> str:
    return f"{elems:>12,} {nbytes / MB:>8.2f}"


def memory_report(graph: Graph, plan: MemoryPlan | None = None) -> str:
    """A per-layer memory table (in the style of the VGG table of the CS231n lectures) and the
    peak memory of a step before and after planning."""
    plan = plan or plan_memory(graph)
    rows, training = layer_table(graph)
    total = LayerRow("total")
    for r in rows:
        for f in ("act", "weight", "grad", "opt"):
            total.add_row(r, f)
    name_w = max([len(r.name) for r in rows] + [8]) + 2
    shape_w = max([len(_shape(r.shape)) for r in rows] + [12]) + 2
    titles = ("activations", "weights", "gradients", "optimizer state")
    head1 = f"{'layer':<{name_w}}{'output shape':<{shape_w}}" + "".join(f"  {t:>21}" for t in titles)
    head2 = " " * (name_w + shape_w) + "".join(f"  {'elements':>12} {'MB':>8}" for _ in titles)
    rule = "-" * len(head2)
    kept = ("activations: forward values read by the backward pass" if training else
            "activations: values each layer hands on (no backward pass)")
    lines = [f"memory of {graph.name}: {len(graph.nodes)} nodes in {len(plan.kernels)} kernels; {kept}",
             head1, head2, rule]
    for r in rows + [None, total]:
        if r is None:
            lines.append(rule)
            continue
        lines.append(f"{r.name:<{name_w}}{_shape(r.shape):<{shape_w}}"
                     + "".join("  " + _cell(getattr(r, f + "_elems"), getattr(r, f + "_bytes"))
                               for f in ("act", "weight", "grad", "opt")))
    other_state = sum(a.type.nbytes for a in graph.state) - total.opt_bytes
    outside = plan.args_bytes + plan.literal_bytes
    lines += [
        "",
        f"outside the arena: inputs {_mb(sum(a.type.nbytes for a in graph.inputs))}, "
        f"params {_mb(total.weight_bytes)}, optimizer state {_mb(total.opt_bytes)}, "
        f"other state {_mb(other_state)}, consts {_mb(sum(a.type.nbytes for a in graph.consts))}, "
        f"literals {_mb(plan.literal_bytes)}: {_mb(outside)} in all",
        f"peak before planning: {_mb(plan.unplanned_bytes):>11} (every buffered value apart) + {_mb(outside)}"
        f" = {_mb(plan.unplanned_bytes + outside)}",
        f"peak after planning:  {_mb(plan.arena_bytes):>11} (arena)                        + {_mb(outside)}"
        f" = {_mb(plan.arena_bytes + outside)}",
        f"{len(plan.intervals)} buffered values; {plan.inplace_updates} updates written in place, "
        f"{plan.inplace_reuses} elementwise outputs written over a dying input; 1 MB = 2^20 bytes",
    ]
    return "\n".join(lines)


def _shape(shape) -> str:
    if shape is None:
        return "-"
    return "x".join(map(str, shape)) if shape else "scalar"


def _mb(nbytes: int) -> str:
    return f"{nbytes / MB:.2f} MB"
