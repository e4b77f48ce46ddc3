"""Kernel families. Each module describes one family to the generator:

- FAMILY: the spec `family` token;  TEMPLATE: its Jinja template (in templates/);  TOOLCHAIN: "nvcc" or "cxx"
- candidates(policy) -> iterable of (KernelSpec, reason or None): the family's whole candidate space for a
  policy; None accepts the spec, a string names why it is left out
- launch(spec) -> dict: launch facts the runtime needs (threads, shared memory, work figures); JSON only
- context(spec) -> dict: precomputed template values (templates do no parameter-space logic)
"""
from . import simt

REGISTRY = {module.FAMILY: module for module in (simt,)}


def register(module):
    REGISTRY[module.FAMILY] = module


from . import tcs; register(tcs)  # noqa: E402,E702
from . import tcg; register(tcg)  # noqa: E402,E702
from . import cpu; register(cpu)  # noqa: E402,E702
