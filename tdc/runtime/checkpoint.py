"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is one .npz file: every param, const and optimizer state array of the
training executable (under "state/NAME"), plus a JSON string "meta" with the
format version, model name, step, epoch, position within the epoch, the seed the
data order is derived from, and the optimizer config. It is written atomically
(temp file + rename), so a crash or a failed write leaves the previous checkpoint intact.

    save_checkpoint("ckpt", exe.state, model="digits", step=440, epoch=10, position=0, seed=0,
                    optimizer=opt.to_dict())
    ck = load_checkpoint("ckpt")          # ckpt/last.npz
"""
from __future__ import annotations

import json
import os
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from ..errors import TdcError
from ..ir.graph import Graph
from ..files import atomic_write
from ..ir.weights import CHECKPOINT_STATE

FORMAT = "tdc-checkpoint"
VERSION = 1
LAST = "last.npz"
STATE_PREFIX = CHECKPOINT_STATE      # what `tdc run --weights ckpt/last.npz` reads
REQUIRED = ("model", "step", "epoch", "position", "seed", "optimizer")


@dataclass
class Checkpoint:
    path: str
    meta: dict
    state: dict[str, np.ndarray]

    @property
    def step(self) -> int:
        return self.meta["step"]

    @property
    def epoch(self) -> int:
        """Epochs completed; the run continues in epoch index `epoch` at batch `position`."""
        return self.meta["epoch"]

    @property
    def position(self) -> int:
        return self.meta["position"]

    @property
    def seed(self) -> int:
        return self.meta["seed"]

    @property
    def optimizer(self) -> dict:
        return self.meta["optimizer"]

    @property
    def model(self) -> str:
        return self.meta["model"]


def checkpoint_path(path: str) -> str:
    """DIR -> DIR/last.npz; a file path is returned as is."""
    return os.path.join(path, LAST) if os.path.isdir(path) or not path.endswith(".npz") else path


def save_checkpoint(directory: str, state: dict[str, np.ndarray], *, model: str, step: int, epoch: int,
                    position: int, seed: int, optimizer: dict, keep: bool = False, **extra) -> str:
    """Write DIR/last.npz (and DIR/step-NNNNNNNN.npz when `keep`). Returns the path of last.npz."""
    meta = {"format": FORMAT, "version": VERSION, "model": model, "step": int(step), "epoch": int(epoch),
            "position": int(position), "seed": int(seed), "optimizer": dict(optimizer), **extra}
    arrays = {"meta": np.array(json.dumps(meta))}
    arrays.update({STATE_PREFIX + k: np.asarray(v) for k, v in state.items()})

    def write(f):
        np.savez(f, **arrays)   # looked up at call time so tests can make it fail midway

    os.makedirs(directory, exist_ok=True)
    if keep:
        atomic_write(os.path.join(directory, f"step-{step:08d}.npz"), write)
    last = os.path.join(directory, LAST)
    atomic_write(last, write)
    return last


def load_checkpoint(path: str) -> Checkpoint:
    """Read a checkpoint file, or DIR/last.npz for a directory; any damage is a TdcError."""
    file = checkpoint_path(path)
    if not os.path.exists(file):
        where = f"{path}: no checkpoint (expected {file})" if file != path else f"{path}: no such checkpoint file"
        raise TdcError(where)
    try:
        with np.load(file, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, zlib.error) as e:
        raise TdcError(f"{file}: corrupt or truncated checkpoint ({e})") from None
    if "meta" not in arrays:
        raise TdcError(f"{file}: not a tdc checkpoint (no metadata; is it a weights file?)")
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except ValueError as e:
        raise TdcError(f"{file}: corrupt checkpoint metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise TdcError(f"{file}: not a tdc checkpoint")
    if meta.get("version") != VERSION:
        raise TdcError(f"{file}: checkpoint format version {meta.get('version')}; this tdc reads version {VERSION}")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise TdcError(f"{file}: corrupt checkpoint metadata (no {', '.join(missing)})")
    other = [k for k in arrays if not k.startswith(STATE_PREFIX)]
    if other:
        raise TdcError(f"{file}: unexpected array {other[0]!r} in checkpoint")
    state = {k[len(STATE_PREFIX):]: v for k, v in arrays.items()}
    return Checkpoint(file, meta, state)


def check_compatible(ck: Checkpoint, graph: Graph, optimizer: dict | None = None) -> None:
    """Raise unless the checkpoint holds exactly the params, consts and state of the training
    `graph` (names, shapes, dtypes) and, when given, was written with the same optimizer."""
    args = [a for a in graph.args if a.kind != "input"]
    # Params first: a different model is the likeliest mistake and its message is the clearest.
    for a in args:
        if a.kind == "param":
            _check_arg(ck, graph, a)
    if optimizer is not None:
        _check_optimizer(ck, optimizer)
    for a in args:
        if a.kind != "param":
            _check_arg(ck, graph, a)
    extra = sorted(set(ck.state) - {a.name for a in args})
    if extra:
        raise TdcError(f"checkpoint {ck.path} (model {ck.model}) does not fit model {graph.name}: "
                       f"it has {extra[0]!r}, which the model does not")


def _check_arg(ck: Checkpoint, graph: Graph, a) -> None:
    bad = f"checkpoint {ck.path} (model {ck.model}) does not fit model {graph.name}"
    if a.name not in ck.state:
        raise TdcError(f"{bad}: it has no {a.kind} {a.name} ({a.type})")
    x = ck.state[a.name]
    if x.shape != a.type.shape:
        raise TdcError(f"{bad}: {a.kind} {a.name} is {list(x.shape)} in the checkpoint, "
                       f"the model needs {list(a.type.shape)}")
    if x.dtype != a.type.np_dtype:
        raise TdcError(f"{bad}: {a.kind} {a.name} has dtype {x.dtype} in the checkpoint, "
                       f"the model needs {a.type.dtype}")


# The hyperparameters each rule bakes into the training graph. The learning rate is not
# among them: it is an input of every step (from the schedule), so it may change on resume.
OPTIMIZER_FIELDS = {"sgd": (), "momentum": ("momentum",), "nesterov": ("momentum",), "adagrad": ("eps",),
                    "rmsprop": ("rho", "eps"), "adam": ("beta1", "beta2", "eps")}


def _check_optimizer(ck: Checkpoint, optimizer: dict) -> None:
    saved = ck.optimizer
    fields = ("name", "weight_decay") + OPTIMIZER_FIELDS.get(optimizer.get("name"), ())
    for k in fields:
        if saved.get(k) != optimizer.get(k):
            raise TdcError(f"checkpoint {ck.path} was written with optimizer {k} {saved.get(k)!r}; "
                           f"this run uses {optimizer.get(k)!r}")


def check_settings(ck: Checkpoint, **settings) -> None:
    """Raise unless every setting (batch, seed, ...) equals the one the checkpoint was written with."""
    for k, v in settings.items():
        if k in ck.meta and ck.meta[k] != v:
            raise TdcError(f"checkpoint {ck.path} was written with {k} {ck.meta[k]!r}; this run uses {v!r} "
                           f"(resume with the same {k})")
