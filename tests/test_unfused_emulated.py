"""The unfused (natten-style) ops natgen.functional.na*d_qk / na*d_av on their generated CUDA kernels
(families unqk, unav, uninv, unrpb, backend="emulator"), run through the CPU emulator against the float64 oracle (tests/oracle.py: unfused_qk_oracle / unfused_av_oracle,
gradients by autograd through it), by the 2x-naive rule of docs/semantics.md. Every launch runs with
racecheck over the tensors and initcheck; each case runs under the default and a shuffled schedule with
bit-identical results (forward and backward)."""
import pytest
import torch

from conftest import emulator_wide
from oracle import check_by_rule, unfused_av_oracle, unfused_qk_oracle

pytestmark = [pytest.mark.emulated, pytest.mark.usefixtures("emulator_checks_global")]


def _ready():
    try:
        from natgen import emulator
        return hasattr(emulator, "launch")
    except ImportError:
        return False


requires_emulator = pytest.mark.skipif(not _ready(), reason="natgen.emulator not built")
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64}

# rank, spatial, kernel, dilation, causal, n_extra, rpb, dtype: borders, dilation groups, even K, causal
# masks, extra tokens, bias; every rank and dtype
# (each case compiles the four kernels of its rank and dtype in the emulator: NATGEN_EMU_WIDE=1 adds two)
ALL_CASES = [
    (1, (11,), 4, 2, True, 2, True, "f32"),
    (2, (6, 7), (3, 4), (2, 1), (False, True), 1, True, "f16"),
    (3, (4, 5, 4), (2, 3, 2), (1, 1, 2), (False, True, False), 1, True, "bf16"),
    (1, (9,), 3, 1, False, 0, True, "bf16"),
    (2, (5, 6), 2, 1, (True, True), 0, False, "f64"),
]
CASES = ALL_CASES if emulator_wide() else ALL_CASES[:3]


def _inputs(case):
    rank, spatial, kernel, dilation, causal, n_extra, with_rpb, dtype = case
    gen = torch.Generator().manual_seed(sum(spatial) * 31 + rank)
    dt = DTYPES[dtype]
    batch, heads, channels = 2, 2, 8
    q, k, v = (torch.randn(batch, heads, *spatial, channels, generator=gen).to(dt) for _ in range(3))
    extra_k = extra_v = None
    if n_extra:
        extra_k, extra_v = (torch.randn(batch, heads, n_extra, channels, generator=gen).to(dt) for _ in range(2))
    ks = kernel if isinstance(kernel, tuple) else (kernel,) * rank
    rpb = torch.randn(heads, *(2 * K - 1 for K in ks), generator=gen).to(dt) if with_rpb else None
    return q, k, v, extra_k, extra_v, rpb


def _close(name, got, ref, naive, dtype):
    hidden = torch.isinf(ref)
    assert torch.equal(torch.isinf(got), hidden), f"{name}: -inf slots differ from the oracle's hidden slots"
    check_by_rule(name, got.masked_fill(hidden, 0), ref.masked_fill(hidden, 0), naive.masked_fill(hidden, 0), dtype)


def _double(tensors):
    """The reference gradients are the float64 math on the same values (leaves in float64, so the reference
    itself is not rounded to the input dtype)."""
    return [t.double() if t is not None else None for t in tensors]


def _grads(fn, tensors, cotangent):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    out = fn(*leaves)
    live = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, live, cotangent.to(out.dtype)))
    return [next(grads) if t is not None else None for t in leaves]


@requires_emulator
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"r{c[0]}_{c[7]}")
def test_qk_forward_and_backward(case, schedules):
    from natgen import functional
    rank, spatial, kernel, dilation, causal, n_extra, with_rpb, dtype = case
    q, k, _, extra_k, _, rpb = _inputs(case)
    dt = DTYPES[dtype]
    op = getattr(functional, f"na{rank}d_qk")

    def run(query, key, extra, bias):
        return op(query, key, kernel, dilation, extra, causal, bias, backend="emulator")

    def oracle(compute):
        return lambda query, key, extra, bias: unfused_qk_oracle(query, key, kernel, dilation, causal, rpb=bias,
                                                                 additional_keys=extra, compute_dtype=compute)

    logits = schedules(lambda: run(q, k, extra_k, rpb))
    _close("logits", logits, oracle(torch.float64)(q, k, extra_k, rpb), oracle(dt)(q, k, extra_k, rpb).to(dt), dt)

    # softmax-like cotangent: zero at the hidden slots (their logits are -inf)
    gen = torch.Generator().manual_seed(7)
    cotangent = torch.randn(logits.shape, generator=gen).to(dt).masked_fill(torch.isinf(logits), 0)
    tensors = (q, k, extra_k, rpb)
    got = schedules(lambda: _grads(run, tensors, cotangent))
    ref = _grads(oracle(torch.float64), _double(tensors), cotangent.double())
    naive = _grads(oracle(dt), tensors, cotangent)
    for name, g, r, n in zip(("query", "key", "additional_keys", "rpb"), got, ref, naive):
        if r is None:
            assert g is None
            continue
        assert g.shape == r.shape and g.dtype == dt, f"grad of {name}: {g.shape} {g.dtype}"
        check_by_rule(f"grad of {name}", g, r, n, dt)


@requires_emulator
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"r{c[0]}_{c[7]}")
def test_av_forward_and_backward(case, schedules):
    from natgen import functional
    rank, spatial, kernel, dilation, causal, n_extra, _, dtype = case
    q, k, v, extra_k, extra_v, _ = _inputs(case)
    dt = DTYPES[dtype]
    op = getattr(functional, f"na{rank}d_av")
    # weights of the qk layout (a softmax of the oracle's logits: 0 at hidden slots)
    attn = torch.softmax(unfused_qk_oracle(q, k, kernel, dilation, causal, additional_keys=extra_k), -1).to(dt)

    def run(weights, value, extra):
        return op(weights, value, kernel, dilation, extra, causal, backend="emulator")

    def oracle(compute):
        return lambda weights, value, extra: unfused_av_oracle(weights, value, kernel, dilation, causal, extra, compute)

    out = schedules(lambda: run(attn, v, extra_v))
    check_by_rule("out", out, oracle(torch.float64)(attn, v, extra_v), oracle(dt)(attn, v, extra_v).to(dt), dt)

    gen = torch.Generator().manual_seed(11)
    cotangent = torch.randn(out.shape, generator=gen).to(dt)
    tensors = (attn, v, extra_v)
    got = schedules(lambda: _grads(run, tensors, cotangent))
    ref = _grads(oracle(torch.float64), _double(tensors), cotangent.double())
    naive = _grads(oracle(dt), tensors, cotangent)
    for name, g, r, n in zip(("attn", "value", "additional_values"), got, ref, naive):
        if r is None:
            assert g is None
            continue
        assert g.shape == r.shape and g.dtype == dt, f"grad of {name}: {g.shape} {g.dtype}"
        check_by_rule(f"grad of {name}", g, r, n, dt)
