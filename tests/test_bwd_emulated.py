"""Emulated tier, CUDA backward (the simtbwd family): autograd through backend="emulator" against the float64
oracle's gradients (autograd through tests/oracle.py), by the tolerance rule of docs/semantics.md.

Every launch runs with racecheck over the tensors and shared memory and with initcheck (the
emulator_checks_global fixture), and every case under the default schedule and a shuffled one with
bit-identical gradients (the schedules fixture: the backward is deterministic, no atomics). The reference's
backward is replaced by a function that raises, so a case passes only if the emulated kernels computed
every gradient.
"""
import itertools
import os
import random
import warnings

import pytest
import torch

import natgen
from natgen import autograd, ops, reference, selector
from natgen.manifest import find
from conftest import emulator_wide
from oracle import assert_grads_close_by_rule, grads_of

pytestmark = [pytest.mark.emulated, pytest.mark.usefixtures("emulator_checks_global"),
              pytest.mark.skipif(not ops.BACKENDS["emulator"].available(), reason="emulator not built")]

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture
def no_reference_backward(monkeypatch):
    """A guard: the emulated backward must not reach the reference's gradients."""
    def refuse(*args, **kwargs):
        raise AssertionError("the reference backward ran for an emulator call")
    monkeypatch.setattr(reference, "na_reference_backward", refuse)
    monkeypatch.setattr(autograd, "na_reference_backward", refuse)  # the name the torch op's fallback calls


def inputs(seed, spatial, heads, heads_kv, head_dim, dtype, n_extra):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn((1, *spatial, heads, head_dim), generator=gen).to(dtype)
    k, v = (torch.randn((1, *spatial, heads_kv, head_dim), generator=gen).to(dtype) for _ in range(2))
    extra = {}
    if n_extra:
        extra = dict(additional_keys=torch.randn(1, n_extra, heads_kv, head_dim, generator=gen).to(dtype),
                     additional_values=torch.randn(1, n_extra, heads_kv, head_dim, generator=gen).to(dtype))
    return q, k, v, extra


def only_family(monkeypatch, family):
    """Pin the backward to `family`'s partner: the selector's cost favours the SIMT family's exact work on the
    tiny problems of this tier, and each family must be checked on them. Resolved calls are cached with their
    backward, so the cache is cleared on the way in and out."""
    real = selector.partner_candidates
    monkeypatch.setattr(selector, "partner_candidates",
                        lambda forward: [i for i in real(forward) if i.spec.family == family])
    ops._CALLS.clear()


def check_case(case, schedules, family="simtbwd"):
    """Gradients of one case through the emulator against the oracle's, by the backward instance of `family`;
    returns its name."""
    with pytest.MonkeyPatch.context() as patch:
        try:
            only_family(patch, family)
            return _check_case(case, schedules, family)
        finally:
            ops._CALLS.clear()


def _check_case(case, schedules, family):
    rank, spatial, kernel, stride, dilation, causal, n_extra, heads, heads_kv, head_dim, dtype, lse_grad = case
    q, k, v, extra = inputs(sum(spatial) * 31 + head_dim, spatial, heads, heads_kv, head_dim, DTYPES[dtype], n_extra)
    params = dict(kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal)
    op = getattr(natgen, f"na{rank}d")
    backend, name = natgen.choose(rank, q, k, v, **params, **extra, backend="emulator", op="backward")
    assert backend == "emulator" and name is not None and f"_bwd_{family}_" in name, (backend, name)

    def forward(**tensors):
        return op(**tensors, **params, backend="emulator", return_lse=lse_grad)

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback to the reference would warn
            return grads_of(forward, q, k, v, seed=7, lse_cotangent=lse_grad, **params, **extra)

    tested = schedules(run)  # bit-identical under a shuffled schedule
    assert_grads_close_by_rule(forward, q, k, v, seed=7, lse_cotangent=lse_grad, tested=tested, **params, **extra)
    return name


