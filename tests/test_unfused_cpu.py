"""The unfused ops natgen.functional.na*d_qk / na*d_av on their generated CPU kernels (families cpuqk, cpuav,
cpuinv, cpurpb; backend="cpu", the default for CPU tensors) against the float64 oracle (tests/oracle.py,
gradients by autograd through it) by the 2x-naive rule of docs/semantics.md: every rank and dtype, borders,
dilation groups, even K, causal masks, extra tokens, bias. Also: the default CPU path runs the generated
kernels (not the torch implementation), and the backward is bit-identical for any thread count."""
import pytest
import torch

import natgen
from natgen import functional, manifest, unfused, unfused_cpu
from oracle import check_by_rule, unfused_av_oracle, unfused_qk_oracle
from test_unfused_emulated import ALL_CASES, DTYPES, _close, _double, _grads, _inputs

pytestmark = [pytest.mark.reference,
              pytest.mark.skipif(not unfused_cpu.available(), reason="no C++ compiler for the CPU kernels")]

# the emulated tier's cases (every rank and dtype) plus float32 / float64 for the ranks they miss there
CASES = ALL_CASES + [
    (3, (5, 4, 6), (3, 2, 3), (1, 2, 2), (True, False, False), 2, True, "f32"),
    (1, (10,), 5, 2, False, 1, True, "f64"),
    (3, (4, 6, 5), 3, (1, 2, 1), (False, False, True), 1, True, "f64"),
    (2, (7, 8), (3, 4), (2, 1), (False, False), 2, True, "f32"),
]


def _check_grads(names, got, ref, naive, dt):
    for name, g, r, n in zip(names, got, ref, naive):
        if r is None:
            assert g is None
            continue
        assert g.shape == r.shape and g.dtype == dt, f"grad of {name}: {g.shape} {g.dtype}"
        check_by_rule(f"grad of {name}", g, r, n, dt)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"r{c[0]}_{c[7]}_{c[1]}")
def test_qk_forward_and_backward(case):
    rank, spatial, kernel, dilation, causal, n_extra, with_rpb, dtype = case
    q, k, _, extra_k, _, rpb = _inputs(case)
    dt = DTYPES[dtype]
    op = getattr(functional, f"na{rank}d_qk")

    def run(query, key, extra, bias):
        return op(query, key, kernel, dilation, extra, causal, bias, backend="cpu")

    def oracle(compute):
        return lambda query, key, extra, bias: unfused_qk_oracle(query, key, kernel, dilation, causal, rpb=bias,
                                                                 additional_keys=extra, compute_dtype=compute)

    logits = run(q, k, extra_k, rpb)
    _close("logits", logits, oracle(torch.float64)(q, k, extra_k, rpb), oracle(dt)(q, k, extra_k, rpb).to(dt), dt)
    # a cotangent nonzero everywhere: the hidden slots' logits are constants and pass no gradient
    cotangent = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7)).to(dt)
    tensors = (q, k, extra_k, rpb)
    visible = cotangent.masked_fill(torch.isinf(logits), 0)
    ref = _grads(oracle(torch.float64), _double(tensors), visible.double())
    naive = _grads(oracle(dt), tensors, visible)
    _check_grads(("query", "key", "additional_keys", "rpb"), _grads(run, tensors, cotangent), ref, naive, dt)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"r{c[0]}_{c[7]}_{c[1]}")
def test_av_forward_and_backward(case):
    rank, spatial, kernel, dilation, causal, n_extra, _, dtype = case
    q, k, v, extra_k, extra_v, _ = _inputs(case)
    dt = DTYPES[dtype]
    op = getattr(functional, f"na{rank}d_av")
    attn = torch.softmax(unfused_qk_oracle(q, k, kernel, dilation, causal, additional_keys=extra_k), -1).to(dt)

    def run(weights, value, extra):
        return op(weights, value, kernel, dilation, extra, causal, backend="cpu")

    def oracle(compute):
        return lambda weights, value, extra: unfused_av_oracle(weights, value, kernel, dilation, causal, extra, compute)

    out = run(attn, v, extra_v)
    check_by_rule("out", out, oracle(torch.float64)(attn, v, extra_v), oracle(dt)(attn, v, extra_v).to(dt), dt)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(11)).to(dt)
    tensors = (attn, v, extra_v)
    got = _grads(run, tensors, cotangent)
    ref = _grads(oracle(torch.float64), _double(tensors), cotangent.double())
    naive = _grads(oracle(dt), tensors, cotangent)
    hidden = torch.isinf(unfused_qk_oracle(q, k, kernel, dilation, causal, additional_keys=extra_k))
    assert torch.equal(got[0][hidden], torch.zeros_like(got[0][hidden])), "hidden slots get no gradient"
    _check_grads(("attn", "value", "additional_values"), got, ref, naive, dt)


