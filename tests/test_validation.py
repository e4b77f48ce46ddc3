"""make_problem rejects every invalid call before a kernel runs, naming the argument, value and rule."""

import dataclasses
import math
import re

import pytest
import torch

from natgen.problem import Problem, make_problem

pytestmark = pytest.mark.validation


def tensors(shape=(2, 16, 16, 4, 8), dtype=torch.float32, head_dim_v=None, device="cpu"):
    q = torch.zeros(shape, dtype=dtype, device=device)
    v_shape = (*shape[:-1], head_dim_v or shape[-1])
    return q, torch.zeros_like(q), torch.zeros(v_shape, dtype=dtype, device=device)


def raises(error, *fragments):
    """pytest.raises that requires every fragment (taken literally) somewhere in the message."""
    pattern = "".join(f"(?=.*{re.escape(fragment)})" for fragment in fragments)
    return pytest.raises(error, match=re.compile(pattern, re.DOTALL))


# ---- valid calls: normalization ---------------------------------------------------------------------

def test_scalars_broadcast_to_every_dim_and_defaults_fill_in():
    q, k, v = tensors(head_dim_v=5)
    problem = make_problem(2, q, k, v, 3)
    assert problem == Problem(rank=2, batch=2, spatial=(16, 16), heads=4, head_dim=8, head_dim_v=5,
                              kernel_size=(3, 3), stride=(1, 1), dilation=(1, 1),
                              is_causal=(False, False), scale=8 ** -0.5, n_extra=0,
                              dtype=torch.float32, device=torch.device("cpu"))
    assert problem.num_tokens == 256 and problem.window == 9


def test_per_dim_lists_and_extra_tokens():
    q, k, v = tensors((1, 12, 10, 9, 2, 4), dtype=torch.float16)
    extra_keys = torch.zeros(1, 5, 2, 4, dtype=torch.float16)
    problem = make_problem(3, q, k, v, [2, 5, 3], stride=(2, 1, 3), dilation=[3, 2, 3],
                           is_causal=[True, False, True], scale=0.25,
                           additional_keys=extra_keys, additional_values=extra_keys.clone())
    assert problem.kernel_size == (2, 5, 3) and problem.dilation == (3, 2, 3)
    assert problem.is_causal == (True, False, True) and problem.n_extra == 5
    assert problem.scale == 0.25 and problem.window == 30 and problem.num_tokens == 1080


def test_boundaries_are_accepted():
    q, k, v = tensors((1, 18, 4, 2, 8))
    # K * D == L exactly, and S == K exactly, are both valid.
    problem = make_problem(2, q, k, v, (9, 2), stride=(9, 2), dilation=(2, 2))
    assert problem.stride == (9, 2)


