"""Optimizers as graph passes: the update rules become part of the training graph.

The pass takes a graph with "grad.<param>" outputs (from autodiff), adds a
scalar input `lr` (the learning rate for this step, from the schedule), state
for each param's slots (velocity, moments...) and the step counter `step`, and
writes every update as `%param <- %new`. The gradient outputs are dropped.

Update rules (g is the gradient plus weight_decay * p, i.e. coupled L2):
  sgd       p -= lr g
  momentum  v = mu v - lr g;               p += v
  nesterov  v' = mu v - lr g;              p += -mu v + (1 + mu) v'
  adagrad   c += g^2;                      p -= lr g / (sqrt(c) + eps)
  rmsprop   c = rho c + (1 - rho) g^2;     p -= lr g / (sqrt(c) + eps)
  adam      m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  t = step + 1
            p -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import TdcError
from ..ops import functional as F
from ..ops.tensor import Builder, Tensor
from ..ir.graph import Graph
from ..ir.types import TensorType
from .autodiff import GRAD_PREFIX

SLOTS = {"sgd": (), "momentum": ("velocity",), "nesterov": ("velocity",), "adagrad": ("cache",),
         "rmsprop": ("cache",), "adam": ("m", "v"), "adamw": ("m", "v")}


@dataclass
class Optimizer:
    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    rho: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    # decoupled: p -= lr * weight_decay * p beside the optimizer's update (AdamW, Loshchilov and Hutter);
    # otherwise L2: weight_decay * p is added to the gradient. adamw is adam with decoupled decay.
    decoupled: bool = False
    decay_bias_norm: bool = True   # False: params of rank <= 1 (biases, norm scales and shifts) get no decay

    def __post_init__(self):
        if self.name not in SLOTS:
            raise TdcError(f"unknown optimizer {self.name!r}; choose from {', '.join(SLOTS)}")
        for k in ("lr", "eps", "weight_decay"):
            if getattr(self, k) < 0:
                raise TdcError(f"optimizer {k} must be >= 0, got {getattr(self, k)}")
        for k in ("momentum", "rho", "beta1", "beta2"):
            if not 0.0 <= getattr(self, k) < 1.0:
                raise TdcError(f"optimizer {k} must be in [0, 1), got {getattr(self, k)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def decoupled_decay(self) -> bool:
        return self.decoupled or self.name == "adamw"

    @property
    def slots(self) -> tuple[str, ...]:
        """The optimizer state each param has (velocity, m and v, ...)."""
        return SLOTS[self.name]

    def decays(self, ndim: int) -> bool:
        """Whether a param of rank `ndim` gets weight decay."""
        return self.weight_decay > 0 and (self.decay_bias_norm or ndim > 1)


def add_optimizer(graph: Graph, opt: Optimizer) -> Graph:
    g, _ = graph.map_copy()
    grads = {n[len(GRAD_PREFIX):]: v for n, v in g.outputs if n.startswith(GRAD_PREFIX)}
    if not grads:
        raise TdcError(f"graph {g.name} has no gradient outputs: run autodiff before the optimizer")
    g.outputs = [(n, v) for n, v in g.outputs if not n.startswith(GRAD_PREFIX)]
    with Builder(g) as b:
        lr = b.arg("lr", TensorType("f32", ()), "input")
        step = b.step()
        t = step + 1
        g.add_update(step.value, t.value)
        for name, gv in grads.items():
            p = Tensor(g.arg(name), b)
            if p.value.kind != "param":
                continue
            grad = Tensor(gv, b)
            lr_p = F.cast(lr, p.dtype) if p.dtype != "f32" else lr
            slots = {s: b.arg(f"{name}.{s}", p.type, "state", init="zeros") for s in SLOTS[opt.name]}
            new_p, new_slots = rule(opt, p, grad, lr_p, t, slots)
            g.add_update(p.value, new_p.value)
            for s, v in new_slots.items():
                g.add_update(slots[s].value, v.value)
    return g


def rule(opt: Optimizer, p, grad, lr, t, slots, decay: bool | None = None):
    """(new p, new slots) of one optimizer step on param `p` (tensors of the graph being built);
    `decay` overrides whether p gets weight decay (a flattened piece of a matrix, say)."""
    decay = opt.decays(p.ndim) if decay is None else decay
    new_p, new_slots = _update(opt, p, grad + p * opt.weight_decay if decay and not opt.decoupled_decay
                               else grad, lr, t, slots)
    if decay and opt.decoupled_decay:
        new_p = new_p - lr * opt.weight_decay * p
    return new_p, new_slots


def _update(opt: Optimizer, p, grad, lr, t, slots):
    eps = opt.eps
    if opt.name == "sgd":
        return p - lr * grad, {}
    if opt.name == "momentum":
        v = slots["velocity"] * opt.momentum - lr * grad
        return p + v, {"velocity": v}
    if opt.name == "nesterov":
        v_old = slots["velocity"]
        v = v_old * opt.momentum - lr * grad
        return p - v_old * opt.momentum + v * (1.0 + opt.momentum), {"velocity": v}
    if opt.name == "adagrad":
        c = slots["cache"] + grad * grad
        return p - lr * grad / (F.sqrt(c) + eps), {"cache": c}
    if opt.name == "rmsprop":
        c = slots["cache"] * opt.rho + grad * grad * (1.0 - opt.rho)
        return p - lr * grad / (F.sqrt(c) + eps), {"cache": c}
    # adam
    m = slots["m"] * opt.beta1 + grad * (1.0 - opt.beta1)
    v = slots["v"] * opt.beta2 + grad * grad * (1.0 - opt.beta2)
    tf = F.cast(t, p.dtype)
    bc1 = 1.0 - F.pow(F.constant(opt.beta1, p.dtype), tf)
    bc2 = 1.0 - F.pow(F.constant(opt.beta2, p.dtype), tf)
    return p - lr * (m / bc1) / (F.sqrt(v / bc2) + eps), {"m": m, "v": v}
