"""Tensor-core generic forward: runtime K, S, D; per-dim causal as a compile-time mask.

A CTA owns 64 queries of one dilation group (4 warps x 16 mma rows); it walks the box that is the union of
their windows, then the extra tokens, in shared-memory tiles of keys, double buffered with cp.async, with an
online (FlashAttention-2 style) softmax. QK^T and PV run on mma.sync m16n8k16 with fp32 accumulation.

fp16 and bf16 only: fp32 inputs are left to the SIMT family (which meets fp32 accuracy); head_dim 256 would
need 128 fp32 output accumulators per thread on top of Q and S and is left out (it spills).

The helpers below are shared with the specialized family (tcs), which runs the same body with K and D
as compile-time constants.
"""
from __future__ import annotations

import functools
import itertools
import math

from ..spec import ANY, KernelSpec, padded_cuda_terms

FAMILY = "tcg"
TEMPLATE = "tcg_fwd.cu.j2"
TOOLCHAIN = "nvcc"
SOURCE_SUFFIX = ".cu"

DTYPES = ("f16", "bf16")
HEAD_DIMS = (32, 64, 128)
WARP = 32
QUERY_ROWS_PER_WARP = 16
# 64 queries per CTA in every rank. In 2-D, 16x4 makes each warp's 16 rows a 4x4 square, whose windows
# cover a compact range of the flattened box (8x8 gives each warp 2x8 rows: 7-15% more computed keys).
TILES = {1: (64,), 2: (16, 4), 3: (4, 4, 4)}
MMA = {"f16": "mma_m16n8k16_f16f32", "bf16": "mma_m16n8k16_bf16f32"}
PACK = {"f16": "pack_half2", "bf16": "pack_bfloat162"}
# Reference problems for the wasted-work figure a runtime-K instance records in the manifest (non-causal,
# S = D = 1): a mid-size window, not the best case. The selector does not use it for these families; it
# computes the figure for the actual problem (problem_waste).
REFERENCE = {1: ((1024,), (31,)), 2: ((56, 56), (7, 7)), 3: ((16, 16, 16), (5, 5, 5))}


# __launch_bounds__ minimum CTAs per SM: 4 caps registers at 128 (16 resident warps), 3 at 168; head_dim 128 holds
# 64 fp32 output accumulators and 32 Q registers per thread, so it keeps the full 255 (2 CTAs).
MIN_BLOCKS = {32: 4, 64: 3, 128: 2}


def kv_tile(head_dim: int) -> int:
    """Keys per shared-memory stage: two stages of K and V stay within the 48 KiB a launch gets without
    opting in to more dynamic shared memory."""
    return 32 if head_dim >= 128 else 64


def row_stride(head_dim: int) -> int:
    return head_dim + 8  # one 16-byte pad per row: the 8 rows an ldmatrix reads fall in distinct banks


def dynamic_smem(head_dim: int, dtype: str) -> int:
    element = 2  # fp16 / bf16
    return 2 * 2 * kv_tile(head_dim) * row_stride(head_dim) * element  # {K, V} x 2 stages


def check_supported(spec: KernelSpec) -> None:
    if spec.dtype not in MMA:
        raise ValueError(f"dtype={spec.dtype}: the tensor-core families take f16/bf16 (f32 goes to simt)")
    if spec.head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim={spec.head_dim} must be one of {HEAD_DIMS}")
    if math.prod(spec.tile) != 64:
        raise ValueError(f"tile={spec.tile} must hold 64 queries (4 warps x 16 mma rows)")


