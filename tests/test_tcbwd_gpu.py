"""GPU tier, the tensor-core CUDA backward (tcbwd): autograd through backend="cuda" against the float64 oracle's
gradients, on the emulated tier's cases and larger ones (long windows, many key tiles and query stages,
batch 2), pinned to this family; and bit-identical gradients run to run. Skipped without a device."""
import warnings

import pytest
import torch

import natgen
from natgen import autograd, ops, reference
from oracle import assert_grads_close_by_rule
from test_bwd_emulated import DTYPES, inputs, only_family
from test_tcbwd_emulated import CORE, WIDE, _case_id

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
              pytest.mark.skipif(not ops.BACKENDS["cuda"].available(), reason="CuPy not installed")]

LARGE = [
    (1, (700,), 129, 3, 2, (False,), 3, 4, 2, 64, "bf16", True),
    (2, (40, 36), (9, 7), (2, 1), (1, 3), (False, True), 2, 4, 4, 128, "f16", False),
    (3, (10, 12, 14), 5, 1, (1, 2, 1), (False, False, False), 0, 2, 1, 32, "bf16", True),
]


@pytest.fixture
def tensor_core_backward(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the reference backward ran for a CUDA call")
    monkeypatch.setattr(reference, "na_reference_backward", refuse)
    monkeypatch.setattr(autograd, "na_reference_backward", refuse)
    only_family(monkeypatch, "tcbwd")
    yield
    ops._CALLS.clear()


@pytest.mark.parametrize("case", CORE + WIDE + LARGE, ids=_case_id)
def test_cuda_tensor_core_backward_against_oracle(case, tensor_core_backward):
    rank, spatial, kernel, stride, dilation, causal, n_extra, heads, heads_kv, head_dim, dtype, lse_grad = case
    q, k, v, extra = inputs(sum(spatial) * 31 + head_dim, spatial, heads, heads_kv, head_dim, DTYPES[dtype], n_extra)
    params = dict(kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal)
    op = getattr(natgen, f"na{rank}d")
    backend, name = natgen.choose(rank, q.cuda(), k.cuda(), v.cuda(), **params,
                                  **{n: t.cuda() for n, t in extra.items()}, backend="cuda", op="backward")
    assert backend == "cuda" and "_bwd_tcbwd_" in name

    def forward(**tensors):
        result = op(**{n: t.cuda() for n, t in tensors.items()}, **params, backend="cuda", return_lse=lse_grad)
        return tuple(r.cpu() for r in result) if lse_grad else result.cpu()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_grads_close_by_rule(forward, q, k, v, seed=7, lse_cotangent=lse_grad, **params, **extra)


def test_cuda_tensor_core_backward_is_deterministic(tensor_core_backward):
    q, k, v, extra = inputs(5, (24, 20), 4, 2, 64, torch.bfloat16, 2)
    tensors = [t.cuda().requires_grad_(True) for t in (q, k, v, *extra.values())]
    grads = []
    for _ in range(2):
        out = natgen.na2d(*tensors[:3], 5, dilation=2, additional_keys=tensors[3], additional_values=tensors[4],
                          backend="cuda")
        grads.append(torch.autograd.grad(out.float().square().sum(), tensors))
    for first, second in zip(*grads):
        assert torch.equal(first, second)
