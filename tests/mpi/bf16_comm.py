"""Run under mpiexec -n 2: bf16 tensors moved between ranks by broadcast, allgather and send/recv on
each backend named on the command line, their bits checked on every rank. Each rank prints one
JSON line."""
import json
import sys

import ml_dtypes
import numpy as np

import tdc
from tdc.backends.comm import communicator
from tdc.ir.graph import Graph
from tdc.ir.types import TensorType as T

BF16 = np.dtype(ml_dtypes.bfloat16)
comm = communicator(timeout=30)
rank = comm.rank


def piece(r: int) -> np.ndarray:
    bits = np.arange(6, dtype=np.uint16).reshape(2, 3) + np.uint16(0x3F80 + 0x100 * r)
    bits[0, 0] = 0x7FC1 + r        # a NaN whose payload differs per rank
    return bits.view(BF16)


g = Graph("bf16_comm")
x = g.add_arg("x", T("bf16", (2, 3)), "input")
g.add_output("b", g.emit("broadcast", [x], {"root": 1})[0])
g.add_output("ag", g.emit("allgather", [x], {"axis": 0, "sizes": [2, 2], "world": 2})[0])
g.emit("send", [x], {"dst": 1}, placement="rank:0")
(y,) = g.emit("recv", [], {"src": 0, "shape": [2, 3], "dtype": "bf16"}, placement="rank:1")
g.add_output("y", y)
done = []
for backend in sys.argv[1:]:
    out = tdc.compile(g, backend=backend)(x=piece(rank))
    want = {"b": piece(1), "ag": np.concatenate([piece(0), piece(1)])}
    if rank == 1:
        want["y"] = piece(0)
    for name, w in want.items():
        assert out[name].dtype == BF16 and np.array_equal(out[name].view(np.uint16), w.view(np.uint16)), \
            (backend, rank, name, out[name].view(np.uint16), w.view(np.uint16))
    done.append(backend)
# one write per rank: print() writes the text and its newline apart, and mpiexec interleaves the
# ranks' output between writes
sys.stdout.write(json.dumps({"rank": rank, "ok": done}) + "\n")
sys.stdout.flush()
