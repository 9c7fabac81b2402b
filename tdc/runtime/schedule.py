"""Learning-rate schedules: `sched.lr_at(step)` gives the rate for step 0, 1, 2, ...

    sched = make_schedule("cosine", lr=1e-3, total_steps=440, warmup=20)

A schedule is a pure function of the step, so a resumed run recomputes the same
rates. The training graph takes `lr` as an input each step, so schedules never
change the compiled graph.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

from ..errors import TdcError

SCHEDULES = ("constant", "step", "cosine")


class Schedule(ABC):
    """A learning rate per step."""

    @abstractmethod
    def lr_at(self, step: int) -> float:
        """The learning rate for 0-based step `step`."""

    def __call__(self, step: int) -> float:
        return self.lr_at(step)


class Constant(Schedule):
    def __init__(self, lr: float):
        self.lr = lr

    def lr_at(self, step: int) -> float:
        return self.lr

    def __repr__(self):
        return f"constant(lr={self.lr:g})"


class StepDecay(Schedule):
    """lr * gamma^(step // step_size): multiply by gamma every step_size steps."""

    def __init__(self, lr: float, step_size: int, gamma: float = 0.1):
        if step_size < 1:
            raise TdcError(f"step decay needs step_size >= 1, got {step_size}")
        self.lr, self.step_size, self.gamma = lr, step_size, gamma

    def lr_at(self, step: int) -> float:
        return self.lr * self.gamma ** (step // self.step_size)

    def __repr__(self):
        return f"step(lr={self.lr:g}, every {self.step_size} steps x{self.gamma:g})"


class Cosine(Schedule):
    """Half a cosine from lr at step 0 down to `floor` at `total_steps`, then flat at floor."""

    def __init__(self, lr: float, total_steps: int, floor: float = 0.0):
        if total_steps < 1:
            raise TdcError(f"cosine decay needs total_steps >= 1, got {total_steps}")
        self.lr, self.total_steps, self.floor = lr, total_steps, floor

    def lr_at(self, step: int) -> float:
        t = min(step, self.total_steps) / self.total_steps
        return self.floor + (self.lr - self.floor) * 0.5 * (1.0 + math.cos(math.pi * t))

    def __repr__(self):
        return f"cosine(lr={self.lr:g} -> {self.floor:g} over {self.total_steps} steps)"


class Warmup(Schedule):
    """Linear warm-up for `steps` steps to the base schedule's first rate, then the base
    schedule (shifted, so it starts where the warm-up ends). Step s < steps gets
    base(0) * (s + 1) / steps: the first step already uses a small nonzero rate."""

    def __init__(self, base: Schedule, steps: int):
        if steps < 0:
            raise TdcError(f"warm-up steps must be >= 0, got {steps}")
        self.base, self.steps = base, steps

    def lr_at(self, step: int) -> float:
        if step < self.steps:
            return self.base.lr_at(0) * (step + 1) / self.steps
        return self.base.lr_at(step - self.steps)

    def __repr__(self):
        return f"warmup({self.steps} steps, then {self.base!r})"


def scaled_lr(lr: float, batch: int, base_batch: int) -> float:
    """The linear scaling rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD"): when the
    mini-batch grows k-fold, multiply the learning rate by k. Pair it with warm-up, since the
    large rate is unstable in the first steps."""
    if base_batch < 1 or batch < 1:
        raise TdcError(f"linear lr scaling needs positive batch sizes, got batch {batch}, base batch {base_batch}")
    return lr * batch / base_batch


def make_schedule(name: str, lr: float, total_steps: int, warmup: int = 0, step_size: int | None = None,
                  gamma: float = 0.1, floor: float = 0.0, batch: int | None = None,
                  base_batch: int | None = None) -> Schedule:
    """A schedule by name. With base_batch, lr is first scaled by batch / base_batch.
    step_size defaults to a third of the steps after warm-up; cosine decays over those steps."""
    if name not in SCHEDULES:
        raise TdcError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    if not lr >= 0:
        raise TdcError(f"learning rate must be >= 0, got {lr}")
    if warmup < 0:
        raise TdcError(f"warm-up must be >= 0 steps, got {warmup}")
    if step_size is not None and step_size < 1:
        raise TdcError(f"step size must be >= 1 steps, got {step_size}")
    if not 0 < gamma <= 1:
        raise TdcError(f"gamma (the step decay factor) must be in (0, 1], got {gamma}")
    if base_batch is not None:
        if batch is None:
            raise TdcError("linear lr scaling needs the batch size")
        lr = scaled_lr(lr, batch, base_batch)
    decay_steps = max(1, total_steps - warmup)
    if name == "constant":
        sched: Schedule = Constant(lr)
    elif name == "step":
        sched = StepDecay(lr, step_size if step_size is not None else max(1, decay_steps // 3), gamma)
    else:
        sched = Cosine(lr, decay_steps, floor)
    return Warmup(sched, warmup) if warmup > 0 else sched
