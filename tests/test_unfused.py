"""natgen.functional (the unfused qk / av ops and natten's names) against the independent oracle of
tests/oracle.py: slot order, causal masking, the bias at borders and across dilation groups, extra tokens, every
rank and dtype, on the generated CPU kernels (backend "cpu", the default) and the torch implementation
(backend "reference"); float64 gradcheck through both; softmax(qk) . av equals the fused op with the same bias.
tests/test_unfused_cpu.py checks the CPU kernels' gradients in every dtype."""

import pytest
import torch

import natgen
import natgen.functional as F
from oracle import check_by_rule, unfused_av_oracle, unfused_qk_oracle

pytestmark = pytest.mark.reference

QK = {1: F.na1d_qk, 2: F.na2d_qk, 3: F.na3d_qk}
AV = {1: F.na1d_av, 2: F.na2d_av, 3: F.na3d_av}

# (spatial, kernel_size, dilation, is_causal)
CASES = [
    ((11,), 5, 2, False),
    ((10,), 4, 1, True),
    ((7, 8), (3, 4), (2, 1), (False, False)),
    ((6, 7), 3, (1, 2), (True, False)),
    ((4, 5, 6), (2, 3, 3), (1, 1, 2), (False, True, False)),
]
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("cpu", "reference")  # the generated CPU kernels, the torch implementation


def _tensors(spatial, kernel_size, n_extra=0, heads=2, head_dim=4, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    rank = len(spatial)
    kernel = kernel_size if isinstance(kernel_size, tuple) else (kernel_size,) * rank

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    q, k, v = (randn(2, heads, *spatial, head_dim) for _ in range(3))
    rpb = randn(heads, *(2 * K - 1 for K in kernel))
    extra_k, extra_v = (randn(2, heads, n_extra, head_dim) for _ in range(2)) if n_extra else (None, None)
    return q, k, v, rpb, extra_k, extra_v


def _finite(x):
    return torch.where(torch.isinf(x), torch.zeros_like(x), x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qk_and_av_match_oracle(case, dtype, backend):
    spatial, kernel_size, dilation, is_causal = case
    rank = len(spatial)
    q, k, v, rpb, extra_k, extra_v = _tensors(spatial, kernel_size, n_extra=2, dtype=dtype)
    for bias in (None, rpb):
        logits = QK[rank](q, k, kernel_size, dilation, extra_k, is_causal, rpb=bias, backend=backend)
        expected = unfused_qk_oracle(q, k, kernel_size, dilation, is_causal, bias, extra_k)
        naive = unfused_qk_oracle(q, k, kernel_size, dilation, is_causal, bias, extra_k, compute_dtype=dtype)
        assert logits.dtype == dtype and logits.shape == expected.shape
        assert torch.equal(torch.isinf(logits), torch.isinf(expected)), "masked slots"
        check_by_rule("logits", _finite(logits), _finite(expected), _finite(naive), dtype)
    attn = torch.softmax(expected, dim=-1).to(dtype)
    out = AV[rank](attn, v, kernel_size, dilation, extra_v, is_causal, backend=backend)
    expected_out = unfused_av_oracle(attn, v, kernel_size, dilation, is_causal, extra_v)
    naive_out = unfused_av_oracle(attn, v, kernel_size, dilation, is_causal, extra_v, compute_dtype=dtype)
    assert out.dtype == dtype and out.shape == v.shape
    check_by_rule("av", out, expected_out, naive_out, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES[1::2] + CASES[:1], ids=str)
def test_gradcheck_float64(case, backend):
    spatial, kernel_size, dilation, is_causal = case
    rank = len(spatial)
    q, k, v, rpb, extra_k, extra_v = _tensors(spatial, kernel_size, n_extra=1, heads=1, head_dim=2)
    q, k, v, rpb, extra_k, extra_v = (t[:1].clone() if t.dim() > rank + 1 else t.clone()
                                      for t in (q, k, v, rpb, extra_k, extra_v))
    leaves = [t.requires_grad_(True) for t in (q, k, extra_k, rpb)]
    torch.autograd.gradcheck(lambda q, k, e, r: _finite(QK[rank](q, k, kernel_size, dilation, e, is_causal, rpb=r,
                                                                 backend=backend)), leaves)
    with torch.no_grad():
        attn = torch.softmax(QK[rank](q, k, kernel_size, dilation, extra_k, is_causal, rpb=rpb), dim=-1)
    leaves = [t.detach().requires_grad_(True) for t in (attn, v, extra_v)]
    torch.autograd.gradcheck(lambda a, v, e: AV[rank](a, v, kernel_size, dilation, e, is_causal, backend=backend),
                             leaves)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_softmax_composition_equals_the_fused_op_with_rpb(case):
    """softmax(qk(q * scale, k) + rpb) . v (the unfused path natten models take) equals natgen.na{r}d(...,
    rpb=...) on the reference backend: same bias, same window, heads-first vs heads-last."""
    spatial, kernel_size, dilation, is_causal = case
    rank = len(spatial)
    q, k, v, rpb, extra_k, extra_v = _tensors(spatial, kernel_size, n_extra=2)
    scale = q.shape[-1] ** -0.5
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, rpb, extra_k, extra_v)]
    attn = torch.softmax(QK[rank](leaves[0] * scale, leaves[1], kernel_size, dilation, leaves[4], is_causal,
                                  rpb=leaves[3]), dim=-1)
    unfused_out = AV[rank](attn, leaves[2], kernel_size, dilation, leaves[5], is_causal)
    last = [t.movedim(1, -2) for t in leaves[:3]]
    fused_out = getattr(natgen, f"na{rank}d")(*last, kernel_size, dilation=dilation, is_causal=is_causal,
                                              additional_keys=leaves[4].movedim(1, 2),
                                              additional_values=leaves[5].movedim(1, 2), rpb=leaves[3],
                                              backend="reference").movedim(-2, 1)
    assert torch.allclose(unfused_out, fused_out, atol=1e-12)
    cotangent = torch.randn_like(fused_out)
    unfused_grads = torch.autograd.grad(unfused_out, leaves, cotangent)
    fused_grads = torch.autograd.grad(fused_out, leaves, cotangent)
    for name, a, b in zip(("q", "k", "v", "rpb", "extra_k", "extra_v"), unfused_grads, fused_grads):
        assert torch.allclose(a, b, atol=1e-11), name


