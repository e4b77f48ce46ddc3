"""GPU tier, CUDA backward (the simtbwd family): autograd through backend="cuda" against the float64 oracle's
gradients, on the emulated tier's cases and a few larger ones. Skipped without a device."""
import warnings

import pytest
import torch

import natgen
from natgen import autograd, ops, reference
from oracle import assert_grads_close_by_rule
from test_bwd_emulated import CORE, DTYPES, _case_id, inputs

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
              pytest.mark.skipif(not ops.BACKENDS["cuda"].available(), reason="CuPy not installed")]

# larger problems: many key/query tiles per CTA row, long windows, batch 2 (the grid's z)
LARGE = [
    (1, (300,), 33, 4, 3, (True,), 3, 4, 2, 64, "bf16", True),
    (2, (40, 36), (9, 7), (2, 1), (1, 3), (False, True), 2, 4, 4, 128, "f16", False),
    (3, (10, 12, 14), 5, 1, (1, 2, 1), (False, False, False), 0, 2, 1, 32, "f32", True),
]


@pytest.fixture
def no_reference_backward(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the reference backward ran for a CUDA call")
    monkeypatch.setattr(reference, "na_reference_backward", refuse)
    monkeypatch.setattr(autograd, "na_reference_backward", refuse)


@pytest.mark.parametrize("case", CORE + LARGE, ids=_case_id)
def test_cuda_backward_against_oracle(case, no_reference_backward):
    rank, spatial, kernel, stride, dilation, causal, n_extra, heads, heads_kv, head_dim, dtype, lse_grad = case
    q, k, v, extra = inputs(sum(spatial) * 31 + head_dim, spatial, heads, heads_kv, head_dim, DTYPES[dtype], n_extra)
    params = dict(kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal)
    op = getattr(natgen, f"na{rank}d")
    backend, name = natgen.choose(rank, q.cuda(), k.cuda(), v.cuda(), **params,
                                  **{n: t.cuda() for n, t in extra.items()}, backend="cuda", op="backward")
    assert backend == "cuda" and "_bwd_simtbwd_" in name

    def forward(**tensors):
        result = op(**{n: t.cuda() for n, t in tensors.items()}, **params, backend="cuda", return_lse=lse_grad)
        return tuple(r.cpu() for r in result) if lse_grad else result.cpu()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_grads_close_by_rule(forward, q, k, v, seed=7, lse_cotangent=lse_grad, **params, **extra)


def test_cuda_backward_is_deterministic():
    q, k, v, extra = inputs(5, (24, 20), 4, 2, 64, torch.bfloat16, 2)
    tensors = [t.cuda().requires_grad_(True) for t in (q, k, v, *extra.values())]
    grads = []
    for _ in range(2):
        out = natgen.na2d(*tensors[:3], 5, dilation=2, additional_keys=tensors[3], additional_values=tensors[4],
                          backend="cuda")
        grads.append(torch.autograd.grad(out.float().square().sum(), tensors))
    for first, second in zip(*grads):
        assert torch.equal(first, second)


# the positional bias (grad_rpb from the drpb entry) and the opt-in atomic dQ, on the emulated tier's cases
from test_bwd_rpb_emulated import CASES as RPB_CASES, _id as _rpb_id, make as make_rpb  # noqa: E402


def _rpb_grads_on_cuda(case, family):
    rank, lse_grad = case[0], case[10]
    q, k, v, tensors, params = make_rpb(case)
    op = getattr(natgen, f"na{rank}d")
    backend, name = natgen.choose(rank, q.cuda(), k.cuda(), v.cuda(), **params,
                                  **{n: t.cuda() for n, t in tensors.items()}, backend="cuda", op="backward")
    assert backend == "cuda" and f"_bwd_{family}_" in name, name

    def forward(**t):
        result = op(**{n: x.cuda() for n, x in t.items()}, **params, backend="cuda", return_lse=lse_grad)
        return tuple(r.cpu() for r in result) if lse_grad else result.cpu()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_grads_close_by_rule(forward, q, k, v, seed=3, lse_cotangent=lse_grad, **params, **tensors)


@pytest.mark.parametrize("case", RPB_CASES, ids=_rpb_id)
def test_cuda_backward_with_rpb_against_oracle(case, no_reference_backward):
    _rpb_grads_on_cuda(case, "simtbwd")


@pytest.mark.parametrize("case", RPB_CASES, ids=_rpb_id)
def test_cuda_atomic_dq_backward_against_oracle(case, no_reference_backward):
    with natgen.backward_options(dq="atomic"):
        _rpb_grads_on_cuda(case, "simtbwda")


def test_cuda_backward_with_rpb_is_deterministic():
    q, k, v, extra = inputs(5, (24, 20), 4, 2, 64, torch.bfloat16, 2)
    rpb = torch.randn(4, 9, 9).to(torch.bfloat16)
    tensors = [t.cuda().requires_grad_(True) for t in (q, k, v, *extra.values(), rpb)]
    grads = []
    for _ in range(2):
        out = natgen.na2d(*tensors[:3], 5, dilation=2, additional_keys=tensors[3], additional_values=tensors[4],
                          rpb=tensors[5], backend="cuda")
        grads.append(torch.autograd.grad(out.float().square().sum(), tensors))
    for first, second in zip(*grads):
        assert torch.equal(first, second)
