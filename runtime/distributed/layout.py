"""Who holds what: the process group, the mesh, the slab sizes and the parameters, agreed on once.

The first call with a given local layout gathers two small integer vectors from every rank (the local
shapes, then the normalized parameters) and checks that they describe one global problem; the halo plan
and this rank's routes are then cached, so later calls move only key/value rows.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..problem import Problem, make_problem
from .exchange import Exchange, make_exchange
from .plan import Plan, make_plan, mesh_coordinates

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_RANK = 3


@dataclass(frozen=True)
class Layout:
    problem: Problem          # the global problem (on the meta device)
    plan: Plan
    exchange: Exchange
    rank: int                 # in the group
    group: object


_LAYOUTS: dict = {}
_LAYOUTS_MAX = 64


def _shape(tensor):
    return tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else None


def _flag(tensor):
    return isinstance(tensor, torch.Tensor) and tensor.requires_grad


def _check_local(rank, q, k, v, shard_dims, mesh, size):
    """Checks that need no other rank; returns (shard_dims, mesh) as tuples."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != rank + 3:
            raise ValueError(f"{name} must have {rank + 3} dims [batch, {rank} spatial, heads, head_dim], "
                             f"got shape {tuple(tensor.shape)}")
    if not (q.shape[1:1 + rank] == k.shape[1:1 + rank] == v.shape[1:1 + rank]):
        raise ValueError(f"q, k and v must hold the same slab, got spatial shapes {tuple(q.shape[1:1 + rank])}, "
                         f"{tuple(k.shape[1:1 + rank])} and {tuple(v.shape[1:1 + rank])}")
    if isinstance(shard_dims, int):
        shard_dims = (shard_dims,)
    shard_dims = tuple(shard_dims)
    if not shard_dims or any(isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < rank
                             for d in shard_dims) or len(set(shard_dims)) != len(shard_dims):
        raise ValueError(f"shard_dims={shard_dims} must be distinct spatial axes in 0..{rank - 1}")
    if mesh is None:
        if len(shard_dims) != 1:
            raise ValueError(f"shard_dims={shard_dims} shards {len(shard_dims)} axes; pass mesh= with one "
                             f"extent per axis (their product the group size {size})")
        mesh = (size,)
    mesh = (mesh,) if isinstance(mesh, int) else tuple(mesh)
    if len(mesh) != len(shard_dims) or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in mesh):
        raise ValueError(f"mesh={mesh} must hold one positive int per entry of shard_dims={shard_dims}")
    if math.prod(mesh) != size:
        raise ValueError(f"mesh={mesh} covers {math.prod(mesh)} ranks, but the group has {size}: "
                         f"every rank holds one block of the mesh")
    return shard_dims, mesh


def _gather(vector, group, device):
    """All ranks' int64 vectors as a [size, n] tensor."""
    mine = torch.tensor(vector, dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return torch.stack(parts).cpu()


def _raise_if_any_failed(gathered, error, what):
    failed = [r for r, ok in enumerate(gathered[:, 0].tolist()) if not ok]
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"rank(s) {failed} rejected the arguments ({what}); see the error raised there")


def _problem_vector(problem: Problem, flags):
    pad = _MAX_RANK - problem.rank
    fields = [problem.batch, problem.heads, problem.head_dim, problem.head_dim_v, problem.n_extra,
              _DTYPES.index(problem.dtype), *problem.kernel_size, *[0] * pad, *problem.stride, *[0] * pad,
              *problem.dilation, *[0] * pad, *map(int, problem.is_causal), *[0] * pad,
              struct.unpack("<q", struct.pack("<d", problem.scale))[0], *map(int, flags)]
    names = ["batch", "heads", "head_dim", "head_dim_v", "n_extra", "dtype",
             *[f"{p}[{a}]" for p in ("kernel_size", "stride", "dilation", "is_causal") for a in range(_MAX_RANK)],
             "scale", *[f"{name}.requires_grad" for name in ("q", "k", "v", "additional_keys",
                                                              "additional_values")]]
    return fields, names