# rank, spatial, kernel, stride, dilation, causal, n_extra, heads, heads_kv, head_dim, dtype, lse cotangent:
# every rank x dtype with non-causal, fully causal and mixed masks, borders, several key/query tiles,
# dilation groups, stride groups, even windows, extra tokens, the LSE cotangent, GQA and head_dim 64 / 128
CORE = [
    (1, (13,), 5, 1, 1, (False,), 0, 2, 2, 32, "f32", False),
    (1, (14,), 6, 4, 2, (True,), 2, 2, 1, 32, "f16", True),
    (1, (9,), 3, 2, 1, (False,), 1, 1, 1, 128, "bf16", False),
    (2, (7, 9), (3, 4), (1, 2), (2, 1), (False, False), 0, 2, 2, 32, "f32", True),
    (2, (8, 6), 3, (3, 1), (1, 2), (True, False), 1, 4, 2, 32, "bf16", False),
    (2, (6, 5), (2, 3), 1, 1, (True, True), 0, 1, 1, 64, "f16", False),
    (3, (4, 5, 5), (2, 3, 3), (1, 1, 2), (1, 1, 1), (False, True, False), 0, 2, 2, 32, "f16", False),
    (3, (4, 4, 5), 2, (2, 1, 1), 1, (True, True, True), 2, 2, 2, 32, "bf16", False),
    (3, (4, 4, 4), (2, 2, 3), 1, (2, 1, 1), (False, False, False), 1, 2, 1, 32, "f32", True),
]


def _case_id(case):
    return f"r{case[0]}_{'x'.join(map(str, case[1]))}_{case[10]}_h{case[9]}"


@pytest.mark.parametrize("case", CORE, ids=_case_id)
def test_emulated_backward_against_oracle(case, schedules, no_reference_backward):
    check_case(case, schedules)


def random_cases(count, seed, free=False):
    """Random shapes and parameters. Without `free` each case takes the rank, causal mask and dtype of a CORE
    case, so it runs on a backward instance the core set compiled already (a cold emulator build of an
    instance costs ~10 s); NATGEN_EMU_WIDE=1 samples those freely too."""
    rng = random.Random(seed)
    for _ in range(count):
        like = rng.choice(CORE)
        rank = like[0] if not free else rng.randint(1, 3)
        kernel = tuple(rng.randint(2, 4 if rank < 3 else 3) for _ in range(rank))
        dilation = tuple(rng.randint(1, 2) for _ in range(rank))
        spatial = tuple(k * d + rng.randint(0, 3) for k, d in zip(kernel, dilation))
        stride = tuple(rng.randint(1, k) for k in kernel)
        causal = like[5] if not free else tuple(rng.random() < 0.4 for _ in range(rank))
        dtype = like[10] if not free else rng.choice(list(DTYPES))
        heads_kv = rng.choice([1, 2])
        yield (rank, spatial, kernel, stride, dilation, causal, rng.choice([0, 0, 2]), heads_kv * rng.choice([1, 2]),
               heads_kv, 32, dtype, rng.random() < 0.3)


# NATGEN_EMULATED_BWD_SAMPLES sets the count; NATGEN_EMU_WIDE=1 samples 16, freely
SAMPLES = int(os.environ.get("NATGEN_EMULATED_BWD_SAMPLES", "16" if emulator_wide() else "1"))


@pytest.mark.parametrize("case", list(random_cases(SAMPLES, 4321, free=emulator_wide())), ids=_case_id)
def test_emulated_backward_random_sample(case, schedules, no_reference_backward):
    check_case(case, schedules)


def cross_product_cases():
    """Every rank x dtype x causal variant (none, all, mixed), on small problems with stride, dilation, extra
    tokens and GQA: the whole default set of backward masks and dtypes (27 instances, ~10 s of cold emulator
    build each), so it runs with NATGEN_EMU_WIDE=1 only; the core set covers every rank x dtype."""
    shapes = {1: ((12,), 4, 2, 2), 2: ((7, 6), (3, 2), (2, 1), (1, 2)), 3: ((4, 5, 4), (2, 3, 2), 1, (1, 1, 2))}
    for rank, dtype in itertools.product((1, 2, 3), DTYPES):
        spatial, kernel, stride, dilation = shapes[rank]
        masks = [(False,) * rank, (True,) * rank] + ([(True,) + (False,) * (rank - 1)] if rank > 1 else [])
        for causal in masks:
            yield (rank, spatial, kernel, stride, dilation, causal, 1, 2, 1, 32, dtype, any(causal))


@pytest.mark.skipif(not emulator_wide(), reason="NATGEN_EMU_WIDE=1 runs the whole rank x dtype x mask product")
@pytest.mark.parametrize("case", list(cross_product_cases()),
                         ids=lambda c: f"{_case_id(c)}_c{''.join('01'[x] for x in c[5])}")
