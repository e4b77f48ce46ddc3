"""Emulated tier, CUDA backward with a relative positional bias: grad_rpb (and every other gradient) from the
simtbwd kernels through backend="emulator" against the float64 oracle (tests/oracle.py's dense bias and
grads_of), racecheck and initcheck on every launch, bit-identical under a shuffled schedule (the dS scratch
is reduced in a fixed order). The opt-in atomic-dQ backward (simtbwda) is checked against the oracle only:
its dQ is summed in the atomics' order.

The cases take the (rank, causal mask, dtype) of tests/test_bwd_emulated.py's CORE cases, so they run on
backward instances that tier compiles anyway (a cold emulator build costs ~10 s each).
"""
import warnings

import pytest
import torch

import natgen
from natgen import ops
from oracle import assert_grads_close_by_rule, grads_of
from test_bwd_emulated import DTYPES, no_reference_backward  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.emulated, pytest.mark.usefixtures("emulator_checks_global"),
              pytest.mark.skipif(not ops.BACKENDS["emulator"].available(), reason="emulator not built")]

# rank, spatial, kernel, stride, dilation, causal, n_extra, heads, heads_kv, dtype, lse cotangent, batch:
# every rank; even K, stride and dilation groups, borders (windows slide inward), causal and mixed masks,
# extra tokens (which get no bias), GQA, the LSE cotangent and batch 2 (grad_rpb sums over it)
CASES = [
    (1, (12,), 6, 4, 2, (True,), 2, 1, 1, "f16", False, 2),
    (2, (8, 6), (3, 4), (1, 2), (2, 1), (True, False), 1, 2, 1, "bf16", True, 1),
    (3, (3, 6, 4), (2, 3, 2), (1, 1, 2), (1, 2, 1), (False, True, False), 0, 1, 1, "f16", False, 1),
]


def _id(case):
    return f"r{case[0]}_{'x'.join(map(str, case[1]))}_{case[9]}"


def make(case):
    rank, spatial, kernel, stride, dilation, causal, n_extra, heads, heads_kv, dtype, lse_grad, batch = case
    gen = torch.Generator().manual_seed(sum(spatial) * 17 + rank)
    dt = DTYPES[dtype]
    q = torch.randn((batch, *spatial, heads, 32), generator=gen).to(dt)
    k, v = (torch.randn((batch, *spatial, heads_kv, 32), generator=gen).to(dt) for _ in range(2))
    kernels = kernel if isinstance(kernel, tuple) else (kernel,) * rank
    # a spread that moves the softmax, so a bias or its gradient in the wrong slot shows
    rpb = (2 * torch.randn((heads, *(2 * K - 1 for K in kernels)), generator=gen)).to(dt)
    tensors = dict(rpb=rpb)
    if n_extra:
        tensors.update(additional_keys=torch.randn(batch, n_extra, heads_kv, 32, generator=gen).to(dt),
                       additional_values=torch.randn(batch, n_extra, heads_kv, 32, generator=gen).to(dt))
    params = dict(kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal)
    return q, k, v, tensors, params


def run_checked(case, family, schedules=None):
    rank, lse_grad = case[0], case[10]
    q, k, v, tensors, params = make(case)
    op = getattr(natgen, f"na{rank}d")
    backend, name = natgen.choose(rank, q, k, v, **params, **tensors, backend="emulator", op="backward")
    assert backend == "emulator" and f"_bwd_{family}_" in name, (backend, name)

    def forward(**t):
        return op(**t, **params, backend="emulator", return_lse=lse_grad)

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback to the reference would warn
            return grads_of(forward, q, k, v, seed=3, lse_cotangent=lse_grad, **params, **tensors)

    tested = schedules(run) if schedules is not None else run()
    assert_grads_close_by_rule(forward, q, k, v, seed=3, lse_cotangent=lse_grad, tested=tested, **params,
                               **tensors)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_emulated_backward_with_rpb_against_oracle(case, schedules, no_reference_backward):  # noqa: F811
    run_checked(case, "simtbwd", schedules)


def test_atomic_dq_backward_is_opt_in_and_matches_the_oracle(no_reference_backward):  # noqa: F811
    case = CASES[1]
    q, k, v, tensors, params = make(case)
    assert "_bwd_simtbwd_" in natgen.choose(2, q, k, v, **params, **tensors, backend="emulator", op="backward")[1]
    with natgen.backward_options(dq="atomic"):
        run_checked(case, "simtbwda")
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:  # torch's deterministic mode overrides the opt-in
            name = natgen.choose(2, q, k, v, **params, **tensors, backend="emulator", op="backward")[1]
            assert "_bwd_simtbwd_" in name
        finally:
            torch.use_deterministic_algorithms(previous)
    assert "_bwd_simtbwd_" in natgen.choose(2, q, k, v, **params, **tensors, backend="emulator", op="backward")[1]
    with pytest.raises(ValueError, match="dq='fast' must be one of"):
        natgen.backward_options(dq="fast")
