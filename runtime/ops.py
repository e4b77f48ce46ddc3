"""The public ops: natgen.na1d / na2d / na3d, natgen.choose, and run_instance for tests and debugging.

A call is validated and resolved once (natgen.registry), then cached under the facts it depends on: every
later call with the same shapes, dtypes, devices and arguments goes straight to the resolved call.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import backends  # noqa: F401  (registers every backend)
from .arch import arch_number
from .autograd import EagerNA, _contiguous
from .dq_scheme import dq_scheme
from .problem import _per_dim_bools, _per_dim_ints, make_problem
from .reference import na_reference
from .registry import BACKENDS, resolve_call  # noqa: F401  (BACKENDS: natgen.ops.BACKENDS["cpu"] etc.)


def _check_arch(arch):
    if arch is not None:
        arch_number(arch)  # raises ValueError naming the argument and the expected form


# Resolved calls: every fact the full path reads from a call (see _call_key) -> (problem, Resolved). A model
# calls an op with the same shapes and arguments over and over; resolution (validation, selection, module
# loading, launch planning) then happens once.
_CALLS: dict = {}
_CALLS_MAX = 512


def _kinds(value):
    kind = type(value)
    return (kind, *map(type, value)) if kind is tuple or kind is list else kind


def _frozen(value):
    return tuple(value) if type(value) is list else value


_SCALAR_TYPES = frozenset((int, bool, float, str, type(None)))


def _call_key(rank, tensors, arguments):
    """The call's facts, or None (the full path then runs, with its errors): each tensor's shape, dtype and
    device (plain tensors only; None for absent extra tokens), and each argument with its type (True and 1
    stay apart, as do 7 and 7.0, and a list from a tuple)."""
    facts = [rank]
    for tensor in tensors:
        if tensor is None:
            facts.append(None)
        elif type(tensor) is not torch.Tensor:
            return None
        else:
            facts += (tensor.shape, tensor.dtype, tensor.device)
    kinds = tuple(map(type, arguments))
    if _SCALAR_TYPES.issuperset(kinds):  # the common case: every argument a plain scalar
        return (*facts, *arguments, *kinds)
    return (*facts, *map(_frozen, arguments), *map(_kinds, arguments))


def resolve(rank, q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, additional_keys=None,
            additional_values=None, backend=None, arch=None, rpb=None):
    """(problem, Resolved) for a call, from the cache when it was resolved before."""
    # the dQ scheme in force picks the backward instance a resolved call holds (natgen.backward_options)
    key = _call_key(rank, (q, k, v, additional_keys, additional_values, rpb),
                    (kernel_size, stride, dilation, is_causal, scale, backend, arch, dq_scheme()))
    try:
        entry = _CALLS.get(key) if key is not None else None
    except TypeError:  # an unhashable argument: the full path reports what is wrong with it
        entry = key = None
    if entry is None:
        _check_arch(arch)
        problem = make_problem(rank, q, k, v, kernel_size, stride, dilation, is_causal, scale,
                               additional_keys, additional_values, rpb)
        entry = (problem, resolve_call(problem, backend, arch))
        if key is not None:
            if len(_CALLS) >= _CALLS_MAX:
                _CALLS.clear()
            _CALLS[key] = entry
    return entry


def _through_torch_op(q) -> bool:
    """Whether a call goes through the registered torch op (natgen.torch_ops): under torch.compile or export
    (fake tensors), for meta tensors, and for tensor subclasses; plain eager calls take the resolved call directly (with gradients through EagerNA), which
    costs a few microseconds instead of the dispatcher's hundreds."""
    return type(q) is not torch.Tensor or q.device.type == "meta" or torch.compiler.is_compiling()


def _op_arguments(rank, kernel_size, stride, dilation, is_causal, scale):
    """Per-axis arguments as the op's lists, validated as make_problem does (a bool kernel size stays an error)."""
    if isinstance(rank, bool) or rank not in (1, 2, 3):
        raise ValueError(f"rank={rank!r} must be 1, 2 or 3")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale={scale!r} must be a real number, got {type(scale).__name__}")
    return (list(_per_dim_ints("kernel_size", kernel_size, rank)), list(_per_dim_ints("stride", stride, rank)),
            list(_per_dim_ints("dilation", dilation, rank)), list(_per_dim_bools("is_causal", is_causal, rank)),
            None if scale is None else float(scale))


