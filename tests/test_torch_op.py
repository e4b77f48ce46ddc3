"""The registered torch ops: torch.compile with no graph breaks, export, meta tensors, opcheck, merging."""
import pytest
import torch

import natgen
from oracle import dense_oracle

pytestmark = pytest.mark.cpu

OPS = {1: natgen.na1d, 2: natgen.na2d, 3: natgen.na3d}
SHAPES = {1: (20,), 2: (9, 10), 3: (5, 6, 7)}


def _inputs(rank, heads=2, head_dim=16, seed=0, grad=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, *SHAPES[rank], heads, head_dim, generator=g, dtype=dtype).requires_grad_(grad)
            for _ in range(3)]


def _grads(f, tensors):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    value = f(*tensors)
    value.backward()
    return value.detach(), [t.grad for t in tensors]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_compiled_fullgraph_matches_eager(rank, backend):
    op = OPS[rank]

    def f(q, k, v):
        return (op(q, k, v, kernel_size=3, backend=backend) * torch.arange(16.0)).sum()

    tensors = _inputs(rank)
    explained = torch._dynamo.explain(f)(*tensors)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="inductor" if backend == "cpu" else "aot_eager")
    value, grads = _grads(compiled, tensors)
    eager_value, eager_grads = _grads(f, tensors)
    assert torch.allclose(value, eager_value, rtol=1e-5, atol=1e-4)
    for grad, eager in zip(grads, eager_grads):
        assert torch.allclose(grad, eager, rtol=1e-5, atol=1e-5)


def test_compiled_every_parameter_and_lse():
    g = torch.Generator().manual_seed(1)
    q, k, v = _inputs(2)
    extra_k, extra_v = (torch.randn(2, 3, 2, 16, generator=g).requires_grad_(True) for _ in range(2))

    def f(q, k, v, extra_k, extra_v):
        out, lse = natgen.na2d(q, k, v, (3, 4), stride=(1, 2), dilation=(2, 1), is_causal=(True, False),
                               scale=0.3, additional_keys=extra_k, additional_values=extra_v, return_lse=True,
                               backend="cpu")
        return out.square().sum() + lse.sum()

    tensors = [q, k, v, extra_k, extra_v]
    assert torch._dynamo.explain(f)(*tensors).graph_break_count == 0
    torch._dynamo.reset()
    value, grads = _grads(torch.compile(f, fullgraph=True, backend="aot_eager"), tensors)
    eager_value, eager_grads = _grads(f, tensors)
    assert torch.allclose(value, eager_value, rtol=1e-5)
    for grad, eager in zip(grads, eager_grads):
        assert torch.allclose(grad, eager, rtol=1e-5, atol=1e-5)


def test_meta_tensors_give_meta_outputs():
    for rank in (1, 2, 3):
        q = torch.empty(2, *SHAPES[rank], 4, 8, device="meta", dtype=torch.bfloat16)
        v = torch.empty(2, *SHAPES[rank], 2, 12, device="meta", dtype=torch.bfloat16)
        k = torch.empty(2, *SHAPES[rank], 2, 8, device="meta", dtype=torch.bfloat16)
        out, lse = OPS[rank](q, k, v, 3, return_lse=True)
        assert out.device.type == "meta" and out.shape == (2, *SHAPES[rank], 4, 12) and out.dtype == torch.bfloat16
        assert lse.device.type == "meta" and lse.shape == (2, *SHAPES[rank], 4) and lse.dtype == torch.float32
    with pytest.raises(ValueError, match="kernel_size"):
        natgen.na2d(torch.empty(1, 4, 4, 1, 8, device="meta"), torch.empty(1, 4, 4, 1, 8, device="meta"),
                    torch.empty(1, 4, 4, 1, 8, device="meta"), 7)
    with torch.device("meta"):
        layer = natgen.NeighborhoodAttention2D(32, 4, 3)
        assert layer(torch.empty(2, 9, 9, 32)).shape == (2, 9, 9, 32)


def test_export_of_the_layer():
    torch.manual_seed(0)
    layer = natgen.NeighborhoodAttention2D(32, 4, 3, num_kv_heads=2)
    x = torch.randn(2, 9, 9, 32)
    exported = torch.export.export(layer, (x,))
    assert any("natgen.na_forward" in str(node.target) for node in exported.graph.nodes)
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), layer(x), atol=1e-6)


