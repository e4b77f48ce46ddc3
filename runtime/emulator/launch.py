"""Run one kernel of a CUDA source on the CPU: argument checking, parameter packing, fault reporting."""

from __future__ import annotations

import numbers
import struct
from typing import Any, Sequence

import torch

from .build import CompiledSource, load_source
from .errors import FAULT_CLASSES, ArgumentError, EmulatorError, LaunchConfigError

# pointee/scalar type code (natgen_emu.h TypeCode) -> torch dtypes a tensor argument may have
POINTEE_DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "f32": (torch.float32,), "f32x2": (torch.float32,), "f32x4": (torch.float32,),
    "f64": (torch.float64,),
    "f16": (torch.float16,), "f16x2": (torch.float16,),
    "bf16": (torch.bfloat16,), "bf16x2": (torch.bfloat16,),
    "bool": (torch.bool,),
    "i8": (torch.int8,), "u8": (torch.uint8,),
    "i16": (torch.int16,), "u16": (torch.int16, torch.uint16),
    "i32": (torch.int32,), "i32x2": (torch.int32,), "i32x4": (torch.int32,),
    "u32": (torch.int32, torch.uint32), "u32x2": (torch.int32, torch.uint32), "u32x4": (torch.int32, torch.uint32),
    "i64": (torch.int64,), "u64": (torch.int64, torch.uint64),
}
# scalar type code -> struct format (little-endian, no padding: offsets come from the C++ side)
SCALAR_FORMATS = {
    "f32": "<f", "f64": "<d", "bool": "<?", "i8": "<b", "u8": "<B", "i16": "<h", "u16": "<H",
    "i32": "<i", "u32": "<I", "i64": "<q", "u64": "<Q",
}
FLOAT_CODES = {"f32", "f64", "f16", "bf16"}


def _dim3(value: Any, what: str) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, numbers.Integral) else tuple(value)
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, numbers.Integral) for d in dims):
        raise LaunchConfigError(f"{what}={value!r} must be an int or a tuple of 1 to 3 ints")
    dims = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
    if any(d < 1 or d >= 2**31 for d in dims):
        raise LaunchConfigError(f"{what}={value!r}: every dimension must be in [1, 2**31)")
    return dims


def _pack_scalar(code: str, size: int, value: Any, label: str) -> bytes:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ArgumentError(f"{label}: expected a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if code in FLOAT_CODES:
        if not isinstance(value, numbers.Real):
            raise ArgumentError(f"{label} (type code {code}) expects a real number, got {type(value).__name__}")
        if code in ("f16", "bf16"):
            dtype = torch.float16 if code == "f16" else torch.bfloat16
            bits = torch.tensor(float(value), dtype=dtype).view(torch.int16).item() & 0xFFFF
            return struct.pack("<H", bits)
        return struct.pack(SCALAR_FORMATS[code], float(value))
    if code in SCALAR_FORMATS:
        if not isinstance(value, numbers.Integral):
            raise ArgumentError(f"{label} (type code {code}) expects an integer, got {value!r}")
        try:
            return struct.pack(SCALAR_FORMATS[code], int(value))
        except struct.error as exc:
            raise ArgumentError(f"{label}={value} does not fit type code {code}: {exc}") from None
    raise ArgumentError(f"{label}: parameter type (code {code!r}, {size} bytes) cannot be passed from Python")


def _tensor_span(t: torch.Tensor) -> tuple[int, int]:
    """Address and byte length of the storage a (possibly strided) tensor covers."""
    if t.numel() == 0:
        return t.data_ptr(), 0
    extent = sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), extent * t.element_size()


