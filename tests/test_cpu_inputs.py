"""bf16 and f16 inputs read by the CPU kernels themselves (the ABI's input_dtype field, the manifest's launch
fact "inputs").

The f32 instances widen bf16 / f16 q / k / v (and extra tokens; the backward also out and dO) while they gather
and the forward rounds out to the input type as it writes it, instead of the runtime converting every tensor
first. Widening is exact and the rounding is torch's (nearest even), so the results must have exactly the bits
of converting first and running the float32 kernel on the same ISA variant: that is checked bit for bit on the
fixed-shape and the generic paths, and the result against the independent float64 oracle by the semantics
doc's rule. Every variant this CPU supports runs; the rest are skipped with the reason.
"""
from __future__ import annotations

import pytest
import torch

import natgen
from natgen import cpu, cpu_isa, cxx
from natgen.manifest import load as load_manifest
from oracle import assert_close_by_rule, assert_grads_close_by_rule

pytestmark = [pytest.mark.cpu,
              pytest.mark.skipif(not cpu.available(), reason="no C++ compiler for the cpu backend")]

OPS = {1: natgen.na1d, 2: natgen.na2d, 3: natgen.na3d}
# the 16-bit input dtypes and the input_dtype code each is passed with (codegen/families/cpu.py INPUT_TYPES)
HALVES = {"bf16": (torch.bfloat16, 1), "f16": (torch.float16, 2)}
SUPPORTED = cpu_isa.supported()
VARIANTS = [pytest.param(name, marks=pytest.mark.skipif(
    name not in SUPPORTED, reason=f"this CPU lacks {name} ({', '.join(cpu_isa.NEEDS[name])})"))
    for name in reversed(cpu_isa.VARIANTS)]

# (spatial, kernel, stride, dilation, causal, heads, heads_kv, head_dim, rpb, extra tokens)
CASES = {
    # the fixed-shape 7x7 h32 forward: interior and border query blocks, an odd tile edge
    "fixed_2d": ((37, 35), 7, 1, 1, False, 2, 2, 32, False, 0),
    # the generic paths: causal, dilated, strided, 1-D and 3-D, grouped heads, a bias, extra tokens
    "any_2d_causal_dilated": ((19, 23), (5, 3), (1, 2), (2, 1), (True, False), 2, 2, 8, False, 0),
    "any_1d_strided": ((45,), 6, 4, 1, False, 2, 1, 12, False, 0),
    "any_3d_causal": ((6, 7, 9), 3, 1, 1, True, 1, 1, 8, False, 0),
    "rpb_2d": ((17, 20), 5, 1, 1, False, 2, 2, 16, True, 0),
    "extra_1d": ((30,), 5, 1, 2, False, 2, 2, 16, False, 3),
}


def _inputs(name, seed=0, half="bf16"):
    spatial, kernel, stride, dilation, causal, heads, heads_kv, head_dim, rpb, n_extra = CASES[name]
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return (2 * torch.randn(*shape, generator=generator)).to(HALVES[half][0])

    q = randn(1, *spatial, heads, head_dim)
    k, v = randn(1, *spatial, heads_kv, head_dim), randn(1, *spatial, heads_kv, head_dim)
    ks = (kernel,) * len(spatial) if isinstance(kernel, int) else kernel
    params = dict(kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal)
    if rpb:
        params["rpb"] = randn(heads, *(2 * K - 1 for K in ks))
    if n_extra:
        params["additional_keys"] = randn(1, n_extra, heads_kv, head_dim)
        params["additional_values"] = randn(1, n_extra, heads_kv, head_dim)
    return OPS[len(spatial)], q, k, v, params


def _as_float(params):
    return {key: value.float() if isinstance(value, torch.Tensor) else value for key, value in params.items()}


# the cases whose forward runs AVX512_BF16's dot products on avx512bf16 with bf16 inputs (the specialized
# forward's query pairs)
BF16_DOT_CASES = ("fixed_2d",)


@pytest.mark.parametrize("half", list(HALVES))
@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("name", list(CASES))
def test_half_forward_has_the_bits_of_converting_first(isa, name, half):
    """Every variant but avx512bf16 on bf16 inputs, whose dot products sum in another order (see below)."""
    op, q, k, v, params = _inputs(name, half=half)
    dtype = HALVES[half][0]
    with cpu_isa.use(isa):
        out, lse = op(q, k, v, **params, return_lse=True, backend="cpu")
        ref_out, ref_lse = op(q.float(), k.float(), v.float(), **_as_float(params), return_lse=True, backend="cpu")
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close_by_rule(out, q, k, v, lse, **params)
    if isa == "avx512bf16" and half == "bf16" and name in BF16_DOT_CASES:
        # AVX512_BF16's dot products: the same exact products summed in another order (float32 sums, channel
        # pairs odd first), so not the bits of converting first, but within float32 rounding of them: the
        # log-sum-exp a few float32 ulps off (and not equal everywhere: the other path ran), the output at most
        # one bf16 step of its value off
        assert not torch.equal(lse, ref_lse)
        assert torch.allclose(lse, ref_lse, rtol=1e-6, atol=1e-5)
        step = ref_out.abs().clamp_min(2.0 ** -126) * 2.0 ** -7
        assert torch.all((out.float() - ref_out.to(dtype).float()).abs() <= step)
        return
    assert torch.equal(out.view(torch.int16), ref_out.to(dtype).view(torch.int16))
    assert torch.equal(lse, ref_lse)


