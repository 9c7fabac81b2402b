"""IR invariants: SSA (one definition, defined before use), attributes as the
registry normalizes them, types as the registry infers them, and well-formed
outputs and updates. Passes run `verify` after each step to catch their bugs early.
"""
from __future__ import annotations

from ..errors import TdcError, VerifyError
from .graph import ARG_KINDS, Graph, Node
from .opdef import attrs_key


def _where(i: int, node: Node) -> str:
    return f"node {i} ({node.op}{' at ' + node.loc if node.loc else ''})"


def _check_types(i: int, node: Node, opdef) -> None:
    try:
        inferred = opdef.infer_types([v.type for v in node.inputs], node.attrs)
    except TdcError as e:
        raise VerifyError(f"{_where(i, node)}: {e}") from None
    declared = [v.type for v in node.outputs]
    if inferred != declared:
        raise VerifyError(f"{_where(i, node)}: outputs are typed {', '.join(map(str, declared)) or 'nothing'} "
                          f"but the registry infers {', '.join(map(str, inferred)) or 'nothing'}")


def _opdef(i: int, node: Node):
    try:
        return node.opdef
    except TdcError as e:
        raise VerifyError(f"{_where(i, node)}: {e}") from None


def check_types(g: Graph) -> None:
    """Only the type invariant: every node's output types are what the registry infers."""
    for i, node in enumerate(g.nodes):
        _check_types(i, node, _opdef(i, node))


def verify(g: Graph) -> None:
    """Raise VerifyError describing the first broken invariant."""

    def fail(msg):
        raise VerifyError(f"graph {g.name}: {msg}")

    defined = set()
    arg_names = set()
    for a in g.args:
        if a.kind not in ARG_KINDS or a.producer is not None:
            fail(f"argument {a.name!r} is not a graph argument (kind {a.kind!r}, producer {a.producer})")
        if a.name in arg_names or a in defined:
            fail(f"argument {a.name!r} appears twice")
        arg_names.add(a.name)
        defined.add(a)

    first_def = {}
    for i, node in enumerate(g.nodes):
        for v in node.outputs:
            first_def.setdefault(v, i)
    for i, node in enumerate(g.nodes):
        for k, v in enumerate(node.inputs):
            if v not in defined:
                later = first_def.get(v, -1) >= i
                fail(f"{_where(i, node)}: input {k} ({v}) is "
                     + (f"used before its definition by node {first_def[v]}" if later else "not defined in this graph"))
        opdef = _opdef(i, node)
        try:
            ok = attrs_key(opdef.normalize_attrs(node.attrs)) == attrs_key(node.attrs)
        except TdcError as e:
            fail(f"{_where(i, node)}: bad attributes: {e}")
        if not ok:
            fail(f"{_where(i, node)}: attributes {node.attrs} are not in normalized form")
        for k, v in enumerate(node.outputs):
            if v in defined:
                fail(f"{_where(i, node)}: output {k} ({v}) is defined twice")
            if v.producer is not node or v.index != k:
                fail(f"{_where(i, node)}: output {k} ({v}) does not point back to its node")
            defined.add(v)
        _check_types(i, node, opdef)

    out_names = set()
    for name, v in g.outputs:
        if name in out_names:
            fail(f"output name {name!r} is used twice")
        out_names.add(name)
        if v not in defined:
            fail(f"output {name!r} ({v}) is not defined in this graph")

    args = set(g.args)
    updated = set()
    for target, v in g.updates:
        if target not in args or target.kind not in ("param", "state"):
            fail(f"update target {target} is not a param or state argument of this graph")
        if target in updated:
            fail(f"{target.name} is updated twice")
        updated.add(target)
        if v not in defined:
            fail(f"the update of {target.name} uses {v}, which is not defined in this graph")
        if v.type != target.type:
            fail(f"the update of {target.name} is {v.type}, but the {target.kind} is {target.type}")
