"""Magnitude pruning's schedule and masks: what `tdc train --prune S` does between epochs.

The training graph holds a mask per prunable weight (passes/prune.py). Before an epoch the
schedule names the sparsity s_e the weights should have; the trainer computes new masks that
zero the round(s_e * n) weights of smallest |w| (per layer: n is the layer's weight count;
global: one threshold over every prunable weight, n their total), zeroes those weights and their
optimizer state, and training goes on with the masks holding them at zero.

Schedules (e counts the epochs completed):
  oneshot[:E]    s_e = S for e >= E (default E = 0: prune before the first step)
  iterative:N    s_e = S (1 - (1 - e/N)^3) for e = 1..N, S after: the cubic ramp of Zhu and
                 Gupta 2017 ("To prune, or not to prune"), re-pruning before each epoch 2..N+1,
                 so one dense epoch comes first and the last epochs fine-tune at S.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import TdcError
from ..ir.graph import Graph
from ..passes.optimizer import SLOTS
from ..passes.prune import MASK

SCOPES = ("layer", "global")


@dataclass(frozen=True)
class Prune:
    sparsity: float
    scope: str = "layer"
    schedule: str = "oneshot"   # "oneshot", "oneshot:E" or "iterative:N"

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise TdcError(f"--prune sparsity must be in [0, 1), got {self.sparsity:g}")
        if self.scope not in SCOPES:
            raise TdcError(f"--prune-scope must be one of {', '.join(SCOPES)}, not {self.scope!r}")
        self.parse_schedule()   # a bad --prune-schedule fails here, before any training

    def parse_schedule(self) -> tuple[str, int]:
        kind, _, n = self.schedule.partition(":")
        bad = f"--prune-schedule must be oneshot, oneshot:EPOCH or iterative:EPOCHS, not {self.schedule!r}"
        if kind not in ("oneshot", "iterative") or (kind == "iterative" and not n):
            raise TdcError(bad)
        try:
            epochs = int(n or 0)
        except ValueError:
            raise TdcError(bad) from None
        if epochs < (1 if kind == "iterative" else 0):
            raise TdcError(bad + ("; EPOCHS >= 1" if kind == "iterative" else "; EPOCH >= 0"))
        return kind, epochs

    def sparsity_at(self, epoch: int) -> float:
        """The sparsity the weights are pruned to before epoch `epoch` (0-based: epochs completed)."""
        kind, n = self.parse_schedule()
        if kind == "oneshot":
            return self.sparsity if epoch >= n else 0.0
        return self.sparsity * (1.0 - (1.0 - min(epoch, n) / n) ** 3)

    def last_epoch(self) -> int:
        """The epoch (0-based) before which the final sparsity is reached."""
        return self.parse_schedule()[1]

    def describe(self) -> str:
        return f"{self.sparsity:g} {self.scope}, {self.schedule}"


def masks_for(weights: dict[str, np.ndarray], sparsity: float, scope: str,
              old: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """{name: mask} zeroing the round(sparsity * n) weights of smallest magnitude, per layer or
    over all `weights` together. Weights already masked in `old` count as zero, so a rising
    sparsity keeps every weight pruned before pruned (ties go to the earlier weight)."""
    mags = {k: np.abs(w.astype(np.float64)) * (old[k] if old else 1) for k, w in weights.items()}
    if scope == "layer":
        return {k: _keep_largest(m, sparsity).astype(weights[k].dtype) for k, m in mags.items()}
    flat = np.concatenate([m.ravel() for m in mags.values()])
    keep = _keep_largest(flat, sparsity)
    out, at = {}, 0
    for k, m in mags.items():
        out[k] = keep[at:at + m.size].reshape(m.shape).astype(weights[k].dtype)
        at += m.size
    return out


def _keep_largest(mag: np.ndarray, sparsity: float) -> np.ndarray:
    k = int(round(sparsity * mag.size))
    keep = np.ones(mag.size, bool)
    keep[np.argsort(mag.ravel(), kind="stable")[:k]] = False
    return keep.reshape(mag.shape)


def mask_names(graph: Graph) -> list[str]:
    """The weights the training graph masks (the prune pass's state values)."""
    return [a.name[:-len(MASK)] for a in graph.state if a.name.endswith(MASK)]


def prune_state(state: dict[str, np.ndarray], graph: Graph, sparsity: float, scope: str) -> dict[str, np.ndarray]:
    """The new masks, weights and optimizer slots of a training step's `state` pruned to `sparsity`:
    what the trainer gives the executable's set_state."""
    names = mask_names(graph)
    masks = masks_for({k: state[k] for k in names}, sparsity, scope, {k: state[k + MASK] for k in names})
    new = {}
    for k, m in masks.items():
        new[k + MASK] = m
        for name in [k] + [f"{k}.{s}" for ss in SLOTS.values() for s in ss]:
            if name in state and name not in new:
                new[name] = state[name] * m
    return new


def sparsity_report(state: dict[str, np.ndarray], names: list[str]) -> tuple[float, dict[str, float]]:
    """(fraction of exact zeros over all `names` weights, {name: its fraction}): measured, not the masks'."""
    per = {k: float(np.mean(state[k] == 0)) for k in names}
    total = sum(state[k].size for k in names)
    return sum(per[k] * state[k].size for k in names) / max(total, 1), per
