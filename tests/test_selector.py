"""Selector tier: the per-problem wasted-work figure of the tensor-core families and how the cost uses it."""
import random
import time

import pytest
import torch
from click.testing import CliRunner

from natgen import cost, selector
from natgen.cli import main
from natgen.codegen.families import REGISTRY, tcg, tcs
from natgen.manifest import load
from natgen.problem import make_problem

pytestmark = pytest.mark.codegen

fast = cost.computed_keys_per_useful_key
brute = cost._computed_keys_per_useful_key_brute

# (tile, spatial, kernel_size, causal): borders wider than the interior, partial last tiles, K even and odd,
# K = 1 and K = L, causal per dim, and tiles other than the shipped ones (warps still sub-boxes).
SMALL = [
    ((64,), (1,), (1,), (False,)),
    ((64,), (64,), (64,), (False,)),
    ((64,), (100,), (7,), (False,)),
    ((64,), (100,), (8,), (True,)),
    ((64,), (129,), (64,), (False,)),
    ((64,), (300,), (31,), (True,)),
    ((64,), (257,), (130,), (False,)),
    ((16, 4), (56, 56), (7, 7), (False, False)),
    ((16, 4), (17, 5), (6, 3), (True, False)),
    ((16, 4), (33, 31), (13, 12), (False, True)),
    ((16, 4), (9, 40), (9, 2), (True, True)),
    ((8, 8), (21, 19), (5, 10), (False, True)),
    ((4, 16), (23, 37), (4, 7), (True, False)),
    ((4, 4, 4), (16, 16, 16), (5, 5, 5), (False, False, False)),
    ((4, 4, 4), (7, 9, 13), (3, 4, 13), (True, False, True)),
    ((4, 4, 4), (10, 5, 11), (10, 2, 6), (False, True, False)),
    ((2, 4, 8), (9, 11, 19), (5, 6, 7), (False, False, True)),
]


@pytest.mark.parametrize("case", SMALL, ids=str)
def test_fast_waste_matches_brute_force(case):
    assert fast(*case) == brute(*case, 64)


def test_fast_waste_matches_brute_force_random_sweep():
    rng = random.Random(7)
    tiles = {1: [(64,)], 2: [tcg.TILES[2], tcs.TILES[2], (8, 8)], 3: [tcg.TILES[3], (2, 4, 8)]}
    limit = {1: 400, 2: 45, 3: 15}
    for _ in range(150):
        rank = rng.choice((1, 2, 3))
        spatial = tuple(rng.randint(1, limit[rank]) for _ in range(rank))
        kernel = tuple(rng.randint(1, n) for n in spatial)
        causal = tuple(rng.random() < 0.4 for _ in range(rank))
        tile = rng.choice(tiles[rank])
        assert fast(tile, spatial, kernel, causal) == brute(tile, spatial, kernel, causal, 64), \
            (tile, spatial, kernel, causal)


@pytest.mark.parametrize("tile, spatial, kernel", [
    ((64,), (32768,), (2048,)),
    ((16, 4), (256, 256), (80, 80)),
    ((4, 4, 4), (30, 48, 80), (18, 24, 24)),
], ids=["long-1d", "image-2d", "video-3d"])
@pytest.mark.parametrize("causal", [False, True])
def test_fast_waste_is_quick_on_large_problems(tile, spatial, kernel, causal):
    fast.cache_clear()
    start = time.perf_counter()
    figure = fast(tile, spatial, kernel, (causal,) * len(tile))
    assert time.perf_counter() - start < 2.0  # the brute force walks every tile and row
    assert figure >= 1.0


def test_manifest_figure_is_the_fast_figure_at_the_reference():
    for inst in load():
        if inst.spec.family in ("tcg", "tcs"):
            ref = inst.launch["waste_reference"]
            figure = fast(tuple(inst.spec.tile), tuple(ref["spatial"]), tuple(ref["kernel_size"]),
                          tuple(inst.spec.causal))
            assert inst.launch["computed_keys_per_useful_key"] == round(figure, 4), inst.name


def problem(spatial, kernel, dilation=1, causal=False, dtype=torch.float16, head_dim=32):
    q = torch.empty((1, *spatial, 4, head_dim), dtype=dtype, device="meta")
    return make_problem(len(spatial), q, q, q, kernel, 1, dilation, causal)


def instance(family, rank, **spec):
    return next(i for i in load() if i.spec.family == family and i.spec.op == "fwd" and i.spec.rank == rank
                and i.spec.dtype == "f16" and i.spec.head_dim == 32 and not any(i.spec.causal)
                and all(getattr(i.spec, k) == v for k, v in spec.items()))


def test_problem_waste_uses_group_lengths_and_causal_flags():
    inst = instance("tcg", 2)
    p = problem((57, 40), (7, 5), dilation=(2, 3), causal=(True, False))
    assert cost.waste(inst, p) == fast(inst.spec.tile, (29, 14), (7, 5), (True, False))
    assert REGISTRY["tcs"].COST["waste"] == REGISTRY["tcg"].COST["waste"] == inst.entry["cost"]["waste"]


def test_selector_cost_of_generic_instance_tracks_kernel_size():
    inst, target = instance("tcg", 1), selector.Target("cuda", "sm_80")
    small, large = problem((1024,), 3), problem((1024,), 63)
    cost_small, details_small = selector.static_cost(inst, small, target)
    cost_large, details_large = selector.static_cost(inst, large, target)
    assert details_small["computed_keys_per_useful_key"] == round(cost.waste(inst, small), 3)
    assert details_large["computed_keys_per_useful_key"] == round(cost.waste(inst, large), 3)
    # a 3-key window fills little of the 16-key chunks a warp computes; a 63-key one most of them
    assert details_small["computed_keys_per_useful_key"] > 2 * details_large["computed_keys_per_useful_key"]
    assert cost_small > cost_large


def test_selector_figure_of_specialized_instance_follows_the_shape():
    inst, target = instance("tcs", 2, kernel_size=(7, 7)), selector.Target("cuda", "sm_80")
    figures = {shape: selector.static_cost(inst, problem(shape, 7), target)[1]["computed_keys_per_useful_key"]
               for shape in ((56, 56), (14, 14))}
    assert figures[(56, 56)] == round(inst.launch["computed_keys_per_useful_key"], 3)  # the reference shape
    assert figures[(14, 14)] != figures[(56, 56)]


def test_explain_reports_the_figure_for_the_problem():
    inst = instance("tcg", 1)
    figure = round(cost.waste(inst, problem((1024,), 63)), 3)
    assert figure != round(inst.launch["computed_keys_per_useful_key"], 3)  # not the reference's figure
    result = CliRunner().invoke(main, ["explain", "--rank", "1", "--shape", "1024", "--kernel-size", "63",
                                       "--dtype", "fp16", "--head-dim", "32"], catch_exceptions=False)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    chosen = next(i for i, line in enumerate(lines) if line.startswith("chosen:"))
    assert inst.name in lines[chosen]
    assert f"'computed_keys_per_useful_key': {figure}" in lines[chosen]
    assert f"computes {figure} (query, key) pairs per useful pair on this problem" in lines[chosen + 1]
