"""The relative positional bias (rpb) of the fused op: validation, selection, and every backend that adds it
against the independent float64 oracle (tests/oracle.py's dense_bias)."""

import pytest
import torch

import natgen
import natgen.reference
from natgen.manifest import load
from natgen.problem import make_problem
from natgen.selector import NoKernelError, Target, not_supported_reasons
from oracle import assert_close_by_rule, assert_grads_close_by_rule, axis_windows, dense_oracle

pytestmark = pytest.mark.reference

OP = {1: natgen.na1d, 2: natgen.na2d, 3: natgen.na3d}

# (spatial, kernel_size, stride, dilation, is_causal): borders, dilation groups, even K, stride, causal
CASES = [
    ((13,), 5, 1, 2, False),
    ((12,), 4, 2, 1, False),
    ((11,), 3, 1, 3, True),
    ((7, 9), (3, 5), (1, 2), (2, 1), (False, True)),
    ((6, 6), 4, 1, 1, False),
    ((4, 5, 6), (2, 3, 3), 1, (1, 1, 2), (True, False, False)),
]


def _inputs(spatial, kernel_size, dtype=torch.float64, heads=2, head_dim=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rank = len(spatial)
    kernel = kernel_size if isinstance(kernel_size, tuple) else (kernel_size,) * rank
    q, k, v = (torch.randn(1, *spatial, heads, head_dim, generator=generator, dtype=torch.float64).to(dtype)
               for _ in range(3))
    rpb = torch.randn(heads, *(2 * K - 1 for K in kernel), generator=generator, dtype=torch.float64).to(dtype)
    return q, k, v, rpb


def test_window_offsets_stay_within_the_bias():
    """Every key of a window is within K - 1 dilation steps of its query, for every parameter natgen accepts
    (even K, stride, causal), so K - 1 + (j - i) / D always indexes the bias's 2K - 1 entries."""
    for L in range(2, 15):
        for K in range(2, L + 1):
            for D in range(1, L // K + 1):
                for S in range(1, K + 1):
                    for causal in (False, True):
                        for i, keys in enumerate(axis_windows(L, K, S, D, causal)):
                            for j in keys:
                                assert (j - i) % D == 0 and -(K - 1) <= (j - i) // D <= (0 if causal else K - 1)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_with_rpb_matches_oracle(case, monkeypatch):
    spatial, kernel_size, stride, dilation, is_causal = case
    monkeypatch.setattr(natgen.reference, "_GATHERED_ELEMENTS_PER_CHUNK", 3000)  # chunk seams
    for dtype in (torch.float64, torch.float32):
        q, k, v, rpb = _inputs(spatial, kernel_size, dtype)
        params = dict(kernel_size=kernel_size, stride=stride, dilation=dilation, is_causal=is_causal)
        out, lse = OP[len(spatial)](q, k, v, **params, rpb=rpb, return_lse=True, backend="reference")
        assert_close_by_rule(out, q, k, v, lse, **params, rpb=rpb)


@pytest.mark.parametrize("case", CASES[::2], ids=str)
def test_reference_grads_with_rpb_match_oracle(case, monkeypatch):
    spatial, kernel_size, stride, dilation, is_causal = case
    monkeypatch.setattr(natgen.reference, "_GATHERED_ELEMENTS_PER_CHUNK", 3000)
    q, k, v, rpb = _inputs(spatial, kernel_size)
    params = dict(kernel_size=kernel_size, stride=stride, dilation=dilation, is_causal=is_causal)
    op = OP[len(spatial)]
    assert_grads_close_by_rule(lambda **t: op(**t, **params, backend="reference"), q, k, v, **params, rpb=rpb)


def test_explicit_reference_backward_matches_autograd_with_extra_tokens():
    """na_reference_backward (what every backend without a backward kernel runs) against the oracle's autograd,
    with extra tokens and an lse cotangent: drpb sums over batch and queries."""
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 6, 7, 2, 3, generator=generator, dtype=torch.float64) for _ in range(3))
    extra_k, extra_v = (torch.randn(2, 2, 2, 3, generator=generator, dtype=torch.float64) for _ in range(2))
    rpb = torch.randn(2, 5, 3, generator=generator, dtype=torch.float64)
    params = dict(kernel_size=(3, 2), stride=1, dilation=(2, 1), is_causal=(False, True))
    problem = make_problem(2, q, k, v, **params, additional_keys=extra_k, additional_values=extra_v, rpb=rpb)
    grad_out = torch.randn(2, 6, 7, 2, 3, generator=generator, dtype=torch.float64)
    grad_lse = torch.randn(2, 6, 7, 2, generator=generator, dtype=torch.float64)
    got = natgen.reference.na_reference_backward(q, k, v, problem, extra_k, extra_v, grad_out, grad_lse, rpb=rpb)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, extra_k, extra_v, rpb)]
    out, lse = dense_oracle(*leaves[:3], **params, additional_keys=leaves[3], additional_values=leaves[4],
                            rpb=leaves[5])
    expected = torch.autograd.grad((out * grad_out).sum() + (lse * grad_lse).sum(), leaves)
    for name, a, b in zip(("q", "k", "v", "extra_k", "extra_v", "rpb"), got, expected):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10), name


