"""Kernel families. Each module describes one family to the generator:

- FAMILY: the spec `family` token;  TEMPLATE: its Jinja template (in templates/);  TOOLCHAIN: "nvcc" or "cxx"
- candidates(policy) -> iterable of (KernelSpec, reason or None): the family's whole candidate space for a
  policy; None accepts the spec, a string names why it is left out
- ABI: the name of its kernel argument list in codegen/abi.py
- launch(spec) -> dict: launch facts the runtime needs (threads, shared memory, grid kind, limits); JSON only
- cost(spec) -> dict (or a COST dict): the selector's inputs (natgen.cost reads them from the manifest)
- partners(spec) -> [specs] (optional): a forward's backward instances
- context(spec) -> dict: precomputed template values (templates do no parameter-space logic)
"""
from . import cpu, cpu_unfused, simt, simtbwd, simtbwda, tcbwd, tcg, tcs, unfused

REGISTRY = {module.FAMILY: module for module in (simt, tcs, tcg, cpu, simtbwd, simtbwda, tcbwd, *unfused.FAMILIES,
                                                *cpu_unfused.FAMILIES)}