def test_problem_is_frozen():
    q, k, v = tensors((1, 8, 2, 4))
    problem = make_problem(1, q, k, v, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        problem.scale = 1.0


# ---- parameters ---------------------------------------------------------------------------------------

def test_window_larger_than_dilated_extent():
    q, k, v = tensors()
    with raises(ValueError, "kernel_size[1]=9", "dilation[1]=2", ">= 18", "got 16"):
        make_problem(2, q, k, v, (3, 9), dilation=(1, 2))
    with raises(ValueError, "kernel_size[0]=17", "dilation[0]=1", ">= 17", "got 16"):
        make_problem(2, q, k, v, 17)


def test_kernel_size_too_small():
    q, k, v = tensors()
    with raises(ValueError, "kernel_size[0]=1", ">= 2"):
        make_problem(2, q, k, v, (1, 3))
    with raises(ValueError, "kernel_size[1]=0", ">= 2"):
        make_problem(2, q, k, v, (3, 0))
    with raises(ValueError, "kernel_size[0]=-3", ">= 2"):
        make_problem(2, q, k, v, -3)


@pytest.mark.parametrize("stride", [5, 0, -1])
def test_stride_out_of_range(stride):
    q, k, v = tensors()
    with raises(ValueError, f"stride[0]={stride}", "1 <= stride <= kernel_size (=3)"):
        make_problem(2, q, k, v, 3, stride=(stride, 1))


def test_dilation_below_one():
    q, k, v = tensors()
    with raises(ValueError, "dilation[1]=0", ">= 1"):
        make_problem(2, q, k, v, 3, dilation=(1, 0))


@pytest.mark.parametrize("name,value", [
    ("kernel_size", (3, 3, 3)), ("stride", (1,)), ("dilation", [1, 1, 1]),
    ("is_causal", (True,)), ("kernel_size", ()),
])
def test_tuple_length_must_match_rank(name, value):
    q, k, v = tensors()
    arguments = {"kernel_size": 3, name: value}
    with raises(ValueError, f"{name}=", f"{len(value)} entries", "rank-2", "2 entries"):
        make_problem(2, q, k, v, **arguments)


@pytest.mark.parametrize("name,value,fragment", [
    ("kernel_size", True, "kernel_size[0]=True"), ("stride", (1, False), "stride[1]=False"),
    ("dilation", 1.0, "dilation[0]=1.0"), ("kernel_size", (3, "3"), "kernel_size[1]='3'"),
    ("is_causal", 1, "is_causal[0]=1"), ("is_causal", (False, None), "is_causal[1]=None"),
])
def test_parameter_types(name, value, fragment):
    q, k, v = tensors()
    arguments = {"kernel_size": 3, name: value}
    with raises(TypeError, fragment):
        make_problem(2, q, k, v, **arguments)


def test_rank():
    q, k, v = tensors()
    with raises(ValueError, "rank=4", "1, 2 or 3"):
        make_problem(4, q, k, v, 3)
    with raises(TypeError, "rank=True"):
        make_problem(True, q, k, v, 3)


@pytest.mark.parametrize("scale", [0, -1.0, math.inf, math.nan])
def test_scale_must_be_positive_and_finite(scale):
    q, k, v = tensors()
    with raises(ValueError, f"scale={float(scale)}", "positive finite"):
        make_problem(2, q, k, v, 3, scale=scale)


@pytest.mark.parametrize("scale", ["0.1", True, torch.tensor(0.1)])
def test_scale_type(scale):
    q, k, v = tensors()
    with raises(TypeError, "scale=", "real number"):
        make_problem(2, q, k, v, 3, scale=scale)


# ---- tensors ------------------------------------------------------------------------------------------

def test_tensors_must_be_tensors():
    q, k, v = tensors()
    with raises(TypeError, "q must be a torch.Tensor", "ndarray"):
        make_problem(2, q.numpy(), k, v, 3)
    with raises(TypeError, "k must be a torch.Tensor", "list"):
        make_problem(2, q, k.tolist(), v, 3)
    with raises(TypeError, "v must be a torch.Tensor", "NoneType"):
        make_problem(2, q, k, None, 3)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.complex64])
def test_unsupported_dtype(dtype):
    q, k, v = tensors(dtype=dtype)
    with raises(TypeError, f"q.dtype={dtype}", "float16, bfloat16, float32, float64"):
        make_problem(2, q, k, v, 3)


@pytest.mark.parametrize("rank,shape,layout", [
    (2, (2, 16, 4, 8), "[batch, H, W, heads, head_dim] (5 dims)"),
    (1, (2, 16, 16, 4, 8), "[batch, L, heads, head_dim] (4 dims)"),
    (3, (2, 16, 16, 4, 8), "[batch, D, H, W, heads, head_dim] (6 dims)"),
])
def test_q_layout_matches_rank(rank, shape, layout):
    q, k, v = tensors(shape)
    with raises(ValueError, f"q has rank-{rank} layout {layout}", f"got shape {shape}"):
        make_problem(rank, q, k, v, 3)


def test_k_must_match_q():
    q, _, v = tensors()
    k = torch.zeros(2, 16, 16, 4, 16)
    with raises(ValueError, "k must have q's shape (2, 16, 16, 4, 8)", "got (2, 16, 16, 4, 16)"):
        make_problem(2, q, k, v, 3)


