"""How a CUDA instance is launched on a problem: grid, block, shared memory and the argument list.

Everything here comes from the instance's manifest entry (its launch facts and its ABI layout) and the
Problem, and is computed once per resolved call: `plan` is static, `bind` fills in the tensor addresses.
The same plan drives the GPU (CuPy) and the CPU emulator, so the emulator checks exactly what a GPU runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

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

    def bind(self, tensors) -> List[object]:
        """The argument list with the tensors (in pointer order) at the pointer positions."""
        args = list(self.template)
        for (position, _), tensor in zip(self.pointers, tensors):
            args[position] = tensor
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




# the tensors a forward call provides, by ABI field name
FORWARD_TENSORS = ("q", "k", "v", "out", "lse", "extra_k", "extra_v", "rpb")


class KernelCall:
    """A resolved call of one CUDA instance on one problem: the plan and a launcher, made once.

    `launcher(tensors)` runs with the pointer arguments in the layout's order (CuPy on a GPU, the emulator
    on the CPU, or nothing for a dry run); a call allocates the outputs and hands over the tensors."""

    def __init__(self, instance: Instance, problem: Problem, launcher=None):
        self.instance, self.problem, self.launcher = instance, problem, launcher
        self.plan = plan(instance, problem)
        names = [name for _, name in self.plan.pointers]
        unknown = sorted(set(names) - set(FORWARD_TENSORS))
        if unknown:
            raise RuntimeError(f"{instance.name}: pointer arguments {unknown} are unknown to this natgen's forward")
        order = [FORWARD_TENSORS.index(name) for name in names]
        self.order = None if order == list(range(len(FORWARD_TENSORS))) else order
        self.out_shape = (problem.batch, *problem.spatial, problem.heads, problem.head_dim_v)
        self.lse_shape = self.out_shape[:-1]
        self.dtype, self.device = problem.dtype, problem.device
        self.placeholder = torch.zeros(1, dtype=problem.dtype, device=problem.device)  # never read: n_extra = 0

    def __call__(self, q, k, v, extra_k=None, extra_v=None, rpb=None):
        out = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)
        lse = torch.empty(self.lse_shape, dtype=torch.float32, device=self.device)
        if extra_k is None:
            extra_k = extra_v = self.placeholder
        if rpb is None:
            rpb = self.placeholder  # never read: the selector gives a bias only to instances that read it
        tensors = (q, k, v, out, lse, extra_k, extra_v, rpb)
        if self.order is not None:
            tensors = tuple(tensors[i] for i in self.order)
        self.launcher(tensors)
        return out, lse
