"""The text IR (printer and parser), the verifier and the DOT export."""
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tdc.errors import IRParseError, VerifyError
from tdc.ir.dot import to_dot
from tdc.ir.graph import ARG_KINDS, Graph, Node, Value
from tdc.ir.parser import parse_graph
from tdc.ir.printer import literal, print_graph
from tdc.ir.types import DTYPES, TensorType as T
from tdc.ir.verify import check_types, verify


def roundtrip(g: Graph) -> Graph:
    text = print_graph(g)
    verify(g)
    g2 = parse_graph(text)
    verify(g2)
    assert print_graph(g2) == text
    return g2


def same_attrs(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, np.ndarray):
            if x.dtype != y.dtype or not np.array_equal(x, y, equal_nan=x.dtype.kind == "f" or x.dtype == DTYPES["bf16"]):
                return False
        elif not (x == y or (x != x and y != y)):  # nan == nan here
            return False
    return True


def assert_same_graph(g: Graph, g2: Graph):
    assert g.name == g2.name
    assert [(a.name, a.type, a.kind) for a in g.args] == [(a.name, a.type, a.kind) for a in g2.args]
    assert len(g.nodes) == len(g2.nodes)
    for n, m in zip(g.nodes, g2.nodes):
        assert (n.op, n.placement, [v.type for v in n.outputs]) == (m.op, m.placement, [v.type for v in m.outputs])
        assert same_attrs(n.attrs, m.attrs)
    assert [n for n, _ in g.outputs] == [n for n, _ in g2.outputs]


# ---- (a) hand-built round trips -------------------------------------------------

def test_roundtrip_every_attr_kind_and_syntax_feature():
    g = Graph("lenet")
    x = g.add_arg("x", T("f32", (4, 1, 8, 8)), "input")
    w = g.add_arg("conv1.weight", T("f32", (6, 1, 5, 5)), "param", {"init": "he_normal"})
    b = g.add_arg("conv1/b:0", T("f32", (6,)), "param",
                  {"init": "zeros", "gain": 1.5, "n": 3, "l": [1, 2.0, [True]], "none": None, "s": 'q"\\\n'})
    m = g.add_arg("m", T("f32", (6,)), "state", {"init": "zeros"})
    v = g.add_arg("v", T("f32", (6,)), "state")
    g.add_arg("c", T("i32", (2,)), "const", {"value": np.array([1, 2], np.int32), "scales": [0.5, 2.0]})
    step = g.add_arg("step", T("i64", ()), "state")
    (c,) = g.emit("conv2d", [x, w, b], {"pad": [2, 2, 2, 2], "algo": "im2col"})     # ints, str
    (r,) = g.emit("relu", [c], names=["h"])
    y, new_m, _ = g.emit("batchnorm", [r, b, b, m, v], {"training": True, "eps": 1e-3})  # bool, float
    (ar,) = g.emit("allreduce", [r], placement="rank:1")
    g.emit("send", [ar], {"dst": 1})                                            # int, zero outputs
    (one,) = g.emit("constant", [], {"value": np.array(1, np.int64)})
    (s2,) = g.emit("add", [step, one])
    (lr,) = g.emit("leaky_relu", [y], {"alpha": -np.inf}, placement="gpu 0")
    (rs,) = g.emit("reduce_sum", [lr], {"axes": [1, 2]})
    (cs,) = g.emit("cast", [rs], {"to": "f16"}, names=["loss/f16:0"])           # dtype
    g.add_update(m, new_m)
    g.add_update(step, s2)
    g.add_output("out", lr)
    g.add_output("loss value", cs)

    text = print_graph(g)
    # a long signature prints one argument per line
    assert text.startswith(
        'graph lenet(\n    %x: f32[4,1,8,8] input,\n    %conv1.weight: f32[6,1,5,5] param {init="he_normal"},\n'
        '    %"conv1/b:0": f32[6] param {init="zeros", gain=1.5, n=3, l=[1,2.0,[true]], none=none, s="q\\"\\\\\\n"}')
    for line in ['  %0 = conv2d(%x, %conv1.weight, %"conv1/b:0") {pad=[2,2,2,2], algo="im2col"} : f32[4,6,8,8]',
                 "  %h = relu(%0) : f32[4,6,8,8]",
                 '  %1, %2, %3 = batchnorm(%h, %"conv1/b:0", %"conv1/b:0", %m, %v) {eps=0.001, training=true}'
                 " : f32[4,6,8,8], f32[6], f32[6]",
                 "  %4 = allreduce(%h) @rank:1 : f32[4,6,8,8]",
                 "  send(%4) {dst=1}",
                 "  %5 = constant() {value=dense<1>} : i64[]",
                 '  %7 = leaky_relu(%1) {alpha=-inf} @"gpu 0" : f32[4,6,8,8]',
                 '  %"loss/f16:0" = cast(%8) {to=f16} : f16[4,8]',
                 "  %m <- %2",
                 "  %step <- %6",
                 '  return out=%7, "loss value"=%"loss/f16:0" : f32[4,6,8,8], f16[4,8]']:
        assert line in text.splitlines()
    assert '{value=dense<[1,2]> : i32[2], scales=[0.5,2.0]}' in text
    g2 = roundtrip(g)
    assert_same_graph(g, g2)
    assert g2.arg("conv1/b:0").attrs == g.arg("conv1/b:0").attrs
    assert g2.nodes[1].outputs[0].name == "h" and g2.nodes[0].outputs[0].name is None
    assert [t.name for t, _ in g2.updates] == ["m", "step"]


