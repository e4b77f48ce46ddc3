"""How a CUDA instance is launched on a problem: grid, block, shared memory and the argument list.

Everything here comes from the instance's manifest entry (its launch facts and its ABI layout) and the
Problem, and is computed once per resolved call: `plan` is static, `bind` fills in the tensor addresses.
The same plan drives the GPU (CuPy) and the CPU emulator, so the emulator checks exactly what a GPU runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

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


def _tiles_grid(tile, problem: Problem) -> int:
    """One CTA per tile of tokens: prod over dims of ceil(L / tile)."""
    return math.prod(math.ceil(length / t) for t, length in zip(tile, problem.spatial))


def _group_tiles_grid(tile, problem: Problem) -> int:
    """A CTA owns a tile inside one dilation group: prod over dims of D * ceil(ceil(L / D) / tile)."""
    return math.prod(d * math.ceil(math.ceil(length / d) / t)
                     for t, length, d in zip(tile, problem.spatial, problem.dilation))


def _extra_grid(tile, problem: Problem) -> int:
    """One CTA per extra token."""
    return problem.n_extra


def _rpb_grid(tile, problem: Problem) -> int:
    """One warp per entry of a head's bias (prod over dims of 2K - 1), a CTA holding prod(tile) warps."""
    return math.ceil(math.prod(2 * k - 1 for k in problem.kernel_size) / math.prod(tile))


def _extra_tiles_grid(tile, problem: Problem) -> int:
    """One CTA per tile's worth of extra tokens: ceil(n_extra / prod(tile))."""
    return math.ceil(problem.n_extra / math.prod(tile))


# launch["grid"] of a manifest entry (or of one of its entry points) -> CTAs along blockIdx.x
GRIDS = {"tiles": _tiles_grid, "group_tiles": _group_tiles_grid, "extra": _extra_grid, "rpb": _rpb_grid,
         "extra_tiles": _extra_tiles_grid}
# what blockIdx.y counts ("heads" unless an entry point says otherwise)
GRID_HEADS = {"heads": lambda problem: problem.heads, "heads_kv": lambda problem: problem.heads_kv}


def plan(instance: Instance, problem: Problem, entry: Optional[dict] = None) -> Plan:
    """The launch of `instance` (or of its entry point `entry`, one of launch["entries"]) on `problem`."""
    launch = entry if entry is not None else instance.launch
    try:
        grid_x = GRIDS[launch["grid"]](instance.spec.tile, problem)
        grid_y = GRID_HEADS[launch.get("heads", "heads")](problem)
    except KeyError:
        raise RuntimeError(f"{instance.name}: grid kind {launch.get('grid')!r} / {launch.get('heads')!r} is unknown "
                           "to this natgen") from None
    if problem.heads > 65535 or problem.batch > 65535:
        raise ValueError(f"heads={problem.heads}, batch={problem.batch}: the CUDA grid allows at most 65535 of each")
    if grid_x >= 2 ** 31:
        raise ValueError(f"{grid_x} query tiles exceed the CUDA grid's x limit")
    layout = Layout(instance.layout, instance.name)
    template: List[object] = [None] * len(layout.names)
    for position, value in layout.scalars(problem):
        template[position] = value
    pointers = [(i, name) for i, name in enumerate(layout.names) if layout.types[i] == "ptr"]
    # batch "loop": the entry sums over the batch itself (one CTA row along z)
    grid_z = 1 if launch.get("batch") == "loop" else problem.batch
    return Plan((grid_x, grid_y, grid_z), (launch["threads"], 1, 1), launch.get("dynamic_smem", 0),
                template, pointers, list(layout.types))


def _tensor_order(instance: Instance, plan: Plan, known) -> Optional[List[int]]:
    """Indices into `known` of the plan's pointer arguments (None: the same order), or an error naming the
    pointer arguments this natgen cannot provide."""
    names = [name for _, name in plan.pointers]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise RuntimeError(f"{instance.name}: pointer arguments {unknown} are unknown to this natgen")
    order = [known.index(name) for name in names]
    return None if order == list(range(len(known))) else order


# the tensors a forward call provides, by ABI field name
FORWARD_TENSORS = ("q", "k", "v", "out", "lse", "extra_k", "extra_v", "rpb")


