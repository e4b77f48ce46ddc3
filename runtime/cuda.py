"""The "cuda" backend: instances loaded through CuPy RawModule, launched on torch's current stream.

A cubin from the build cache is used when `natgen build` made one for the device's arch; otherwise the
library's source is compiled by NVRTC on first use (CuPy caches the result on disk). A resolved call holds
the loaded function, its launch plan and the argument template; a repeated call only binds addresses.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import numpy as np
import torch

from . import paths, selector
from .toolkit import cubin_path, cuda_include_dir, find_nvcc  # noqa: F401  (re-exported)
from .launch import BackwardCall, KernelCall, Plan
from .manifest import Instance
from .problem import Problem
from .registry import Backend, Resolved, register_backend

log = logging.getLogger("natgen.cuda")


def cupy_module():
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError("the CUDA backend needs CuPy: pip install 'natgen[cuda13]' (or [cuda12])") from exc
    return cupy


def available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        cupy_module()
    except RuntimeError:
        return False
    return True


def device_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def device_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


NVRTC_OPTIONS = ("-std=c++17", "--use_fast_math")


@functools.lru_cache(maxsize=None)
def _function(instance: Instance, arch: str, device_index: int, symbol: Optional[str] = None):
    """The loaded kernel `symbol` of an instance (its manifest symbol by default; a backward instance has
    several entry points in one module)."""
    return _module(instance, arch, device_index).get_function(symbol or instance.entry["symbol"])


@functools.lru_cache(maxsize=None)
def _module(instance: Instance, arch: str, device_index: int):
    cupy = cupy_module()
    with cupy.cuda.Device(device_index):
        build = instance.build(arch)
        cubin = cubin_path(build["cubin_key"]) if build and build.get("cubin_key") else None
        if cubin is not None and cubin.exists():
            log.debug("loading %s from %s", instance.name, cubin)
            module = cupy.RawModule(path=str(cubin))
        else:
            log.debug("compiling %s through NVRTC for %s", instance.name, arch)
            options = NVRTC_OPTIONS + (f"-I{paths.TEMPLATES_DIR}",)
            cuda_include = cuda_include_dir()
            if cuda_include:
                options += (f"-I{cuda_include}",)
            module = cupy.RawModule(code=instance.source_path.read_text(), options=options, backend="nvrtc")
        return module


_SCALARS = {"i32": np.int32, "f32": np.float32, "i64": np.int64, "f64": np.float64}


def cupy_launcher(function, plan: Plan, stream_of, device_index: Optional[int] = None):
    """launcher(tensors) for KernelCall: scalars converted once, tensor addresses per call. `function` is a
    CuPy RawKernel, or for a dry run any callable with its signature (nothing runs); with `device_index`
    the launch runs in that device's context (the one its module was loaded in)."""
    converted = [None if kind == "ptr" else _SCALARS[kind](value)
                 for kind, value in zip(plan.scalar_types, plan.template)]
    positions = [position for position, _ in plan.pointers]
    grid, block, shared_mem = plan.grid, plan.block, plan.shared_mem
    uint64 = np.uint64

    def launch(tensors):
        values = converted[:]
        for position, tensor in zip(positions, tensors):
            values[position] = uint64(0 if tensor is None else tensor.data_ptr())  # None: a null pointer
        function(grid, block, tuple(values), shared_mem=shared_mem, stream=stream_of())

    if device_index is None:
        return launch
    device = cupy_module().cuda.Device(device_index)

    def launch_on_device(tensors):
        with device:
            launch(tensors)

    return launch_on_device


def kernel_call(instance: Instance, problem: Problem, arch: str, device_index: int) -> KernelCall:
    """A KernelCall of `instance` on a CUDA device: the loaded function (with the larger shared-memory carve-out
    where the launch needs it), launched on torch's current stream in the device's context."""
    cupy = cupy_module()
    function = _function(instance, arch, device_index)
    if instance.launch.get("dynamic_smem", 0) > 48 * 1024:
        # above 48 KB a kernel must opt in to the larger dynamic shared memory carve-out
        function.max_dynamic_shared_size_bytes = instance.launch["dynamic_smem"]
    device = torch.device("cuda", device_index)

    def stream_of():
        return cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream, device_index)

    call = KernelCall(instance, problem)
    call.launcher = cupy_launcher(function, call.plan, stream_of, device_index)
    return call


def backward_call(instance: Instance, problem: Problem, arch: str, device_index: int) -> BackwardCall:
    """A BackwardCall of a backward instance on a CUDA device: its entry points launched in turn on torch's
    current stream."""
    cupy = cupy_module()
    device = torch.device("cuda", device_index)

    def stream_of():
        return cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream, device_index)

    def launcher_for(symbol, plan):
        return cupy_launcher(_function(instance, arch, device_index, symbol), plan, stream_of, device_index)

    return BackwardCall(instance, problem, launcher_for)


class CudaCall(Resolved):
    def __init__(self, problem: Problem, target: selector.Target, device_index: Optional[int], dry_run=None):
        forward = selector.select("fwd", problem, target).instance
        backward, self.backward_reason = selector.backward_or_reason(forward, problem, target)
        super().__init__("cuda", forward, backward)
        self.problem, self.arch, self.device_index, self.dry_run = problem, target.arch, device_index, dry_run
        self._backward_call = None
        if dry_run is None:
            self.call = kernel_call(forward, problem, target.arch, device_index)
        else:
            self.call = KernelCall(forward, problem)
            self.call.launcher = cupy_launcher(dry_run, self.call.plan, lambda: None)
        self.forward = self.call  # (q, k, v, extra_k=None, extra_v=None) -> (out, lse)

    def backward(self, q, k, v, extra_k, extra_v, out, lse, grad_out, grad_lse, rpb=None):
        if self.backward_instance is None:
            return None
        if self._backward_call is None:  # loaded (compiled on first use) at the first backward
            if self.dry_run is None:
                self._backward_call = backward_call(self.backward_instance, self.problem, self.arch, self.device_index)
            else:
                dry_run = self.dry_run
                self._backward_call = BackwardCall(self.backward_instance, self.problem,
                                                   lambda symbol, plan: cupy_launcher(dry_run, plan, lambda: None))
        return self._backward_call(q, k, v, extra_k, extra_v, out, lse, grad_out, grad_lse, rpb)


def target_for(device: torch.device) -> selector.Target:
    return selector.Target("cuda", device_arch(device), device_sms(device))


def resolve(problem: Problem, arch: Optional[str] = None) -> CudaCall:
    device = problem.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    target = selector.Target("cuda", arch) if arch is not None else target_for(device)
    return CudaCall(problem, target, index)


def resolve_dry_run(problem: Problem, arch: str = "sm_80", sms: Optional[int] = None) -> CudaCall:
    """The cuda path's resolved call for CPU tensors, launching nothing: what `natgen bench --overhead`
    times where no GPU exists (selection, planning, argument conversion; everything but the launch)."""
    return CudaCall(problem, selector.Target("cuda", arch, sms), None,
                    dry_run=lambda grid, block, args, shared_mem=0, stream=None: None)


register_backend(Backend("cuda", "cuda", available, resolve,
                         unavailable_hint=": install CuPy (natgen[cuda13]) and use a CUDA device"))