def test_opcheck_on_every_registered_op():
    q, k, v = _inputs(2)
    args = ([3, 3], [1, 2], [1, 1], [False, True], None, "cpu", None)
    torch.library.opcheck(torch.ops.natgen.na_forward.default, (q, k, v, None, None, *args))
    extra = [torch.randn(2, 2, 2, 16) for _ in range(2)]
    torch.library.opcheck(torch.ops.natgen.na_forward.default, (q, k, v, *extra, *args))
    out, lse = torch.ops.natgen.na_forward(q.detach(), k.detach(), v.detach(), None, None, *args)
    grad = torch.randn_like(out)
    detached = [t.detach() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.natgen.na_backward.default,
                          (*detached, None, None, out, lse, grad, None, *args))
    torch.library.opcheck(torch.ops.natgen.na_backward.default,
                          (*detached, None, None, out, lse, grad, torch.randn_like(lse), *args))


@pytest.mark.reference
def test_merge_equals_attention_over_the_concatenated_keys():
    """Splitting the extra tokens off into their own partial attention and merging by LSE gives the same
    result as one attention over the window and the extra tokens together (against the dense oracle)."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 11, 3, 8, generator=g, dtype=torch.float64).requires_grad_(True) for _ in range(3))
    extra_k, extra_v = (torch.randn(2, 4, 3, 8, generator=g, dtype=torch.float64) for _ in range(2))
    window_out, window_lse = natgen.na1d(q, k, v, 5, return_lse=True)
    # attention of each query over the extra tokens alone, written out densely
    logits = torch.einsum("bqhd,behd->bqhe", q, extra_k) * 8 ** -0.5
    extra_lse = torch.logsumexp(logits, dim=-1)
    extra_out = torch.einsum("bqhe,behd->bqhd", torch.softmax(logits, dim=-1), extra_v)
    merged, lse = natgen.merge_attentions([window_out, extra_out], [window_lse, extra_lse])
    expected, expected_lse = dense_oracle(q, k, v, 5, additional_keys=extra_k, additional_values=extra_v)
    assert torch.allclose(merged, expected, atol=1e-12) and merged.dtype == torch.float64
    assert torch.allclose(lse.double(), expected_lse, atol=1e-6) and lse.dtype == torch.float32
    # differentiable: the gradient matches the oracle's
    cot = torch.randn(merged.shape, generator=g, dtype=torch.float64)
    grad = torch.autograd.grad(merged, q, cot)[0]
    q2 = q.detach().clone().requires_grad_(True)
    expected_grad = torch.autograd.grad(dense_oracle(q2, k.detach(), v.detach(), 5, additional_keys=extra_k,
                                                     additional_values=extra_v)[0], q2, cot)[0]
    assert torch.allclose(grad, expected_grad, atol=1e-10)
    # three pieces merge associatively (up to the float32 rounding of the inner merge's returned lse)
    a, b = natgen.merge_attentions([window_out, extra_out, extra_out], [window_lse, extra_lse, extra_lse])
    c, d = natgen.merge_attentions(
        [window_out, natgen.merge_attentions([extra_out, extra_out], [extra_lse, extra_lse])[0]],
        [window_lse, natgen.merge_attentions([extra_out, extra_out], [extra_lse, extra_lse])[1]])
    assert torch.allclose(a, c, atol=1e-6) and torch.allclose(b, d, atol=1e-5)


@pytest.mark.validation
def test_merge_errors():
    out, lse = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="outputs is empty"):
        natgen.merge_attentions([], [])
    with pytest.raises(ValueError, match="2 outputs but 1 lse tensors"):
        natgen.merge_attentions([out, out], [lse])
    with pytest.raises(ValueError, match=r"lse_tensors\[1\] has shape \(2, 5\); it must be outputs\[1\]'s shape"):
        natgen.merge_attentions([out, out], [lse, lse[..., 0]])
    with pytest.raises(ValueError, match=r"outputs\[1\] has shape \(2, 5, 3, 4\)"):
        natgen.merge_attentions([out, out[..., :4]], [lse, lse])
