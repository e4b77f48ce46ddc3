"""Relative positional bias in the CUDA forward families, run through the CPU emulator against the float64
oracle (tests/rpb_cases.py), with racecheck and initcheck on every launch and a shuffled schedule that must
give bit-identical results (tests/conftest.py)."""
import pytest

from conftest import emulator_wide
from rpb_cases import core_cases, run_case

pytestmark = [pytest.mark.emulated, pytest.mark.usefixtures("emulator_checks_global")]


def _emulator_ready():
    try:
        from natgen import emulator
        return hasattr(emulator, "launch")
    except ImportError:
        return False


requires_emulator = pytest.mark.skipif(not _emulator_ready(), reason="natgen.emulator not built")
CORE = core_cases(emulator_wide())


@requires_emulator
@pytest.mark.parametrize("case", CORE, ids=[c.id for c in CORE])
def test_fused_rpb(case, schedules):
    schedules(lambda: run_case(case, "emulator"))


# the public op on backend="emulator": the selector's instance (it must add the bias) forward, and the
# gradients, d rpb included, from the simtbwd backward kernels (no reference fallback: it would warn)
# (the geometry of core cases, and the backward masks and dtypes of tests/test_bwd_emulated.py's, so the
# same instances are compiled once)
PUBLIC = [
    (2, (7, 8), (3, 4), (1, 2), (2, 1), (True, False), "bfloat16", "_"),
    (1, (13,), 4, 1, 2, (True,), "float16", "_"),
    (3, (4, 5, 6), (2, 3, 3), 1, (1, 1, 2), (False, True, False), "float16", "_"),
]


@requires_emulator
@pytest.mark.parametrize("case", PUBLIC, ids=lambda c: f"r{c[0]}_{c[6]}")
def test_public_op_with_rpb_forward_and_gradients(case, schedules):
    import torch

    import natgen
    from oracle import assert_close_by_rule, assert_grads_close_by_rule
    rank, spatial, kernel, stride, dilation, causal, dtype, family = case
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(rank * 101)
    q, k, v = (torch.randn(2, *spatial, 2, 32, generator=gen).to(dt) for _ in range(3))
    ks = kernel if isinstance(kernel, tuple) else (kernel,) * rank
    rpb = (2 * torch.randn(2, *(2 * K - 1 for K in ks), generator=gen)).to(dt)
    params = dict(kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal)
    op = getattr(natgen, f"na{rank}d")
    backend, name = natgen.choose(rank, q, k, v, backend="emulator", rpb=rpb, **params)
    assert backend == "emulator" and name is not None and family in name, name
    out, lse = schedules(lambda: op(q, k, v, backend="emulator", rpb=rpb, return_lse=True, **params))
    assert_close_by_rule(out, q, k, v, lse=lse, rpb=rpb, **params)
    backward = natgen.choose(rank, q, k, v, backend="emulator", rpb=rpb, op="backward", **params)
    assert backward[0] == "emulator" and "_bwd_simtbwd_" in backward[1], backward
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_grads_close_by_rule(lambda **t: op(**t, backend="emulator", **params), q, k, v, rpb=rpb, **params)