@pytest.mark.parametrize("half", list(HALVES))
@pytest.mark.parametrize("name", ["fixed_2d", "any_2d_causal_dilated"])
def test_half_gradients_through_the_direct_forward_match_the_oracle(name, half):
    op, q, k, v, params = _inputs(name, seed=1, half=half)
    assert_grads_close_by_rule(lambda **t: op(**t, **params, backend="cpu"), q, k, v, **params)


# per 16-bit type: four pairs of neighbouring numbers (their mean is a tie; for f16 the last is subnormal),
# then infinity, NaN, the largest finite number and a tiny one
TIE_PAIRS = {
    "bf16": [(1.0, 1.0 + 2 ** -7), (1.0 + 2 ** -7, 1.0 + 2 ** -6), (-2.0, -(2.0 + 2 ** -6)),
             (2.0 ** 15, 2.0 ** 15 + 2 ** 8), (float("inf"), 1.0), (float("nan"), 1.0), (3.0e38, 3.0e38),
             (1e-39, 0.0)],
    "f16": [(1.0, 1.0 + 2 ** -10), (1.0 + 2 ** -10, 1.0 + 2 ** -9), (-2.0, -(2.0 + 2 ** -9)), (2.0 ** -24, 2.0 ** -23),
            (float("inf"), 1.0), (float("nan"), 1.0), (65504.0, 65504.0), (1e-7, 0.0)],
}


@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("half", list(HALVES))
def test_the_rounding_is_torchs_on_ties_infinities_and_nan(half, isa):
    """Outputs exactly between two bf16 / f16 numbers, and non-finite ones, round as torch rounds them."""
    # causal K=2 with q = 0: query i > 0 averages keys i-1 and i with equal weights, out = (a + b) / 2 exactly;
    # rows alternate a, b per channel, so every out row past the first is that channel's mean
    dtype, pairs = HALVES[half][0], TIE_PAIRS[half]
    a = torch.tensor([x for x, _ in pairs]).to(dtype)
    b = torch.tensor([y for _, y in pairs]).to(dtype)
    v = torch.stack([a if i % 2 == 0 else b for i in range(16)]).reshape(1, 16, 1, 8)
    q = torch.zeros(1, 16, 1, 8, dtype=dtype)
    with cpu_isa.use(isa):
        ref = natgen.na1d(q.float(), q.float(), v.float(), 2, is_causal=True, backend="cpu")
        direct = natgen.na1d(q, q, v, 2, is_causal=True, backend="cpu")
    ties = ref[0, 1:, 0, :4]
    mean = ((a.double() + b.double()) / 2)[:4].float()
    assert torch.equal(ties, mean.expand_as(ties)), "the first four channels must be the exact means"
    assert torch.all(ties.to(dtype).float() != ties), "the means must lie between two numbers of the type"
    expected = ref.to(dtype)
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(direct), nan) and nan.any()
    assert torch.equal(direct.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])
    assert torch.isinf(direct).any()


def test_the_manifest_says_which_instances_read_half_inputs():
    """The f32 instances (forward and backward) read bf16 and f16; f64 instances read their compute type only."""
    instances = [i for i in load_manifest() if i.spec.family == "cpu"]
    assert {i.spec.op for i in instances} == {"fwd", "bwd"}
    reads = {name: code for name, (_, code) in HALVES.items()}
    for instance in instances:
        assert instance.launch.get("inputs") == (reads if instance.spec.dtype == "f32" else {}), instance.name


