"""Generated CPU kernels (shared libraries called through ctypes) against the independent float64 oracle: forward, gradients,
gradcheck, errors, first-use compilation and the compile cache.

Every spec the sweep needs is compiled once up front, in parallel, into the normal cache (so a second run
takes seconds); the cache tests use a private cache directory.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import pytest
import torch

import natgen
from natgen import cpu
from natgen import cxx as cpu_build
from natgen.problem import make_problem
from oracle import assert_close_by_rule, assert_grads_close_by_rule
from conftest import cpu_wide

pytestmark = [pytest.mark.cpu,
              pytest.mark.skipif(not cpu.available(), reason="no C++ compiler for the cpu backend")]

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64}
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
    heads: int = 2
    batch: int = 1

    def __str__(self):
        return (f"r{self.rank}_L{'x'.join(map(str, self.spatial))}_k{'x'.join(map(str, self.kernel))}"
                f"_s{'x'.join(map(str, self.stride))}_d{'x'.join(map(str, self.dilation))}"
                f"_c{''.join(str(int(c)) for c in self.causal)}_e{self.n_extra}_{self.dtype}"
                f"_h{self.head_dim}v{self.head_dim_v}")


# Causal masks the sweep may draw per rank: the library's all-False / all-True plus one mixed mask per rank
# (a K=any library instance each), so the sweep compiles a bounded set of modules.
CAUSAL_CHOICES = {1: [(False,), (True,)], 2: [(False, False), (True, True), (True, False)],
                  3: [(False, False, False), (True, True, True), (False, True, False)]}


def _random_case(rng: random.Random, dtype: str) -> Case:
    rank = rng.choice([1, 2, 2, 3])
    causal = rng.choice(CAUSAL_CHOICES[rank])
    if dtype == "f64":  # keep the f64 sweep to the non-causal modules (fewer compiles)
        causal = (False,) * rank
    spatial, kernel, stride, dilation = [], [], [], []
    for _ in range(rank):
        K = rng.choice([2, 3, 4, 5] if rank == 3 else [2, 3, 4, 5, 6, 7])
        D = rng.choice([1, 1, 2])
        L = K * D + rng.randint(0, 5 if rank < 3 else 2)
        spatial.append(L), kernel.append(K), dilation.append(D), stride.append(rng.randint(1, K))
    head_dim = rng.choice([4, 8, 12])
    head_dim_v = head_dim if rng.random() < 0.7 else rng.choice([4, 8, 12])
    return Case(rank, tuple(spatial), tuple(kernel), tuple(stride), tuple(dilation), causal,
                rng.choice([0, 0, 3]), dtype, head_dim, head_dim_v)


def _sweep(seed: int, count: int):
    rng = random.Random(seed)
    return [_random_case(rng, dtype) for dtype in ("f32", "f16", "bf16", "f64") for _ in range(count)]


FORWARD_CASES = _sweep(1, 5)
GRAD_CASES = _sweep(2, 3)
# the benchmark shape (specialized instance, K=7, head_dim 32) and a small specialized 3x3 one
SPECIALIZED_CASES = [Case(2, (16, 16), (7, 7), (1, 1), (1, 1), (False, False), 0, "f32", 32, 32),
                     Case(1, (70,), (31,), (1,), (2,), (False,), 0, "f32", 64, 64),
                     # the specialized forward's fixed-stride layout (constant K and head_dim, no extra tokens):
                     # clamped borders, dilation groups, strides whose tiles split a stride group (key unions
                     # wider than tile + K - 1 take the general path), half inputs, batch > 1, ranks 1 and 3
                     Case(2, (23, 19), (7, 7), (3, 2), (1, 2), (False, False), 0, "f32", 32, 32, batch=2),
                     Case(2, (13, 30), (5, 5), (1, 1), (2, 3), (False, False), 0, "f16", 32, 32),
                     Case(2, (20, 17), (7, 7), (2, 1), (1, 1), (False, False), 0, "f32", 64, 64),
                     Case(3, (9, 10, 11), (3, 3, 3), (1, 2, 1), (1, 1, 2), (False, False, False), 0, "f32", 32, 32,
                          batch=2),
                     # enough units for the taller forward tiles of 2-D (up to 32 rows): a full and a partial
                     # tile of an odd row count, query pairs whose windows are clamped onto each other, and
                     # dilation groups of unequal length
                     Case(2, (45, 20), (7, 7), (1, 1), (1, 1), (False, False), 0, "f32", 32, 32, heads=4),
                     Case(2, (51, 16), (5, 5), (1, 1), (2, 1), (False, False), 0, "f32", 32, 32, heads=4),
                     # heads interleaved at power-of-two strides: a window's value rows would crowd a few L1
                     # sets, so the fixed layout gathers fp32 values too (values_conflict; cpu-1d's and nat-2d's
                     # layouts)
                     Case(1, (70,), (31,), (1,), (2,), (False,), 0, "f32", 64, 64, heads=4),
                     Case(2, (14, 14), (7, 7), (1, 1), (1, 1), (False, False), 0, "f32", 32, 32, heads=16)]
# two more specialized shapes, each a further pair of modules to compile (NATGEN_CPU_WIDE=1): the 2-D 3x3
# window with extra tokens, the 1-D K=7 instance with bf16 inputs and a stride
if cpu_wide():
    SPECIALIZED_CASES += [Case(2, (9, 11), (3, 3), (1, 2), (2, 1), (False, False), 2, "f32", 32, 32),
                          Case(1, (100,), (7,), (1,), (3,), (False,), 0, "bf16", 32, 32)]
# what the random sweep does not reach: windows longer than one vector along the last axis (several
# segments per row, causal there too), head_dim_v over 64 (P.V in several register blocks), batch > 1,
# and a mixed rank-3 causal mask; then several full 8-query lane groups per tile on the last axis
# (interior groups whose windows shift with the lane, border groups whose clamped windows do not, strided
# groups, a partial group), with head dims that are no multiple of the vector width
EDGE_CASES = [Case(1, (40,), (13,), (3,), (2,), (False,), 2, "f32", 8, 72, batch=2),
              Case(2, (12, 14), (3, 11), (1, 2), (1, 1), (False, True), 0, "f32", 8, 8, heads=3),
              Case(3, (5, 6, 7), (2, 3, 3), (1, 1, 2), (1, 2, 1), (False, True, False), 1, "f32", 8, 8, batch=2),
              Case(2, (20, 27), (5, 7), (2, 3), (1, 2), (False, True), 2, "f32", 12, 20),
              Case(3, (4, 6, 19), (3, 3, 5), (1, 1, 2), (1, 1, 1), (True, True, True), 0, "f32", 16, 16),
              Case(1, (150,), (9,), (1,), (1,), (False,), 0, "f64", 8, 8)]


def _tensors(case: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dtype = DTYPES[case.dtype]
    shape = (case.batch, *case.spatial, case.heads)
    q = torch.randn(*shape, case.head_dim, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(*shape, case.head_dim, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(*shape, case.head_dim_v, generator=g, dtype=torch.float64).to(dtype)
    ek = ev = None
    if case.n_extra:
        ek = torch.randn(case.batch, case.n_extra, case.heads, case.head_dim, generator=g,
                         dtype=torch.float64).to(dtype)
        ev = torch.randn(case.batch, case.n_extra, case.heads, case.head_dim_v, generator=g,
                         dtype=torch.float64).to(dtype)
    return q, k, v, ek, ev


def _params(case: Case, ek=None, ev=None):
    return dict(kernel_size=case.kernel, stride=case.stride, dilation=case.dilation, is_causal=case.causal,
                additional_keys=ek, additional_values=ev)


def _specs(case: Case):
    q, k, v, ek, ev = _tensors(case)
    problem = make_problem(case.rank, q, k, v, case.kernel, case.stride, case.dilation, case.causal, None, ek, ev)
    return [cpu.choose(problem, "fwd"), cpu.choose(problem, "bwd")]


@pytest.fixture(scope="module", autouse=True)
def compiled_modules():
    """Compile every module the tests below use, two at a time (a cold cache costs ~2 minutes on 2 cores)."""
    instances = {i.name: i for case in FORWARD_CASES + GRAD_CASES + SPECIALIZED_CASES + EDGE_CASES
                 for i in _specs(case)}
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        list(pool.map(cpu_build.compile_instance, [instances[name] for name in sorted(instances)]))
    return instances


@pytest.mark.parametrize("case", FORWARD_CASES + SPECIALIZED_CASES + EDGE_CASES, ids=str)
def test_forward_matches_oracle(case):
    q, k, v, ek, ev = _tensors(case)
    out, lse = OPS[case.rank](q, k, v, case.kernel, case.stride, case.dilation, case.causal,
                              additional_keys=ek, additional_values=ev, return_lse=True, backend="cpu")
    assert_close_by_rule(out, q, k, v, lse=lse, **_params(case, ek, ev))


@pytest.mark.parametrize("case", GRAD_CASES + SPECIALIZED_CASES + EDGE_CASES, ids=str)
def test_gradients_match_oracle(case):
    q, k, v, ek, ev = _tensors(case, seed=1)

    def forward(q, k, v, additional_keys=None, additional_values=None):
        return OPS[case.rank](q, k, v, case.kernel, case.stride, case.dilation, case.causal,
                              additional_keys=additional_keys, additional_values=additional_values, backend="cpu")

    assert_grads_close_by_rule(forward, q, k, v, seed=3, **_params(case, ek, ev))


def test_lse_gradient_matches_reference():
    """A loss that uses lse too: the backward kernel folds dlse into D_i."""
    case = GRAD_CASES[0]
    q, k, v, ek, ev = (None if t is None else t.double() for t in _tensors(case, seed=4))
    grads = {}
    for backend in ("cpu", "reference"):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (q, k, v, ek, ev)]
        out, lse = OPS[case.rank](*leaves[:3], case.kernel, case.stride, case.dilation, case.causal,
                                  additional_keys=leaves[3], additional_values=leaves[4], return_lse=True,
                                  backend=backend)
        (out.sin().sum() + (lse.double() * 0.7).sum()).backward()
        grads[backend] = [t.grad for t in leaves if t is not None]
    for got, want in zip(grads["cpu"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # lse is float32 by contract


@pytest.mark.parametrize("rank,spatial,kernel,stride,dilation,extra", [
    (1, (7,), (3,), (2,), (2,), 2),
    (2, (5, 6), (3, 2), (1, 2), (1, 2), 1),
])
def test_gradcheck_float64(rank, spatial, kernel, stride, dilation, extra):
    g = torch.Generator().manual_seed(5)
    shape = (1, *spatial, 1)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    q, k, v = make(*shape, 3), make(*shape, 3), make(*shape, 2)
    ek, ev = make(1, extra, 1, 3), make(1, extra, 1, 2)

    def fn(q, k, v, ek, ev):
        return OPS[rank](q, k, v, kernel, stride, dilation, False, additional_keys=ek, additional_values=ev,
                         backend="cpu")

    assert torch.autograd.gradcheck(fn, (q, k, v, ek, ev))


def test_benchmark_shape_uses_specialized_instance_and_default_backend():
    q = k = v = torch.randn(1, 32, 32, 4, 32)
    backend, name = natgen.choose(2, q, k, v, 7)
    assert backend == "cpu"
    assert name.startswith("na2d_fwd_cpu_k7x7_dany_c00_f32_h32"), name
    assert torch.equal(natgen.na2d(q, k, v, 7), natgen.na2d(q, k, v, 7, backend="cpu"))


def test_half_inputs_select_the_f32_instance():
    q = k = v = torch.randn(1, 10, 10, 2, 8, dtype=torch.bfloat16)
    assert "_f32_" in natgen.choose(2, q, k, v, 3, backend="cpu")[1]


@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel_size=(3, 5), dilation=(1, 2)), r"kernel_size\[1\]=5 with dilation\[1\]=2 needs spatial extent >= 10, got 9"),
    (dict(kernel_size=9), r"kernel_size\[0\]=9"),
    (dict(kernel_size=3, stride=4), r"stride\[0\]=4"),
])
def test_invalid_problems_raise_value_error(kwargs, match):
    q = torch.randn(1, 8, 9, 2, 8)
    with pytest.raises(ValueError, match=match):
        natgen.na2d(q, q, q, backend="cpu", **kwargs)


def test_bad_shapes_raise_value_error():
    q = torch.randn(1, 8, 8, 2, 8)
    with pytest.raises(ValueError):
        natgen.na2d(q, torch.randn(1, 8, 7, 2, 8), q, 3, backend="cpu")
    with pytest.raises(ValueError):
        natgen.na2d(q[0], q[0], q[0], 3, backend="cpu")
    with pytest.raises(ValueError):
        natgen.na2d(q, q, q, 3, additional_keys=torch.randn(1, 2, 2, 8), backend="cpu")


# ------------------------------------------------------------------------------------------- cache
_FIRST_USE = textwrap.dedent("""
    import json, logging, sys, torch, natgen
    from natgen import cxx as cpu_build
    from natgen.problem import make_problem
    from natgen.reference import na_reference
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 9, 7, 2, 6, generator=g) for _ in range(3))
    # a mixed per-dim causal mask with dilation: a K=any library instance, compiled on first use
    args = ((3, 2), 1, (1, 2), (False, True))
    out = natgen.na2d(q, k, v, *args, backend="cpu")
    ref = na_reference(q, k, v, make_problem(2, q, k, v, *args))
    print(json.dumps({"compiles": cpu_build.COMPILES, "close": bool(torch.allclose(out, ref, atol=1e-5)),
                      "instance": natgen.choose(2, q, k, v, *args, backend="cpu")[1]}))