@pytest.mark.parametrize("alpha, text", [(1.0, "1.0"), (1e-05, "1e-05"), (np.inf, "inf"), (np.nan, "nan"),
                                         (-0.0, "-0.0"), (0.1, "0.1"), (1e300, "1e+300"), (-2.5, "-2.5")])
def test_float_attrs_exact(alpha, text):
    g = Graph("f")
    x = g.add_arg("x", T("f32", (2,)), "input")
    (y,) = g.emit("leaky_relu", [x], {"alpha": alpha})
    g.add_output("y", y)
    printed = print_graph(g)
    assert f"{{alpha={text}}}" in printed
    g2 = roundtrip(g)
    assert repr(g2.nodes[0].attrs["alpha"]) == repr(g.nodes[0].attrs["alpha"])


def test_scalar_literals():
    assert literal(3) == "3" and literal(3.0) == "3.0" and literal(True) == "true" and literal(None) == "none"
    assert literal([1, 2]) == "[1,2]" and literal((0.5, float("-inf"))) == "[0.5,-inf]"
    assert literal(np.float32(0.1)) == "0.1" and literal(np.int8(-3)) == "-3"   # shortest f32 text
    assert literal("f16") == '"f16"' and literal("f16", dtype_attr=True) == "f16"


CONSTANTS = [
    np.array([[1.0, 2.0], [3.0, 4.0]], np.float32),
    np.array([np.nan, np.inf, -np.inf, -0.0, 0.1, 1e-45, 3.4028235e38], np.float32),
    np.array([np.nan, -np.inf, 6e-08, 65504, 0.1], np.float16),
    np.array([np.nan, 5e-324, 1e-308, 0.1, 1 / 3], np.float64),
    np.array([-128, 0, 127], np.int8),
    np.array([[-2**31, 2**31 - 1]], np.int32),
    np.array([-2**63, 2**63 - 1, 0], np.int64),
    np.array([0, 255, 7], np.uint8),
    np.array([-2**15, 2**15 - 1], np.int16),
    np.array([[0, 2**16 - 1]], np.uint16),
    np.array([0, 2**32 - 1], np.uint32),
    np.array([0, 2**63, 2**64 - 1], np.uint64),
    np.array([[True, False], [False, True]]),
    np.array(5, np.int32),
    np.array(np.nan, np.float16),
    np.array(True),
    np.zeros((0, 3), np.float32),
    np.zeros((2, 0), np.int64),
    np.zeros((2, 1, 3), np.float64),
]