@pytest.mark.parametrize("half", list(HALVES))
@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("name", ["fixed_2d", "any_2d_causal_dilated", "extra_1d", "rpb_2d"])
def test_half_backward_has_the_bits_of_converting_first(isa, name, half):
    """The backward reads bf16 / f16 q / k / v / out / dO itself: its float32 gradients equal those of the same
    kernel given the tensors converted to float32 first (a call whose backward is made to convert)."""
    op, q, k, v, params = _inputs(name, seed=5, half=half)
    dtype, code = HALVES[half]
    rank = q.dim() - 3
    extra = (params.get("additional_keys"), params.get("additional_values"))
    rpb = params.get("rpb")
    resolve_params = {key: value for key, value in params.items()
                      if key not in ("rpb", "additional_keys", "additional_values")}
    problem, call = natgen.ops.resolve(rank, q, k, v, additional_keys=extra[0], additional_values=extra[1], rpb=rpb,
                                       backend="cpu", **resolve_params)
    assert call.backward_code == code
    converting = cpu.CpuCall(problem)
    converting.backward_code, converting.backward_input_dtype = 0, torch.float32
    converting.backward_blocks = cpu._Blocks(converting.blocks.layout, problem)
    generator = torch.Generator().manual_seed(6)
    with cpu_isa.use(isa):
        out, lse = call.forward(q, k, v, *extra, rpb)
        grad_out = torch.randn(out.shape, generator=generator).to(dtype)
        direct = call.backward(q, k, v, *extra, out, lse, grad_out, None, rpb)
        converted = converting.backward(q, k, v, *extra, out, lse, grad_out, None, rpb)
    for a, b in zip(direct, converted):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a.float(), b.float())


@pytest.mark.parametrize("kernel", [7, 5])  # the fixed-shape and the generic instances
def test_half_calls_pass_their_tensors_and_float64_ones_their_own(kernel):
    q = torch.randn(1, 12, 12, 2, 32)
    for dtype, code in HALVES.values():
        call = natgen.ops.resolve(2, *(q.to(dtype),) * 3, kernel, backend="cpu")[1]
        assert (call.input_code, call.input_dtype) == (code, dtype)
        assert (call.backward_code, call.backward_input_dtype) == (code, dtype)
    call = natgen.ops.resolve(2, *(q.double(),) * 3, kernel, backend="cpu")[1]
    assert (call.input_code, call.input_dtype, call.backward_code) == (0, torch.float64, 0)


@pytest.mark.parametrize("which, code", [("backward", 7), ("forward", 7)])
def test_an_input_code_a_kernel_does_not_read_is_refused(which, code):
    q = torch.randn(1, 12, 12, 2, 16, dtype=torch.bfloat16)
    call = natgen.ops.resolve(2, q, q, q, 5, backend="cpu")[1]
    instance = call.backward_instance if which == "backward" else call.instance
    blocks = cpu._Blocks(cpu.Layout(instance.layout, instance.name), call.problem, input_dtype=code)
    with pytest.raises(RuntimeError, match="does not read the input_dtype code"):
        cxx.load(instance).run(blocks.block(1)[1], blocks.count)  # refused before any pointer is read


@pytest.mark.parametrize("half", list(HALVES))
def test_the_fixed_forward_rounds_non_finite_outputs_as_torch(half):
    """The fixed-shape forward narrows 8 outputs at a time: NaN and infinite outputs come out as torch's."""
    dtype = HALVES[half][0]
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(1, 16, 16, 1, 32, generator=generator).to(dtype)
    v = torch.randn(1, 16, 16, 1, 32, generator=generator)
    v[0, 2, 3, 0, 5], v[0, 12, 12, 0, 9], v[0, 8, 1, 0, 30] = float("nan"), float("inf"), -float("inf")
    v = v.to(dtype)
    call = natgen.ops.resolve(2, q, q, v, 7, backend="cpu")[1]
    assert "_k7x7_" in call.instance.name  # the fixed-shape instance
    # the bits of converting first (avx512bf16's bf16 dot products sum in another order: the variant under it)
    isa = "avx512" if cpu_isa.current() == "avx512bf16" else cpu_isa.current()
    with cpu_isa.use(isa):
        direct = natgen.na2d(q, q, v, 7, backend="cpu")
        expected = natgen.na2d(q.float(), q.float(), v.float(), 7, backend="cpu").to(dtype)
    nan = torch.isnan(expected)
    assert nan.any() and torch.isinf(expected).any()
    assert torch.equal(torch.isnan(direct), nan)
    assert torch.equal(direct.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])


@pytest.mark.parametrize("kernel", [7, 5])  # the fixed-shape and the generic forward
def test_float32_and_half_calls_of_one_shape_take_turns_on_the_same_threads(kernel):
    """The per-thread scratch is kept between calls of one shape: a bf16 call after a float32 one, an f16 call
    after that (and back to float32) find the buffers they need."""
    generator = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 20, 20, 2, 32, generator=generator) for _ in range(3))
    first = natgen.na2d(q, k, v, kernel, backend="cpu")
    for dtype, _ in HALVES.values():
        half = natgen.na2d(q.to(dtype), k.to(dtype), v.to(dtype), kernel, backend="cpu")
        expected = natgen.na2d(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(), kernel, backend="cpu")
        assert torch.equal(half.view(torch.int16), expected.to(dtype).view(torch.int16))
    again = natgen.na2d(q, k, v, kernel, backend="cpu")
    assert torch.equal(first, again)