def _window(i: int, length: int, kernel: int, stride: int, dilation: int, causal: bool):
    """SEMANTICS.md's 1-D rule: (start, end) in group-local coordinates."""
    group, local = i % dilation, i // dilation
    group_len = length // dilation + (1 if group < length % dilation else 0)
    left, right = kernel // 2, kernel // 2 + kernel % 2 - 1
    if not causal:
        centre = min((local // stride) * stride + stride // 2, group_len - 1)
        start = max(centre - left, 0)
        if centre + right >= group_len:
            start += group_len - right - centre - 1
        return start, start + kernel
    centre = min((local // stride) * stride + stride - 1, group_len - 1)
    return max(centre - kernel + 1, 0), min(local + 1, group_len)


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


def problem_waste(spec: KernelSpec, problem) -> float:
    """computed_keys_per_useful_key for one natgen.problem.Problem run by this instance.

    A CTA works inside one dilation group, so the axes are the group-local lengths ceil(spatial / dilation)
    (groups differ by at most one token; the longest stands for all). Stride is taken as 1, so for a
    strided problem the figure is an estimate that can err either way: a stride moves each window by less
    than the stride, which changes the chunks a warp spans (from about -50% to +20% on the reference
    shapes for strides 2-7; queries of one stride group share a window, so fewer distinct windows, but a
    group straddling a warp widens its range). Extra tokens are left out.
    """
    spatial = tuple(-(-n // d) for n, d in zip(problem.spatial, problem.dilation))
    return computed_keys_per_useful_key(tuple(spec.tile), spatial, tuple(problem.kernel_size),
                                        tuple(problem.is_causal))


def tc_launch(spec: KernelSpec, spatial, kernel_size, limits=None) -> dict:
    figures = {
        "threads": WARP * math.prod(spec.tile) // QUERY_ROWS_PER_WARP,
        "dynamic_smem": dynamic_smem(spec.head_dim, spec.dtype),
        "queries_per_cta": math.prod(spec.tile),
        "kv_tile": kv_tile(spec.head_dim),
        "computed_keys_per_useful_key": round(computed_keys_per_useful_key(
            tuple(spec.tile), tuple(spatial), tuple(kernel_size), tuple(spec.causal), kv_tile(spec.head_dim)), 4),
        "waste_reference": {"spatial": list(spatial), "kernel_size": list(kernel_size)},
    }
    if limits:
        figures["limits"] = limits
    return figures


def tc_context(spec: KernelSpec) -> dict:
    check_supported(spec)
    rank, pad = spec.rank, 3 - spec.rank
    kernel_size, dilation = padded_cuda_terms(spec)
    return {
        "rank": rank,
        "threads": WARP * math.prod(spec.tile) // QUERY_ROWS_PER_WARP,
        "queries": math.prod(spec.tile),
        "tile": list(spec.tile) + [1] * pad,
        "kernel_size": kernel_size,
        "dilation": dilation,
        "causal": [("true" if c else "false") for c in spec.causal] + ["false"] * pad,
        "head_dim": spec.head_dim,
        "kv_tile": kv_tile(spec.head_dim),
        "min_blocks": MIN_BLOCKS[spec.head_dim],
        "length": [f"len{d}" for d in range(rank)] + ["1"] * pad,
        "mma": MMA[spec.dtype],
        "pack": PACK[spec.dtype],
    }


def candidates(policy: str):
    for rank in (1, 2, 3):
        for dtype, head_dim in itertools.product(DTYPES, HEAD_DIMS):
            for causal in itertools.product((False, True), repeat=rank):
                yield KernelSpec(FAMILY, "fwd", rank, ANY, ANY, causal, dtype, head_dim, TILES[rank], "sm80"), None
        yield (KernelSpec(FAMILY, "fwd", rank, ANY, ANY, (False,) * rank, "f32", 64, TILES[rank], "sm80"),
               "fp32 inputs are served by the simt family at fp32 accuracy (no 3xTF32 path yet)")
        yield (KernelSpec(FAMILY, "fwd", rank, ANY, ANY, (False,) * rank, "f16", 256, TILES[rank], "sm80"),
               "head_dim 256 needs 128 fp32 output accumulators per thread besides Q and S: it spills")


def launch(spec: KernelSpec) -> dict:
    spatial, kernel_size = REFERENCE[spec.rank]
    return tc_launch(spec, spatial, kernel_size)


def context(spec: KernelSpec) -> dict:
    return tc_context(spec)
