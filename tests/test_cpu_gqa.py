"""Grouped-query attention in the generated CPU kernels: k, v and the extra tokens have fewer heads than q, the
kernels index the kv head of each query head, and the backward sums a kv head's grads over its query heads.

Checked against the float64 oracle with repeated K/V (forward and gradients, fp32 and fp64 compute), against the
same kernels fed repeated K/V (the forward and dQ do the same arithmetic, so they agree exactly), for
determinism across thread counts, and by gradcheck.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch

import natgen
from natgen import cpu
from natgen import cxx as cpu_build
from natgen.problem import make_problem
from oracle import assert_close_by_rule, assert_grads_close_by_rule

pytestmark = [pytest.mark.cpu,
              pytest.mark.skipif(not cpu.available(), reason="no C++ compiler for the cpu backend")]

DTYPES = {"f32": torch.float32, "f16": torch.float16, "f64": torch.float64}
OPS = {1: natgen.na1d, 2: natgen.na2d, 3: natgen.na3d}


@dataclass(frozen=True)
class Case:
    rank: int
    spatial: tuple
    kernel: tuple
    stride: tuple
    dilation: tuple
    causal: tuple
    n_extra: int
    dtype: str
    head_dim: int
    head_dim_v: int
    heads: int
    heads_kv: int
    batch: int = 1

    def __str__(self):
        return (f"r{self.rank}_L{'x'.join(map(str, self.spatial))}_k{'x'.join(map(str, self.kernel))}"
                f"_s{'x'.join(map(str, self.stride))}_d{'x'.join(map(str, self.dilation))}"
                f"_c{''.join(str(int(c)) for c in self.causal)}_e{self.n_extra}_{self.dtype}"
                f"_h{self.head_dim}v{self.head_dim_v}_q{self.heads}kv{self.heads_kv}_b{self.batch}")


CASES = [
    # generic (K=any) instances: borders, dilation groups, strides, causal axes, extra tokens, head_dim_v != head_dim
    Case(1, (23,), (5,), (1,), (2,), (False,), 0, "f32", 8, 8, heads=4, heads_kv=2),
    Case(1, (26,), (6,), (4,), (1,), (True,), 2, "f32", 8, 12, heads=3, heads_kv=1),
    Case(2, (9, 11), (3, 4), (1, 2), (2, 1), (False, False), 1, "f32", 12, 12, heads=6, heads_kv=2, batch=2),
    Case(2, (10, 8), (3, 3), (3, 1), (1, 2), (True, False), 0, "f32", 8, 8, heads=4, heads_kv=1),
    Case(3, (5, 6, 7), (2, 3, 3), (1, 1, 2), (1, 2, 1), (False, True, False), 1, "f32", 8, 8, heads=4, heads_kv=2),
    Case(3, (4, 6, 19), (3, 3, 5), (1, 1, 2), (1, 1, 1), (True, True, True), 2, "f32", 16, 16, heads=2, heads_kv=1),
    # specialized instances (constant K and head_dim): the fixed-stride forward and the fixed-shape backward
    # lane groups, with clamped borders, strides and dilation groups, half inputs
    Case(2, (16, 16), (7, 7), (1, 1), (1, 1), (False, False), 0, "f32", 32, 32, heads=4, heads_kv=2),
    Case(2, (23, 19), (7, 7), (3, 2), (1, 2), (False, False), 0, "f32", 32, 32, heads=4, heads_kv=1, batch=2),
    Case(2, (13, 30), (5, 5), (1, 1), (2, 3), (False, False), 0, "f16", 32, 32, heads=4, heads_kv=2),
    Case(3, (9, 10, 11), (3, 3, 3), (1, 2, 1), (1, 1, 2), (False, False, False), 0, "f32", 32, 32, heads=2,
         heads_kv=1),
    # fp64 compute (the backward recomputes the normalizer)
    Case(2, (9, 8), (3, 3), (1, 1), (1, 2), (False, False), 2, "f64", 8, 8, heads=4, heads_kv=2),
    Case(1, (19,), (4,), (2,), (1,), (False,), 0, "f64", 8, 8, heads=3, heads_kv=1, batch=2),
]


def _tensors(case: Case, seed: int = 0, heads_kv=None):
    g = torch.Generator().manual_seed(seed)
    dtype = DTYPES[case.dtype]
    kv_heads = case.heads_kv if heads_kv is None else heads_kv
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    q = randn(case.batch, *case.spatial, case.heads, case.head_dim)
    k = randn(case.batch, *case.spatial, kv_heads, case.head_dim)
    v = randn(case.batch, *case.spatial, kv_heads, case.head_dim_v)
    ek = ev = None
    if case.n_extra:
        ek = randn(case.batch, case.n_extra, kv_heads, case.head_dim)
        ev = randn(case.batch, case.n_extra, kv_heads, case.head_dim_v)
    return q, k, v, ek, ev


def _params(case: Case, ek=None, ev=None):
    return dict(kernel_size=case.kernel, stride=case.stride, dilation=case.dilation, is_causal=case.causal,
                additional_keys=ek, additional_values=ev)


def _repeat(t, group):
    """K/V (or extra tokens) with each kv head repeated for its query heads: the layout heads == heads_kv."""
    return None if t is None else t.repeat_interleave(group, dim=-2)


def _run(case: Case, q, k, v, ek, ev, return_lse=False):
    return OPS[case.rank](q, k, v, case.kernel, case.stride, case.dilation, case.causal, additional_keys=ek,
                          additional_values=ev, return_lse=return_lse, backend="cpu")


@pytest.fixture(scope="module", autouse=True)
def compiled_modules():
    """Compile every module the tests below use, two at a time."""
    instances = {}
    for case in CASES:
        q, k, v, ek, ev = _tensors(case)
        problem = make_problem(case.rank, q, k, v, case.kernel, case.stride, case.dilation, case.causal, None,
                               ek, ev)
        assert problem.heads_kv == case.heads_kv
        for op in ("fwd", "bwd"):
            instance = cpu.choose(problem, op)
            instances[instance.name] = instance
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        list(pool.map(cpu_build.compile_instance, [instances[name] for name in sorted(instances)]))
    return instances


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_matches_oracle(case):
    q, k, v, ek, ev = _tensors(case)
    out, lse = _run(case, q, k, v, ek, ev, return_lse=True)
    assert out.shape == (*q.shape[:-1], case.head_dim_v)
    assert_close_by_rule(out, q, k, v, lse=lse, **_params(case, ek, ev))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_equals_the_kernel_on_repeated_kv(case):
    """Query head h reads kv head h // group: exactly what the same kernel computes from repeated K/V."""
    q, k, v, ek, ev = _tensors(case)
    group = case.heads // case.heads_kv
    out, lse = _run(case, q, k, v, ek, ev, return_lse=True)
    out_rep, lse_rep = _run(case, q, *(_repeat(t, group) for t in (k, v, ek, ev)), return_lse=True)
    assert torch.equal(out, out_rep)
    assert torch.equal(lse, lse_rep)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients_match_oracle(case):
    q, k, v, ek, ev = _tensors(case, seed=1)

    def forward(q, k, v, additional_keys=None, additional_values=None):
        return _run(case, q, k, v, additional_keys, additional_values)

    assert_grads_close_by_rule(forward, q, k, v, seed=3, **_params(case, ek, ev))


