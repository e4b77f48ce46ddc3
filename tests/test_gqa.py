"""Grouped-query attention (fewer key/value heads than query heads) on every backend against the float64
oracle with repeated K/V, forward and gradients; the layer's num_kv_heads; clear errors."""
import pytest
import torch

import natgen
from natgen import ops, selector
from natgen.manifest import load
from oracle import assert_close_by_rule, assert_grads_close_by_rule

pytestmark = pytest.mark.reference

CASES = [  # (rank, spatial, kernel, dilation, causal, heads, heads_kv, n_extra)
    (1, (23,), 5, 2, False, 4, 2, 0),
    (1, (17,), 4, 1, True, 3, 1, 2),     # MQA, with extra tokens
    (2, (9, 8), 3, (1, 2), (False, True), 6, 2, 0),
    (3, (5, 6, 5), 3, 1, False, 4, 1, 1),
]


def _inputs(rank, spatial, heads, heads_kv, n_extra, dtype=torch.float32, head_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, *spatial, heads, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(2, *spatial, heads_kv, head_dim, generator=g).to(dtype) for _ in range(2))
    extra = {}
    if n_extra:
        extra = dict(additional_keys=torch.randn(2, n_extra, heads_kv, head_dim, generator=g).to(dtype),
                     additional_values=torch.randn(2, n_extra, heads_kv, head_dim, generator=g).to(dtype))
    return q, k, v, extra


def _kernel_backends():
    """Backends with generated kernels that index grouped key/value heads (per the manifest)."""
    found = set()
    for instance in load():
        if instance.launch.get("grouped_kv_heads"):
            found.add("cpu" if instance.spec.family == "cpu" else "emulator")
    return sorted(found)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"r{c[0]}_h{c[5]}kv{c[6]}_e{c[7]}")
@pytest.mark.parametrize("backend", [None, "reference"] + _kernel_backends())
def test_grouped_heads_match_the_oracle(case, backend):
    rank, spatial, kernel, dilation, causal, heads, heads_kv, n_extra = case
    # the CUDA families (emulated) have head dims 32-128 and no float64 instances
    head_dim, grad_dtype = (32, torch.float32) if backend == "emulator" else (8, torch.float64)
    q, k, v, extra = _inputs(rank, spatial, heads, heads_kv, n_extra, head_dim=head_dim)
    op = getattr(natgen, f"na{rank}d")
    params = dict(kernel_size=kernel, dilation=dilation, is_causal=causal)
    out, lse = op(q, k, v, return_lse=True, backend=backend, **params, **extra)
    assert_close_by_rule(out, q, k, v, lse=lse, **params, **extra)
    assert_grads_close_by_rule(lambda **t: op(**t, backend=backend, **params), q.to(grad_dtype),
                               k.to(grad_dtype), v.to(grad_dtype), **params,
                               **{n: t.to(grad_dtype) for n, t in extra.items()})


def test_kernel_backends_without_grouped_heads_say_so():
    q, k, v, _ = _inputs(2, (9, 8), 4, 2, 0)
    for backend in ("cpu", "emulator"):
        if backend in _kernel_backends():
            continue
        with pytest.raises(selector.NoKernelError, match="grouped key/value heads"):
            natgen.na2d(q, k, v, 3, backend=backend)
    # the automatic choice falls back to the reference rather than failing
    assert natgen.choose(2, q, k, v, 3)[0] in ["reference"] + _kernel_backends()


@pytest.mark.validation
def test_heads_must_divide():
    q = torch.randn(1, 8, 8, 6, 8)
    k = torch.randn(1, 8, 8, 4, 8)
    with pytest.raises(ValueError, match=r"k has 4 heads: the key/value heads must divide q's 6 heads"):
        natgen.na2d(q, k, k, 3)
    with pytest.raises(ValueError, match=r"additional_keys must have shape \[batch=1, n_extra, heads=2"):
        kv = torch.randn(1, 8, 8, 2, 8)
        natgen.na2d(q, kv, kv, 3, additional_keys=torch.randn(1, 2, 6, 8), additional_values=torch.randn(1, 2, 6, 8))


def test_layer_with_fewer_kv_heads():
    torch.manual_seed(0)
    layer = natgen.NeighborhoodAttention2D(dim=32, num_heads=4, kernel_size=3, num_kv_heads=2)
    assert layer.qkv.out_features == 32 + 2 * 2 * 8
    x = torch.randn(2, 7, 9, 32, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad is not None and torch.isfinite(x.grad).all()
    # against the same projection done by hand and the oracle with repeated K/V
    from oracle import dense_oracle
    q, k, v = layer.qkv(x).detach().split([32, 16, 16], dim=-1)
    q, k, v = q.unflatten(-1, (4, 8)), k.unflatten(-1, (2, 8)), v.unflatten(-1, (2, 8))
    expected = layer.proj(dense_oracle(q, k, v, 3)[0].float().flatten(-2))
    assert torch.allclose(y, expected, atol=1e-5)
    with pytest.raises(ValueError, match="num_kv_heads=3 must be a positive int dividing num_heads=4"):
        natgen.NeighborhoodAttention2D(dim=32, num_heads=4, kernel_size=3, num_kv_heads=3)