def test_rpb_through_the_registered_op():
    """The registered op (torch.compile's and export's path): its fake, its autograd formula and the grad of
    rpb from its backward op."""
    q, k, v, rpb = _inputs((8, 8), 3, torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, rpb)]
    expected = natgen.na2d(*leaves[:3], 3, dilation=2, rpb=leaves[3], backend="reference")
    expected_grads = torch.autograd.grad(expected.square().sum(), leaves)
    args = ([3, 3], [1, 1], [2, 2], [False, False], None, None, None)
    got, _ = torch.ops.natgen.na_forward(*leaves[:3], None, None, *args, leaves[3])
    got_grads = torch.autograd.grad(got.square().sum(), leaves)
    assert torch.allclose(got, expected, atol=1e-5)
    for a, b in zip(got_grads, expected_grads):
        assert torch.allclose(a, b, atol=1e-4)
    torch.library.opcheck(torch.ops.natgen.na_forward.default, (*leaves[:3], None, None, *args, leaves[3]))


def test_rpb_errors_name_the_argument_value_and_rule():
    q, k, v, rpb = _inputs((8, 8), 3, torch.float32)
    with pytest.raises(ValueError, match=r"rpb.shape=\(2, 5, 5\) must be \[heads=2, 2\*kernel_size\[0\]-1=5, "
                                         r"2\*kernel_size\[1\]-1=7\] = \(2, 5, 7\)"):
        natgen.na2d(q, k, v, (3, 4), rpb=torch.zeros(2, 5, 5))
    with pytest.raises(ValueError, match=r"rpb.dtype=torch.float64 must match q.dtype=torch.float32"):
        natgen.na2d(q, k, v, 3, rpb=rpb.double())
    with pytest.raises(TypeError, match="rpb must be a torch.Tensor"):
        natgen.na2d(q, k, v, 3, rpb=[[0.0]])
    with pytest.raises(ValueError, match=r"rpb.device=meta must match q.device=cpu"):
        natgen.na2d(q, k, v, 3, rpb=rpb.to("meta"))


def test_instances_without_rpb_refuse_it_with_a_reason():
    """No instance reads a bias it does not add: each says so, and an explicit backend without one fails
    (rather than run without the bias)."""
    q, k, v, rpb = _inputs((8, 8), 3, torch.float32)
    problem = make_problem(2, q, k, v, 3, rpb=rpb)
    for instance in load():
        if instance.launch.get("rpb", False):
            continue
        target = Target("cpu") if instance.spec.family == "cpu" else Target("cuda", "sm_90")
        reasons = not_supported_reasons(instance, problem, target, instance.spec.op)
        assert any("relative positional bias" in r for r in reasons), instance.name
    if not any(i.launch.get("rpb", False) for i in load() if i.spec.family != "cpu"):
        with pytest.raises((NoKernelError, RuntimeError)):
            natgen.na2d(q, k, v, 3, rpb=rpb, backend="emulator")


