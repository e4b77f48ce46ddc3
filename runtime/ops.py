"""natgen.na1d / na2d / na3d: validation, backend choice, autograd."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from . import launch as launch_mod
from . import selector
from .manifest import Instance
from .problem import Problem, make_problem
from .reference import na_reference

log = logging.getLogger("natgen")

EMULATED_ARCH = "sm_80"


@dataclass
class Backend:
    """forward(problem, q, k, v, extra_k, extra_v, arch) -> (out, lse, instance name or None).
    backward(ctx_tensors..., grad_out, grad_lse) -> grads, or None to recompute through the reference."""
    name: str
    forward: Callable
    device_type: str                      # "cuda" or "cpu": the tensors it takes
    available: Callable[[], bool]
    choose: Callable[[Problem, str], Optional[Instance]]   # raises NoKernelError when nothing fits
    backward: Optional[Callable] = None
    # runner(problem) -> None, or a callable (q, k, v) -> (out, lse) for calls without extra tokens or grads,
    # which returns None where it cannot take the tensors as they are (the full path then runs)
    runner: Optional[Callable] = None


BACKENDS: Dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    BACKENDS[backend.name] = backend


# ------------------------------------------------------------------------------------------- backends
def _cuda_available() -> bool:
    from . import cuda
    return cuda.available()


def _cuda_target(problem: Problem, arch: Optional[str]) -> selector.Target:
    from . import cuda
    if arch is None:
        return selector.Target("cuda", cuda.device_arch(problem.device), cuda.device_sms(problem.device))
    return selector.Target("cuda", arch)


def _choose_cuda(problem: Problem, arch: Optional[str] = None) -> Instance:
    return selector.select(problem, _cuda_target(problem, arch)).instance


def _launch(instance, problem, q, k, v, extra_k, extra_v, via):
    """Allocate outputs, plan and run one CUDA instance on the GPU (via="cuda") or the emulator."""
    buffers = launch_mod.allocate(problem, q, k, v, extra_k, extra_v)
    plan = launch_mod.plan(instance, problem, buffers)
    if via == "emulator":
        from . import emulator
        emulator.launch(instance.source_path.read_text(), instance.entry["symbol"], plan.grid, plan.block,
                        plan.args, shared_mem=plan.shared_mem)
    elif via == "cuda":
        from . import cuda
        cuda.run(instance, plan, q.device)
    else:
        raise ValueError(f"via={via!r} must be 'emulator' or 'cuda'")
    return buffers.out, buffers.lse


def _forward_cuda(problem, q, k, v, extra_k, extra_v, arch=None):
    instance = _choose_cuda(problem, arch)
    return (*_launch(instance, problem, q, k, v, extra_k, extra_v, "cuda"), instance.name)


def _emulator_available() -> bool:
    try:
        from . import emulator  # noqa: F401
        return hasattr(emulator, "launch")
    except ImportError:
        return False


def _choose_emulated(problem: Problem, arch: Optional[str] = None) -> Instance:
    return selector.select(problem, selector.Target("cuda", arch or EMULATED_ARCH)).instance


def _forward_emulated(problem, q, k, v, extra_k, extra_v, arch=None):
    instance = _choose_emulated(problem, arch)
    return (*_launch(instance, problem, q, k, v, extra_k, extra_v, "emulator"), instance.name)


def _reference_forward(problem, q, k, v, extra_k, extra_v, arch=None):
    out, lse = na_reference(q, k, v, problem, extra_k, extra_v, return_lse=True)
    return out, lse, None


register_backend(Backend("reference", _reference_forward, "any", lambda: True, lambda p, a=None: None))
register_backend(Backend("cuda", _forward_cuda, "cuda", _cuda_available, _choose_cuda))
register_backend(Backend("emulator", _forward_emulated, "cpu", _emulator_available, _choose_emulated))


def resolve_backend(problem: Problem, backend: Optional[str]) -> str:
    device_type = problem.device.type
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} must be one of {sorted(BACKENDS)} or None")
        chosen = BACKENDS[backend]
        if chosen.device_type not in ("any", device_type):
            raise ValueError(f"backend={backend!r} runs on {chosen.device_type} tensors, got {device_type} tensors")
        if not chosen.available():
            raise RuntimeError(f"backend={backend!r} is not available here"
                               + (": install CuPy (natgen[cuda13]) and use a CUDA device" if backend == "cuda" else ""))
        return backend
    preferred = {"cuda": ["cuda"], "cpu": ["cpu"]}.get(device_type, [])
    for name in preferred:
        candidate = BACKENDS.get(name)
        if candidate is None or not candidate.available():
            continue
        try:
            candidate.choose(problem)
            return name
        except selector.NoKernelError as exc:
            log.info("natgen: %s; using the reference backend", exc)
    return "reference"


# ------------------------------------------------------------------------------------------- autograd
def _reference_grads(problem, tensors, grad_out, grad_lse):
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(True) if t is not None else None for t in tensors]
        q, k, v, extra_k, extra_v = inputs
        out, lse = na_reference(q, k, v, problem, extra_k, extra_v, return_lse=True)
        outputs, cotangents = [out], [grad_out]
        if grad_lse is not None:
            outputs.append(lse)
            cotangents.append(grad_lse)
        wanted = [t for t in inputs if t is not None]
        grads = iter(torch.autograd.grad(outputs, wanted, cotangents, allow_unused=True))
    return tuple(next(grads) if t is not None else None for t in inputs)


class _NeighborhoodAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem, backend_name, arch, runner, q, k, v, extra_k, extra_v):
        result = runner(q, k, v) if runner is not None else None
        if result is not None:
            out, lse = result
        else:
            out, lse, _ = BACKENDS[backend_name].forward(problem, q, k, v, extra_k, extra_v, arch)
        ctx.problem, ctx.backend_name = problem, backend_name
        ctx.set_materialize_grads(False)  # an unused lse arrives as None, not as a tensor of zeros
        ctx.save_for_backward(q, k, v, extra_k, extra_v, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, extra_k, extra_v, out, lse = ctx.saved_tensors
        backend = BACKENDS[ctx.backend_name]
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if backend.backward is not None:
            grads = backend.backward(ctx.problem, q, k, v, extra_k, extra_v, out, lse, grad_out, grad_lse)
        else:
            # backends without generated backward kernels recompute through the O(N*K) reference
            grads = _reference_grads(ctx.problem, (q, k, v, extra_k, extra_v), grad_out, grad_lse)
        return (None, None, None, None, *grads)


def _contiguous(tensor):
    return tensor.contiguous() if tensor is not None else None


def _check_arch(arch):
    if arch is not None:
        from .codegen.nvcc import arch_number
        arch_number(arch)  # raises ValueError naming the argument and the expected form


# Resolved calls: every fact the full path reads from a call (see _call_key) -> (problem, backend name, runner or
# None). A model calls an op with the same shapes and arguments over and over; on a 0.3 ms CPU call the full
# path (validation, backend choice, output allocation through the generic forward) cost ~25 us.
_CALLS: dict = {}
_CALLS_MAX = 512


def _kinds(value):
    kind = type(value)
    return (kind, *map(type, value)) if kind is tuple or kind is list else kind


def _frozen(value):
    return tuple(value) if type(value) is list else value


def _call_key(rank, tensors, arguments):
    """The call's facts, or None (the full path then runs, with its errors): each tensor's shape, dtype and
    device (plain tensors only; None for absent extra tokens), and each argument with its type (True and 1
    stay apart, as do 7 and 7.0)."""
    facts = [rank]
    for tensor in tensors:
        if tensor is None:
            facts.append(None)
        elif type(tensor) is not torch.Tensor:
            return None
        else:
            facts += (tensor.shape, tensor.dtype, tensor.device)
    key = (*facts, *map(_frozen, arguments), *map(_kinds, arguments))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _resolve_call(rank, q, k, v, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                  additional_values, backend, arch):
    _check_arch(arch)
    problem = make_problem(rank, q, k, v, kernel_size, stride, dilation, is_causal, scale,
                           additional_keys, additional_values)
    name = resolve_backend(problem, backend)
    factory = BACKENDS[name].runner if name != "reference" else None
    return problem, name, factory(problem) if factory is not None else None


def neighborhood_attention(rank, q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
                           additional_keys=None, additional_values=None, return_lse=False, backend=None,
                           arch=None):
    key = _call_key(rank, (q, k, v, additional_keys, additional_values),
                    (kernel_size, stride, dilation, is_causal, scale, backend, arch))
    entry = _CALLS.get(key) if key is not None else None
    if entry is None:
        entry = _resolve_call(rank, q, k, v, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                              additional_values, backend, arch)
        if key is not None:
            if len(_CALLS) >= _CALLS_MAX:
                _CALLS.clear()
            _CALLS[key] = entry
    problem, name, runner = entry
    if runner is not None and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or
                                                                v.requires_grad)):
        result = runner(q, k, v)
        if result is not None:
            return result if return_lse else result[0]
    if name == "reference":
        return na_reference(q, k, v, problem, additional_keys, additional_values, return_lse=return_lse)
    tensors = [_contiguous(t) for t in (q, k, v, additional_keys, additional_values)]
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if needs_grad:
        out, lse = _NeighborhoodAttention.apply(problem, name, arch, runner, *tensors)
    else:
        out, lse, _ = BACKENDS[name].forward(problem, *tensors, arch)
    return (out, lse) if return_lse else out


def choose(rank, q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, additional_keys=None,
           additional_values=None, backend=None, arch=None) -> Tuple[str, Optional[str]]:
    """(backend, instance name) that a call with these arguments would run; the instance is None for the
    reference."""
    _check_arch(arch)
    problem = make_problem(rank, q, k, v, kernel_size, stride, dilation, is_causal, scale,
                           additional_keys, additional_values)
    name = resolve_backend(problem, backend)
    instance = BACKENDS[name].choose(problem, arch) if name != "reference" else None
    return name, (instance.name if instance is not None else None)


def run_instance(name, rank, q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
                 additional_keys=None, additional_values=None, via="emulator"):
    """Run one named CUDA instance (bypassing the selector) on the GPU (`via="cuda"`) or through the
    emulator (`via="emulator"`, CPU tensors). Returns (out, lse). For tests and debugging; the instance
    must support the problem, which is checked first."""
    from .manifest import find
    problem = make_problem(rank, q, k, v, kernel_size, stride, dilation, is_causal, scale,
                           additional_keys, additional_values)
    instance = find(name)
    arch = "sm_90" if via == "emulator" or instance.spec.arch == "sm90" else "sm_80"
    reasons = selector.not_supported_reasons(instance, problem, selector.Target("cuda", arch))
    if reasons:
        raise ValueError(f"instance {name} cannot run this problem: {'; '.join(reasons)}")
    tensors = [_contiguous(t) for t in (q, k, v, additional_keys, additional_values)]
    return _launch(instance, problem, *tensors, via)


def _op(rank):
    def op(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, additional_keys=None,
           additional_values=None, return_lse=False, backend=None, arch=None):
        return neighborhood_attention(rank, q, k, v, kernel_size, stride, dilation, is_causal, scale,
                                      additional_keys, additional_values, return_lse, backend, arch)
    op.__name__ = f"na{rank}d"
    op.__qualname__ = op.__name__
    op.__doc__ = (f"{rank}-D neighborhood attention on [batch, {', '.join('XYZ'[:rank])}, heads, head_dim] tensors.\n\n"
                  "kernel_size, stride, dilation, is_causal: an int/bool or one per spatial dim. "
                  "additional_keys/values: [batch, n_extra, heads, head_dim], attended by every query. "
                  "return_lse also returns the float32 log-sum-exp [batch, *spatial, heads]. backend: None "
                  "(best available), 'reference', 'cuda', 'cpu' or 'emulator'. arch: with backend='emulator', "
                  "the GPU arch whose instance choice is emulated (default sm_80).")
    return op


na1d, na2d, na3d = _op(1), _op(2), _op(3)

from . import cpu  # noqa: F401,E402  (registers the generated-C++ CPU backend; unavailable without a compiler)
