"""Launch plans of the tensor-core families (tcs, tcg): same argument list as the SIMT plan, another grid.

A CTA owns a tile of queries inside one dilation group, so the grid enumerates, per spatial dim,
(dilation group, tile of the longest group); tiles past the end of a shorter group exit at once.
"""
from __future__ import annotations

import math

from .launch import LOG2E, Buffers, Plan, _padded, register_planner
from .manifest import Instance
from .problem import Problem


def tc_grid_tiles(tile, spatial, dilation) -> int:
    """CTAs along blockIdx.x: prod over dims of dilation * ceil(ceil(L / dilation) / tile)."""
    return math.prod(d * math.ceil(math.ceil(length / d) / t) for t, length, d in zip(tile, spatial, dilation))


def tc_plan(instance: Instance, problem: Problem, buffers: Buffers) -> Plan:
    spec, launch = instance.spec, instance.launch
    if problem.heads > 65535 or problem.batch > 65535:
        raise ValueError(f"heads={problem.heads}, batch={problem.batch}: the CUDA grid allows at most 65535 of each")
    spatial, dilation = _padded(problem.spatial), _padded(problem.dilation)
    tiles = tc_grid_tiles(_padded(spec.tile), spatial, dilation)
    if tiles >= 2 ** 31:
        raise ValueError(f"{tiles} query tiles exceed the CUDA grid's x limit")
    ints = [problem.n_extra, problem.heads, *spatial, *_padded(problem.kernel_size), *_padded(problem.stride),
            *dilation]
    args = [buffers.q, buffers.k, buffers.v, buffers.out, buffers.lse, buffers.extra_k, buffers.extra_v,
            *ints, problem.scale * LOG2E, 1]
    scalar_types = ["int"] * len(ints) + ["float", "int"]
    return Plan((tiles, problem.heads, problem.batch), (launch["threads"], 1, 1), args, scalar_types,
                launch["dynamic_smem"])


register_planner("tcs", tc_plan)
register_planner("tcg", tc_plan)
