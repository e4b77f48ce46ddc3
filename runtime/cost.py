"""The selector's cost model: how much work an instance does on a problem, from manifest fields only.

Each manifest entry carries a `cost` record written by its family at build time: the family's relative
time per useful key (`base`), a factor for compile-time window sizes (`specialization`), the resident warps
beyond which occupancy stops helping (`saturating_warps`), and which wasted-work model applies (`waste`):
"exact" (every query computes exactly its own keys) or "tc_chunks" (a warp of the tensor-core families
computes whole 16-key chunks over the flattened range of its 16 rows' windows; computed below for the
problem at hand, since a runtime-K instance's waste depends on K and the borders).
"""
from __future__ import annotations

import functools
import itertools
import math

from .arch import arch_limits
from .window import window_1d

QUERY_ROWS_PER_WARP = 16
KEY_CHUNK = 16


def _window(i: int, length: int, kernel: int, stride: int, dilation: int, causal: bool):
    """(start, end) of the group-local window (natgen.window's rule)."""
    _, start, end = window_1d(i, length, kernel, stride, dilation, causal)
    return start, end


def _computed_keys_per_useful_key_brute(tile, spatial, kernel_size, causal, keys_per_stage) -> float:
    """Reference for computed_keys_per_useful_key: walks every CTA tile, warp and row (slow, obviously right).

    Mirrors the kernel: per CTA the box is the union of its queries' windows, flattened row-major; each warp
    computes the 16-key chunks overlapping the flattened range of its own rows' windows, 16 rows each.
    """
    rank = len(tile)
    pad = (1,) * (3 - rank)
    tile3, spatial3 = tuple(tile) + pad, tuple(spatial) + pad
    kernel3, causal3 = tuple(kernel_size) + pad, tuple(causal) + (False,) * (3 - rank)
    windows = [[_window(i, spatial3[d], kernel3[d], 1, 1, causal3[d]) for i in range(spatial3[d])]
               for d in range(3)]
    computed = useful = 0
    tiles = [range(0, spatial3[d], tile3[d]) for d in range(3)]
    for firsts in itertools.product(*tiles):
        lasts = [min(firsts[d] + tile3[d], spatial3[d]) - 1 for d in range(3)]
        box_lo = [windows[d][firsts[d]][0] for d in range(3)]
        extent = [windows[d][lasts[d]][1] - box_lo[d] for d in range(3)]
        for warp in range(math.prod(tile3) // QUERY_ROWS_PER_WARP):
            rows = []
            for row in range(warp * 16, warp * 16 + 16):
                local = (firsts[0] + row // (tile3[1] * tile3[2]), firsts[1] + (row // tile3[2]) % tile3[1],
                         firsts[2] + row % tile3[2])
                if all(local[d] < spatial3[d] for d in range(3)):
                    rows.append(local)
            if not rows:
                continue
            lo = [windows[d][min(r[d] for r in rows)][0] - box_lo[d] for d in range(3)]
            hi = [windows[d][max(r[d] for r in rows)][1] - 1 - box_lo[d] for d in range(3)]
            flat_lo = (lo[0] * extent[1] + lo[1]) * extent[2] + lo[2]
            flat_hi = (hi[0] * extent[1] + hi[1]) * extent[2] + hi[2] + 1
            chunks = -(-flat_hi // 16) - flat_lo // 16
            computed += chunks * 16 * 16
            useful += sum(math.prod(windows[d][r[d]][1] - windows[d][r[d]][0] for d in range(3)) for r in rows)
    del keys_per_stage  # chunks are 16-aligned within every stage, so the stage size does not matter
    return computed / useful


def _axis_classes(tile: int, length: int, kernel: int, causal: bool):
    """The tiles along one axis grouped by their windows relative to the tile's first window start.

    Returns [(multiplicity, rel)], rel[o] = (start, end) of offset o's window minus the first start, for the
    tile's in-bounds offsets. Every full tile whose queries all have unclipped windows (start = i - K // 2,
    or i - K + 1 when causal) shares one rel; clipping only grows towards the borders, so checking a tile's
    first and last query is enough, and only the ~K / tile border tiles (and a partial last one) are walked.
    """
    span = kernel - 1 if causal else kernel // 2

    def unclipped(i):
        return _window(i, length, kernel, 1, 1, causal) == (i - span, i - span + kernel)

    classes, interior = {}, 0
    for first in range(0, length, tile):
        last = min(first + tile, length) - 1
        if last - first + 1 == tile and unclipped(first) and unclipped(last):
            interior += 1
            continue
        base = _window(first, length, kernel, 1, 1, causal)[0]
        rel = tuple((s - base, e - base) for s, e in (_window(i, length, kernel, 1, 1, causal)
                                                      for i in range(first, last + 1)))
        classes[rel] = classes.get(rel, 0) + 1
    if interior:
        rel = tuple((o, o + kernel) for o in range(tile))
        classes[rel] = classes.get(rel, 0) + interior
    return [(count, rel) for rel, count in classes.items()]


@functools.lru_cache(maxsize=None)
def computed_keys_per_useful_key(tile, spatial, kernel_size, causal, keys_per_stage=None) -> float:
    """(query, key) pairs the kernel computes / pairs that are in some window, for one problem (S = D = 1).

    Mirrors the kernel: per CTA the box is the union of its queries' windows, flattened row-major; each warp
    computes the 16-key chunks overlapping the flattened range of its own rows' windows, 16 rows each.

    Exact and fast: a tile's work depends only on its queries' windows relative to its box, and along each
    axis all interior tiles share those (only border tiles and a partial last tile differ), so one
    representative per combination of per-axis classes, weighted by the product of multiplicities, gives
    the same totals as walking every tile (_computed_keys_per_useful_key_brute). Tiles are powers of two
    with 64 queries, so each warp's 16 rows are a sub-box: its in-bounds rows are the product of its
    in-bounds offsets per axis, and its useful pairs the product of per-axis window-size sums.
    """
    del keys_per_stage  # chunks are 16-aligned within every stage, so the stage size does not matter
    rank = len(tile)
    pad = (1,) * (3 - rank)
    tile3, spatial3 = tuple(tile) + pad, tuple(spatial) + pad
    kernel3, causal3 = tuple(kernel_size) + pad, tuple(causal) + (False,) * (3 - rank)
    rows = QUERY_ROWS_PER_WARP
    warps = []  # per warp, the sorted tile offsets its rows take along each axis
    for warp in range(math.prod(tile3) // rows):
        coords = [(r // (tile3[1] * tile3[2]), (r // tile3[2]) % tile3[1], r % tile3[2])
                  for r in range(warp * rows, warp * rows + rows)]
        offsets = [sorted({c[d] for c in coords}) for d in range(3)]
        if math.prod(map(len, offsets)) != rows:
            raise ValueError(f"tile={tuple(tile)}: a warp's {rows} rows are not a sub-box of the tile")
        warps.append(offsets)

    # per axis and class: (multiplicity, extent, per warp (lo, hi, window-size sum) or None when out of bounds)
    axes = []
    for d in range(3):
        entries = []
        for count, rel in _axis_classes(tile3[d], spatial3[d], kernel3[d], causal3[d]):
            per_warp = []
            for offsets in warps:
                valid = [o for o in offsets[d] if o < len(rel)]
                per_warp.append((rel[valid[0]][0], rel[valid[-1]][1] - 1, sum(e - s for s, e in
                                                                                (rel[o] for o in valid)))
                                if valid else None)
            entries.append((count, rel[-1][1], per_warp))
        axes.append(entries)

    computed = useful = 0
    for (n0, _, w0), (n1, e1, w1), (n2, e2, w2) in itertools.product(*axes):
        tile_computed = tile_useful = 0
        for a, b, c in zip(w0, w1, w2):
            if a is None or b is None or c is None:
                continue
            flat_lo = (a[0] * e1 + b[0]) * e2 + c[0]
            flat_hi = (a[1] * e1 + b[1]) * e2 + c[1] + 1
            tile_computed += (-(-flat_hi // 16) - flat_lo // 16) * 16 * rows
            tile_useful += a[2] * b[2] * c[2]
        weight = n0 * n1 * n2
        computed += weight * tile_computed
        useful += weight * tile_useful
    return computed / useful


def problem_waste(tile, problem) -> float:
    """computed_keys_per_useful_key for one natgen.problem.Problem run by an instance with this query tile.

    A CTA works inside one dilation group, so the axes are the group-local lengths ceil(spatial / dilation)
    (groups differ by at most one token; the longest stands for all). Stride is taken as 1, so for a
    strided problem the figure is an estimate that can err either way: a stride moves each window by less
    than the stride, which changes the chunks a warp spans (from about -50% to +20% on the reference
    shapes for strides 2-7; queries of one stride group share a window, so fewer distinct windows, but a
    group straddling a warp widens its range). Extra tokens are left out.
    """
    spatial = tuple(-(-n // d) for n, d in zip(problem.spatial, problem.dilation))
    return computed_keys_per_useful_key(tuple(tile), spatial, tuple(problem.kernel_size),
                                        tuple(problem.is_causal))




# ----------------------------------------------------------------------------------- the cost of a choice
REGISTER_ALLOCATION_UNIT = 256


def ctas_per_sm(launch: dict, build, arch: str) -> int:
    """Resident CTAs per SM from ptxas figures (registers, static smem) and the launch shape."""
    limits = arch_limits(arch)
    threads = launch["threads"]
    bounds = [limits["ctas"], limits["threads"] // threads]
    smem = launch.get("dynamic_smem", 0) + (build or {}).get("smem_bytes", 0)
    if smem:
        bounds.append(limits["smem"] // smem)
    if build and build.get("registers"):
        per_warp = math.ceil(build["registers"] * 32 / REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
        bounds.append(limits["registers"] // (per_warp * math.ceil(threads / 32)))
    return max(0, min(bounds))


def waste(instance, problem) -> float:
    """(query, key) pairs the instance computes per useful pair on this problem."""
    model = instance.entry["cost"]["waste"]
    if model == "exact":
        return 1.0
    if model == "tc_chunks":
        return problem_waste(instance.spec.tile, problem)
    raise RuntimeError(f"{instance.name}: waste model {model!r} is unknown to this natgen (newer manifest?)")


def static_cost(instance, problem, target):
    """(relative cost, details) of running `instance` on `problem` at `target`; lower is faster."""
    cost_facts, launch = instance.entry["cost"], instance.entry["launch"]
    figure = waste(instance, problem)
    cost = cost_facts["base"] * figure * cost_facts.get("specialization", 1.0)
    details = {"computed_keys_per_useful_key": round(figure, 3)}
    if target.kind == "cuda":
        build = instance.build(target.arch)
        resident = ctas_per_sm(launch, build, target.arch)
        if resident == 0:
            return math.inf, {"ctas_per_sm": 0}
        sms = target.sms or arch_limits(target.arch)["sms"]
        ctas = math.ceil(problem.num_tokens / launch["queries_per_cta"]) * problem.heads * problem.batch
        slots = sms * resident
        waves = math.ceil(ctas / slots)
        wave_efficiency = ctas / (waves * slots)
        warps = resident * launch["threads"] / 32
        occupancy_factor = min(1.0, warps / cost_facts["saturating_warps"])
        cost /= max(wave_efficiency, 1e-3) * max(occupancy_factor, 0.125)
        details.update(ctas_per_sm=resident, waves=waves, wave_efficiency=round(wave_efficiency, 3),
                       registers=(build or {}).get("registers"))
    return cost, details
