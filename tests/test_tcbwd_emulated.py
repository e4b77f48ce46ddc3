"""Emulated tier, the tensor-core CUDA backward (the tcbwd family): autograd through backend="emulator" against
the float64 oracle's gradients by the tolerance rule of docs/semantics.md, with racecheck and initcheck, under
the default and a shuffled schedule with bit-identical gradients, and with the reference's backward refused
(tests/test_bwd_emulated.py's harness, pinned to this family)."""
import os
import random

import pytest
import torch

import natgen
from natgen import ops
from natgen.manifest import find
from conftest import emulator_wide
from test_bwd_emulated import check_case, no_reference_backward  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.emulated, pytest.mark.usefixtures("emulator_checks_global"),
              pytest.mark.skipif(not ops.BACKENDS["emulator"].available(), reason="emulator not built")]

FAMILY = "tcbwd"

# rank, spatial, kernel, stride, dilation, causal, n_extra, heads, heads_kv, head_dim, dtype, lse cotangent.
# Each case is its own instance (a cold emulator build of the forward and the backward costs ~15 s), so the
# default set packs every feature into three: every rank, both dtypes, head_dim 32 / 64 / 128, fully causal
# and mixed masks, even windows, strides, dilation groups, extra tokens (their dK / dV entry), the LSE
# cotangent, GQA and borders; the rank-1 and 2-D cases span several key tiles of 64 and several query stages
# per tile; the 3-D one runs a specialized instance (compile-time K and dilation). NATGEN_EMU_WIDE=1 adds
# more (fully causal 3-D, generic non-causal, another specialized one) and a random sample.
CORE = [
    (1, (150,), 6, 2, 2, (True,), 2, 2, 1, 128, "f16", True),
    (2, (20, 9), (5, 4), (1, 2), (1, 2), (True, False), 1, 4, 2, 64, "bf16", False),
    (3, (4, 4, 5), 3, (2, 1, 1), 1, (False, False, False), 2, 2, 2, 32, "f16", True),  # compile-time K = 3
]
WIDE = [
    (3, (4, 4, 5), 2, (2, 1, 1), 1, (True, True, True), 2, 2, 2, 32, "f16", True),
    (2, (11, 9), 5, (2, 1), 1, (False, False), 2, 2, 1, 64, "bf16", False),  # compile-time K = 5
    (2, (20, 9), (5, 3), (1, 2), (1, 1), (False, False), 0, 1, 1, 32, "bf16", False),
    (1, (9,), 3, 2, 1, (False,), 1, 1, 1, 128, "bf16", False),
    (3, (5, 6, 6), 3, 1, (1, 2, 1), (False, False, False), 3, 2, 1, 64, "bf16", True),
]


def _case_id(case):
    return f"r{case[0]}_{'x'.join(map(str, case[1]))}_{case[10]}_h{case[9]}"


def specialized(case):
    """Whether the case fits a specialized instance (tcbwd.SPECIALIZED_KERNEL_SIZES, dilation 1, non-causal)."""
    rank, _, kernel, _, dilation, causal = case[:6]
    kernel = (kernel,) * rank if isinstance(kernel, int) else tuple(kernel)
    dilation = (dilation,) * rank if isinstance(dilation, int) else tuple(dilation)
    return (len(set(kernel)) == 1 and kernel[0] in (3, 5, 7) and set(dilation) == {1} and not any(causal))


def check(case, schedules):
    name = check_case(case, schedules, FAMILY)
    rank, kernel = case[0], case[2]
    expected = f"_k{'x'.join([str(kernel if isinstance(kernel, int) else kernel[0])] * rank)}_d" \
        if specialized(case) else "_kany_dany_"
    assert expected in name, (name, expected)  # the specialized instance wins where it fits


@pytest.mark.parametrize("case", CORE, ids=_case_id)
def test_tensor_core_backward_against_oracle(case, schedules, no_reference_backward):
    check(case, schedules)


@pytest.mark.skipif(not emulator_wide(), reason="NATGEN_EMU_WIDE=1 runs the non-causal cases too")
@pytest.mark.parametrize("case", WIDE, ids=_case_id)
def test_tensor_core_backward_wide_cases(case, schedules, no_reference_backward):
    check(case, schedules)


def random_cases(count, seed):
    """Random ranks, shapes, windows, strides, dilations, masks, dtypes and head_dims (NATGEN_EMU_WIDE=1)."""
    rng = random.Random(seed)
    for _ in range(count):
        rank = rng.randint(1, 3)
        kernel = tuple(rng.randint(2, 5 if rank < 3 else 3) for _ in range(rank))
        dilation = tuple(rng.randint(1, 2) for _ in range(rank))
        spatial = tuple(k * d + rng.randint(0, 9 if rank == 1 else 4) for k, d in zip(kernel, dilation))
        stride = tuple(rng.randint(1, k) for k in kernel)
        causal = tuple(rng.random() < 0.4 for _ in range(rank))
        heads_kv = rng.choice([1, 2])
        yield (rank, spatial, kernel, stride, dilation, causal, rng.choice([0, 0, 3]), heads_kv * rng.choice([1, 2]),
               heads_kv, rng.choice([32, 32, 64, 128]), rng.choice(["f16", "bf16"]), rng.random() < 0.3)


SAMPLES = int(os.environ.get("NATGEN_EMULATED_TCBWD_SAMPLES", "16"))


@pytest.mark.skipif(not emulator_wide(), reason="NATGEN_EMU_WIDE=1 runs the random sample (one cold build each)")
@pytest.mark.parametrize("case", list(random_cases(SAMPLES, 2468)), ids=_case_id)
def test_tensor_core_backward_random_sample(case, schedules, no_reference_backward):
    check(case, schedules)


def test_tensor_core_backward_is_chosen_for_half_inputs_and_explained():
    """On a NAT-sized fp16 problem the cost model picks the specialized tensor-core backward over the generic
    and the SIMT ones, and `natgen explain --backward` names them with the losers' costs."""
    q = torch.randn(1, 56, 56, 8, 32).half()
    backend, name = natgen.choose(2, q, q, q, 7, backend="emulator", op="backward")
    assert backend == "emulator" and name == "na2d_bwd_tcbwd_k7x7_d1x1_c00_f16_h32_q16x4_sm80"
    forward = find(natgen.choose(2, q, q, q, 7, backend="emulator")[1])
    assert name in forward.partners and any("_bwd_simtbwd_" in p for p in forward.partners)
    entry = find(name)
    assert [e["role"] for e in entry.launch["entries"]] == ["preprocess", "dkdv", "dkdv_extra", "dq"]
    assert entry.launch["dq"] == "query_stationary"
    from click.testing import CliRunner
    from natgen.cli import main
    result = CliRunner().invoke(main, ["explain", "--rank", "2", "--shape", "56x56", "--kernel-size", "7",
                                       "--backward"])
    assert result.exit_code == 0, result.output
    assert f"chosen:  {name}" in result.output
    loser = next(line for line in result.output.splitlines()
                 if line.startswith("na2d_bwd_simtbwd_kany_dany_c00_f16_h32_q2x2_sm80"))
    assert "computed_keys_per_useful_key" in loser  # supported, but costlier
    generic = next(line for line in result.output.splitlines()
                   if line.startswith("na2d_bwd_tcbwd_kany_dany_c00_f16_h32_q16x4_sm80"))
    assert "computed_keys_per_useful_key" in generic


def test_fp32_stays_with_the_simt_backward():
    q = torch.randn(1, 56, 56, 4, 32)
    assert "_bwd_simtbwd_" in natgen.choose(2, q, q, q, 7, backend="emulator", op="backward")[1]
