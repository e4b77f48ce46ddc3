"""natgen.distributed: halo plans against the oracle's window rule, and sharded calls on gloo processes
against the single-process op on the whole tensors (forward, lse and every gradient).

The process tests start one group of workers per world size (2 and 4; the 4-rank group also runs the 2x2
meshes); each worker runs every case of its group and writes what it found to a file, which the tests
below read, one test per case.
"""
from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from oracle import _EPS, _axis_mask, _floor

from natgen import cpu
from natgen.distributed.plan import even_sizes, local_region, make_plan, needed_rows

pytestmark = [pytest.mark.cpu,
              pytest.mark.skipif(not cpu.available(), reason="no C++ compiler for the cpu backend"),
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]


# ------------------------------------------------------------------------------------ plans, no processes
def _axis_cases(count, seed):
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        K = rng.randint(2, 7)
        S, D, C = rng.randint(1, K), rng.randint(1, 3), rng.random() < 0.4
        L = rng.randint(K * D, K * D + 24)
        start = rng.randint(0, L - 1)
        cases.append((L, K, S, D, C, start, rng.randint(start + 1, L)))
    return cases


def test_needed_rows_are_the_union_of_the_windows():
    for L, K, S, D, C, start, stop in _axis_cases(1500, seed=1):
        want = _axis_mask(L, K, S, D, C)[start:stop].any(0).nonzero().flatten()
        got = needed_rows(L, K, S, D, C, start, stop)
        assert torch.equal(got, want), (L, K, S, D, C, start, stop, got.tolist(), want.tolist())


def test_local_region_gives_the_global_windows():
    for L, K, S, D, C, start, stop in _axis_cases(1500, seed=2):
        rows = needed_rows(L, K, S, D, C, start, stop)
        lo, hi = local_region(L, K, S, D, C, start, stop, rows)
        assert 0 <= lo <= int(rows[0]) and int(rows[-1]) < hi <= L and hi - lo >= K * D
        local = _axis_mask(hi - lo, K, S, D, C)[start - lo:stop - lo]
        assert torch.equal(local, _axis_mask(L, K, S, D, C)[start:stop, lo:hi]), (L, K, S, D, C, start, stop, lo, hi)


@pytest.mark.parametrize("K,S,D,C,halo_left,halo_right", [
    (7, 1, 1, False, 3, 3),     # symmetric window
    (6, 1, 1, False, 3, 2),     # even K: one fewer on the right
    (5, 1, 3, False, 6, 6),     # dilation: (K//2)*D each side
    (7, 1, 1, True, 6, 0),      # causal: one-sided
    (4, 4, 1, False, 0, 0),     # blocked (S == K) with slabs on block boundaries: no halo at all
])
def test_interior_halo_sizes(K, S, D, C, halo_left, halo_right):
    plan = make_plan([even_sizes(96, 4)], (0,), (4,), (K,), (S,), (D,), (C,))
    received = sum(t.tokens for t in plan.incoming(1))
    assert received == halo_left + halo_right
    assert plan.axes[0].needed[1].tolist() == list(range(24 - halo_left, 48 + halo_right))


def test_border_shard_needs_the_shifted_window():
    # L=40, K=9: the first query's window is [0, 9), so slab [0, 2) needs 7 rows beyond itself, not 4
    plan = make_plan([[2, 38]], (0,), (2,), (9,), (1,), (1,), (False,))
    assert plan.axes[0].needed[0].tolist() == list(range(9))


def test_mesh_transfers_include_corners():
    plan = make_plan([even_sizes(16, 2), even_sizes(16, 2)], (0, 1), (2, 2), (5, 5), (1, 1), (1, 1),
                     (False, False))
    owners = {t.owner: t.tokens for t in plan.incoming(0)}
    assert owners == {1: 8 * 2, 2: 2 * 8, 3: 2 * 2}   # edge, edge, corner


# ------------------------------------------------------------------------------------ cases for processes
def _compose(total, parts, rng):
    """Random positive sizes summing to total (uneven slabs)."""
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, total])]


