"""Kernel families. Each module describes one family to the generator:

- FAMILY: the spec `family` token;  TEMPLATE: its Jinja template (in templates/);  TOOLCHAIN: "nvcc" or "cxx"
- candidates(policy) -> iterable of (KernelSpec, reason or None): the family's whole candidate space for a
  policy; None accepts the spec, a string names why it is left out
- launch(spec) -> dict: launch facts the runtime needs (threads, shared memory, work figures); JSON only
- context(spec) -> dict: precomputed template values (templates do no parameter-space logic)
"""
from . import cpu, simt, tcg, tcs

REGISTRY = {module.FAMILY: module for module in (simt, tcs, tcg, cpu)}
