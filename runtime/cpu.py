"""The "cpu" backend: generated C++ kernels (codegen/families/cpu.py), shared libraries called through ctypes.

Instance choice goes through runtime.selector with Target("cpu") on the manifest, with the problem's dtype
replaced by the compute type (f32 for f32/f16/bf16 inputs, f64 for f64). A problem no library instance
serves (a mixed causal mask, f64 causal, ...) gets an on-demand K=any spec, compiled once into the cache.
Backward runs the "bwd" twin of the chosen forward spec.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import struct
import threading
from typing import Optional

import torch

from . import selector
from .codegen import cpu_build
from .codegen.families import cpu as cpu_family
from .codegen.spec import ANY, KernelSpec
from .manifest import Instance
from .problem import Problem

log = logging.getLogger("natgen.cpu")

# Same order as natgen::Args in templates/natgen_cpu.h (every field 8 bytes). runner() and backward()'s direct
# float32 call write the 14 pointer fields by position.
ARG_FIELDS = (
    "q", "k", "v", "out", "lse", "extra_k", "extra_v",
    "grad_out", "grad_lse", "grad_q", "grad_k", "grad_v", "grad_extra_k", "grad_extra_v",
    "batch", "heads", "head_dim", "head_dim_v", "n_extra", "threads",
    "length0", "length1", "length2", "kernel0", "kernel1", "kernel2", "stride0", "stride1", "stride2",
    "dilation0", "dilation1", "dilation2", "causal0", "causal1", "causal2",
    "scale",
)
assert len(ARG_FIELDS) == cpu_family.ARG_FIELD_COUNT



_AVAILABLE = []


def available() -> bool:
    # asked on every call (resolve_backend): decided once per process, since looking the compiler up
    # again (environment reads) cost ~8 us a call
    if not _AVAILABLE:
        _AVAILABLE.append(cpu_build.find_compiler() is not None)
    return _AVAILABLE[0]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _on_demand(problem: Problem, op: str) -> Instance:
    dtype = "f64" if problem.dtype == torch.float64 else "f32"
    spec = KernelSpec("cpu", op, problem.rank, ANY, ANY, tuple(problem.is_causal), dtype, ANY,
                      cpu_family.TILES[problem.rank], "cpu")
    return Instance(spec, {"name": spec.name, "launch": cpu_family.launch(spec), "on_demand": True})


def choose(problem: Problem, arch: Optional[str] = None) -> Instance:
    return _choose(problem)


@functools.lru_cache(maxsize=256)  # ranking the whole manifest costs ~ms; a problem's answer never changes
def _choose(problem: Problem) -> Instance:
    compute_problem = dataclasses.replace(problem, dtype=compute_dtype(problem.dtype))
    try:
        return selector.select(compute_problem, selector.Target("cpu")).instance
    except (selector.NoKernelError, FileNotFoundError) as exc:
        log.info("natgen: %s; compiling a K=any CPU instance on demand", exc)
        return _on_demand(compute_problem, "fwd")


def _twin(instance: Instance, op: str) -> KernelSpec:
    return dataclasses.replace(instance.spec, op=op)


_ARGS_STRUCT = struct.Struct(f"={len(ARG_FIELDS) - 1}qd")
_POINTERS = ARG_FIELDS[:ARG_FIELDS.index("batch")]  # the tensor addresses lead the block
_POINTER_STRUCT = struct.Struct(f"={len(_POINTERS)}q")


@functools.lru_cache(maxsize=256)
def _static_args(problem: Problem, threads: int) -> bytes:
    """The argument block with every tensor address 0: what depends on the problem alone."""
    pad = 3 - problem.rank
    values = {name: 0 for name in ARG_FIELDS}
    values.update(batch=problem.batch, heads=problem.heads, head_dim=problem.head_dim,
                  head_dim_v=problem.head_dim_v, n_extra=problem.n_extra, threads=threads)
    for axis in range(3):
        real = axis - pad
        values[f"length{axis}"] = problem.spatial[real] if real >= 0 else 1
        values[f"kernel{axis}"] = problem.kernel_size[real] if real >= 0 else 1
        values[f"stride{axis}"] = problem.stride[real] if real >= 0 else 1
        values[f"dilation{axis}"] = problem.dilation[real] if real >= 0 else 1
        values[f"causal{axis}"] = int(problem.is_causal[real]) if real >= 0 else 0
    return _ARGS_STRUCT.pack(*[values[name] for name in ARG_FIELDS[:-1]], float(problem.scale))


_BLOCKS = threading.local()  # per thread: (problem, threads) -> (argument block, its address)


def _block(problem: Problem, threads: int):
    """(bytearray, its address) of this thread's argument block for the problem (a per-thread cache: a call
    reads its block synchronously, and another thread has its own)."""
    blocks = getattr(_BLOCKS, "blocks", None)
    if blocks is None or len(blocks) > 256:
        blocks = _BLOCKS.blocks = {}
    entry = blocks.get((problem, threads))
    if entry is None:
        data = bytearray(_static_args(problem, threads))
        view = (ctypes.c_char * len(data)).from_buffer(data)
        entry = blocks[(problem, threads)] = (data, ctypes.addressof(view), view)
    return entry


def _pack(problem: Problem, tensors: dict, threads: int) -> int:
    """Address of this thread's argument block for the problem, with the tensor addresses written in."""
    entry = _block(problem, threads)
    _POINTER_STRUCT.pack_into(entry[0], 0, *[tensors[name].data_ptr() if tensors.get(name) is not None else 0
                                             for name in _POINTERS])
    return entry[1]