def _random_case(rng, world, mesh2d):
    rank = rng.choice((2, 3)) if mesh2d else rng.choice((1, 1, 2, 3))
    shard_dims = tuple(sorted(rng.sample(range(rank), 2))) if mesh2d else (rng.randrange(rank),)
    mesh = (2, 2) if mesh2d else (world,)
    kernel, stride, dilation, causal, spatial = [], [], [], [], []
    for axis in range(rank):
        K = rng.randint(2, 5 if rank < 3 else 3)
        D = rng.choice((1, 1, 2))
        kernel.append(K)
        stride.append(rng.randint(1, K))
        dilation.append(D)
        # causal on the first axis only keeps the number of distinct CPU kernels (compiled once each) small
        causal.append(axis == 0 and rng.random() < 0.35)
        shards = mesh[shard_dims.index(axis)] if axis in shard_dims else 1
        low = max(K * D, shards)
        spatial.append(rng.randint(low, low + (12 if rank == 1 else 5)))
    sizes = [(_compose(spatial[a], mesh[shard_dims.index(a)], rng) if rng.random() < 0.6
              else even_sizes(spatial[a], mesh[shard_dims.index(a)])) if a in shard_dims else [spatial[a]]
             for a in range(rank)]
    return dict(rank=rank, batch=rng.randint(1, 2), heads=rng.randint(1, 2), head_dim=rng.choice((4, 8)),
                head_dim_v=rng.choice((4, 8)), kernel=kernel, stride=stride, dilation=dilation, causal=causal,
                sizes=sizes, shard_dims=list(shard_dims), mesh=list(mesh), n_extra=rng.choice((0, 0, 2)),
                return_lse=rng.random() < 0.4, seed=rng.randrange(1 << 30))


def _cases(world, count, mesh_count, seed):
    rng = random.Random(seed)
    cases = [_random_case(rng, world, False) for _ in range(count)]
    cases += [_random_case(rng, world, True) for _ in range(mesh_count)]
    return cases


# fixed cases: a halo wider than the neighbour's slab (rows from two ranks away), one row per rank,
# blocked windows, and the extremes of the border shift
FIXED_CASES = {
    2: [dict(rank=1, batch=1, heads=2, head_dim=4, head_dim_v=4, kernel=[9], stride=[1], dilation=[2],
             causal=[False], sizes=[[3, 19]], shard_dims=[0], mesh=[2], n_extra=0, return_lse=True, seed=5)],
    4: [dict(rank=1, batch=1, heads=1, head_dim=4, head_dim_v=8, kernel=[7], stride=[2], dilation=[1],
             causal=[False], sizes=[[1, 2, 1, 20]], shard_dims=[0], mesh=[4], n_extra=2, return_lse=False,
             seed=6),
        dict(rank=1, batch=1, heads=1, head_dim=4, head_dim_v=4, kernel=[4], stride=[4], dilation=[1],
             causal=[True], sizes=[[1, 1, 1, 1]], shard_dims=[0], mesh=[4], n_extra=0, return_lse=True, seed=7),
        dict(rank=2, batch=1, heads=2, head_dim=4, head_dim_v=4, kernel=[3, 5], stride=[1, 3], dilation=[2, 1],
             causal=[True, False], sizes=[[2, 9], [1, 10]], shard_dims=[0, 1], mesh=[2, 2], n_extra=2,
             return_lse=True, seed=8),
        # three sharded axes (one of extent 1), and shard_dims not in axis order (the mesh follows shard_dims)
        dict(rank=3, batch=1, heads=2, head_dim=4, head_dim_v=4, kernel=[3, 3, 3], stride=[1, 2, 1],
             dilation=[1, 1, 2], causal=[True, False, False], sizes=[[3, 4], [7], [3, 5]], shard_dims=[0, 1, 2],
             mesh=[2, 1, 2], n_extra=2, return_lse=True, seed=11),
        dict(rank=3, batch=1, heads=1, head_dim=4, head_dim_v=4, kernel=[2, 3, 2], stride=[1, 1, 2],
             dilation=[2, 1, 1], causal=[False, False, False], sizes=[[5], [3, 4], [2, 5]], shard_dims=[2, 1],
             mesh=[2, 2], n_extra=0, return_lse=False, seed=12)],
}

