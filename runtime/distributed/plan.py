"""Halo plans: which key/value rows each shard needs and on which region it computes, from natgen.window.

Pure Python and torch on the CPU, no process group: every rank computes the same plan for all ranks from
the slab sizes alone, so a rank knows what to send to whom without asking, and the bytes a sharding moves
can be counted without launching anything.

Along one axis, a shard holding the query rows [a, b) needs the union of their windows (natgen.window);
that set is what the other shards send. The local op then runs on a region [lo, hi) of the global axis that
holds every needed row. The op's border logic is relative to the tensor it is given, so the region is
chosen such that the local windows of the rows [a, b), read back into global coordinates, are exactly the
global ones: lo is a multiple of dilation * stride (dilation groups and stride groups then line up), and hi
grows past the last needed row where the rule asks (a causal stride group's centre may lie past its last
query; a window slid inward at the far border needs the far border itself). Every candidate region is
checked against the rule before it is used, and the whole axis, on which the local windows are the global
ones by definition, is the last resort. Region rows that no query of the shard sees are zeros, not data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain
from typing import Optional

import torch

from ..window import window_1d_tensor


def needed_rows(L: int, K: int, S: int, D: int, C: bool, start: int, stop: int) -> torch.Tensor:
    """Sorted global rows (int64) that the queries [start, stop) of an axis of length L see."""
    queries = torch.arange(start, stop)
    group, first, end = window_1d_tensor(queries, L, K, S, D, C)
    group_span = -(-L // D)
    # one difference array per dilation group in group-local coordinates: +1 where a window opens,
    # -1 where it closes; a row is needed where the running sum is positive
    marks = torch.zeros(D, group_span + 1, dtype=torch.long)
    ones = torch.ones_like(group)
    marks.index_put_((group, first), ones, accumulate=True)
    marks.index_put_((group, end), -ones, accumulate=True)
    covered = marks.cumsum(1)[:, :group_span] > 0
    rows = torch.arange(group_span)[None, :] * D + torch.arange(D)[:, None]
    return rows[covered & (rows < L)].sort().values


def windows_agree(L: int, K: int, S: int, D: int, C: bool, start: int, stop: int, lo: int, hi: int) -> bool:
    """Does the op on the region [lo, hi) of the axis give the queries [start, stop) their global windows?"""
    if hi - lo < K * D:
        return False  # the op would reject the region
    queries = torch.arange(start, stop)
    group, first, end = window_1d_tensor(queries, L, K, S, D, C)
    local_group, local_first, local_end = window_1d_tensor(queries - lo, hi - lo, K, S, D, C)
    # a window is the rows first*D+g, (first+1)*D+g, ... before end*D+g: equal ends mean equal sets
    return (torch.equal(first * D + group, local_first * D + local_group + lo)
            and torch.equal(end * D + group, local_end * D + local_group + lo))


def local_region(L: int, K: int, S: int, D: int, C: bool, start: int, stop: int,
                 rows: torch.Tensor) -> tuple[int, int]:
    """(lo, hi): the region of the axis on which the shard [start, stop) computes (see the module doc)."""
    period = D * S
    lo = (int(rows[0]) // period) * period
    hi = int(rows[-1]) + 1
    # a causal centre lies at most a stride group past the last query; a short region grows by up to K*D
    reach = (K + S) * D
    for candidate in chain(range(hi, min(L, hi + reach) + 1), (L,)):
        if windows_agree(L, K, S, D, C, start, stop, lo, candidate):
            return lo, candidate
    for candidate in range(lo - period, -1, -period):
        if windows_agree(L, K, S, D, C, start, stop, candidate, L):
            return candidate, L
    return 0, L


@dataclass(frozen=True)
class AxisPlan:
    """One spatial axis: its slabs (bounds[p] <= row < bounds[p + 1] for mesh coordinate p), and per
    coordinate the rows its queries need and the region it computes on. An axis that is not sharded has
    one slab, the whole axis."""
    length: int
    bounds: tuple[int, ...]
    needed: tuple[torch.Tensor, ...]
    regions: tuple[tuple[int, int], ...]

    @property
    def shards(self) -> int:
        return len(self.bounds) - 1

    def slab(self, coordinate: int) -> tuple[int, int]:
        return self.bounds[coordinate], self.bounds[coordinate + 1]

    def rows_from(self, coordinate: int, owner: int) -> torch.Tensor:
        """Global rows that coordinate `coordinate` needs from the slab of coordinate `owner`."""
        rows = self.needed[coordinate]
        first, last = self.slab(owner)
        return rows[(rows >= first) & (rows < last)]


def plan_axis(sizes, K: int, S: int, D: int, C: bool) -> AxisPlan:
    bounds = (0, *[int(x) for x in torch.tensor(list(sizes), dtype=torch.long).cumsum(0).tolist()])
    L = bounds[-1]
    needed, regions = [], []
    for p in range(len(bounds) - 1):
        rows = needed_rows(L, K, S, D, C, bounds[p], bounds[p + 1])
        needed.append(rows)
        regions.append(local_region(L, K, S, D, C, bounds[p], bounds[p + 1], rows))
    return AxisPlan(L, bounds, tuple(needed), tuple(regions))


def mesh_coordinates(rank: int, shard_dims, mesh, axes: int) -> tuple[int, ...]:
    """Per spatial axis, the slab index of `rank` (row-major over the mesh; 0 on axes not sharded)."""
    per_axis = [0] * axes
    for dim, extent in zip(reversed(shard_dims), reversed(mesh)):
        rank, per_axis[dim] = divmod(rank, extent)
    return tuple(per_axis)


@dataclass(frozen=True)
class Transfer:
    """Key/value rows that rank `owner` sends to rank `needer`: the product of one row set per spatial axis
    (global coordinates; the whole axis where it is not sharded)."""
    owner: int
    needer: int
    rows: tuple[torch.Tensor, ...]

    @property
    def tokens(self) -> int:
        return math.prod(len(r) for r in self.rows)


@dataclass(frozen=True)
class Plan:
    """The exchange of a sharded call: per-axis plans and the mesh (ranks in row-major order over the
    sharded axes, rank r at coordinates unravel(r))."""
    axes: tuple[AxisPlan, ...]
    shard_dims: tuple[int, ...]
    mesh: tuple[int, ...]

    @property
    def ranks(self) -> int:
        return math.prod(self.mesh)

    def coordinates(self, rank: int) -> tuple[int, ...]:
        return mesh_coordinates(rank, self.shard_dims, self.mesh, len(self.axes))

    def slab(self, rank: int) -> tuple[tuple[int, int], ...]:
        return tuple(axis.slab(c) for axis, c in zip(self.axes, self.coordinates(rank)))

    def region(self, rank: int) -> tuple[tuple[int, int], ...]:
        return tuple(axis.regions[c] for axis, c in zip(self.axes, self.coordinates(rank)))

    def transfer(self, owner: int, needer: int) -> Optional[Transfer]:
        if owner == needer:
            return None
        mine, theirs = self.coordinates(owner), self.coordinates(needer)
        rows = tuple(axis.rows_from(t, m) for axis, m, t in zip(self.axes, mine, theirs))
        if any(len(r) == 0 for r in rows):
            return None
        return Transfer(owner, needer, rows)

    def incoming(self, rank: int) -> list[Transfer]:
        return [t for t in (self.transfer(owner, rank) for owner in range(self.ranks)) if t is not None]

    def outgoing(self, rank: int) -> list[Transfer]:
        return [t for t in (self.transfer(rank, needer) for needer in range(self.ranks)) if t is not None]


def make_plan(spatial_sizes, shard_dims, mesh, kernel_size, stride, dilation, is_causal) -> Plan:
    """spatial_sizes[axis]: the slab sizes along that axis in mesh-coordinate order (one entry, the whole
    length, for an axis that is not sharded). Parameters are per-axis tuples."""
    axes = tuple(plan_axis(sizes, kernel_size[a], stride[a], dilation[a], is_causal[a])
                 for a, sizes in enumerate(spatial_sizes))
    return Plan(axes, tuple(shard_dims), tuple(mesh))


def even_sizes(length: int, shards: int) -> list[int]:
    """Slab sizes of torch.tensor_split(x, shards) along an axis of this length."""
    return [len(part) for part in torch.arange(length).tensor_split(shards)]
