"""The op families. Importing this package defines every op (fills the registry in
`tdc.ir.opdef`); `tensor.py` and `functional.py` are the graph-building API that the
families' gradient rules, the passes and the DSL are written in."""
from . import comm, conv, elementwise, linalg, loss, norm, pool, quant, reduce, shape, sparse  # noqa: F401
