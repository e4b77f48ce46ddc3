"""GPU backend: loads instances through CuPy RawModule and launches them on torch's current stream.

A cubin from the build cache is used when `natgen build` made one for the device's arch; otherwise the
rendered source is compiled by NVRTC on first use (CuPy caches the result on disk).
"""
from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from .codegen import nvcc as nvcc_paths
from .codegen.render import TEMPLATES_DIR
from .launch import Plan
from .manifest import Instance

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


@functools.lru_cache(maxsize=None)
def _function(name: str, arch: str, device_index: int):
    cupy = cupy_module()
    from .manifest import find
    instance = find(name)
    with cupy.cuda.Device(device_index):
        build = instance.build(arch)
        cubin = nvcc_paths.cubin_path(build["cubin_key"]) if build and build.get("cubin_key") else None
        if cubin is not None and cubin.exists():
            log.debug("loading %s from %s", name, cubin)
            module = cupy.RawModule(path=str(cubin))
        else:
            log.debug("compiling %s through NVRTC for %s", name, arch)
            options = ("-std=c++17", f"-I{TEMPLATES_DIR}", "--use_fast_math")
            cuda_include = nvcc_paths.cuda_include_dir()
            if cuda_include:
                options += (f"-I{cuda_include}",)
            module = cupy.RawModule(code=instance.source_path.read_text(), options=options, backend="nvrtc")
        return module.get_function(instance.entry["symbol"])


def run(instance: Instance, plan: Plan, device: torch.device) -> None:
    cupy = cupy_module()
    index = device.index if device.index is not None else torch.cuda.current_device()
    function = _function(instance.name, device_arch(device), index)
    scalars = iter(plan.scalar_types)
    args = []
    for value in plan.args:
        if isinstance(value, torch.Tensor):
            args.append(np.uint64(value.data_ptr()))
        else:
            args.append(np.int32(value) if next(scalars) == "int" else np.float32(value))
    if plan.shared_mem > 48 * 1024:
        # above 48 KB a kernel must opt in to the larger dynamic shared memory carve-out
        function.max_dynamic_shared_size_bytes = plan.shared_mem
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream, index)
    with cupy.cuda.Device(index):
        function(plan.grid, plan.block, tuple(args), shared_mem=plan.shared_mem, stream=stream)