@pytest.mark.parametrize("value", CONSTANTS, ids=lambda a: f"{a.dtype}{list(a.shape)}")
def test_constant_roundtrip(value):
    g = Graph("k")
    (k,) = g.emit("constant", [], {"value": value}, names=["k"])
    g.add_output("k", k)
    g2 = roundtrip(g)
    got = g2.nodes[0].attrs["value"]
    assert got.dtype == value.dtype and got.shape == value.shape and got.tobytes() == value.tobytes()


def test_constant_text_forms():
    g = Graph("k")
    g.add_output("a", g.emit("constant", [], {"value": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)})[0])
    g.add_output("b", g.emit("constant", [], {"value": np.array(5, np.int32)})[0])
    g.add_output("c", g.emit("constant", [], {"value": np.array([True, False])})[0])
    text = print_graph(g)
    assert "%0 = constant() {value=dense<[[1.0,2.0],[3.0,4.0]]>} : f32[2,2]" in text
    assert "%1 = constant() {value=dense<5>} : i32[]" in text
    assert "%2 = constant() {value=dense<[true,false]>} : bool[2]" in text


def test_names_numbering_and_quoting():
    g = Graph("my graph")
    x = g.add_arg("x", T("f32", (3,)), "input")
    d = g.add_arg("7", T("f32", (3,)), "input")             # an all-digit argument name stays a name
    (a,) = g.emit("relu", [x], names=["x"])                 # clashes with an argument: numbered
    (b,) = g.emit("relu", [a], names=["12"])                # all digits: numbered
    (c,) = g.emit("add", [b, d], names=["é \"q\""])
    (e,) = g.emit("relu", [c], names=[""])
    g.add_output("0", e)
    text = print_graph(g)
    assert text.splitlines()[0] == 'graph "my graph"(%x: f32[3] input, %"7": f32[3] input) {'
    assert '  %"\\u00e9 \\"q\\"" = add(%1, %"7") : f32[3]' in text
    assert '  return "0"=%2 : f32[3]' in text
    g2 = roundtrip(g)
    assert [v.name for n in g2.nodes for v in n.outputs] == [None, None, 'é "q"', None]
    assert g2.arg("7").type == T("f32", (3,))


def test_empty_graph_and_flexible_text():
    g = Graph("e")
    assert print_graph(g) == "graph e() {\n  return\n}"
    roundtrip(g)
    text = """// a comment
    graph   t (  %x :f32[ 2 , 3 ]input ,%y: f32[3] param{init = "zeros"  }) {  // a comment
      %a=add(%x,%y):f32[2,3]   %b = leaky_relu(%a){alpha=1}:f32[2,3]
      %y <- %y
      return r = %b , "s" = %a : f32[2,3] , f32[2,3] }
    """
    g = parse_graph(text)
    verify(g)
    assert print_graph(g) == (
        'graph t(%x: f32[2,3] input, %y: f32[3] param {init="zeros"}) {\n'
        "  %a = add(%x, %y) : f32[2,3]\n"
        "  %b = leaky_relu(%a) {alpha=1.0} : f32[2,3]\n"
        "  %y <- %y\n"
        "  return r=%b, s=%a : f32[2,3], f32[2,3]\n"
        "}")


# ---- (b) random graphs -----------------------------------------------------------

NAMES = st.one_of(st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,5}", fullmatch=True), st.text(max_size=5),
                  st.sampled_from(["0", "12", "x", "return", "graph", "inf", "true", "dense"]))
FLOATS = ("f16", "f32", "f64")