def resolve(rank, q, k, v, kernel_size, stride, dilation, is_causal, scale, additional_keys, additional_values,
            group, shard_dims, mesh) -> Layout:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("natgen.distributed needs torch.distributed initialized "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")
    group = group if group is not None else dist.group.WORLD
    size, me = dist.get_world_size(group), dist.get_rank(group)
    if me < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of group={group}")
    flags = tuple(map(_flag, (q, k, v, additional_keys, additional_values)))
    key = (id(group), rank, _shape(q), _shape(k), _shape(v), _shape(additional_keys), _shape(additional_values),
           getattr(q, "dtype", None), getattr(q, "device", None), flags,
           *[tuple(x) if isinstance(x, list) else x for x in (kernel_size, stride, dilation, is_causal, scale,
                                                               shard_dims, mesh)])
    try:
        hash(key)
    except TypeError:
        key = None
    layout = _LAYOUTS.get(key) if key is not None else None
    if layout is None:
        layout = _agree(rank, q, k, v, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                        additional_values, group, size, me, shard_dims, mesh, flags)
        if key is not None:
            if len(_LAYOUTS) >= _LAYOUTS_MAX:
                _LAYOUTS.clear()
            _LAYOUTS[key] = layout
    return layout


def _agree(rank, q, k, v, kernel_size, stride, dilation, is_causal, scale, additional_keys, additional_values,
           group, size, me, shard_dims, mesh, flags) -> Layout:
    device = q.device if isinstance(q, torch.Tensor) and dist.get_backend(group) != "gloo" else torch.device("cpu")
    # 1. local shapes (a rank whose arguments fail the local checks still joins, so no one waits forever)
    error = None
    try:
        shard_dims, mesh = _check_local(rank, q, k, v, shard_dims, mesh, size)
        spatial = list(q.shape[1:1 + rank])
    except (TypeError, ValueError) as exc:
        error, spatial = exc, [0] * rank
    gathered = _gather([int(error is None), *spatial], group, device)
    _raise_if_any_failed(gathered, error, "tensor layout, shard_dims or mesh")
    shapes = gathered[:, 1:].tolist()

    # 2. slab sizes per sharded axis, in mesh order; every other extent must agree
    coordinates = [mesh_coordinates(r, shard_dims, mesh, rank) for r in range(size)]
    sizes = []
    for axis in range(rank):
        if axis in shard_dims:
            extent = mesh[shard_dims.index(axis)]
            per_slab = [None] * extent
            for r in range(size):
                c, length = coordinates[r][axis], shapes[r][axis]
                if per_slab[c] is None:
                    per_slab[c] = (length, r)
                elif per_slab[c][0] != length:
                    raise ValueError(f"ranks {per_slab[c][1]} and {r} hold slab {c} of spatial axis {axis} "
                                     f"with {per_slab[c][0]} and {length} rows: ranks sharing a slab of the "
                                     f"mesh={mesh} must agree on its size")
            for c, (length, r) in enumerate(per_slab):
                if length < 1:
                    raise ValueError(f"rank {r} holds {length} rows of spatial axis {axis}: every slab needs "
                                     f"at least one row")
            sizes.append([length for length, _ in per_slab])
        else:
            lengths = {shapes[r][axis] for r in range(size)}
            if len(lengths) != 1:
                raise ValueError(f"spatial axis {axis} is not in shard_dims={shard_dims}, but ranks hold "
                                 f"different extents along it: {[shapes[r][axis] for r in range(size)]}")
            sizes.append([shapes[0][axis]])

    # 3. the global problem, validated by the op's own rules, and compared across ranks
    global_spatial = [sum(s) for s in sizes]
    error, problem = None, None
    try:
        def meta(t):
            return torch.empty(t.shape[0], *global_spatial, *t.shape[1 + rank:], dtype=t.dtype, device="meta")
        extra = [torch.empty(t.shape, dtype=t.dtype, device="meta") if isinstance(t, torch.Tensor) else t
                 for t in (additional_keys, additional_values)]
        problem = make_problem(rank, meta(q), meta(k), meta(v), kernel_size, stride, dilation, is_causal, scale,
                               *extra)
        fields, names = _problem_vector(problem, flags)
    except (TypeError, ValueError) as exc:
        error = exc
        fields, names = _problem_vector(_placeholder(rank), flags)
    gathered = _gather([int(error is None), *fields], group, device)
    _raise_if_any_failed(gathered, error, "parameters of the global problem")
    reference = gathered[0, 1:]
    for r in range(1, size):
        differs = (gathered[r, 1:] != reference).nonzero().flatten().tolist()
        if differs:
            name = names[differs[0]]
            raise ValueError(f"rank {r} and rank 0 disagree on {name}: {gathered[r, 1 + differs[0]].item()} vs "
                             f"{reference[differs[0]].item()} (scale and dtype compare as codes); every rank must "
                             f"call with the same parameters")

    plan = make_plan(sizes, shard_dims, mesh, problem.kernel_size, problem.stride, problem.dilation,
                     problem.is_causal)
    exchange = make_exchange(plan, me, group, lambda r: dist.get_global_rank(group, r), q.device)
    return Layout(problem, plan, exchange, me, group)


def _placeholder(rank) -> Problem:
    ones = (1,) * rank
    return Problem(rank, 0, ones, 0, 0, 0, ones, ones, ones, (False,) * rank, 1.0, 0, torch.float32,
                   torch.device("meta"))
