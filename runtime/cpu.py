"""The "cpu" backend: generated C++ kernels (the cpu family), shared libraries called through ctypes.

Instances are chosen by natgen.selector with Target("cpu") on the manifest, with the problem's dtype
replaced by the compute type (f32 for f32/f16/bf16 inputs, f64 for f64); every valid problem has one (the
default library holds a K=any instance for every causal mask and compute type). The backward kernel is the
forward entry's backward partner, loaded (compiled on first use) at the first backward call. Arguments are
packed from the manifest's "cpu" ABI layout into one block per thread.

An instance whose manifest entry lists the input dtype in its launch fact "inputs" (bf16 and f16 for the
f32 instances) reads its tensors in that dtype itself (the ABI's input_dtype field): the forward q / k / v and
out, the backward also out and dO (its gradients come back in the compute type and are rounded here); other
dtypes get tensors converted to the compute type first.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import threading
from typing import Optional

import torch

from . import cpu_isa, cxx, selector
from .manifest import Instance
from .packing import Layout
from .problem import Problem
from .registry import Backend, Resolved, register_backend
from .spec import TORCH_DTYPE_TOKENS

log = logging.getLogger("natgen.cpu")

_AVAILABLE = []


def available() -> bool:
    # decided once per process: looking the compiler up again (environment reads) cost ~8 us a call
    if not _AVAILABLE:
        _AVAILABLE.append(cxx.find_compiler() is not None)
    return _AVAILABLE[0]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_problem(problem: Problem) -> Problem:
    return dataclasses.replace(problem, dtype=compute_dtype(problem.dtype))


@functools.lru_cache(maxsize=256)  # ranking the manifest costs ~ms; a problem's answer never changes
def choose(problem: Problem, op: str = "fwd") -> Instance:
    if selector.op_token(op) == "fwd":
        return selector.select("fwd", compute_problem(problem), selector.Target("cpu")).instance
    # among the partners of the (cached) forward choice
    return selector.select_backward(choose(problem, "fwd"), compute_problem(problem), selector.Target("cpu")).instance


class _Blocks:
    """Per-thread argument blocks of one (instance layout, problem): a call reads its block synchronously,
    and another Python thread has its own."""

    def __init__(self, layout: Layout, problem: Problem, **values):
        self.values = values  # scalar fields set here rather than from the problem (input_dtype)
        self.struct = layout.struct()
        self.count = len(layout.names)
        self.pointer_offset, self.pointer_struct = layout.pointer_struct()
        self.pointer_names = layout.pointer_names
        self.layout, self.problem = layout, problem
        self._local = threading.local()

    def block(self, threads: int):
        """(bytearray, its address) of this thread's block with every address 0."""
        blocks = getattr(self._local, "blocks", None)
        if blocks is None:
            blocks = self._local.blocks = {}
        entry = blocks.get(threads)
        if entry is None:
            values = [0] * self.count
            for position, value in self.layout.scalars(self.problem, threads):
                values[position] = value
            for name, value in self.values.items():
                values[self.layout.index(name)] = value
            data = bytearray(self.struct.pack(*values))
            view = (ctypes.c_char * len(data)).from_buffer(data)
            entry = blocks[threads] = (data, ctypes.addressof(view), view)
        return entry

    def pack(self, tensors: dict, threads: int) -> int:
        entry = self.block(threads)
        self.pointer_struct.pack_into(entry[0], self.pointer_offset,
                                      *[tensors[name].data_ptr() if tensors.get(name) is not None else 0
                                        for name in self.pointer_names])
        return entry[1]


def _prepare(tensor, dtype):
    if tensor is None:
        return None
    if tensor.dtype == dtype and tensor.is_contiguous():
        return tensor  # only its address is read (detach() alone costs ~1 us)
    return tensor.detach().to(dtype).contiguous()


def _input_code(entry, dtype: torch.dtype) -> int:
    """The ABI input_dtype code an instance reads `dtype` with (its launch fact "inputs"), 0 if it does not
    read it (or there is no instance)."""
    if entry is None:
        return 0
    return entry.launch.get("inputs", {}).get(TORCH_DTYPE_TOKENS[str(dtype).replace("torch.", "")], 0)