@st.composite
def graphs(draw):
    base = tuple(draw(st.lists(st.integers(1, 3), max_size=3)))

    def shape():  # every shape broadcasts with every other one
        k = draw(st.integers(0, len(base)))
        return tuple(d if draw(st.booleans()) else 1 for d in base[len(base) - k:])

    g = Graph(draw(NAMES))
    pool: list[Value] = []
    for name in draw(st.lists(NAMES, min_size=1, max_size=4, unique=True)):
        attrs = draw(st.sampled_from([{}, {"init": "he_normal"}, {"init": "zeros", "scale": 0.5, "fan": [1, 2]}]))
        pool.append(g.add_arg(name, T(draw(st.sampled_from(list(DTYPES))), shape()),
                              draw(st.sampled_from(ARG_KINDS)), attrs))

    def pick(pred=lambda v: True):
        choices = [v for v in pool if pred(v)]
        return draw(st.sampled_from(choices)) if choices else None

    for _ in range(draw(st.integers(0, 10))):
        op = draw(st.sampled_from(["relu", "exp", "tanh", "sigmoid", "neg", "abs", "leaky_relu", "cast",
                                   "add", "sub", "mul", "maximum", "less", "equal", "where", "constant", "full"]))
        attrs, inputs = {}, None
        if op in ("relu", "exp", "tanh", "sigmoid", "leaky_relu"):
            x = pick(lambda v: v.type.dtype in FLOATS)
            inputs = x and [x]
            if op == "leaky_relu":
                attrs["alpha"] = draw(st.floats())
        elif op in ("neg", "abs"):
            x = pick(lambda v: v.type.dtype not in ("bool", "bf16"))
            inputs = x and [x]
        elif op == "cast":
            inputs = [pick()]
            attrs["to"] = draw(st.sampled_from(list(DTYPES)))
        elif op in ("add", "sub", "mul", "maximum", "less", "equal"):
            a = pick(lambda v: v.type.dtype != "bf16" and (op in ("less", "equal") or v.type.dtype != "bool"))
            inputs = a and [a, pick(lambda v: v.type.dtype == a.type.dtype)]
        elif op == "where":
            c = pick(lambda v: v.type.dtype == "bool")
            if c is not None:
                x = pick()
                inputs = [c, x, pick(lambda v: v.type.dtype == x.type.dtype)]
        elif op == "constant":
            inputs = []
            dt = draw(st.sampled_from(list(DTYPES)))
            # hypothesis has no bfloat16 strategy: f32 values rounded to it
            attrs["value"] = draw(arrays(DTYPES[dt] if dt != "bf16" else np.float32, shape())).astype(DTYPES[dt])
        else:
            inputs = []
            attrs = {"shape": shape(), "value": draw(st.floats()), "dtype": draw(st.sampled_from(list(DTYPES)))}
        if inputs is None:
            continue
        placement = draw(st.one_of(st.none(), st.sampled_from(["rank:1", "gpu 0", "a.b_c"]), st.text(max_size=3)))
        pool += g.emit(op, inputs, attrs, placement=placement, names=[draw(st.one_of(st.none(), NAMES))])

    for name in draw(st.lists(NAMES, max_size=3, unique=True)):
        g.add_output(name, pick())
    for target in [a for a in g.args if a.kind in ("param", "state")]:
        new = pick(lambda v: v.type == target.type)
        if draw(st.booleans()):
            g.add_update(target, new)
    return g


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_random_graphs_roundtrip(g):
    g2 = roundtrip(g)
    assert_same_graph(g, g2)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mangled_text_raises_only_parse_errors(data):
    text = print_graph(data.draw(graphs()))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(i, min(len(text), i + 4)))
        text = text[:i] + data.draw(st.sampled_from(["", "%", '"', ",", "[", "]", "{", "}", "-", "1", "x", "<-",
                                                     "dense<", ":", "f32[2]", "//", "\n", "@"])) + text[j:]
    try:
        g = parse_graph(text)
    except IRParseError as e:
        assert re.match(r"<ir>:\d+:\d+: ", str(e))
    else:
        verify(g)


# ---- (c) malformed text -------------------------------------------------------

BASE = """graph t(%x: f32[2,3] input, %w: f32[3] param) {
  %0 = relu(%x) : f32[2,3]
  %1 = add(%0, %w) : f32[2,3]
  return out=%1 : f32[2,3]
}"""


def edit(line: int, old: str, new: str) -> str:
    lines = BASE.split("\n")
    assert old in lines[line - 1]
    lines[line - 1] = lines[line - 1].replace(old, new, 1)
    return "\n".join(lines)