def test_bench_rpb_peers_compute_the_same_attention():
    """natgen bench's rpb sets: the natgen peer (fused, with the case's bias) and the unfused composition
    compute the same outputs and gradients; peers without a bias say so instead of timing something else."""
    from natgen.bench import PEER_FACTORIES, PeerUnavailable, ProblemSet, make_case
    ps = ProblemSet("tiny-rpb", 2, 1, 2, (9, 10), 8, 3, 2, rpb=True)
    for backward in (False, True):
        case = make_case(ps, "cpu", torch.float64, backward)
        fused, unfused = (PEER_FACTORIES[p](case).call() for p in ("natgen", "unfused"))
        if backward:
            assert len(fused) == len(unfused) == 4  # q, k, v, rpb
            for a, b in zip(fused[3:], unfused[3:]):
                assert torch.allclose(a, b, atol=1e-10)
            for a, b in zip(fused[:3], unfused[:3]):
                assert torch.allclose(a, b.movedim(1, -2), atol=1e-10)
        else:
            assert torch.allclose(fused, unfused.movedim(1, -2), atol=1e-12)
    with pytest.raises(PeerUnavailable, match="takes no relative positional bias"):
        PEER_FACTORIES["sdpa"](case)


# (spatial, kernel_size, stride, dilation, is_causal, head_dim): the specialized K=7 head_dim 32 instances (whose
# fixed-layout paths a bias turns off), and K=any instances over ranks, both masks, strides and dilation groups
# (all-causal or non-causal only: the instances the CPU tests compile anyway)
CPU_CASES = [
    ((16, 16), 7, 1, 2, False, 32),
    ((9, 10), (3, 4), (1, 2), (2, 1), False, 8),
    ((20,), 6, 3, 1, True, 8),
    ((5, 6, 7), (2, 3, 3), 1, (1, 1, 2), False, 8),
]


def _cpu_or_skip():
    from natgen import cpu
    if not cpu.available():
        pytest.skip("no C++ compiler for the cpu backend")


@pytest.mark.cpu
@pytest.mark.parametrize("case", CPU_CASES, ids=str)
def test_cpu_with_rpb_matches_oracle(case):
    """The generated CPU forward and backward with a bias: out, lse and every gradient (rpb's included)."""
    _cpu_or_skip()
    spatial, kernel_size, stride, dilation, is_causal, head_dim = case
    rank = len(spatial)
    params = dict(kernel_size=kernel_size, stride=stride, dilation=dilation, is_causal=is_causal)
    q, k, v, rpb = _inputs(spatial, kernel_size, torch.float32, heads=2, head_dim=head_dim, seed=rank)
    for op in ("forward", "backward"):
        backend, instance = natgen.choose(rank, q, k, v, **params, rpb=rpb, op=op)
        assert backend == "cpu" and instance is not None, op
    out, lse = OP[rank](q, k, v, **params, rpb=rpb, return_lse=True, backend="cpu")
    assert_close_by_rule(out, q, k, v, lse, **params, rpb=rpb)
    assert_grads_close_by_rule(lambda **t: OP[rank](**t, **params, backend="cpu"), q, k, v, **params, rpb=rpb)


@pytest.mark.cpu
def test_cpu_rpb_grads_with_grouped_heads_are_deterministic():
    """Bias grads sum every work unit's share in unit order: the same bits for 1 and 2 threads, and with
    grouped key/value heads each query head's table gets its own grads."""
    _cpu_or_skip()
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(2, 12, 12, 4, 8, generator=generator)
    k, v = (torch.randn(2, 12, 12, 2, 8, generator=generator) for _ in range(2))
    rpb = torch.randn(4, 5, 5, generator=generator)
    params = dict(kernel_size=3, dilation=(2, 3))
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            leaves = [t.clone().requires_grad_(True) for t in (q, k, v, rpb)]
            out = natgen.na2d(*leaves[:3], **params, rpb=leaves[3], backend="cpu")
            results.append(torch.autograd.grad(out.square().sum(), leaves))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert_grads_close_by_rule(lambda **t: natgen.na2d(**t, **params, backend="cpu"), q, k, v, **params, rpb=rpb)