def _prepare(compiled: CompiledSource, kernel_name: str, args: Sequence[Any]):
    blob_size, params = compiled.param_info[kernel_name]
    decl = compiled.kernels.get(kernel_name)
    names = decl.param_names if decl and len(decl.param_names) == len(params) else tuple(f"arg{i}" for i in range(len(params)))
    if len(args) != len(params):
        raise ArgumentError(f"kernel '{kernel_name}' takes {len(params)} arguments ({', '.join(names)}), got {len(args)}")
    blob = bytearray(blob_size)
    tensors = []  # (blob_offset, address, nbytes, label)
    for i, ((is_pointer, code, size, offset), value) in enumerate(zip(params, args)):
        label = f"argument {i} '{names[i]}'"
        if is_pointer:
            if value is None:
                continue  # nullptr
            if not isinstance(value, torch.Tensor):
                raise ArgumentError(f"{label} is a pointer: pass a torch tensor (or None), got {type(value).__name__}")
            if value.device.type != "cpu":
                raise ArgumentError(f"{label} is on {value.device}; the emulator needs CPU tensors")
            allowed = POINTEE_DTYPES.get(code)
            if code != "void":
                if allowed is None:
                    raise ArgumentError(f"{label}: pointee type code {code!r} has no torch dtype")
                if value.dtype not in allowed:
                    want = " or ".join(str(d) for d in allowed)
                    raise ArgumentError(f"{label} points to {code}, so it needs a {want} tensor, got {value.dtype}")
            address, nbytes = _tensor_span(value)
            tensors.append((offset, address, nbytes, f"'{names[i]}'"))
        else:
            blob[offset : offset + size] = _pack_scalar(code, size, value, label).ljust(size, b"\0")
    return bytes(blob), tensors


def _regions(tensors):
    """Group overlapping tensor spans (aliases, views of one buffer) into one guarded region each."""
    order = sorted(range(len(tensors)), key=lambda i: tensors[i][1])
    groups: list[list[int]] = []
    for i in order:
        _, address, nbytes, _ = tensors[i]
        if groups:
            last = groups[-1]
            end = max(tensors[j][1] + tensors[j][2] for j in last)
            if address < end:
                last.append(i)
                continue
        groups.append([i])
    regions, fixups = [], []
    for index, group in enumerate(groups):
        start = min(tensors[j][1] for j in group)
        end = max(tensors[j][1] + tensors[j][2] for j in group)
        regions.append((start, end - start, "/".join(tensors[j][3] for j in group)))
        for j in group:
            fixups.append((tensors[j][0], index, tensors[j][1] - start))
    return regions, fixups


def launch(
    source: str,
    kernel_name: str,
    grid,
    block,
    args: Sequence[Any],
    shared_mem: int = 0,
    seed: int | None = None,
    checked: bool = True,
    timeout: float | None = None,
    *,
    include_dirs: Sequence[str] = (),
    filename: str = "kernel.cu",
) -> None:
    """Run `kernel_name` of the CUDA `source` on the CPU, like `kernel<<<grid, block, shared_mem>>>(*args)`.

    Tensor arguments (CPU) are written in place. `seed` shuffles the order in which threads run between
    synchronisation points; `checked` runs the kernel on guarded copies of the tensors so that any
    out-of-bounds access raises; `timeout` (seconds) bounds the launch. Raises an EmulatorError subclass
    on any fault of the kernel.
    """
    grid3, block3 = _dim3(grid, "grid"), _dim3(block, "block")
    if not isinstance(shared_mem, numbers.Integral) or shared_mem < 0:
        raise LaunchConfigError(f"shared_mem={shared_mem!r} must be a non-negative int (bytes)")
    if seed is not None and not isinstance(seed, numbers.Integral):
        raise LaunchConfigError(f"seed={seed!r} must be an int or None")
    compiled = load_source(source, tuple(include_dirs), filename)
    if kernel_name not in compiled.param_info:
        known = ", ".join(sorted(compiled.param_info)) or "none"
        raise LaunchConfigError(f"no __global__ function {kernel_name!r} in the source (found: {known})")
    blob, tensors = _prepare(compiled, kernel_name, args)
    regions, fixups = _regions(tensors)
    fault = compiled.native.launch(
        kernel_name, grid3, block3, int(shared_mem), None if seed is None else int(seed) & (2**64 - 1),
        bool(checked), float(timeout or 0.0), blob, regions, fixups,
    )
    if fault is not None:
        kind, message, block_index, thread_index = fault
        error_class = FAULT_CLASSES.get(kind, EmulatorError)
        launch_level = error_class in (LaunchConfigError,) or (thread_index is None and kind == 4)
        raise error_class(message, kernel=kernel_name, block=None if launch_level else tuple(block_index),
                          thread=None if thread_index is None else tuple(thread_index))