BAD = [
    (edit(2, "relu", "relu3"), 2, 8, "unknown op 'relu3'"),
    (edit(2, "relu(%x)", "relu(%x, %x)"), 2, 8, "relu takes 1 inputs, got 2"),
    (edit(1, "f32[2,3]", "f32(2,3)"), 1, 16, "expected '[' after the dtype"),
    (edit(1, "f32[2,3]", "f33[2,3]"), 1, 13, "unknown dtype 'f33'"),
    (edit(1, "f32[2,3]", "f32[2,-3]"), 1, 19, "bad dimension '-3'"),
    (edit(3, "%0, %w", "%7, %w"), 3, 12, "use of undefined value %7"),
    (edit(3, "%1 =", "%0 ="), 3, 3, "%0 is defined twice"),
    (edit(1, "%w: f32[3] param", "%x: f32[3] param"), 1, 29, "%x is defined twice"),
    (edit(2, "relu(%x)", 'leaky_relu(%x) {alpha="big"}'), 2, 30, "bad attribute value"),
    (edit(2, "relu(%x)", "leaky_relu(%x) {alpha=)}"), 2, 30, "bad attribute value ')'"),
    (edit(2, "relu(%x)", "leaky_relu(%x) {alph=0.5}"), 2, 24, "unknown attribute 'alph'"),
    (BASE[:BASE.index("  %1")], 3, 1, "unexpected end of input"),
    (BASE.replace("  return out=%1 : f32[2,3]\n", ""), 4, 1, "missing 'return'"),
    (edit(2, ": f32[2,3]", ": f32[3,2]"), 2, 19, "type mismatch: %0 is inferred as f32[2,3] but declared f32[3,2]"),
    (edit(4, ": f32[2,3]", ": f64[2,3]"), 4, 19, "type mismatch: output out (%1) is f32[2,3] but declared f64[2,3]"),
    (edit(2, "relu(%x)", "relu(%x) #"), 2, 17, "unexpected character '#'"),
    (edit(1, "graph t", 'graph "t'), 1, 7, "unterminated string"),
    (edit(1, "%x: f32", "%x f32"), 1, 12, "expected ':' after value name"),
    (edit(1, "input", "inputs"), 1, 22, "unknown argument kind 'inputs'"),
    (edit(3, "  %1", "  %x <- %0\n  %1"), 3, 3, "only params and state can be updated"),
    (edit(2, "relu(%x)", "constant() {value=dense<[1.0,2.0]>}"), 2, 26, "dense<...> has shape [2] but its type is"),
    (edit(2, "relu(%x) : f32[2,3]", "constant() {value=dense<[1.5]>} : i8[1]"), 2, 26, "not a valid i8"),
    (edit(5, "}", "} x"), 5, 3, "expected end of input after the graph, got 'x'"),
    (edit(2, "%0 = relu(%x) : f32[2,3]", "%0, %9 = relu(%x) : f32[2,3], f32[2,3]"), 2, 12, "relu produces 1 result(s), but 2 are named"),
    ("", 1, 1, "unexpected end of input (expected 'graph')"),
]


@pytest.mark.parametrize("text, line, col, message", BAD, ids=[b[3][:30] for b in BAD])
def test_parse_errors(text, line, col, message):
    with pytest.raises(IRParseError) as info:
        parse_graph(text, source="model.tir")
    e = info.value
    assert (e.line, e.col) == (line, col), str(e)
    assert message in str(e)
    assert str(e).startswith(f"model.tir:{line}:{col}: ")


# ---- (d) the verifier ------------------------------------------------------------

def small_graph():
    g = Graph("v")
    x = g.add_arg("x", T("f32", (2, 3)), "input")
    s = g.add_arg("s", T("f32", (2, 3)), "state")
    (a,) = g.emit("relu", [x])
    (b,) = g.emit("leaky_relu", [a], {"alpha": 0.5})
    g.add_output("out", b)
    g.add_update(s, b)
    verify(g)
    return g, x, s, a, b


def test_verify_use_before_definition():
    g, *_ = small_graph()
    g.nodes.reverse()
    with pytest.raises(VerifyError, match=r"node 0 \(leaky_relu\): input 0 .* used before its definition by node 1"):
        verify(g)