class KernelCall:
    """A resolved call of one CUDA instance on one problem: the plan and a launcher, made once.

    `launcher(tensors)` runs with the pointer arguments in the layout's order (CuPy on a GPU, the emulator
    on the CPU, or nothing for a dry run); a call allocates the outputs and hands over the tensors."""

    def __init__(self, instance: Instance, problem: Problem, launcher=None):
        self.instance, self.problem, self.launcher = instance, problem, launcher
        self.plan = plan(instance, problem)
        self.order = _tensor_order(instance, self.plan, FORWARD_TENSORS)
        self.out_shape = (problem.batch, *problem.spatial, problem.heads, problem.head_dim_v)
        self.lse_shape = self.out_shape[:-1]
        self.dtype, self.device = problem.dtype, problem.device
        self.placeholder = torch.zeros(1, dtype=problem.dtype, device=problem.device)  # never read: n_extra = 0

    def __call__(self, q, k, v, extra_k=None, extra_v=None, rpb=None):
        out = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)
        lse = torch.empty(self.lse_shape, dtype=torch.float32, device=self.device)
        if extra_k is None:
            extra_k = extra_v = self.placeholder
        tensors = (q, k, v, out, lse, extra_k, extra_v, rpb)  # rpb None: a null pointer (no bias)
        if self.order is not None:
            tensors = tuple(tensors[i] for i in self.order)
        self.launcher(tensors)
        return out, lse


# the tensors a backward call provides, by ABI field name
BACKWARD_TENSORS = ("q", "k", "v", "out", "lse", "grad_out", "grad_lse", "delta", "extra_k", "extra_v", "grad_q",
                    "grad_k", "grad_v", "grad_extra_k", "grad_extra_v", "rpb", "grad_rpb", "grad_logits", "dq_accum")


class BackwardCall:
    """A resolved call of one CUDA backward instance: one plan per entry point (launch["entries"], in launch
    order; those that need extra tokens or a bias only when the problem has them), all on the same argument
    list.

    `launcher_for(symbol, plan)` makes each entry's launcher (CuPy, the emulator, or nothing). A call allocates
    the gradients and the float32 scratch and runs the entries in turn on the same stream. The scratch:
    `delta`, one value per query row (O(N * heads)); with a bias `grad_logits`, dS per (query row, window
    slot) (O(N * heads * prod(K)), what the unfused ops' logits take); with launch dq = "atomic" a zeroed
    float32 dQ (`dq_accum`, like q). Absent scratch and bias tensors are null pointers."""

    def __init__(self, instance: Instance, problem: Problem, launcher_for: Callable):
        self.instance, self.problem = instance, problem
        entries = instance.launch.get("entries")
        if not entries:
            raise RuntimeError(f"{instance.name}: a backward entry without launch entry points "
                               "(re-run `python build.py`)")
        if problem.has_rpb and not instance.launch.get("rpb", False):
            raise RuntimeError(f"{instance.name} adds no positional bias (the selector refuses it such problems)")
        self.launches = []
        for entry in entries:
            if (entry.get("needs_extra") and not problem.n_extra) or (entry.get("needs_rpb") and not problem.has_rpb):
                continue
            entry_plan = plan(instance, problem, entry)
            self.launches.append((entry["symbol"], launcher_for(entry["symbol"], entry_plan),
                                  _tensor_order(instance, entry_plan, BACKWARD_TENSORS)))
        self.lse_shape = (problem.batch, *problem.spatial, problem.heads)
        self.logits_shape = (*self.lse_shape, math.prod(problem.kernel_size))
        self.atomic_dq = instance.launch.get("dq") == "atomic"
        self.device = problem.device
        self.placeholder = torch.zeros(1, dtype=problem.dtype, device=problem.device)  # never read: n_extra = 0

    def __call__(self, q, k, v, extra_k, extra_v, out, lse, grad_out, grad_lse, rpb=None):
        """(grad_q, grad_k, grad_v, grad_extra_k, grad_extra_v, grad_rpb), None where there is no such input."""
        device = self.device
        if grad_lse is None:
            grad_lse = torch.zeros(self.lse_shape, dtype=torch.float32, device=device)
        else:
            grad_lse = grad_lse.to(torch.float32).contiguous()
        delta = torch.empty(self.lse_shape, dtype=torch.float32, device=device)
        # torch.empty: every gradient row is written by exactly one warp, including rows no query reaches
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dq_accum = torch.zeros(q.shape, dtype=torch.float32, device=device) if self.atomic_dq else None
        if extra_k is None:
            extra_k = extra_v = grad_extra_k = grad_extra_v = self.placeholder
        else:
            grad_extra_k, grad_extra_v = torch.empty_like(extra_k), torch.empty_like(extra_v)
        grad_rpb = grad_logits = None
        if rpb is not None:
            # every entry of grad_rpb is written by one warp; grad_logits is read only where a walk stored dS
            grad_rpb = torch.empty_like(rpb)
            grad_logits = torch.empty(self.logits_shape, dtype=torch.float32, device=device)
        tensors = (q, k, v, out, lse, grad_out, grad_lse, delta, extra_k, extra_v, grad_q, grad_k, grad_v,
                   grad_extra_k, grad_extra_v, rpb, grad_rpb, grad_logits, dq_accum)
        for _, launcher, order in self.launches:
            launcher(tensors if order is None else tuple(tensors[i] for i in order))
        if extra_v is self.placeholder:
            grad_extra_k = grad_extra_v = None
        return grad_q, grad_k, grad_v, grad_extra_k, grad_extra_v, grad_rpb
