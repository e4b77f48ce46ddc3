"""The CPU kernels' ISA variants (avx512, avx2, portable: natgen.cpu_isa) against the independent float64 oracle.

Every variant this CPU supports runs the forward and the backward of the fixed-shape paths (interior and
borders, the backward's bands at batch 1 with one head) and of the generic paths (K=any: causal, dilation,
strides), with a relative positional bias and with grouped key/value heads; variants the CPU lacks are
skipped with the reason. Every module holds all variants, so one compile serves them all; the instances are
the ones tests/test_cpu_backend.py uses too (a shared cache builds them once).
"""
from __future__ import annotations

import pytest
import torch

import natgen
from natgen import cpu, cpu_isa, cxx
from oracle import assert_close_by_rule, assert_grads_close_by_rule

pytestmark = [pytest.mark.cpu,
              pytest.mark.skipif(not cpu.available(), reason="no C++ compiler for the cpu backend")]

OPS = {1: natgen.na1d, 2: natgen.na2d, 3: natgen.na3d}
SUPPORTED = cpu_isa.supported()


def _variant(name):
    return pytest.param(name, marks=pytest.mark.skipif(
        name not in SUPPORTED, reason=f"this CPU lacks {name} ({', '.join(cpu_isa.NEEDS[name])})"))


VARIANTS = [_variant(name) for name in reversed(cpu_isa.VARIANTS)]

# (spatial, kernel, stride, dilation, causal, heads, heads_kv, head_dim, rpb)
CASES = {
    # fixed-shape 7x7 h32: interior and border lane groups, 2 x 2 query blocks; one unit, so backward bands
    "fixed_2d_banded": ((37, 35), 7, 1, 1, False, 1, 1, 32, False),
    # fixed-shape groups holding both borders' clamped queries (a last axis of 14 on AVX-512, of 7 on AVX2)
    "fixed_2d_narrow_14": ((7, 14), 7, 1, 1, False, 2, 2, 32, False),
    "fixed_2d_narrow_7": ((9, 7), 7, 1, 1, False, 1, 1, 32, False),
    # the bias on a fixed shape (AVX-512: the query-pair path adds it; the other variants take the generic one)
    "fixed_2d_rpb_dilated": ((23, 30), 7, 1, 2, False, 2, 2, 32, True),
    # fixed-shape with strides and dilation: windows of a query pair apart by other than 8 columns (AVX-512)
    "fixed_2d_strided": ((30, 37), 7, (3, 3), (1, 2), False, 2, 2, 32, False),
    # the generic K=any paths: a causal axis, dilation, strides
    "any_2d_causal_dilated": ((19, 23), (5, 3), (1, 2), (2, 1), (True, False), 2, 2, 8, False),
    "any_1d_strided": ((45,), 6, 4, 1, False, 2, 2, 12, False),
    "any_3d_causal": ((6, 7, 9), 3, 1, 1, True, 1, 1, 8, False),
    # the bias, and grouped heads (dK/dV summed over a kv head's query heads)
    "rpb_2d": ((17, 20), 5, 1, 1, False, 2, 2, 16, True),
    "gqa_2d": ((21, 18), 7, 1, 1, False, 4, 2, 32, False),
}


