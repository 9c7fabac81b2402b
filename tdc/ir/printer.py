"""The text form of a graph (MLIR-like, one line per node); `parser.py` reads it back.

    graph mlp(%x: f32[8,4] input, %w: f32[4,2] param {init="he_normal"}) {
      %0 = matmul(%x, %w) : f32[8,2]
      %1 = leaky_relu(%0) {alpha=0.2} : f32[8,2]
      return out=%1 : f32[8,2]
    }

Printing then parsing then printing gives the same text, so everything a graph
holds is printed exactly: floats with `repr`, strings JSON-quoted, tensors as
`dense<...>` literals.
"""
from __future__ import annotations

import json
import re

import numpy as np

from ..errors import TdcError
from .graph import Graph, Node, Value
from .types import DTYPES, TensorType

PREVIEW = 4      # values an elided constant shows
IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
PLACEMENT_RE = re.compile(r"[A-Za-z0-9_.:]+")
NUMBER_RE = re.compile(r"[0-9]+")


def quote_name(name: str) -> str:
    """A name as written in the text: bare when it is an identifier, else JSON-quoted."""
    return name if IDENT_RE.fullmatch(name) else json.dumps(name)


def is_numbered(name: str | None) -> bool:
    """Node outputs with these names print as %0, %1, ...: the text cannot tell them from numbers."""
    return not name or NUMBER_RE.fullmatch(name) is not None


def literal(v, dtype_attr: bool = False) -> str:
    """An attribute value (anything but a tensor) as text."""
    if v is None:
        return "none"
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (np.float32, np.float16)):
        return str(v)   # the shortest text that reads back as the same f32/f16 value: 0.9, not 0.8999999761581421
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    if isinstance(v, str):
        return v if dtype_attr and v in DTYPES else json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(literal(x) for x in v) + "]"
    raise TdcError(f"cannot print attribute value {v!r} of type {type(v).__name__}")


def dense(a: np.ndarray, type_hint: TensorType | None, max_elements: int | None = None) -> str:
    """`dense<[[1.0,2.0]]>`, with ` : type` only when the tensor's type is not `type_hint`. With
    more than `max_elements` elements, `elided<"HASH", [first values]> : type` instead: the
    dtype, shape, a hash of the bytes and a few values (the parser refuses it)."""
    a = np.asarray(a)
    t = TensorType.of(a)
    if max_elements is not None and a.size > max_elements:
        import hashlib
        head = _elements(a.reshape(-1)[:PREVIEW])
        return f'elided<"{hashlib.sha1(a.tobytes()).hexdigest()[:12]}", {head}> : {t}'
    text = f"dense<{_elements(a)}>"
    return text if t == type_hint else f"{text} : {t}"


def _elements(a: np.ndarray) -> str:
    if a.dtype.kind != "f" or a.dtype == np.float64:
        return literal(a.tolist())
    if a.ndim == 0:
        return literal(a[()])
    return "[" + ",".join(_elements(x) for x in a) + "]"


class _Namer:
    def __init__(self, g: Graph):
        self.names: dict[Value, str] = {}
        self.count = 0
        used = set()
        for a in g.args:
            if a.name is None:  # a broken graph; still printable
                self._number(a)
            else:
                self.names[a] = "%" + quote_name(a.name)
                used.add(a.name)
        for node in g.nodes:
            for v in node.outputs:
                # a duplicate name would make the text ambiguous: number it instead
                if is_numbered(v.name) or v.name in used:
                    self._number(v)
                else:
                    self.names[v] = "%" + quote_name(v.name)
                    used.add(v.name)

    def _number(self, v: Value):
        self.names[v] = f"%{self.count}"
        self.count += 1

    def __call__(self, v: Value) -> str:
        return self.names.get(v, "%<undefined>")


def _attrs_text(node: Node, max_elements: int | None = None) -> str:
    try:
        opdef = node.opdef
    except TdcError:
        opdef = None
    if opdef is None:
        shown = dict(node.attrs)
        kinds = {}
    else:
        declared = {k: v for k, v in node.attrs.items() if k in opdef.attrs}
        nd = opdef.non_default_attrs(declared)
        shown = {k: nd[k] for k in opdef.attrs if k in nd}
        # attributes the op does not declare (a broken graph) are shown so verify's messages make sense
        shown.update({k: v for k, v in node.attrs.items() if k not in opdef.attrs})
        kinds = {k: a.kind for k, a in opdef.attrs.items()}
    if not shown:
        return ""
    hint = node.outputs[0].type if node.outputs else None
    parts = []
    for k, v in shown.items():
        text = dense(v, hint, max_elements) if isinstance(v, np.ndarray) else literal(v, kinds.get(k) == "dtype")
        parts.append(f"{quote_name(k)}={text}")
    return " {" + ", ".join(parts) + "}"


def _arg_text(a: Value, name: str) -> str:
    s = f"{name}: {a.type} {a.kind}"
    if a.attrs:
        items = (f"{quote_name(k)}={dense(v, None) if isinstance(v, np.ndarray) else literal(v)}"
                 for k, v in a.attrs.items())
        s += " {" + ", ".join(items) + "}"
    return s


def print_graph(g: Graph, max_elements: int | None = None) -> str:
    """The graph as text. Constants of more than `max_elements` elements print in short
    (elided<...>: readable, not parseable); by default every value prints, exactly."""
    name = _Namer(g)
    args = [_arg_text(a, name(a)) for a in g.args]
    head = f"graph {quote_name(g.name)}(" + ", ".join(args) + ") {"
    if len(head) > 100:   # one argument per line keeps long signatures readable
        head = f"graph {quote_name(g.name)}(\n" + ",\n".join("    " + a for a in args) + "\n) {"
    lines = [head]
    group = None
    for node in g.nodes:
        if node.group != group:
            if group is not None:
                lines.append("  }")
            if node.group is not None:
                lines.append(f"  kernel {quote_name(node.group)} {{")
            group = node.group
        s = f"{node.op}(" + ", ".join(name(v) for v in node.inputs) + ")" + _attrs_text(node, max_elements)
        if node.placement is not None:
            p = node.placement
            s += " @" + (p if PLACEMENT_RE.fullmatch(p) else json.dumps(p))
        if node.outputs:
            s = ", ".join(name(v) for v in node.outputs) + " = " + s
            s += " : " + ", ".join(str(v.type) for v in node.outputs)
        lines.append(("    " if group is not None else "  ") + s)
    if group is not None:
        lines.append("  }")
    for target, v in g.updates:
        lines.append(f"  {name(target)} <- {name(v)}")
    ret = "  return"
    if g.outputs:
        ret += " " + ", ".join(f"{quote_name(n)}={name(v)}" for n, v in g.outputs)
        ret += " : " + ", ".join(str(v.type) for _, v in g.outputs)
    lines.append(ret)
    lines.append("}")
    return "\n".join(lines)