CASES = {2: FIXED_CASES[2] + _cases(2, 14, 0, seed=20), 4: FIXED_CASES[4] + _cases(4, 8, 7, seed=40)}


def _case_id(case):
    spatial = "x".join(str(sum(s)) for s in case["sizes"])
    return (f"{case['rank']}d-{spatial}-K{case['kernel']}-S{case['stride']}-D{case['dilation']}"
            f"-C{[int(c) for c in case['causal']]}-shard{case['shard_dims']}-mesh{case['mesh']}"
            f"-x{case['n_extra']}{'-lse' if case['return_lse'] else ''}").replace(" ", "")


# ------------------------------------------------------------------------------------ the worker side
def _block(case, coordinates):
    return tuple(slice(sum(s[:c]), sum(s[:c + 1])) for s, c in zip(case["sizes"], coordinates))


def _coordinates(case, rank):
    per_axis = [0] * case["rank"]
    for dim, extent in zip(reversed(case["shard_dims"]), reversed(case["mesh"])):
        rank, per_axis[dim] = divmod(rank, extent)
    return per_axis


def _run_case(case, me):
    import natgen
    import natgen.distributed as nd
    rank = case["rank"]
    spatial = [sum(s) for s in case["sizes"]]
    gen = torch.Generator().manual_seed(case["seed"])

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    b, h = case["batch"], case["heads"]
    q, k = randn(b, *spatial, h, case["head_dim"]), randn(b, *spatial, h, case["head_dim"])
    v = randn(b, *spatial, h, case["head_dim_v"])
    extra = ((randn(b, case["n_extra"], h, case["head_dim"]), randn(b, case["n_extra"], h, case["head_dim_v"]))
             if case["n_extra"] else (None, None))
    grad_out = randn(b, *spatial, h, case["head_dim_v"])
    grad_lse = randn(b, *spatial, h).float()
    params = dict(kernel_size=tuple(case["kernel"]), stride=tuple(case["stride"]),
                  dilation=tuple(case["dilation"]), is_causal=tuple(case["causal"]))

    def leaves(tensors):
        return [t.clone().requires_grad_(True) if t is not None else None for t in tensors]

    def backward(result, block):
        out, lse = result if isinstance(result, tuple) else (result, None)
        index = (slice(None), *block)
        outputs, cotangents = [out], [grad_out[index]]
        if lse is not None:
            outputs.append(lse)
            cotangents.append(grad_lse[index])
        torch.autograd.backward(outputs, cotangents)
        return out, lse

    whole = leaves((q, k, v, *extra))
    op = {1: natgen.na1d, 2: natgen.na2d, 3: natgen.na3d}[rank]
    full_block = tuple(slice(None) for _ in range(rank))
    ref_out, ref_lse = backward(op(*whole[:3], **params, additional_keys=whole[3], additional_values=whole[4],
                                   return_lse=case["return_lse"]), full_block)

    block = _block(case, _coordinates(case, me))
    index = (slice(None), *block)
    mine = leaves([t[index] for t in (q, k, v)] + list(extra))
    sharded = {1: nd.na1d, 2: nd.na2d, 3: nd.na3d}[rank]
    out, lse = backward(sharded(*mine[:3], **params, additional_keys=mine[3], additional_values=mine[4],
                                return_lse=case["return_lse"], shard_dims=tuple(case["shard_dims"]),
                                mesh=tuple(case["mesh"])), block)

    errors = []

    def compare(name, value, reference, slack=0.0):
        if value is None or value.shape != reference.shape:
            errors.append(f"{name}: shape {None if value is None else tuple(value.shape)} "
                          f"!= {tuple(reference.shape)}")
            return
        error = (value.double() - reference.double()).abs().max().item() if value.numel() else 0.0
        bound = _floor(torch.float64, reference) + slack
        if not error <= bound:
            errors.append(f"{name}: max error {error:.3e} > {bound:.3e}")

    compare("out", out, ref_out[index])
    if case["return_lse"]:
        # lse is stored in float32: one rounding of either side is part of a correct answer
        compare("lse", lse, ref_lse[index], 2 * _EPS[torch.float32] * ref_lse.abs().max().item())
    for name, got, want in zip(("dq", "dk", "dv"), mine[:3], whole[:3]):
        compare(name, got.grad, want.grad[index])
    if case["n_extra"]:
        for name, got, want in zip(("d_extra_k", "d_extra_v"), mine[3:], whole[3:]):
            compare(name, got.grad, want.grad)
    return errors


