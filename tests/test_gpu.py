"""GPU tier: generated CUDA instances run through CuPy on a real device. Skipped without one."""
import pytest
import torch

import natgen
from natgen import ops
from natgen.manifest import load
from oracle import assert_close_by_rule

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
              pytest.mark.skipif(not ops.BACKENDS["cuda"].available(), reason="CuPy not installed")]

CASES = [
    # rank, spatial, kernel_size, stride, dilation, causal, n_extra, head_dim
    (1, (37,), 7, 1, 1, False, 0, 32),
    (1, (40,), 8, 3, 2, True, 3, 64),
    (2, (13, 11), 5, 1, 1, False, 0, 32),
    (2, (16, 18), (3, 4), (2, 1), (2, 3), (True, False), 2, 128),
    (3, (6, 7, 5), 3, 1, 1, False, 0, 32),
    (3, (8, 6, 9), (2, 3, 4), (1, 2, 3), (2, 1, 2), (False, True, True), 1, 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_cuda_backend_matches_oracle(case, dtype):
    rank, spatial, kernel, stride, dilation, causal, n_extra, head_dim = case
    gen = torch.Generator().manual_seed(CASES.index(case) * 10 + dtype.itemsize)
    shape = (2, *spatial, 3, head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    extra = {}
    if n_extra:
        extra = dict(additional_keys=torch.randn(2, n_extra, 3, head_dim, generator=gen).to(dtype),
                     additional_values=torch.randn(2, n_extra, 3, head_dim, generator=gen).to(dtype))
    params = dict(kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal)
    op = getattr(natgen, f"na{rank}d")
    on_gpu = {name: t.cuda() for name, t in extra.items()}
    out, lse = op(q.cuda(), k.cuda(), v.cuda(), **params, **on_gpu, return_lse=True, backend="cuda")
    torch.cuda.synchronize()
    assert_close_by_rule(out.cpu(), q, k, v, lse=lse.cpu(), **params, **extra)


@pytest.mark.parametrize("instance", [i for i in load() if i.spec.family == "simt"
                                      and i.spec.kernel_size != "any"][::17], ids=lambda i: i.name)
def test_specialized_simt_instances(instance):
    spec = instance.spec
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[spec.dtype]
    spatial = tuple(k + 4 for k in spec.kernel_size)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn((1, *spatial, 2, spec.head_dim), generator=gen).to(dtype) for _ in range(3))
    out, lse = ops.run_instance(instance.name, spec.rank, q.cuda(), k.cuda(), v.cuda(), spec.kernel_size,
                                via="cuda")
    torch.cuda.synchronize()
    assert_close_by_rule(out.cpu(), q, k, v, lse=lse.cpu(), kernel_size=spec.kernel_size)


def test_autograd_through_cuda_backend():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 12, 12, 2, 32, generator=gen, dtype=torch.float64) for _ in range(3))
    qc, kc, vc = (t.float().cuda().requires_grad_(True) for t in (q, k, v))
    out = natgen.na2d(qc, kc, vc, 5, backend="cuda")
    out.sum().backward()
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    natgen.na2d(qr, kr, vr, 5, backend="reference").sum().backward()
    for got, want in ((qc.grad, qr.grad), (kc.grad, kr.grad), (vc.grad, vr.grad)):
        assert (got.double().cpu() - want).abs().max().item() < 1e-3
