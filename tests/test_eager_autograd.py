"""Eager calls with gradients: they take natgen's own autograd Function (no dispatcher layers), which must give
exactly the registered op's results and gradients, and behave as a torch autograd node should."""
import pytest
import torch

import natgen
from oracle import dense_oracle

pytestmark = pytest.mark.cpu

KW = dict(kernel_size=(3, 5), dilation=(1, 2), is_causal=(False, True))


def _leaves(seed=0, extra=False, rpb=False, shape=(2, 7, 11, 2, 16)):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    tensors = {"q": q, "k": k, "v": v}
    if extra:
        tensors["additional_keys"] = torch.randn(shape[0], 3, shape[-2], shape[-1], generator=g)
        tensors["additional_values"] = torch.randn(shape[0], 3, shape[-2], shape[-1], generator=g)
    if rpb:
        tensors["rpb"] = torch.randn(shape[-2], 5, 9, generator=g)
    return {name: t.requires_grad_(True) for name, t in tensors.items()}


def _through_op(tensors, **kw):
    """The same call through the registered op (the path torch.compile takes)."""
    args = natgen.ops._op_arguments(2, kw["kernel_size"], 1, kw["dilation"], kw["is_causal"], None)
    return torch.ops.natgen.na_forward(tensors["q"], tensors["k"], tensors["v"], tensors.get("additional_keys"),
                                       tensors.get("additional_values"), *args, "cpu", None, tensors.get("rpb"))


def _loss(out, lse):
    weights = torch.linspace(-1, 1, out.shape[-1])
    return (out * weights).sum() + (lse * 0.3).sum()


@pytest.mark.parametrize("extra,rpb", [(False, False), (True, False), (False, True)])
def test_eager_gradients_equal_the_registered_ops(extra, rpb):
    if extra and rpb:
        pytest.skip("extra tokens and a bias do not combine")
    kw = dict(KW, **({"dilation": (1, 1), "is_causal": False} if rpb else {}))
    eager = _leaves(extra=extra, rpb=rpb)
    out, lse = natgen.na2d(**eager, **kw, return_lse=True, backend="cpu")
    assert type(out.grad_fn).__name__ == "EagerNABackward"
    _loss(out, lse).backward()
    op = {name: t.detach().clone().requires_grad_(True) for name, t in eager.items()}
    out_op, lse_op = _through_op(op, **kw)
    assert "EagerNA" not in type(out_op.grad_fn).__name__
    _loss(out_op, lse_op).backward()
    assert torch.equal(out, out_op) and torch.equal(lse, lse_op)
    for name in eager:
        assert torch.equal(eager[name].grad, op[name].grad), name


def test_eager_gradients_match_the_dense_oracle():
    tensors = _leaves(seed=3)
    out, lse = natgen.na2d(**tensors, **KW, return_lse=True, backend="cpu")
    _loss(out, lse).backward()
    reference = {name: t.detach().double().requires_grad_(True) for name, t in tensors.items()}
    out_ref, lse_ref = dense_oracle(reference["q"], reference["k"], reference["v"], **KW)
    _loss(out_ref, lse_ref).backward()
    for name in tensors:
        torch.testing.assert_close(tensors[name].grad.double(), reference[name].grad, rtol=1e-4, atol=1e-5)


def test_lse_only_and_out_only_cotangents():
    for use in ("out", "lse"):
        eager = _leaves(seed=5)
        out, lse = natgen.na2d(**eager, **KW, return_lse=True, backend="cpu")
        (out.sum() if use == "out" else lse.sum()).backward()
        op = {name: t.detach().clone().requires_grad_(True) for name, t in eager.items()}
        out_op, lse_op = _through_op(op, **KW)
        (out_op.sum() if use == "out" else lse_op.sum()).backward()
        for name in eager:
            assert torch.equal(eager[name].grad, op[name].grad), (use, name)


def test_non_contiguous_inputs_and_partial_requires_grad():
    tensors = _leaves(seed=7, shape=(2, 7, 11, 2, 32))
    q, k, v = (t.detach()[..., ::2] for t in tensors.values())
    assert not q.is_contiguous()
    q.requires_grad_(True)  # k and v need no gradient
    out = natgen.na2d(q, k, v, **KW, backend="cpu")
    out.sum().backward()
    q2 = q.detach().contiguous().requires_grad_(True)
    natgen.na2d(q2, k.contiguous(), v.contiguous(), **KW, backend="cpu").sum().backward()
    assert torch.equal(q.grad, q2.grad)
    assert k.grad is None and v.grad is None


def test_second_derivative_raises():
    tensors = _leaves()
    out = natgen.na2d(**tensors, **KW, backend="cpu")
    (grad_q,) = torch.autograd.grad(out.square().sum(), tensors["q"], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_q.sum().backward()  # as the registered op's backward, which has no autograd formula, raises


def test_modifying_a_saved_input_is_caught():
    tensors = _leaves()
    out = natgen.na2d(**tensors, **KW, backend="cpu")
    with torch.no_grad():
        tensors["k"].mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_reference_fallback_warns_and_matches_the_reference():
    # float64 with a head_dim no CPU backward instance handles would fall back; the fp64 CPU kernels take any
    # head_dim, so force the fallback by removing the backward instance from the resolved call
    tensors = _leaves(seed=11)
    problem, resolved = natgen.ops.resolve(2, tensors["q"], tensors["k"], tensors["v"], KW["kernel_size"],
                                           dilation=KW["dilation"], is_causal=KW["is_causal"], backend="cpu")
    saved = resolved.backward
    resolved.backward = lambda *args, **kwargs: None
    try:
        out = natgen.na2d(**tensors, **KW, backend="cpu")
        with pytest.warns(UserWarning, match="recomputed through the reference"):
            out.sum().backward()
    finally:
        resolved.backward = saved
    expected = {name: t.detach().clone().requires_grad_(True) for name, t in tensors.items()}
    natgen.na2d(**expected, **KW, backend="reference").sum().backward()
    for name in tensors:
        torch.testing.assert_close(tensors[name].grad, expected[name].grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel_size, head_dim", [(7, 32), ((3, 5), 16)])  # a fixed-shape and a generic instance
def test_the_direct_cpu_backward_has_the_bits_of_the_general_one(kernel_size, head_dim):
    """float32 calls without extra tokens or bias take the CPU backend's direct backward (its pointers packed
    in one step); it must give exactly what the general backward does, and a non-contiguous cotangent, which
    it declines, must too."""
    from natgen import ops
    leaves = _leaves(seed=4, shape=(1, 18, 20, 2, head_dim))
    q, k, v = (leaves[name] for name in "qkv")
    resolved = ops.resolve(2, q, k, v, kernel_size, backend="cpu")[1]
    g = torch.Generator().manual_seed(5)
    for contiguous in (True, False):
        grad_out = torch.randn(head_dim, 2, 20, 18, 1, generator=g).permute(4, 3, 2, 1, 0)
        grad_out = grad_out.contiguous() if contiguous else grad_out
        out, lse = natgen.na2d(q, k, v, kernel_size, return_lse=True, backend="cpu")
        fast = torch.autograd.grad(out, (q, k, v), grad_out)
        assert resolved.fast_backward is not None and resolved.fast_backward.__name__ == "run"
        general = resolved.backward(q.detach(), k.detach(), v.detach(), None, None, out.detach(), lse.detach(),
                                    grad_out.contiguous(), None)
        for a, b in zip(fast, general[:3]):
            assert torch.equal(a, b)