def neighborhood_attention(rank, q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
                           additional_keys=None, additional_values=None, return_lse=False, backend=None,
                           arch=None, rpb=None):
    if not _through_torch_op(q):
        problem, resolved = resolve(rank, q, k, v, kernel_size, stride, dilation, is_causal, scale,
                                    additional_keys, additional_values, backend, arch, rpb)
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or (
            additional_keys is not None and (additional_keys.requires_grad or additional_values.requires_grad))
            or (rpb is not None and rpb.requires_grad))
        if resolved.backend == "reference":
            # differentiable as it stands (torch ops, checkpointed chunks)
            return na_reference(q, k, v, problem, additional_keys, additional_values, return_lse=return_lse,
                                rpb=rpb)
        if not needs_grad:
            fast = resolved.fast
            if fast is not None and additional_keys is None and rpb is None:
                result = fast(q, k, v, return_lse)
                if result is not None:
                    return result if return_lse else result[0]
            tensors = [_contiguous(t) for t in (q, k, v, additional_keys, additional_values, rpb)]
            out, lse = resolved.forward(*tensors)
            return (out, lse) if return_lse else out
        out, lse = EagerNA.apply(q, k, v, additional_keys, additional_values, rpb, problem, resolved)
        return (out, lse) if return_lse else out
    _check_arch(arch)
    from . import torch_ops  # noqa: F401  (registers the natgen ops)
    out, lse = torch.ops.natgen.na_forward(q, k, v, additional_keys, additional_values,
                                           *_op_arguments(rank, kernel_size, stride, dilation, is_causal, scale),
                                           backend, arch, rpb)
    return (out, lse) if return_lse else out


def choose(rank, q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, additional_keys=None,
           additional_values=None, backend=None, arch=None, op="forward", rpb=None) -> Tuple[str, Optional[str]]:
    """(backend, instance name) that a call with these arguments would run for `op` ("forward" or
    "backward"); the instance is None where the reference runs (for a backward: where the chosen backend has
    no backward kernel for the problem, so its gradients are recomputed through the reference)."""
    from .selector import op_token
    token = op_token(op)
    _, resolved = resolve(rank, q, k, v, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                          additional_values, backend, arch, rpb)
    if token == "fwd":
        return resolved.backend, (resolved.instance.name if resolved.instance is not None else None)
    instance = resolved.backward_instance
    return resolved.backward_backend, (instance.name if instance is not None else None)


def run_instance(name, rank, q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
                 additional_keys=None, additional_values=None, via="emulator", seed=None, rpb=None):
    """Run one named CUDA instance (bypassing the selector) on the GPU (`via="cuda"`) or through the
    emulator (`via="emulator"`, CPU tensors; `seed` shuffles its thread schedule); `rpb` adds a relative
    positional bias. Returns (out, lse). For
    tests and debugging; the instance must support the problem, which is checked first."""
    from . import selector
    from .manifest import find
    problem = make_problem(rank, q, k, v, kernel_size, stride, dilation, is_causal, scale,
                           additional_keys, additional_values, rpb)
    instance = find(name)
    arch = "sm_90" if via == "emulator" or instance.spec.arch == "sm_90" else "sm_80"
    reasons = selector.not_supported_reasons(instance, problem, selector.Target("cuda", arch), instance.spec.op)
    if reasons:
        raise ValueError(f"instance {name} cannot run this problem: {'; '.join(reasons)}")
    if via == "emulator":
        from . import emulated
        call = emulated.kernel_call(instance, problem, seed)
    elif via == "cuda":
        from . import cuda
        index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        call = cuda.kernel_call(instance, problem, cuda.device_arch(q.device), index)
    else:
        raise ValueError(f"via={via!r} must be 'emulator' or 'cuda'")
    tensors = [_contiguous(t) for t in (q, k, v, additional_keys, additional_values, rpb)]
    return call(*tensors)


def _op(rank):
    def op(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, additional_keys=None,
           additional_values=None, return_lse=False, backend=None, arch=None, rpb=None):
        return neighborhood_attention(rank, q, k, v, kernel_size, stride, dilation, is_causal, scale,
                                      additional_keys, additional_values, return_lse, backend, arch, rpb)
    op.__name__ = f"na{rank}d"
    op.__qualname__ = op.__name__
    op.__doc__ = (f"{rank}-D neighborhood attention on [batch, {', '.join('XYZ'[:rank])}, heads, head_dim] tensors.\n\n"
                  "kernel_size, stride, dilation, is_causal: an int/bool or one per spatial dim. "
                  "additional_keys/values: [batch, n_extra, heads, head_dim], attended by every query. "
                  "return_lse also returns the float32 log-sum-exp [batch, *spatial, heads]. backend: None "
                  "(best available), 'reference', 'cuda', 'cpu' or 'emulator'. arch: with backend='emulator', "
                  "the GPU arch whose instance choice is emulated (default sm_80). rpb: a relative positional bias "
                  "[heads, 2*K_0-1, ...] added to the scaled logits (docs/semantics.md).")
    return op


na1d, na2d, na3d = _op(1), _op(2), _op(3)