def test_emulated_backward_every_mask_and_dtype(case, schedules, no_reference_backward):
    check_case(case, schedules)


def test_backward_choice_is_named_and_explained():
    q = torch.randn(1, 6, 6, 2, 32)
    backend, name = natgen.choose(2, q, q, q, 3, backend="emulator", op="backward")
    forward = natgen.choose(2, q, q, q, 3, backend="emulator")[1]
    assert backend == "emulator" and name in find(forward).partners
    entry = find(name)
    roles = [e["role"] for e in entry.launch["entries"]]
    assert roles == ["preprocess", "dkdv", "dkdv_extra", "dq", "drpb"] and entry.launch["dq"] == "query_stationary"
    assert entry.launch["rpb"] is True
    from click.testing import CliRunner
    from natgen.cli import main
    result = CliRunner().invoke(main, ["explain", "--rank", "2", "--shape", "6x6", "--kernel-size", "3",
                                       "--dtype", "fp32", "--backward"])
    assert result.exit_code == 0, result.output
    assert "chosen:  na2d_bwd_simtbwd_kany_dany_c00_f32_h32_q2x2_sm80" in result.output
    causal_line = next(line for line in result.output.splitlines()
                       if line.startswith("na2d_bwd_simtbwd_kany_dany_c11_f32_h32_q2x2_sm80"))
    assert "not a backward partner of" in causal_line and "causal mask" in causal_line
    assert "dQ: query_stationary (its own pass, deterministic; the default" in result.output
    atomic_line = next(line for line in result.output.splitlines()
                       if line.startswith("na2d_bwd_simtbwda_kany_dany_c00_f32_h32_q2x2_sm80"))
    assert "is opt-in: natgen.backward_options(dq='atomic')" in atomic_line
    with natgen.backward_options(dq="atomic"):
        result = CliRunner().invoke(main, ["explain", "--rank", "2", "--shape", "6x6", "--kernel-size", "3",
                                           "--dtype", "fp32", "--backward"])
        assert natgen.choose(2, q, q, q, 3, backend="emulator", op="backward")[1].startswith("na2d_bwd_simtbwda_")
    assert "chosen:  na2d_bwd_simtbwda_kany_dany_c00_f32_h32_q2x2_sm80" in result.output
    assert "dQ: atomic (summed by fp32 atomics" in result.output
    assert natgen.choose(2, q, q, q, 3, backend="emulator", op="backward")[1] == name  # restored at exit


def test_backward_without_partner_warns_and_falls_back(monkeypatch, tmp_path):
    """A forward the library holds no backward for (an instance rendered outside the policy, head_dim 256):
    the gradients come from the reference, with a warning naming why."""
    from natgen.codegen import library
    from natgen.manifest import reload
    from natgen.spec import KernelSpec
    from natgen import paths
    emulator_cache = paths.cache_dir() / "emulator"
    emulator_cache.mkdir(parents=True, exist_ok=True)
    (tmp_path / "emulator").symlink_to(emulator_cache)  # the extra library is private, the compiled modules not
    monkeypatch.setenv("NATGEN_CACHE_DIR", str(tmp_path))
    for variable in ("NATGEN_EMU_RACECHECK", "NATGEN_EMU_INITCHECK"):  # the warning is the point: one plain build
        monkeypatch.delenv(variable, raising=False)
    name = "na1d_fwd_simt_kany_dany_c0_f32_h256_q4_sm80"
    library.write_extra([KernelSpec.parse(name)])
    reload()
    try:
        q, k, v, _ = inputs(3, (6,), 1, 1, 256, torch.float32, 0)
        assert natgen.choose(1, q, k, v, 3, backend="emulator")[1] == name
        problem = ops.resolve(1, q, k, v, 3, backend="emulator")[0]
        _, reason = selector.backward_or_reason(find(name), problem, selector.Target("cuda", "sm_80"))
        assert reason and name in reason
        assert natgen.choose(1, q, k, v, 3, backend="emulator", op="backward") == ("reference", None)
        with pytest.warns(UserWarning, match="no emulator backward kernel.*names no backward kernel"):
            assert_grads_close_by_rule(lambda **t: natgen.na1d(**t, kernel_size=3, backend="emulator"), q, k, v,
                                       kernel_size=3)
    finally:
        monkeypatch.undo()  # the original cache (and its manifest overlays) before reloading
        reload()
        ops._CALLS.clear()