class CpuCall(Resolved):
    """A resolved CPU call: the forward instance and its loaded module, the backward partner (loaded at the
    first backward), the argument blocks."""

    def __init__(self, problem: Problem):
        forward = choose(problem, "fwd")
        try:
            backward = choose(problem, "bwd")
        except selector.NoKernelError:
            backward = None
        super().__init__("cpu", forward, backward)
        self.problem = problem
        self.dtype = compute_dtype(problem.dtype)
        layout = Layout(forward.layout, forward.name)
        # the input codes: the kernel reads problem.dtype itself (0: tensors converted to self.dtype); the
        # backward reads it only where the forward does (its saved tensors are the forward's inputs)
        self.input_code = _input_code(forward, problem.dtype) if problem.dtype != self.dtype else 0
        self.backward_code = _input_code(backward, problem.dtype) if self.input_code else 0
        self.input_dtype = problem.dtype if self.input_code else self.dtype
        self.backward_input_dtype = problem.dtype if self.backward_code else self.dtype
        self.blocks = _Blocks(layout, problem, input_dtype=self.input_code)
        self.backward_blocks = (_Blocks(layout, problem, input_dtype=self.backward_code)
                                if self.backward_code != self.input_code else self.blocks)
        self._module = self._backward_module = None
        self.out_shape = (problem.batch, *problem.spatial, problem.heads, problem.head_dim_v)
        if self.input_dtype == problem.dtype and self.dtype == torch.float32 and not problem.n_extra:
            self.fast = self._first_fast  # the module loads (compiling on first use) at the first call
            if backward is not None and problem.dtype == torch.float32:
                self.fast_backward = self._first_fast_backward

    @property
    def module(self):
        if self._module is None:
            self._module = cxx.load(self.instance)
            log.info("natgen: %s runs the CPU ISA variant %s", self.instance.name, cpu_isa.describe())
        return self._module

    def _first_fast(self, q, k, v, with_lse=True):
        self.fast = self._fast_runner()
        return self.fast(q, k, v, with_lse) if self.fast is not None else None

    def _fast_runner(self):
        """(q, k, v, with_lse=True) -> (out, lse; None without with_lse) for calls without extra tokens whose tensors the kernel reads as they are
        (float32, or a dtype of its "inputs"), or None for tensors it cannot pass as they are (not contiguous):
        the caller then takes forward()."""
        dtype, out_shape, lse_shape = self.input_dtype, self.out_shape, self.out_shape[:-1]
        blocks, empty, get_threads = self.blocks, torch.empty, torch.get_num_threads
        call, fields = self.module.run, blocks.count
        offset, pack_into = blocks.pointer_offset, blocks.pointer_struct.pack_into
        order = blocks.pointer_names
        slots = [order.index(name) for name in ("q", "k", "v", "out", "lse")]
        if slots != list(range(5)):
            return None  # the direct path below writes these five first; any other layout takes forward()
        tail = (0,) * (len(order) - 5)

        def run(q, k, v, with_lse=True):
            if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
                return None
            entry = blocks.block(get_threads())
            out = empty(out_shape, dtype=dtype)
            # without lse (a null pointer: the kernel then writes none), a call saves its allocation (~5 us)
            lse = empty(lse_shape, dtype=torch.float32) if with_lse else None
            pack_into(entry[0], offset, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                      lse.data_ptr() if with_lse else 0, *tail)
            call(entry[1], fields)
            return out, lse

        return run

    def _first_fast_backward(self, q, k, v, out, lse, grad_out, grad_lse):
        self.fast_backward = self._fast_backward_runner()
        return self.fast_backward(q, k, v, out, lse, grad_out, grad_lse) if self.fast_backward is not None else None

    def _fast_backward_runner(self):
        """(q, k, v, out, lse, grad_out, grad_lse) -> (grad_q, grad_k, grad_v), or None where a tensor is not
        contiguous (the caller then takes backward()): float32 calls without extra tokens or bias, whose
        tensors the kernel reads as they are; one pointer per name, packed in the layout's order."""
        if self._backward_module is None:
            self._backward_module = cxx.load(self.backward_instance)
        blocks, empty, get_threads = self.backward_blocks, torch.empty, torch.get_num_threads
        call, fields = self._backward_module.run, blocks.count
        offset, pack_into, order = blocks.pointer_offset, blocks.pointer_struct.pack_into, blocks.pointer_names
        names = ("q", "k", "v", "out", "lse", "grad_out", "grad_lse", "grad_q", "grad_k", "grad_v")
        if any(name not in order for name in names):
            return None
        slots = [order.index(name) for name in names]
        cleared = [0] * len(order)  # extra tokens, bias and their grads: null

        def run(q, k, v, out, lse, grad_out, grad_lse):
            if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous() and out.is_contiguous() and
                    lse.is_contiguous() and grad_out.is_contiguous() and
                    (grad_lse is None or grad_lse.is_contiguous())):
                return None
            # torch.empty: each kernel work unit zeroes the key grads it owns
            grads = (empty(q.shape, dtype=torch.float32), empty(k.shape, dtype=torch.float32),
                     empty(v.shape, dtype=torch.float32))
            pointers = cleared.copy()
            for slot, tensor in zip(slots, (q, k, v, out, lse, grad_out, grad_lse) + grads):
                if tensor is not None:
                    pointers[slot] = tensor.data_ptr()
            entry = blocks.block(get_threads())
            pack_into(entry[0], offset, *pointers)
            call(entry[1], fields)
            return grads

        return run

    def forward(self, q, k, v, extra_k=None, extra_v=None, rpb=None):
        problem, dtype, input_dtype = self.problem, self.dtype, self.input_dtype
        q_, k_, v_, ek_, ev_ = (_prepare(t, input_dtype) for t in (q, k, v, extra_k, extra_v))
        rpb_ = _prepare(rpb, dtype)
        out = torch.empty(self.out_shape, dtype=input_dtype)
        lse = torch.empty(self.out_shape[:-1], dtype=dtype)
        address = self.blocks.pack(dict(q=q_, k=k_, v=v_, out=out, lse=lse, extra_k=ek_, extra_v=ev_, rpb=rpb_),
                                   torch.get_num_threads())
        self.module.run(address, self.blocks.count)
        if input_dtype != problem.dtype:
            out = out.to(problem.dtype)
        if dtype != torch.float32:
            lse = lse.to(torch.float32)
        return out, lse

    def backward(self, q, k, v, extra_k, extra_v, out, lse, grad_out, grad_lse, rpb=None):
        if self.backward_instance is None:
            return None
        if self._backward_module is None:
            self._backward_module = cxx.load(self.backward_instance)
        dtype, input_dtype = self.dtype, self.backward_input_dtype
        q_, k_, v_, ek_, ev_, do_, out_ = (_prepare(t, input_dtype)
                                           for t in (q, k, v, extra_k, extra_v, grad_out, out))
        grad_lse_ = _prepare(grad_lse, dtype)
        # the saved lse is float32: exact for f32 compute; f64 recomputes the normalizer in the kernel
        saved_lse = _prepare(lse, dtype) if dtype == torch.float32 else None
        # torch.empty, not zeros: each kernel work unit zeroes the key grads it owns, saving a separate pass
        rpb_ = _prepare(rpb, dtype)
        grads = {name: torch.empty(t.shape, dtype=dtype) if t is not None else None
                 for name, t in (("grad_q", q_), ("grad_k", k_), ("grad_v", v_), ("grad_extra_k", ek_),
                                 ("grad_extra_v", ev_), ("grad_rpb", rpb_))}
        tensors = dict(q=q_, k=k_, v=v_, extra_k=ek_, extra_v=ev_, out=out_, grad_out=do_, grad_lse=grad_lse_,
                       lse=saved_lse, rpb=rpb_, **grads)
        address = self.backward_blocks.pack(tensors, torch.get_num_threads())
        self._backward_module.run(address, self.blocks.count)
        originals = (q, k, v, extra_k, extra_v, rpb)
        return tuple(None if grad is None else grad if grad.dtype == original.dtype else grad.to(original.dtype)
                     for grad, original in zip(grads.values(), originals))


def resolve(problem: Problem, arch: Optional[str] = None) -> CpuCall:
    return CpuCall(problem)


register_backend(Backend("cpu", "cpu", available, resolve))
