"""The unfused ops' generated CPU kernels (families cpuqk, cpuav, cpuinv, cpurpb): finding, loading, launching.

natgen.unfused_cuda composes the ops and their gradients from the four kernel kinds for every kernel backend
and hands backend "cpu" to launch() here. Tensors go to the kernels as they are (float32, float16, bfloat16 or
float64, contiguous): the instances read and write their element type and accumulate in float (double for
double), so no converted copy of the logits is made. Arguments are packed from the manifest's "cpu_unfused"
layout into one block of 8-byte fields; modules compile on first use (natgen.cxx).
"""
from __future__ import annotations

import ctypes
import functools

import torch

from . import cxx
from .manifest import family_instance
from .packing import Layout
from .problem import Problem
from .spec import TORCH_DTYPE_TOKENS

FAMILIES = {"qk": "cpuqk", "av": "cpuav", "inverse": "cpuinv", "rpb_grad": "cpurpb"}


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the CPU kernels can run here (a C++ compiler builds them on first use)."""
    return cxx.find_compiler() is not None


def instance_for(operation: str, rank: int, dtype_token: str):
    return family_instance(FAMILIES[operation], rank, dtype_token)


@functools.lru_cache(maxsize=None)
def _layout(instance) -> Layout:
    return Layout(instance.layout, instance.name)


def launch(operation: str, problem: Problem, out: torch.Tensor, zero_masked: bool = False, **tensors) -> torch.Tensor:
    """Run one unfused CPU kernel: the pointers by ABI name (absent ones are null), `out` written in place;
    zero_masked: the qk kind writes 0 instead of -inf in the slots a causal window hides."""
    instance = instance_for(operation, problem.rank, TORCH_DTYPE_TOKENS[str(problem.dtype).replace("torch.", "")])
    module = cxx.load(instance)
    layout = _layout(instance)
    values = [0] * len(layout.names)
    for position, value in layout.scalars(problem, torch.get_num_threads()):
        values[position] = value
    values[layout.index("zero_masked")] = int(zero_masked)
    tensors = dict(tensors, out=out)  # out: allocated contiguous by every caller (natgen.unfused_cuda)
    keep = {name: tensors[name].contiguous() for name in layout.pointer_names if tensors.get(name) is not None}
    for name in layout.pointer_names:
        values[layout.index(name)] = keep[name].data_ptr() if name in keep else 0
    data = bytearray(layout.struct().pack(*values))
    view = (ctypes.c_char * len(data)).from_buffer(data)
    module.run(ctypes.addressof(view), len(values))
    return out
