"""How each CUDA family is launched: grid, block and the argument list, from the manifest and a Problem.

The same plan drives the GPU (CuPy) and the CPU emulator, so the emulator checks exactly what a GPU runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch

from .manifest import Instance
from .problem import Problem

LOG2E = 1.4426950408889634


@dataclass
class Buffers:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor
    extra_k: torch.Tensor
    extra_v: torch.Tensor


@dataclass
class Plan:
    grid: Tuple[int, int, int]
    block: Tuple[int, int, int]
    args: List[object]        # tensors for pointer parameters, python ints/floats otherwise
    scalar_types: List[str]   # C type of each non-tensor argument, in order ("int" / "float")
    shared_mem: int


def allocate(problem: Problem, q, k, v, extra_k, extra_v) -> Buffers:
    out = torch.empty(q.shape[:-1] + (problem.head_dim_v,), dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    if extra_k is None:
        # a one-element stand-in keeps every pointer valid; n_extra=0 means it is never read
        extra_k = extra_v = torch.zeros(1, dtype=q.dtype, device=q.device)
    return Buffers(q, k, v, out, lse, extra_k, extra_v)


def _padded(values, fill=1):
    return list(values) + [fill] * (3 - len(values))


def simt_plan(instance: Instance, problem: Problem, buffers: Buffers) -> Plan:
    spec, launch = instance.spec, instance.launch
    tile = _padded(spec.tile)
    spatial = _padded(problem.spatial)
    tiles = math.prod(math.ceil(spatial[d] / tile[d]) for d in range(3))
    if problem.heads > 65535 or problem.batch > 65535:
        raise ValueError(f"heads={problem.heads}, batch={problem.batch}: the CUDA grid allows at most 65535 of each")
    ints = [problem.n_extra, problem.heads, *spatial, *_padded(problem.kernel_size), *_padded(problem.stride),
            *_padded(problem.dilation)]
    args = [buffers.q, buffers.k, buffers.v, buffers.out, buffers.lse, buffers.extra_k, buffers.extra_v,
            *ints, problem.scale * LOG2E, 1]
    scalar_types = ["int"] * len(ints) + ["float", "int"]
    return Plan((tiles, problem.heads, problem.batch), (launch["threads"], 1, 1), args, scalar_types,
                launch.get("dynamic_smem", 0))


PLANNERS: Dict[str, Callable[[Instance, Problem, Buffers], Plan]] = {"simt": simt_plan}


def register_planner(family: str, planner: Callable[[Instance, Problem, Buffers], Plan]) -> None:
    PLANNERS[family] = planner


def plan(instance: Instance, problem: Problem, buffers: Buffers) -> Plan:
    try:
        planner = PLANNERS[instance.spec.family]
    except KeyError:
        raise RuntimeError(f"no launch plan for family {instance.spec.family!r}") from None
    return planner(instance, problem, buffers)


from . import launch_tc  # noqa: E402,F401  (registers the tensor-core planners; it imports this module)
