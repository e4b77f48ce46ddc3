"""Emulated tier, SIMT family: the generated CUDA source run on the CPU against the float64 oracle.

Every launch runs with racecheck over the tensors (the family has no shared memory) and initcheck (the
emulator_checks_global fixture), and every case under the default schedule and a shuffled one, with
bit-identical results (the schedules fixture, tests/conftest.py).
"""
import os
import random

import pytest
import torch

import natgen
from natgen import ops
from natgen.manifest import load
from conftest import emulator_wide
from oracle import assert_close_by_rule

pytestmark = [pytest.mark.emulated, pytest.mark.usefixtures("emulator_checks_global"),
              pytest.mark.skipif(not ops.BACKENDS["emulator"].available(), reason="emulator not built")]

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def simt_instance(rank, dtype, head_dim, kernel_size="any", causal=None):
    causal = tuple(causal or (False,) * rank)
    for inst in load():
        spec = inst.spec
        if (spec.family, spec.rank, spec.dtype, spec.head_dim) == ("simt", rank, dtype, head_dim) and \
                spec.causal == causal and (spec.kernel_size == kernel_size if kernel_size == "any"
                                           else spec.kernel_size == (kernel_size,) * rank) and \
                (spec.dilation == "any" if kernel_size == "any" else True):
            return inst
    raise LookupError(f"no simt instance rank={rank} {dtype} h{head_dim} K={kernel_size} causal={causal}")


def random_inputs(seed, batch, spatial, heads, head_dim, dtype, n_extra=0, heads_kv=None):
    gen = torch.Generator().manual_seed(seed)
    heads_kv = heads_kv or heads
    q = torch.randn((batch, *spatial, heads, head_dim), generator=gen).to(dtype)
    k, v = (torch.randn((batch, *spatial, heads_kv, head_dim), generator=gen).to(dtype) for _ in range(2))
    extra = {}
    if n_extra:
        extra = dict(additional_keys=torch.randn(batch, n_extra, heads_kv, head_dim, generator=gen).to(dtype),
                     additional_values=torch.randn(batch, n_extra, heads_kv, head_dim, generator=gen).to(dtype))
    return q, k, v, extra


# rank, spatial, kernel, stride, dilation, causal, n_extra: borders, several tiles, dilation groups,
# stride groups, even windows and extra tokens, all on the generic (K=any) instances
CORE = [
    (1, (23,), 5, 1, 1, (False,), 0),
    (1, (26,), 6, 4, 2, (True,), 2),
    (2, (9, 11), (3, 4), (1, 2), (2, 1), (False, False), 0),
    (2, (10, 8), 3, (3, 1), (1, 2), (True, False), 1),
    (3, (5, 6, 7), (2, 3, 3), (1, 1, 2), (1, 2, 1), (False, True, False), 0),
    (3, (4, 6, 5), 2, (2, 1, 1), 1, (True, True, True), 2),
]


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("case", CORE, ids=lambda c: f"r{c[0]}_{'x'.join(map(str, c[1]))}")
def test_generic_simt_against_oracle(case, dtype, schedules):
    rank, spatial, kernel, stride, dilation, causal, n_extra = case
    q, k, v, extra = random_inputs(hash(case) % 1000, 2, spatial, 2, 32, DTYPES[dtype], n_extra)
    instance = simt_instance(rank, dtype, 32, causal=causal)
    params = dict(kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal)
    out, lse = schedules(lambda: ops.run_instance(instance.name, rank, q, k, v, **params, **extra))
    assert_close_by_rule(out, q, k, v, lse=lse, **params, **extra)