""")


def _run_first_use(cache_dir):
    env = dict(os.environ, NATGEN_CACHE_DIR=str(cache_dir))
    return subprocess.Popen([sys.executable, "-c", _FIRST_USE], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(process):
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return json.loads(stdout.strip().splitlines()[-1])


def test_first_use_compile_is_shared_by_concurrent_processes_and_reused(tmp_path):
    first, second = _run_first_use(tmp_path), _run_first_use(tmp_path)  # both start on a cold cache
    results = [_result(first), _result(second)]
    assert all(r["close"] for r in results)
    assert results[0]["instance"] == "na2d_fwd_cpu_kany_dany_c01_f32_hany_q8x8_cpu"
    assert sorted(r["compiles"] for r in results) == [0, 1]  # the lock made the later one wait, not rebuild
    modules = list(tmp_path.glob("cpu/*/*.so"))
    assert len(modules) == 1 and not list(tmp_path.glob("cpu/*/.*.tmp"))
    again = _result(_run_first_use(tmp_path))
    assert again == {**results[0], "compiles": 0}


_TINY = 'extern "C" __attribute__((visibility("default"))) int natgen_cache_probe() { return 42; }\n'


def test_corrupt_cache_entry_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("NATGEN_CACHE_DIR", str(tmp_path))
    before = cpu_build.COMPILES
    path = cpu_build.compile_source("natgen_cache_probe", _TINY)
    assert cpu_build.compile_source("natgen_cache_probe", _TINY) == path and cpu_build.COMPILES == before + 1
    path.write_bytes(path.read_bytes()[:1000])  # truncated, e.g. by a crash of an old natgen
    assert cpu_build.compile_source("natgen_cache_probe", _TINY) == path
    assert cpu_build.COMPILES == before + 2
    assert path.stat().st_size > 1000
    import ctypes
    assert ctypes.CDLL(str(path)).natgen_cache_probe() == 42


def test_repeated_calls_take_the_resolved_path_and_agree_with_the_full_path():
    """A call's resolution is cached by its shapes and arguments; what the cached path cannot take as it is
    (non-contiguous inputs, grads, half inputs, other thread counts) still gets the same numbers."""
    case = SPECIALIZED_CASES[0]
    q, k, v, _, _ = _tensors(case)
    first = natgen.na2d(q, k, v, 7)
    assert natgen.na2d(q, k, v, 7).equal(first)
    wide = torch.zeros(*q.shape[:-1], 2 * q.shape[-1])
    wide[..., ::2] = q
    strided = wide[..., ::2]
    assert not strided.is_contiguous()
    assert natgen.na2d(strided, k, v, 7).equal(first)
    out, lse = natgen.na2d(q, k, v, 7, return_lse=True)
    assert out.equal(first) and lse.dtype == torch.float32 and lse.shape == q.shape[:-1]
    assert_close_by_rule(out, q, k, v, lse=lse, **_params(case))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert natgen.na2d(q, k, v, 7).equal(first)
    finally:
        torch.set_num_threads(threads)
    leaf = q.clone().requires_grad_()
    out = natgen.na2d(leaf, k, v, 7)
    assert out.grad_fn is not None and out.detach().equal(first)
    out.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    half = natgen.na2d(q.half(), k.half(), v.half(), 7)
    assert half.dtype == torch.float16
    assert_close_by_rule(half, q.half(), k.half(), v.half(), **_params(case))


def test_cached_calls_keep_argument_types_apart():
    """is_causal=False resolves; is_causal=0 (an int, equal and hash-equal to False) must still be refused."""
    q, k, v, _, _ = _tensors(SPECIALIZED_CASES[0])
    natgen.na2d(q, k, v, 7, is_causal=False)
    natgen.na2d(q, k, v, (7, 7), is_causal=(False, False))
    with pytest.raises(TypeError, match=r"is_causal\[0\]=0"):
        natgen.na2d(q, k, v, 7, is_causal=0)
    with pytest.raises(TypeError, match=r"is_causal\[1\]=0"):
        natgen.na2d(q, k, v, (7, 7), is_causal=(False, 0))
    with pytest.raises(TypeError, match=r"kernel_size\[0\]=7.0"):
        natgen.na2d(q, k, v, 7.0)


def test_concurrent_calls_from_two_threads_match_sequential_ones():
    """Argument blocks and kernel scratch are per thread: two Python threads calling the same ops at once (the
    kernels release the GIL) get what sequential calls get, forward and backward."""
    case = SPECIALIZED_CASES[0]
    inputs = [_tensors(case, seed=seed)[:3] for seed in range(4)]
    cotangent = torch.randn_like(inputs[0][0])

    def work(tensors):
        leaves = [t.clone().requires_grad_() for t in tensors]
        out = natgen.na2d(*leaves, 7)
        out.backward(cotangent)
        return [natgen.na2d(*tensors, 7), out.detach()] + [t.grad for t in leaves]

    expected = [work(t) for t in inputs]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for _ in range(3):
            for got, want in zip(pool.map(work, inputs), expected):
                for a, b in zip(got, want):
                    assert a.equal(b)


@pytest.mark.parametrize("spatial,kernel", [((32, 32), 7), ((13, 19), (5, 3))])
def test_non_finite_inputs_do_not_reach_the_next_backward(spatial, kernel):
    """The backward keeps its per-thread buffers between calls of one shape: after a call whose keys and
    queries hold inf / NaN (in the padding its masked cells read and write), the next finite call's gradients
    are the same bits as those of a first call."""
    g = torch.Generator().manual_seed(5)
    finite = [torch.randn(1, *spatial, 2, 32, generator=g) for _ in range(4)]

    def grads(q, k, v, grad_out):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        return torch.autograd.grad(natgen.na2d(*leaves, kernel, backend="cpu"), leaves, grad_out)

    first = grads(*finite)
    for value in (float("inf"), float("-inf"), float("nan")):
        poisoned = [t.clone() for t in finite]
        for t in poisoned[:3]:  # a corner, an edge and an interior token of every input
            t[0, 0, 0], t[0, -1, spatial[1] // 2], t[0, spatial[0] // 2, -1] = value, value, value
        grads(*poisoned)
        again = grads(*finite)
        for a, b in zip(first, again):
            assert torch.isfinite(a).all() and torch.equal(a, b), value