def _inputs(spatial, heads, heads_kv, head_dim, rpb, kernel, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rank = len(spatial)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    q = randn(1, *spatial, heads, head_dim)
    k, v = randn(1, *spatial, heads_kv, head_dim), randn(1, *spatial, heads_kv, head_dim)
    ks = (kernel,) * rank if isinstance(kernel, int) else kernel
    bias = randn(heads, *(2 * K - 1 for K in ks)) if rpb else None
    return q, k, v, bias


@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("name", list(CASES))
def test_variant_forward_and_backward_match_oracle(isa, name):
    spatial, kernel, stride, dilation, causal, heads, heads_kv, head_dim, rpb = CASES[name]
    q, k, v, bias = _inputs(spatial, heads, heads_kv, head_dim, rpb, kernel)
    params = dict(kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal)
    extra = dict(rpb=bias) if rpb else {}
    op = OPS[len(spatial)]
    with cpu_isa.use(isa):
        out, lse = op(q, k, v, **params, **extra, return_lse=True)
        assert_close_by_rule(out, q, k, v, lse, **params, **extra)
        assert_grads_close_by_rule(lambda **t: op(**t, **params), q, k, v, **params, **extra)


@pytest.mark.parametrize("isa", VARIANTS)
def test_banded_backward_has_the_same_bits_for_any_thread_count(isa):
    """Bands are chosen from the problem alone, and overlapping key grads are added in tile order."""
    q, k, v, _ = _inputs((37, 35), 1, 1, 32, False, 7, seed=1)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    results = []
    try:
        with cpu_isa.use(isa):
            for count in (1, 2, 3):
                torch.set_num_threads(count)
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                out = natgen.na2d(*leaves, 7)
                results.append(torch.autograd.grad(out, leaves, grad))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("isa", VARIANTS)
def test_forward_has_the_same_bits_for_any_thread_count(isa):
    """The specialized forward's tiles grow taller with fewer threads, which moves queries between its blocks
    (and, on AVX-512, between query pairs and lone queries): a query's numbers must not change with that."""
    q, k, v, _ = _inputs((29, 37), 2, 2, 32, False, 7, seed=3)
    threads = torch.get_num_threads()
    results = []
    try:
        with cpu_isa.use(isa):
            for count in (1, 2, 3):
                torch.set_num_threads(count)
                results.append(natgen.na2d(q, k, v, 7, return_lse=True))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_every_variant_is_compiled_into_the_module():
    """The module of a fixed-shape instance holds every variant, whatever this CPU runs (x86-64: all four)."""
    q = torch.randn(1, 12, 12, 1, 32)
    natgen.na2d(q, q, q, 7)
    kernel = cxx.load(cpu.choose(natgen.ops.resolve(2, q, q, q, 7)[0], "fwd"))
    expected = ("avx512bf16", "avx512", "avx2", "portable") if SUPPORTED != ("portable",) else ("portable",)
    assert kernel.variants[:len(expected)] == expected


def test_the_best_supported_variant_is_the_default(monkeypatch):
    monkeypatch.delenv(cpu_isa.ENV, raising=False)
    cpu_isa.force(None)
    try:
        # the widest variant, except AVX-512 on AMD's Zen 4 (family 25: 512-bit operations run as two halves)
        info = cpu_isa._cpuinfo()
        zen4 = info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "25"
        expected = "avx2" if SUPPORTED[0] in ("avx512", "avx512bf16") and zen4 else SUPPORTED[0]
        assert cpu_isa.current() == expected
        assert cpu_isa.current() in cpu_isa.describe()
    finally:
        cpu_isa.force(None)


@pytest.mark.parametrize("vendor, family, expected", [("AuthenticAMD", "25", "avx2"), ("AuthenticAMD", "26", "avx512bf16"),
                                                     ("GenuineIntel", "6", "avx512bf16"), ("AuthenticAMD", "", "avx512bf16")])
@pytest.mark.parametrize("bf16", [True, False])
def test_the_default_steps_down_where_the_wide_variant_measured_slower(monkeypatch, vendor, family, expected, bf16):
    monkeypatch.delenv(cpu_isa.ENV, raising=False)
    have = ("avx512bf16",) * bf16 + ("avx512", "avx2", "portable")
    expected = expected if bf16 or expected == "avx2" else "avx512"
    monkeypatch.setattr(cpu_isa, "supported", lambda: have)
    fields = dict(cpu_isa._cpuinfo(), vendor_id=vendor, **{"cpu family": family})
    monkeypatch.setattr(cpu_isa, "_cpuinfo", lambda: fields)
    cpu_isa.force(None)
    try:
        assert cpu_isa.current() == expected
        assert (vendor in cpu_isa.describe()) == (expected == "avx2")
    finally:
        cpu_isa.force(None)


@pytest.mark.parametrize("value, message", [("sse9", "unknown CPU ISA variant; allowed values: avx512bf16, avx512, avx2, portable"),
                                            ("AVX512", None)])
def test_the_environment_variable_is_checked(monkeypatch, value, message):
    monkeypatch.setenv(cpu_isa.ENV, value)
    cpu_isa.force(None)
    try:
        if message is None:  # names are case-insensitive; a variant this CPU lacks is refused by name
            if "avx512" in SUPPORTED:
                assert cpu_isa.current() == "avx512"
            else:
                with pytest.raises(ValueError, match=f"{cpu_isa.ENV}='avx512': this CPU lacks"):
                    cpu_isa.current()
        else:
            with pytest.raises(ValueError, match=f"{cpu_isa.ENV}='sse9': {message}"):
                cpu_isa.current()
    finally:
        monkeypatch.delenv(cpu_isa.ENV)
        cpu_isa.force(None)


def test_forcing_a_missing_variant_names_what_it_needs(monkeypatch):
    monkeypatch.setattr(cpu_isa, "supported", lambda: ("avx2", "portable"))
    with pytest.raises(ValueError, match="needs avx512f, avx512bw, avx512vl, avx512dq, fma.*allowed values here: "
                                         "avx2, portable"):
        cpu_isa.force("avx512")


def test_the_machine_line_names_the_cpu_class(monkeypatch):
    """One model name ("AMD EPYC") covers CPUs of different classes: benchmark tables name family, model, flags."""
    fields = {"vendor_id": "GenuineIntel", "cpu family": "6", "model": "143",
              "flags": "fpu sse2 avx2 fma avx512f avx512bw amx_tile amx_bf16"}
    monkeypatch.setattr(cpu_isa, "_cpuinfo", lambda: fields)
    assert cpu_isa.cpu_class() == "GenuineIntel family 6 model 143: avx2 fma avx512f amx_tile amx_bf16"
    monkeypatch.setattr(cpu_isa, "_cpuinfo", lambda: {"flags": "fpu sse2"})
    assert cpu_isa.cpu_class().endswith(": none of " + ", ".join(cpu_isa.NOTABLE_FLAGS))