@pytest.mark.parametrize("v_shape", [(2, 16, 16, 2, 8), (1, 16, 16, 4, 8), (2, 16, 4, 8)])
def test_v_must_match_q_except_head_dim(v_shape):
    q, k, _ = tensors()
    with raises(ValueError, "v must have q's shape (2, 16, 16, 4)", f"got {v_shape}"):
        make_problem(2, q, k, torch.zeros(v_shape), 3)


def test_dtypes_must_agree():
    q, k, v = tensors()
    with raises(ValueError, "q.dtype=torch.float32", "k.dtype=torch.float16", "share one dtype"):
        make_problem(2, q, k.half(), v, 3)


def test_devices_must_agree():
    q, k, v = tensors()
    # The meta device stands in for a second device on a CPU-only machine.
    with raises(ValueError, "q.device=cpu", "v.device=meta", "one device"):
        make_problem(2, q, k, v.to("meta"), 3)


@pytest.mark.parametrize("empty", ["batch", "heads", "head_dim", "head_dim_v"])
def test_empty_dimensions(empty):
    sizes = {"batch": 2, "heads": 4, "head_dim": 8, "head_dim_v": 8, empty: 0}
    q = torch.zeros(sizes["batch"], 16, 16, sizes["heads"], sizes["head_dim"])
    v = torch.zeros(sizes["batch"], 16, 16, sizes["heads"], sizes["head_dim_v"])
    with raises(ValueError, f"{empty}=0", ">= 1"):
        make_problem(2, q, q.clone(), v, 3)


# ---- extra tokens -------------------------------------------------------------------------------------

def test_extra_keys_and_values_come_together():
    q, k, v = tensors()
    extra = torch.zeros(2, 3, 4, 8)
    with raises(ValueError, "additional_keys given without additional_values"):
        make_problem(2, q, k, v, 3, additional_keys=extra)
    with raises(ValueError, "additional_values given without additional_keys"):
        make_problem(2, q, k, v, 3, additional_values=extra)


@pytest.mark.parametrize("keys_shape", [(1, 3, 4, 8), (2, 3, 2, 8), (2, 3, 4, 6), (3, 4, 8)])
def test_extra_keys_shape(keys_shape):
    q, k, v = tensors()
    with raises(ValueError, "additional_keys must have shape [batch=2, n_extra, heads=4, head_dim=8]",
                f"got {keys_shape}"):
        make_problem(2, q, k, v, 3, additional_keys=torch.zeros(keys_shape),
                     additional_values=torch.zeros(2, 3, 4, 8))


@pytest.mark.parametrize("values_shape", [(2, 5, 4, 6), (2, 3, 4, 8), (2, 3, 6)])
def test_extra_values_shape(values_shape):
    q, k, v = tensors(head_dim_v=6)
    with raises(ValueError, "additional_values must have shape [batch=2, n_extra=3, heads=4, "
                            "head_dim_v=6]", f"got {values_shape}"):
        make_problem(2, q, k, v, 3, additional_keys=torch.zeros(2, 3, 4, 8),
                     additional_values=torch.zeros(values_shape))


def test_extra_tokens_dtype_device_and_type():
    q, k, v = tensors()
    extra = torch.zeros(2, 3, 4, 8)
    with raises(ValueError, "additional_values.dtype=torch.float64", "q.dtype=torch.float32"):
        make_problem(2, q, k, v, 3, additional_keys=extra, additional_values=extra.double())
    with raises(ValueError, "additional_keys.device=meta", "q.device=cpu"):
        make_problem(2, q, k, v, 3, additional_keys=extra.to("meta"), additional_values=extra)
    with raises(TypeError, "additional_keys must be a torch.Tensor"):
        make_problem(2, q, k, v, 3, additional_keys=extra.tolist(), additional_values=extra)
    with raises(TypeError, "additional_values.dtype=torch.int32"):
        make_problem(2, q, k, v, 3, additional_keys=extra, additional_values=extra.int())