def test_verify_value_from_another_graph():
    g, *_ = small_graph()
    other, x2, *_ = small_graph()
    g.nodes[0].inputs[0] = x2
    with pytest.raises(VerifyError, match=r"node 0 \(relu\): input 0 .* not defined in this graph"):
        verify(g)


def test_verify_wrong_output_type():
    g, *_ = small_graph()
    g.nodes[0].outputs[0].type = T("f32", (3, 2))
    with pytest.raises(VerifyError, match=r"node 0 \(relu\): outputs are typed f32\[3,2\] but the registry infers"):
        check_types(g)
    with pytest.raises(VerifyError, match=r"node 0 \(relu\): outputs are typed f32\[3,2\]"):
        verify(g)


def test_verify_attrs_duplicates_outputs_updates():
    g, x, s, a, b = small_graph()
    g.nodes[1].attrs = {}
    with pytest.raises(VerifyError, match=r"node 1 \(leaky_relu\): attributes \{\} are not in normalized form"):
        verify(g)
    g.nodes[1].attrs = {"alpha": "big"}
    with pytest.raises(VerifyError, match="bad attributes: leaky_relu: attribute alpha must be a number"):
        verify(g)
    g.nodes[1].attrs = {"alpha": 0.5, "beta": 1}
    with pytest.raises(VerifyError, match="unknown attribute 'beta'"):
        verify(g)

    g, x, s, a, b = small_graph()
    g.nodes.append(g.nodes[0])
    with pytest.raises(VerifyError, match=r"node 2 \(relu\): output 0 .* defined twice"):
        verify(g)

    g, x, s, a, b = small_graph()
    g.outputs.append(("out", a))
    with pytest.raises(VerifyError, match="output name 'out' is used twice"):
        verify(g)

    g, x, s, a, b = small_graph()
    g.updates.append((s, a))
    with pytest.raises(VerifyError, match="s is updated twice"):
        verify(g)
    g.updates = [(x, b)]
    with pytest.raises(VerifyError, match="not a param or state"):
        verify(g)
    g.updates = [(s, Value(T("f32", (2, 3))))]
    with pytest.raises(VerifyError, match="not defined in this graph"):
        verify(g)

    g, *_ = small_graph()
    g.nodes.append(Node("conv3d", [], {}))
    with pytest.raises(VerifyError, match="unknown op 'conv3d'"):
        verify(g)


# ---- (e) DOT ------------------------------------------------------------------

DOT_STRING = r'"(?:[^"\\]|\\.)*"'


def check_dot(dot: str):
    assert dot.startswith("digraph ") and dot.rstrip().endswith("}")
    stripped = re.sub(DOT_STRING, '""', dot)
    assert '"' not in stripped.replace('""', ""), "unterminated DOT string"
    depth = 0
    for ch in stripped:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0
    declared, edges = set(), []
    for line in stripped.splitlines()[1:-1]:
        if m := re.fullmatch(r"\s*(\w+) -> (\w+) \[.*\];", line):
            edges.append(m.groups())
        elif m := re.fullmatch(r"\s*(\w+) \[.*\];", line):
            if m.group(1) not in ("node", "edge"):  # defaults, not declarations
                declared.add(m.group(1))
        else:
            raise AssertionError(f"not a DOT statement: {line}")
    for src, dst in edges:
        assert src in declared and dst in declared, (src, dst)
    return declared, edges


def test_dot():
    g, *_ = small_graph()
    g.name = 'we"ird\\name\n'
    g.add_output("a \"quoted\" \\ name", g.args[0])
    dot = to_dot(g)
    declared, edges = check_dot(dot)
    assert dot.startswith('digraph "we\\"ird\\\\name\\n" {')
    assert ("a0", "n0") in edges and ("n1", "o0") in edges and ("n1", "u0") in edges and ("u0", "a1") in edges
    assert 'n1 [shape=box, label="leaky_relu\\nf32[2,3]"];' in dot
    assert 'label="a \\"quoted\\" \\\\ name"' in dot


@settings(max_examples=50, deadline=None)
@given(graphs())
def test_dot_random(g):
    declared, edges = check_dot(to_dot(g))
    assert len(declared) == len(g.args) + len(g.nodes) + len(g.outputs) + len(g.updates)