@pytest.mark.parametrize("rank, kernel", [(1, 13), (2, 7), (3, 3)])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_specialized_simt_against_oracle(rank, kernel, head_dim, schedules):
    spatial = {1: (kernel + 9,), 2: (kernel + 3, kernel + 2), 3: (kernel + 2, kernel + 1, kernel)}[rank]
    dtype = ["f32", "f16", "bf16"][head_dim // 64]
    q, k, v, _ = random_inputs(kernel * head_dim, 1, spatial, 2, head_dim, DTYPES[dtype])
    instance = simt_instance(rank, dtype, head_dim, kernel_size=kernel)
    out, lse = schedules(lambda: ops.run_instance(instance.name, rank, q, k, v, kernel))
    assert_close_by_rule(out, q, k, v, lse=lse, kernel_size=kernel)


# grouped-query attention: (case from CORE, heads, heads_kv) on the generic instances, then specialized ones
GQA_GENERIC = [(CORE[1], 4, 2), (CORE[3], 6, 2), (CORE[4], 3, 1)]


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("case,heads,heads_kv", GQA_GENERIC, ids=lambda c: str(c) if isinstance(c, int) else
                         f"r{c[0]}_{'x'.join(map(str, c[1]))}")
def test_generic_simt_grouped_kv_heads(case, heads, heads_kv, dtype, schedules):
    rank, spatial, kernel, stride, dilation, causal, n_extra = case
    q, k, v, extra = random_inputs(heads * 7 + heads_kv, 2, spatial, heads, 32, DTYPES[dtype], n_extra + 1,
                                   heads_kv=heads_kv)
    instance = simt_instance(rank, dtype, 32, causal=causal)
    params = dict(kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal)
    out, lse = schedules(lambda: ops.run_instance(instance.name, rank, q, k, v, **params, **extra))
    assert_close_by_rule(out, q, k, v, lse=lse, **params, **extra)


@pytest.mark.parametrize("rank, kernel, heads_kv", [(1, 13, 1), (2, 7, 2)])
def test_specialized_simt_grouped_kv_heads(rank, kernel, heads_kv, schedules):
    spatial = {1: (kernel + 9,), 2: (kernel + 3, kernel + 2)}[rank]
    q, k, v, _ = random_inputs(kernel, 1, spatial, 4, 64, torch.float16, heads_kv=heads_kv)
    instance = simt_instance(rank, "f16", 64, kernel_size=kernel)
    out, lse = schedules(lambda: ops.run_instance(instance.name, rank, q, k, v, kernel))
    assert_close_by_rule(out, q, k, v, lse=lse, kernel_size=kernel)


def test_emulator_backend_runs_what_the_selector_picks(schedules):
    q, k, v, _ = random_inputs(5, 1, (9, 9), 2, 32, torch.float32)
    backend, name = natgen.choose(2, q, k, v, 5, backend="emulator")
    assert backend == "emulator" and name is not None and "_k5x5_" in name
    out = schedules(lambda: natgen.na2d(q, k, v, 5, backend="emulator"))
    assert_close_by_rule(out, q, k, v, kernel_size=5)


def test_emulator_backend_autograd_matches_reference_grads():
    """The emulated backward kernels (natgen.emulated) against the reference backend's gradients."""
    q, k, v, _ = random_inputs(6, 1, (7, 6), 1, 32, torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    natgen.na2d(*leaves, 3, backend="emulator").square().sum().backward()
    expected = [t.clone().requires_grad_(True) for t in (q, k, v)]
    natgen.na2d(*expected, 3, backend="reference").square().sum().backward()
    for got, want in zip(leaves, expected):
        assert torch.allclose(got.grad, want.grad, rtol=1e-4, atol=1e-5)


def random_cases(count, seed):
    rng = random.Random(seed)
    for _ in range(count):
        rank = rng.randint(1, 3)
        kernel = tuple(rng.randint(2, 4) for _ in range(rank))
        dilation = tuple(rng.randint(1, 2) for _ in range(rank))
        spatial = tuple(k * d + rng.randint(0, 4) for k, d in zip(kernel, dilation))
        stride = tuple(rng.randint(1, k) for k in kernel)
        causal = tuple(rng.random() < 0.4 for _ in range(rank))
        yield rank, spatial, kernel, stride, dilation, causal, rng.choice([0, 0, 3]), rng.choice(["f32", "f16", "bf16"])


# NATGEN_EMULATED_SAMPLES sets the count; NATGEN_EMU_WIDE=1 samples four times as many
SAMPLES = int(os.environ.get("NATGEN_EMULATED_SAMPLES", "24" if emulator_wide() else "6"))


@pytest.mark.parametrize("case", list(random_cases(SAMPLES, 1234)), ids=lambda c: f"r{c[0]}_{c[7]}")
def test_random_sample_against_oracle(case, schedules):
    rank, spatial, kernel, stride, dilation, causal, n_extra, dtype = case
    q, k, v, extra = random_inputs(sum(spatial), 1, spatial, 2, 32, DTYPES[dtype], n_extra)
    instance = simt_instance(rank, dtype, 32, causal=causal)
    params = dict(kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal)
    out, lse = schedules(lambda: ops.run_instance(instance.name, rank, q, k, v, **params, **extra))
    assert_close_by_rule(out, q, k, v, lse=lse, **params, **extra)


def test_emulated_arch_is_a_parameter():
    q, k, v, _ = random_inputs(7, 1, (9, 9), 2, 32, torch.float16)
    for arch in ("sm_80", "sm_90"):
        backend, name = natgen.choose(2, q, k, v, 5, backend="emulator", arch=arch)
        assert backend == "emulator" and name
        out = natgen.na2d(q, k, v, 5, backend="emulator", arch=arch)
        assert_close_by_rule(out, q, k, v, kernel_size=5)
    with pytest.raises(ValueError, match="arch"):
        natgen.na2d(q, k, v, 5, backend="emulator", arch="sm_9x")
