"""Lowering: what every compiled backend shares between the passes and its own code.

  pipeline.py  the compile pipeline (simplification, conv algorithm choice, fusion) for a target
  plan.py      the kernel plan: each fused kernel as a loop nest of scalar ops (loops.py), a
               library call, a view, a strided copy, or a fallback
  memplan.py   the memory plan: liveness over the kernel schedule, offsets in one arena
A backend renders the plan (Numba as Python source, LLVM as IR) over the planned buffers.
"""
