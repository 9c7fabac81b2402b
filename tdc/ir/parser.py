"""Reads the text form written by `printer.py` back into a `Graph`.

A hand-written lexer and recursive-descent parser. Nodes are rebuilt with
`Graph.emit`, so the registry re-checks every op, and the printed result types
must agree with the inferred ones. Every error is an `IRParseError` pointing at
a line and column.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import IRParseError, ShapeError, TdcError
from .graph import ARG_KINDS, Graph, Value
from .opdef import get_op
from .printer import is_numbered
from .types import DTYPES, TensorType, is_int

_STRING = r'"(?:[^"\\\n]|\\.)*"'
_TOKEN_RE = re.compile(rf"""
    (?P<ws>[ \t\r\n]+|//[^\n]*)
  | (?P<value>%(?:[A-Za-z_][A-Za-z0-9_.]*|[0-9]+|{_STRING}))
  | (?P<placement>@(?:[A-Za-z0-9_.:]+|{_STRING}))
  | (?P<string>{_STRING})
  | (?P<number>-?[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|-inf(?![A-Za-z0-9_.]))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<arrow><-(?![0-9i]))   # not `dense<-1>` or `dense<-inf>`
  | (?P<punct>[(){{}}\[\],=:<>])
""", re.VERBOSE)


@dataclass
class Token:
    kind: str     # value, placement, string, number, ident, eof, or the punctuation itself ("(", "<-", ...)
    text: str
    value: Any    # decoded: a str, int or float; for values the lookup key
    line: int
    col: int


@dataclass
class _Dense:
    """A `dense<...>` literal, turned into an array once its type is known."""
    literal: Any
    type: TensorType | None
    tok: Token


def _lex(text: str, source: str) -> list[Token]:
    toks = []
    pos, line, line_start = 0, 1, 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        col = pos - line_start + 1
        if m is None:
            c = text[pos]
            if c == '"' or text.startswith('%"', pos) or text.startswith('@"', pos):
                raise IRParseError("unterminated string", line, col + (c != '"'), source)
            if c == "%":
                raise IRParseError("expected a value name after '%'", line, col, source)
            if c == "@":
                raise IRParseError("expected a placement after '@'", line, col, source)
            raise IRParseError(f"unexpected character {c!r}", line, col, source)
        kind, s = m.lastgroup, m.group()
        if kind != "ws":
            value: Any = s
            try:
                if kind == "string":
                    value = json.loads(s)
                elif kind == "placement":
                    value = json.loads(s[1:]) if s[1] == '"' else s[1:]
                elif kind == "value":
                    body = s[1:]
                    # numbers and names are separate namespaces: %0 is not %"0"
                    value = ("#", body) if body.isdigit() else ("name", json.loads(body) if body[0] == '"' else body)
                elif kind == "number":
                    value = int(s) if re.fullmatch(r"-?[0-9]+", s) else float(s)
            except ValueError as e:  # only json.loads can fail here: the regexes vetted the rest
                raise IRParseError(f"bad string literal ({getattr(e, 'msg', e)})", line, col, source) from None
            if kind in ("punct", "arrow"):
                kind = s
            toks.append(Token(kind, s, value, line, col))
        newlines = s.count("\n")
        if newlines:
            line += newlines
            line_start = pos + s.rindex("\n") + 1
        pos = m.end()
    toks.append(Token("eof", "", None, line, pos - line_start + 1))
    return toks


class _Parser:
    def __init__(self, text: str, source: str):
        self.source = source
        self.toks = _lex(text, source)
        self.i = 0
        self.env: dict[tuple, Value] = {}
        self.g: Graph | None = None

    # ---- token helpers --------------------------------------------------
    @property
    def tok(self) -> Token:
        return self.toks[self.i]

    def peek(self, k: int = 1) -> Token:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def advance(self) -> Token:
        t = self.tok
        if t.kind != "eof":
            self.i += 1
        return t

    def at(self, kind: str, text: str | None = None) -> bool:
        return self.tok.kind == kind and (text is None or self.tok.text == text)

    def error(self, msg: str, tok: Token | None = None) -> IRParseError:
        tok = tok or self.tok
        if tok.kind == "eof":
            msg = f"unexpected end of input ({msg})"
        return IRParseError(msg, tok.line, tok.col, self.source)

    def expect(self, kind: str, what: str) -> Token:
        if self.tok.kind != kind:
            got = "" if self.tok.kind == "eof" else f", got '{self.tok.text}'"
            raise self.error(f"expected {what}{got}")
        return self.advance()

    # ---- grammar --------------------------------------------------------
    def graph(self) -> Graph:
        if not self.at("ident", "graph"):
            raise self.error("expected 'graph'")
        self.advance()
        self.g = Graph(self.name("a graph name"))
        self.expect("(", "'(' after the graph name")
        if not self.at(")"):
            self.arg()
            while self.at(","):
                self.advance()
                self.arg()
        self.expect(")", "',' or ')' after an argument")
        self.expect("{", "'{' to start the graph body")
        while not self.at("ident", "return"):
            if self.at("}"):
                raise self.error("missing 'return' before '}'")
            if self.at("value") and self.peek().kind == "<-":
                self.update()
            elif self.at("ident", "kernel"):
                self.kernel()
            else:
                self.node()
        self.ret()
        self.expect("}", "'}' after the return line")
        self.expect("eof", "end of input after the graph")
        return self.g

    def kernel(self):
        """A fused kernel: `kernel NAME { nodes }`; its nodes get node.group = NAME."""
        self.advance()
        group = self.name("a kernel name")
        if any(n.group == group for n in self.g.nodes):
            raise self.error(f"kernel {group} is defined twice")
        self.expect("{", "'{' after the kernel name")
        first = len(self.g.nodes)
        while not self.at("}"):
            if self.at("eof"):
                raise self.error("unexpected end of input inside kernel " + group)
            self.node()
        self.advance()
        if len(self.g.nodes) == first:
            raise self.error(f"kernel {group} is empty")
        for n in self.g.nodes[first:]:
            n.group = group

    def name(self, what: str) -> str:
        if self.at("ident") or self.at("string"):
            return self.advance().value
        raise self.error(f"expected {what}")

    def define(self, tok: Token, v: Value):
        if tok.value in self.env:
            raise self.error(f"{tok.text} is defined twice", tok)
        self.env[tok.value] = v

    def use(self) -> Value:
        tok = self.expect("value", "a value (%name)")
        if tok.value not in self.env:
            raise self.error(f"use of undefined value {tok.text}", tok)
        return self.env[tok.value]

    def arg(self):
        tok = self.expect("value", "an argument (%name)")
        if tok.value in self.env:
            raise self.error(f"{tok.text} is defined twice", tok)
        self.expect(":", "':' after value name")
        t, _ = self.type()
        ktok = self.expect("ident", "an argument kind (input, param, const or state)")
        if ktok.text not in ARG_KINDS:
            raise self.error(f"unknown argument kind '{ktok.text}' (expected input, param, const or state)", ktok)
        attrs = {}
        if self.at("{"):
            attrs, _ = self.attr_dict(None)
            for k, v in attrs.items():
                if isinstance(v, _Dense):
                    attrs[k] = self.build_dense(v, None)
        try:
            v = self.g.add_arg(tok.value[1], t, ktok.text, attrs)
        except TdcError as e:
            raise self.error(str(e), tok) from None
        self.define(tok, v)

    def type(self) -> tuple[TensorType, Token]:
        tok = self.expect("ident", "a type such as f32[2,3]")
        if tok.text not in DTYPES:
            raise self.error(f"unknown dtype '{tok.text}' (expected one of {', '.join(DTYPES)})", tok)
        self.expect("[", "'[' after the dtype")
        dims = []
        while not self.at("]"):
            if dims:
                self.expect(",", "',' or ']' in the shape")
            d = self.expect("number", "a dimension")
            if not isinstance(d.value, int) or d.value < 0:
                raise self.error(f"bad dimension '{d.text}': dimensions are integers >= 0", d)
            dims.append(d.value)
        self.advance()
        return TensorType(tok.text, tuple(dims)), tok

    def types(self, n: int) -> list[tuple[TensorType, Token]]:
        out = [self.type()]
        while len(out) < n:
            self.expect(",", f"',' and {n - len(out)} more type(s)")
            out.append(self.type())
        if self.at(","):
            raise self.error(f"expected {n} type(s), got more")
        return out

    def node(self):
        name_toks = []
        if self.at("value"):
            name_toks.append(self.advance())
            while self.at(","):
                self.advance()
                name_toks.append(self.expect("value", "a result name"))
            self.expect("=", "'=' after the result names")
        op_tok = self.expect("ident", "an op name or 'return'")
        try:
            opdef = self.registry_op(op_tok.text)
        except ShapeError:
            raise self.error(f"unknown op '{op_tok.text}'", op_tok) from None
        self.expect("(", f"'(' after {op_tok.text}")
        inputs = []
        if not self.at(")"):
            inputs.append(self.use())
            while self.at(","):
                self.advance()
                inputs.append(self.use())
        self.expect(")", "',' or ')' after an input")
        attrs, attr_toks = self.attr_dict(opdef) if self.at("{") else ({}, {})
        placement = self.advance().value if self.at("placement") else None
        types = []
        if name_toks:
            self.expect(":", "':' and the result types")
            types = self.types(len(name_toks))
        for k, v in attrs.items():
            if isinstance(v, _Dense):
                attrs[k] = self.build_dense(v, types[0][0] if types else None)
            try:
                # checked one by one to point at the offending value; emit normalizes again
                opdef.attrs[k].normalize(attrs[k], f"{opdef.name}: attribute {k}")
            except TdcError as e:
                raise self.error(f"bad attribute value: {e}", attr_toks[k]) from None
        names = []
        for t in name_toks:
            if t.value in self.env:
                raise self.error(f"{t.text} is defined twice", t)
            names.append(None if t.value[0] == "#" or is_numbered(t.value[1]) else t.value[1])
        try:
            outs = self.g.emit(op_tok.text, inputs, attrs, placement, names=names)
        except TdcError as e:
            raise self.error(str(e), op_tok) from None
        if len(outs) != len(name_toks):
            raise self.error(f"{op_tok.text} produces {len(outs)} result(s), but {len(name_toks)} are named", op_tok)
        for t, v, (declared, ttok) in zip(name_toks, outs, types):
            if v.type != declared:
                raise self.error(f"type mismatch: {t.text} is inferred as {v.type} but declared {declared}", ttok)
            self.define(t, v)

    @staticmethod
    def registry_op(name: str):
        return get_op(name)

    def attr_dict(self, opdef) -> tuple[dict, dict]:
        """`{k=v, ...}`; with an opdef, keys must be its attributes. Returns values and their tokens."""
        self.expect("{", "'{'")
        attrs, toks = {}, {}
        while not self.at("}"):
            if attrs:
                self.expect(",", "',' or '}' after an attribute")
            ktok = self.tok
            key = self.name("an attribute name")
            if opdef is not None and key not in opdef.attrs:
                takes = ", ".join(opdef.attrs) or "none"
                raise self.error(f"unknown attribute '{key}' of {opdef.name} (it takes: {takes})", ktok)
            if key in attrs:
                raise self.error(f"attribute '{key}' is given twice", ktok)
            self.expect("=", f"'=' after attribute name {key}")
            toks[key] = self.tok
            attrs[key] = self.literal(top=True)
        self.advance()
        return attrs, toks

    def literal(self, top: bool = False):
        tok = self.tok
        if tok.kind in ("number", "string"):
            return self.advance().value
        if tok.kind == "[":
            self.advance()
            items = []
            while not self.at("]"):
                if items:
                    self.expect(",", "',' or ']' in a list")
                items.append(self.literal())
            self.advance()
            return items
        if tok.kind == "ident":
            words = {"true": True, "false": False, "none": None, "inf": float("inf"), "nan": float("nan")}
            if tok.text in words:
                self.advance()
                return words[tok.text]
            if tok.text in DTYPES:
                return self.advance().text
            if tok.text == "elided":
                raise self.error("a constant printed in short (elided<...>) cannot be read back: print the graph "
                                 "with every value (tdc dump --full-constants)", tok)
            if tok.text == "dense" and top:
                self.advance()
                self.expect("<", "'<' after dense")
                lit = self.literal()
                self.expect(">", "'>' to close dense<...")
                t = None
                if self.at(":"):
                    self.advance()
                    t, _ = self.type()
                return _Dense(lit, t, tok)
        raise self.error(f"bad attribute value '{tok.text}'" if tok.kind != "eof" else "bad attribute value", tok)

    def build_dense(self, d: _Dense, result: TensorType | None) -> np.ndarray:
        t = d.type or result
        if t is None:
            raise self.error("dense<...> needs a type here: write dense<...> : f32[...]", d.tok)

        def shape_of(x) -> tuple:
            if not isinstance(x, list):
                return ()
            inner = {shape_of(e) for e in x}
            if len(inner) > 1:
                raise self.error("dense<...> rows have different lengths", d.tok)
            return (len(x),) + (inner.pop() if inner else ())

        def check(x):
            if isinstance(x, list):
                return all(check(e) for e in x)
            if t.dtype == "bool":
                return isinstance(x, bool)
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                return False
            if is_int(t.dtype):
                info = np.iinfo(t.np_dtype)
                return isinstance(x, int) and info.min <= x <= info.max
            return True

        if not check(d.literal):
            raise self.error(f"dense<...> has a value that is not a valid {t.dtype}", d.tok)
        shape = shape_of(d.literal)
        try:
            with np.errstate(over="ignore"):  # f16 overflows to inf, as a cast would
                a = np.array(d.literal, dtype=t.np_dtype)
        except (OverflowError, ValueError):
            raise self.error(f"dense<...> has a value that does not fit {t.dtype}", d.tok) from None
        if shape != t.shape:
            if a.size != 0 or t.size != 0:
                raise self.error(f"dense<...> has shape {list(shape)} but its type is {t}", d.tok)
            a = a.reshape(t.shape)
        return a

    def update(self):
        ttok = self.tok
        target = self.use()
        self.expect("<-", "'<-'")
        value = self.use()
        try:
            self.g.add_update(target, value)
        except TdcError as e:
            raise self.error(str(e), ttok) from None

    def ret(self):
        self.advance()
        if self.at("}"):
            return
        outs = []
        while True:
            ntok = self.tok
            name = self.name("an output name")
            self.expect("=", f"'=' after output name {name}")
            vtok = self.tok
            outs.append((ntok, name, vtok, self.use()))
            if not self.at(","):
                break
            self.advance()
        self.expect(":", "':' and the output types")
        for (ntok, name, vtok, v), (declared, ttok) in zip(outs, self.types(len(outs))):
            if v.type != declared:
                raise self.error(f"type mismatch: output {name} ({vtok.text}) is {v.type} but declared {declared}",
                                 ttok)
            try:
                self.g.add_output(name, v)
            except TdcError as e:
                raise self.error(str(e), ntok) from None


def parse_graph(text: str, source: str = "<ir>") -> Graph:
    """Parse the text form of one graph. Raises IRParseError ("source:line:col: message")."""
    p = None
    try:
        p = _Parser(text, source)
        return p.graph()
    except IRParseError:
        raise
    except Exception as e:  # a bug or a registry failure must still say where the parser was
        tok = p.tok if p is not None else Token("eof", "", None, 1, 1)
        msg = str(e) if isinstance(e, TdcError) else f"internal error: {type(e).__name__}: {e}"
        raise IRParseError(msg, tok.line, tok.col, source) from e