def _grads(case, tensors, cotangent):
    leaves = [None if t is None else t.clone().requires_grad_() for t in tensors]
    out = _run(case, *leaves)
    out.backward(cotangent)
    return [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("case", [CASES[2], CASES[6], CASES[10]], ids=str)
def test_dq_equals_the_kernel_on_repeated_kv_and_key_grads_sum_its_heads(case):
    """dQ does the same arithmetic as on repeated K/V (exactly equal); the kv heads' grads are the sums over
    their query heads of the repeated layout's grads (equal up to the order of the additions)."""
    tensors = _tensors(case, seed=2)
    group = case.heads // case.heads_kv
    q = tensors[0]
    cotangent = torch.randn(*q.shape[:-1], case.head_dim_v, generator=torch.Generator().manual_seed(4),
                            dtype=torch.float64).to(q.dtype)
    grouped = _grads(case, tensors, cotangent)
    repeated = _grads(case, (q, *(_repeat(t, group) for t in tensors[1:])), cotangent)
    assert torch.equal(grouped[0], repeated[0])
    for got, rep in zip(grouped[1:], repeated[1:]):
        if got is None:
            continue
        summed = rep.unflatten(-2, (case.heads_kv, group)).sum(-2)
        tolerance = 1e-12 if q.dtype == torch.float64 else 1e-5
        torch.testing.assert_close(got, summed, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("case", [CASES[2], CASES[6], CASES[7]], ids=str)
def test_backward_is_deterministic_across_thread_counts(case):
    """One work unit owns a kv head's keys for all its query heads: no races, and the same bits on 1 or 2
    threads."""
    tensors = _tensors(case, seed=5)
    q = tensors[0]
    cotangent = torch.randn(*q.shape[:-1], case.head_dim_v, generator=torch.Generator().manual_seed(6),
                            dtype=torch.float64).to(q.dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 1, 2):
            torch.set_num_threads(count)
            results.append(_grads(case, tensors, cotangent))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            assert (got is None and want is None) or torch.equal(got, want)


@pytest.mark.parametrize("rank,spatial,kernel,stride,dilation,extra", [
    (1, (7,), (3,), (2,), (2,), 2),
    (2, (5, 6), (3, 2), (1, 2), (1, 2), 1),
])
def test_gradcheck_float64(rank, spatial, kernel, stride, dilation, extra):
    g = torch.Generator().manual_seed(5)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    q = make(1, *spatial, 4, 3)
    k, v = make(1, *spatial, 2, 3), make(1, *spatial, 2, 2)
    ek, ev = make(1, extra, 2, 3), make(1, extra, 2, 2)

    def fn(q, k, v, ek, ev):
        return OPS[rank](q, k, v, kernel, stride, dilation, False, additional_keys=ek, additional_values=ev,
                         backend="cpu")

    assert torch.autograd.gradcheck(fn, (q, k, v, ek, ev))
