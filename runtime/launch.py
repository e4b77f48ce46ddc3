"""How a CUDA instance is launched on a problem: grid, block, shared memory and the argument list.

Everything here comes from the instance's manifest entry (its launch facts and its ABI layout) and the
Problem, and is computed once per resolved call: `plan` is static, `bind` fills in the tensor addresses.
The same plan drives the GPU (CuPy) and the CPU emulator, so the emulator checks exactly what a GPU runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from .manifest import Instance
from .packing import Layout
from .problem import Problem


@dataclass
class Plan:
    grid: Tuple[int, int, int]
    block: Tuple[int, int, int]
    shared_mem: int
    template: List[object]             # python ints/floats at scalar positions, None at pointer positions
    pointers: List[Tuple[int, str]]    # (position, field name) of each pointer argument
    scalar_types: List[str]            # ABI type of every argument, in order

    def bind(self, tensors: Dict[str, torch.Tensor]) -> List[object]:
        """The argument list with tensors at the pointer positions (CuPy / the emulator take them so)."""
        args = list(self.template)
        for position, name in self.pointers:
            args[position] = tensors[name]
        return args


def _tiles_grid(tile, spatial, dilation) -> int:
    """One CTA per query tile: prod over dims of ceil(L / tile)."""
    return math.prod(math.ceil(length / t) for t, length in zip(tile, spatial))


def _group_tiles_grid(tile, spatial, dilation) -> int:
    """A CTA owns a tile inside one dilation group: prod over dims of D * ceil(ceil(L / D) / tile)."""
    return math.prod(d * math.ceil(math.ceil(length / d) / t) for t, length, d in zip(tile, spatial, dilation))


# launch["grid"] of a manifest entry -> CTAs along blockIdx.x
GRIDS = {"tiles": _tiles_grid, "group_tiles": _group_tiles_grid}


def plan(instance: Instance, problem: Problem) -> Plan:
    launch = instance.launch
    try:
        grid_x = GRIDS[launch["grid"]](instance.spec.tile, problem.spatial, problem.dilation)
    except KeyError:
        raise RuntimeError(f"{instance.name}: grid kind {launch.get('grid')!r} is unknown to this natgen") from None
    if problem.heads > 65535 or problem.batch > 65535:
        raise ValueError(f"heads={problem.heads}, batch={problem.batch}: the CUDA grid allows at most 65535 of each")
    if grid_x >= 2 ** 31:
        raise ValueError(f"{grid_x} query tiles exceed the CUDA grid's x limit")
    layout = Layout(instance.layout, instance.name)
    template: List[object] = [None] * len(layout.names)
    for position, value in layout.scalars(problem):
        template[position] = value
    pointers = [(i, name) for i, name in enumerate(layout.names) if layout.types[i] == "ptr"]
    return Plan((grid_x, problem.heads, problem.batch), (launch["threads"], 1, 1), launch.get("dynamic_smem", 0),
                template, pointers, list(layout.types))


def allocate(problem: Problem, q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(q.shape[:-1] + (problem.head_dim_v,), dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    return out, lse


def placeholder(q: torch.Tensor) -> torch.Tensor:
    # a one-element stand-in keeps every pointer valid; n_extra=0 means it is never read
    return torch.zeros(1, dtype=q.dtype, device=q.device)


class KernelCall:
    """A resolved call of one CUDA instance on one problem: the plan and a launcher, made once.

    `launcher(plan, args)` runs the bound argument list (CuPy on a GPU, the emulator on the CPU, or nothing
    for a dry run); a call allocates the outputs, binds the addresses and launches."""

    def __init__(self, instance: Instance, problem: Problem, launcher):
        self.instance, self.problem, self.launcher = instance, problem, launcher
        self.plan = plan(instance, problem)
        self.out_shape = (problem.batch, *problem.spatial, problem.heads, problem.head_dim_v)

    def __call__(self, q, k, v, extra_k=None, extra_v=None):
        out = torch.empty(self.out_shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(self.out_shape[:-1], dtype=torch.float32, device=q.device)
        if extra_k is None:
            extra_k = extra_v = placeholder(q)
        args = self.plan.bind({"q": q, "k": k, "v": v, "out": out, "lse": lse, "extra_k": extra_k,
                               "extra_v": extra_v})
        self.launcher(self.plan, args)
        return out, lse
