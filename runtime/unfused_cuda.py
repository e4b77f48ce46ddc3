"""The unfused (natten-style) ops on generated kernels: the CUDA families unqk, unav, uninv, unrpb, and (through
natgen.unfused_cpu) the CPU families cpuqk, cpuav, cpuinv, cpurpb, which have the same four kinds.

natgen.functional's na*d_qk / na*d_av run here for CUDA tensors (CuPy), for backend="emulator" (CPU tensors
through the emulator) and for backend="cpu" (CPU tensors on the CPU kernels: the default where a C++
compiler is found); the torch implementation (natgen.unfused) is the reference and the fallback. Heads-first
tensors [batch, heads, *spatial, channels]; the Problem comes from problem.make_unfused_qk_problem /
make_unfused_av_problem. qk's backward is d query = av(d logits, key), d key = the inverse neighborhood of
(d logits, query), d rpb = the per-offset sum of d logits; av's backward is d attn = qk(grad_out, value)
(hidden slots 0), d value = the inverse neighborhood of (attn, grad_out). The extra tokens' gradients are one
dense product each (torch).
"""
from __future__ import annotations

import dataclasses

import torch

from .launch import plan as launch_plan
from .manifest import family_instance
from .problem import Problem
from .spec import TORCH_DTYPE_TOKENS

FAMILIES = {"qk": "unqk", "av": "unav", "inverse": "uninv", "rpb_grad": "unrpb"}


def instance_for(operation: str, rank: int, dtype_token: str):
    return family_instance(FAMILIES[operation], rank, dtype_token)


def backend_for(tensor, backend):
    if backend is None:
        backend = "cuda" if tensor.device.type == "cuda" else "emulator"
    if backend not in ("cuda", "emulator"):
        raise ValueError(f"backend={backend!r} must be 'cuda' or 'emulator' for the unfused CUDA kernels")
    if (backend == "cuda") != (tensor.device.type == "cuda"):
        raise ValueError(f"backend={backend!r} does not run {tensor.device.type} tensors")
    return backend


def launch(operation: str, problem: Problem, backend: str, out: torch.Tensor, zero_masked: bool = False,
           **tensors) -> torch.Tensor:
    """Run one unfused kernel: the pointers by ABI name (absent ones are null), `out` written in place.
    zero_masked (the CPU qk kind only): 0 instead of -inf in the slots a causal window hides."""
    if backend == "cpu":
        from . import unfused_cpu
        return unfused_cpu.launch(operation, problem, out, zero_masked, **tensors)
    instance = instance_for(operation, problem.rank, TORCH_DTYPE_TOKENS[str(problem.dtype).replace("torch.", "")])
    plan = launch_plan(instance, problem)
    tensors = dict(tensors, out=out)
    ordered = [None if tensors.get(name) is None else tensors[name].contiguous() for _, name in plan.pointers]
    if backend == "emulator":
        from .emulated import emulator_launcher
        emulator_launcher(instance, plan)(ordered)
    else:
        from . import cuda
        device = out.device
        index = device.index if device.index is not None else torch.cuda.current_device()
        function = cuda._function(instance, cuda.device_arch(device), index)
        cupy = cuda.cupy_module()

        def stream_of():
            return cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream, index)

        cuda.cupy_launcher(function, plan, stream_of, index)(ordered)
    return out


def qk_forward(problem, backend, query, key, extra_k=None, rpb=None, zero_masked=False):
    shape = (problem.batch, problem.heads, *problem.spatial, problem.window + problem.n_extra)
    out = torch.empty(shape, dtype=query.dtype, device=query.device)
    return launch("qk", problem, backend, out, zero_masked, x=query, y=key, extra=extra_k, rpb=rpb)


def av_forward(problem, backend, attn, value, extra_v=None):
    shape = (problem.batch, problem.heads, *problem.spatial, value.shape[-1])
    out = torch.empty(shape, dtype=value.dtype, device=value.device)
    return launch("av", dataclasses.replace(problem, head_dim=value.shape[-1]), backend, out, attn=attn, y=value,
                  extra=extra_v)


def inverse(problem, backend, attn, x):
    """out[key] = sum over the queries reaching the key of attn[query, slot] * x[query]."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return launch("inverse", dataclasses.replace(problem, head_dim=x.shape[-1]), backend, out, attn=attn, x=x)


def _extra_grad(weights, x, window):
    """d extra[e] = sum over queries of weights[query, window + e] * x[query] (one dense product)."""
    flat_w = weights.flatten(2, -2)[..., window:]           # [b, h, n, e]
    flat_x = x.flatten(2, -2)                               # [b, h, n, c]
    return torch.einsum("bhne,bhnc->bhec", flat_w.to(torch.float32 if x.dtype != torch.float64 else x.dtype),
                        flat_x.to(torch.float32 if x.dtype != torch.float64 else x.dtype)).to(x.dtype)


def qk_backward(problem, backend, query, key, extra_k, grad_logits, needs=(True, True, True, True)):
    """(grad_query, grad_key, grad_additional_keys, grad_rpb) of qk_forward for the logits' cotangent:
    d query = av(d logits, key), d key = the inverse neighborhood of (d logits, query), d rpb per offset."""
    grad_logits = grad_logits.contiguous()
    grad_q = av_forward(problem, backend, grad_logits, key, extra_k) if needs[0] else None
    grad_k = inverse(problem, backend, grad_logits, query) if needs[1] else None
    grad_extra = _extra_grad(grad_logits, query, problem.window) if extra_k is not None and needs[2] else None
    grad_rpb = None
    if problem.has_rpb and needs[3]:
        shape = (problem.heads, *(2 * K - 1 for K in problem.kernel_size))
        grad_rpb = launch("rpb_grad", problem, backend, torch.empty(shape, dtype=query.dtype, device=query.device),
                          attn=grad_logits)
    return grad_q, grad_k, grad_extra, grad_rpb


def av_backward(problem, backend, attn, value, extra_v, grad_out, needs=(True, True, True)):
    """(grad_attn, grad_value, grad_additional_values) of av_forward for the output's cotangent: d attn =
    qk(grad_out, value) with the hidden slots 0, d value = the inverse neighborhood of (attn, grad_out)."""
    grad_out = grad_out.contiguous()
    grad_attn = grad_value = grad_extra = None
    if needs[0]:
        # slots a causal window hides get no gradient: the CPU kernel writes 0 there, the CUDA one -inf
        grad_attn = qk_forward(dataclasses.replace(problem, has_rpb=False), backend, grad_out, value, extra_v,
                               zero_masked=True)
        if backend != "cpu":
            grad_attn.masked_fill_(grad_attn == float("-inf"), 0)
    if needs[1]:
        grad_value = inverse(problem, backend, attn, grad_out)
    if extra_v is not None and needs[2]:
        grad_extra = _extra_grad(attn, grad_out, problem.window)
    return grad_attn, grad_value, grad_extra