@functools.lru_cache(maxsize=256)
def _modules(problem: Problem, op: str):
    instance = choose(problem)
    return instance, cpu_build.load(_twin(instance, op))


def _prepare(tensor, dtype):
    if tensor is None:
        return None
    if tensor.dtype == dtype and tensor.is_contiguous():
        return tensor  # only its address is read (detach() alone costs ~1 us)
    return tensor.detach().to(dtype).contiguous()


def forward(problem: Problem, q, k, v, extra_k, extra_v, arch=None):
    instance, module = _modules(problem, "fwd")
    dtype = compute_dtype(problem.dtype)
    q_, k_, v_, ek_, ev_ = (_prepare(t, dtype) for t in (q, k, v, extra_k, extra_v))
    out = torch.empty(*q.shape[:-1], problem.head_dim_v, dtype=dtype)
    lse = torch.empty(*q.shape[:-1], dtype=dtype)
    args = _pack(problem, dict(q=q_, k=k_, v=v_, out=out, lse=lse, extra_k=ek_, extra_v=ev_),
                 torch.get_num_threads())
    module.run(args, len(ARG_FIELDS))
    if dtype != problem.dtype:
        out = out.to(problem.dtype)
    if dtype != torch.float32:
        lse = lse.to(torch.float32)
    return out, lse, instance.name


def runner(problem: Problem):
    """A callable (q, k, v) -> (out, lse) for float32 calls without extra tokens, or None: everything forward()
    derives from the problem is done once here. It returns None for tensors it cannot pass as they are (not
    contiguous), and the caller takes the full path."""
    dtype = torch.float32
    if problem.n_extra or problem.dtype != dtype:
        return None
    _, module = _modules(problem, "fwd")
    out_shape = (problem.batch, *problem.spatial, problem.heads, problem.head_dim_v)
    lse_shape = out_shape[:-1]
    call, fields, pack_into, empty = module.run, len(ARG_FIELDS), _POINTER_STRUCT.pack_into, torch.empty
    tail = (0,) * (len(_POINTERS) - 5)
    get_threads = torch.get_num_threads

    def run(q, k, v):
        if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
            return None
        entry = _block(problem, get_threads())
        out, lse = empty(out_shape, dtype=dtype), empty(lse_shape, dtype=dtype)
        pack_into(entry[0], 0, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), *tail)
        call(entry[1], fields)
        return out, lse

    return run


def backward(problem: Problem, q, k, v, extra_k, extra_v, out, lse, grad_out, grad_lse):
    instance, module = _modules(problem, "bwd")
    dtype = compute_dtype(problem.dtype)
    if (problem.dtype == torch.float32 and extra_k is None and grad_lse is None and q.is_contiguous() and
            k.is_contiguous() and v.is_contiguous() and out.is_contiguous() and grad_out.is_contiguous() and
            lse.is_contiguous()):
        # the common case, without the general path's conversions (~15 us a call)
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        entry = _block(problem, torch.get_num_threads())
        _POINTER_STRUCT.pack_into(entry[0], 0, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                  lse.data_ptr(), 0, 0, grad_out.data_ptr(), 0, grad_q.data_ptr(),
                                  grad_k.data_ptr(), grad_v.data_ptr(), 0, 0)
        module.run(entry[1], len(ARG_FIELDS))
        return grad_q, grad_k, grad_v, None, None
    q_, k_, v_, ek_, ev_, do_, out_ = (_prepare(t, dtype) for t in (q, k, v, extra_k, extra_v, grad_out, out))
    grad_lse_ = _prepare(grad_lse, dtype)
    # the saved lse is float32: exact for f32 compute; f64 recomputes the normalizer in the kernel
    saved_lse = _prepare(lse, dtype) if dtype == torch.float32 else None
    # torch.empty, not zeros: each kernel work unit zeroes the key grads it owns, saving a separate pass
    grads = {name: torch.empty_like(t) if t is not None else None
             for name, t in (("grad_q", q_), ("grad_k", k_), ("grad_v", v_), ("grad_extra_k", ek_),
                             ("grad_extra_v", ev_))}
    args = _pack(problem, dict(q=q_, k=k_, v=v_, extra_k=ek_, extra_v=ev_, out=out_, grad_out=do_,
                               grad_lse=grad_lse_, lse=saved_lse, **grads), torch.get_num_threads())
    module.run(args, len(ARG_FIELDS))
    result = []
    for name, original in (("grad_q", q), ("grad_k", k), ("grad_v", v), ("grad_extra_k", extra_k),
                           ("grad_extra_v", extra_v)):
        grad = grads[name]
        result.append(None if grad is None else grad.to(original.dtype))
    return tuple(result)


def _register():
    from .ops import Backend, register_backend
    register_backend(Backend("cpu", forward, "cpu", available, choose, backward=backward, runner=runner))


_register()