def _error_cases(world, me):
    """Bad calls that every rank must reject with the same kind of error (no rank may hang)."""
    import natgen.distributed as nd
    found = {}

    def expect(name, call, words):
        try:
            call()
            found[name] = "no error"
        except (ValueError, TypeError) as exc:
            message = str(exc)
            found[name] = "ok" if all(w in message for w in words) else f"message lacks {words}: {message}"

    t = torch.randn(1, 8, 1, 4)
    kernel = 5 if me == 1 else 3
    expect("mismatched kernel", lambda: nd.na1d(t, t, t, kernel), ["kernel_size[0]", "rank 1"])
    expect("mesh does not cover", lambda: nd.na2d(torch.randn(1, 8, 8, 1, 4), *[torch.randn(1, 8, 8, 1, 4)] * 2,
                                                  3, shard_dims=(0, 1), mesh=(world, 2)), ["mesh", str(world)])
    rows = 0 if me == world - 1 else 8
    e = torch.randn(1, rows, 1, 4)
    expect("empty slab", lambda: nd.na1d(e, e, e, 3), [f"rank {world - 1}", "axis 0", "0 rows"])
    w = torch.randn(1, 8, 8 + me, 1, 4)
    expect("unsharded extents differ", lambda: nd.na2d(w, w, w, 3), ["axis 1", "shard_dims"])
    g = torch.randn(1, 2, 1, 4)
    expect("global window too large", lambda: nd.na1d(g, g, g, 2 * world + 1), ["kernel_size[0]", "needs"])
    bad = torch.randn(1, 8, 1) if me == 0 else t
    expect("one rank's bad layout", lambda: nd.na1d(bad, t, t, 3), ["4 dims"] if me == 0 else ["rank(s) [0]"])
    return found


# A process that ran the generated CPU kernels and gloo collectives sometimes aborts in its exit-time
# destructors ("terminate called without an active exception", after destroy_process_group, about one run in
# ten with 4 processes); everything is written by then, so a worker leaves without running them.
def _leave():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(me, world, init_file, cases, result_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=me, world_size=world)
    results = {}
    try:
        for i, case in enumerate(cases):
            try:
                results[str(i)] = _run_case(case, me)
            except Exception:   # recorded, so that the test names the case
                results[str(i)] = [traceback.format_exc()]
        results["errors"] = _error_cases(world, me)
    finally:
        with open(os.path.join(result_dir, f"rank{me}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()
    _leave()


_RESULTS: dict = {}


def _results(world):
    """Per rank, what the workers of a `world`-rank group found (started once per session)."""
    if world not in _RESULTS:
        with tempfile.TemporaryDirectory() as scratch:
            init_file = os.path.join(scratch, "init")
            mp.start_processes(_worker, args=(world, init_file, CASES[world], scratch), nprocs=world,
                               join=True, start_method="spawn")
            found = []
            for me in range(world):
                with open(os.path.join(scratch, f"rank{me}.json")) as f:
                    found.append(json.load(f))
        _RESULTS[world] = found
    return _RESULTS[world]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world,index", [(w, i) for w in (2, 4) for i in range(len(CASES[w]))],
                         ids=[f"{w}ranks-{_case_id(c)}" for w in (2, 4) for c in CASES[w]])
def test_sharded_matches_whole(world, index):
    problems = {me: found[str(index)] for me, found in enumerate(_results(world)) if found[str(index)]}
    assert not problems, f"case {CASES[world][index]}: {problems}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", (2, 4))
def test_bad_calls_fail_on_every_rank(world):
    for me, found in enumerate(_results(world)):
        bad = {name: outcome for name, outcome in found["errors"].items() if outcome != "ok"}
        assert not bad, f"rank {me}: {bad}"


def test_needs_an_initialized_group():
    import natgen.distributed as nd
    t = torch.randn(1, 8, 1, 4)
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        nd.na1d(t, t, t, 3)