def _layer(rank, q, k, v, rpb, extra_k, extra_v, kernel, dilation, causal, backend=None):
    logits = getattr(functional, f"na{rank}d_qk")(q, k, kernel, dilation, extra_k, causal, rpb, backend=backend)
    return getattr(functional, f"na{rank}d_av")(torch.softmax(logits, -1), v, kernel, dilation, extra_v, causal,
                                                 backend=backend)


def test_default_cpu_path_runs_the_generated_kernels(monkeypatch):
    """backend None on CPU tensors: every op and gradient runs a manifest instance of the CPU unfused families,
    and the torch implementation is never called."""
    for name in ("qk_forward", "qk_backward", "av_forward", "av_backward"):
        monkeypatch.setattr(unfused, name, lambda *a, _name=name, **k: pytest.fail(f"natgen.unfused.{_name} ran"))
    used = []
    real = unfused_cpu.launch

    def spy(operation, problem, out, zero_masked=False, **tensors):
        used.append(unfused_cpu.instance_for(operation, problem.rank, natgen.spec.TORCH_DTYPE_TOKENS[
            str(problem.dtype).replace("torch.", "")]).name)
        return real(operation, problem, out, zero_masked, **tensors)

    monkeypatch.setattr(unfused_cpu, "launch", spy)
    case = CASES[1]  # rank 2, float16, extra tokens and bias
    q, k, v, extra_k, extra_v, rpb = (t.requires_grad_(True) for t in _inputs(case))
    out = _layer(2, q, k, v, rpb, extra_k, extra_v, *case[2:5])
    out.backward(torch.ones_like(out))
    families = {manifest.find(name).spec.family for name in used}
    assert families == {"cpuqk", "cpuav", "cpuinv", "cpurpb"}, used
    assert all(manifest.find(name).spec.dtype == "f16" and manifest.find(name).spec.rank == 2 for name in used)
    assert all(t.grad is not None for t in (q, k, v, extra_k, extra_v, rpb))


def test_backward_is_bit_identical_for_any_thread_count():
    """Every output row (and bias entry) has one owner and a fixed summation order (torch's own softmax
    backward is not bit-stable across thread counts, so the two ops are checked on their own)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 17, 19, 16, generator=gen) for _ in range(3))
    rpb = torch.randn(3, 9, 7, generator=gen)
    kernel, dilation, causal = (5, 4), (2, 3), (False, True)
    attn = torch.rand(2, 3, 17, 19, 20, generator=gen)
    d_logits, d_out = torch.randn(attn.shape, generator=gen), torch.randn(v.shape, generator=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            leaves = [t.clone().requires_grad_(True) for t in (q, k, rpb, attn, v)]
            logits = functional.na2d_qk(leaves[0], leaves[1], kernel, dilation, None, causal, leaves[2])
            out = functional.na2d_av(leaves[3], leaves[4], kernel, dilation, None, causal)
            torch.autograd.backward((logits, out), (d_logits, d_out))
            results.append([logits.detach(), out.detach()] + [t.grad for t in leaves])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_cpu_backend_rejects_other_devices_by_name():
    q = torch.zeros(1, 1, 8, 4, device="meta")
    with pytest.raises(ValueError, match="backend='cpu' does not run meta tensors"):
        functional.na1d_qk(q, q, 3, backend="cpu")


def test_bf16_outputs_round_as_torch_converts():
    """bf16 outputs are rounded to nearest even, as torch converts float to bfloat16: the logits equal the
    float32 kernels' logits converted, bit for bit, and NaN where those are NaN (a query row holding NaN of
    either sign, and a 0 * inf product; NaN bits themselves differ between torch's own conversion paths)."""
    g = torch.Generator().manual_seed(11)
    q, k = (torch.randn(1, 2, 12, 16, generator=g) for _ in range(2))
    q[0, 0, 3, 5] = float("nan")
    q[0, 1, 7, 2] = -float("nan")
    k[0, 1, 0, 4], q[0, 1, 0, 4] = float("inf"), 0.0  # 0 * inf: NaN in every window holding key 0
    q, k = q.to(torch.bfloat16), k.to(torch.bfloat16)
    got = functional.na1d_qk(q, k, 5, 1, backend="cpu")
    want = functional.na1d_qk(q.float(), k.float(), 5, 1, backend="cpu").to(torch.bfloat16)
    nan = torch.isnan(want)
    assert nan.sum() == 11 and torch.equal(torch.isnan(got), nan)
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