def test_natten_names_and_argument_orders():
    q, k, v, rpb, _, _ = _tensors((7, 9), 3)
    assert torch.equal(F.natten2dqkrpb(q, k, rpb, 3, 2), F.na2d_qk(q, k, 3, 2, rpb=rpb))
    assert torch.equal(F.natten2dqk(q, k, 3, 2), F.na2d_qk(q, k, 3, 2))
    attn = torch.softmax(F.natten2dqk(q, k, 3, 2), -1)
    assert torch.equal(F.natten2dav(attn, v, 3, 2), F.na2d_av(attn, v, 3, 2))
    q1, k1, v1, rpb1, _, _ = _tensors((12,), 5)
    assert torch.equal(F.natten1dqkrpb(q1, k1, rpb1, 5, 2), F.na1d_qk(q1, k1, 5, 2, rpb=rpb1))
    attn1 = torch.softmax(F.natten1dqk(q1, k1, 5, 1), -1)
    assert torch.equal(F.natten1dav(attn1, v1, 5, 1), F.na1d_av(attn1, v1, 5, 1))
    # 3-D: kernel_size_d / dilation_d for the first axis, kernel_size / dilation for the other two
    q3, k3, v3, rpb3, _, _ = _tensors((4, 6, 6), (2, 3, 3))
    logits = F.natten3dqkrpb(q3, k3, rpb3, 2, 3, 2, 1)
    assert torch.equal(logits, F.na3d_qk(q3, k3, (2, 3, 3), (2, 1, 1), rpb=rpb3))
    assert torch.equal(F.natten3dqk(q3, k3, 2, 3, 2, 1), F.na3d_qk(q3, k3, (2, 3, 3), (2, 1, 1)))
    attn3 = torch.softmax(logits, -1)
    assert torch.equal(F.natten3dav(attn3, v3, 2, 3, 2, 1), F.na3d_av(attn3, v3, (2, 3, 3), (2, 1, 1)))


def test_unfused_errors_name_the_argument_value_and_rule():
    q, k, v, rpb, _, _ = _tensors((7, 9), 3)
    with pytest.raises(ValueError, match=r"rpb.shape=\(2, 5, 5\) must be \[heads=2"):
        F.na2d_qk(q, k, (3, 4), rpb=rpb)
    with pytest.raises(ValueError, match=r"key.shape=.* must equal query.shape"):
        F.na2d_qk(q, k[:, :1], 3)
    with pytest.raises(ValueError, match=r"kernel_size\[0\]=5 with dilation\[0\]=2 needs spatial extent >= 10, got 7"):
        F.na2d_qk(q, k, 5, 2)
    with pytest.raises(ValueError, match=r"attn.shape=\(2, 2, 7, 9, 8\) must be .*prod\(kernel_size\)=9"):
        F.na2d_av(torch.zeros(2, 2, 7, 9, 8, dtype=torch.float64), v, 3)
    with pytest.raises(ValueError, match=r"query has rank-2 heads-first layout \[batch, heads, H, W, head_dim\]"):
        F.na2d_qk(q[0], k[0], 3)
