"""Run one kernel of a CUDA source on the CPU: argument checking, parameter packing, fault reporting."""

from __future__ import annotations

import numbers
import os
import struct
from typing import Any, Sequence

import torch

from .build import CompiledSource, load_source
from .errors import FAULT_CLASSES, ArgumentError, EmulatorError, LaunchConfigError, RaceError
from .symbols import resolve

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


RACECHECK_LEVELS = {False: 0, True: 1, "shared": 1, "global": 2}
_ENV_RACECHECK = {"": 0, "0": 0, "off": 0, "false": 0, "1": 1, "on": 1, "true": 1, "shared": 1, "global": 2}
_ENV_FLAG = {"": False, "0": False, "off": False, "false": False, "1": True, "on": True, "true": True}


def resolve_seed(seed: int | None) -> int | None:
    """`seed`, or NATGEN_EMU_SEED when it is None (unset or empty: the default schedule)."""
    if seed is not None:
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise LaunchConfigError(f"seed={seed!r} must be an int or None")
        return int(seed)
    text = os.environ.get("NATGEN_EMU_SEED", "").strip()
    if not text:
        return None
    try:
        return int(text, 0)
    except ValueError:
        raise LaunchConfigError(f"NATGEN_EMU_SEED={text!r} must be an integer (or empty for the default schedule)") from None


def resolve_racecheck(racecheck) -> int:
    """0 (off), 1 (shared memory) or 2 (shared and global memory); None reads NATGEN_EMU_RACECHECK."""
    if racecheck is None:
        text = os.environ.get("NATGEN_EMU_RACECHECK", "").strip().lower()
        if text not in _ENV_RACECHECK:
            raise LaunchConfigError(f"NATGEN_EMU_RACECHECK={text!r} must be one of 0, 1, shared, global")
        return _ENV_RACECHECK[text]
    if isinstance(racecheck, (bool, str)) and racecheck in RACECHECK_LEVELS:
        return RACECHECK_LEVELS[racecheck]
    raise LaunchConfigError(f"racecheck={racecheck!r} must be None, False, True, 'shared' or 'global'")


def resolve_initcheck(initcheck) -> bool:
    """initcheck, or NATGEN_EMU_INITCHECK when it is None."""
    if initcheck is None:
        text = os.environ.get("NATGEN_EMU_INITCHECK", "").strip().lower()
        if text not in _ENV_FLAG:
            raise LaunchConfigError(f"NATGEN_EMU_INITCHECK={text!r} must be 0 or 1")
        return _ENV_FLAG[text]
    if not isinstance(initcheck, bool):
        raise LaunchConfigError(f"initcheck={initcheck!r} must be None, False or True")
    return initcheck


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
    racecheck: bool | str | None = None,
    initcheck: bool | None = None,
    include_dirs: Sequence[str] = (),
    filename: str = "kernel.cu",
) -> None:
    """Run `kernel_name` of the CUDA `source` on the CPU, like `kernel<<<grid, block, shared_mem>>>(*args)`.

    Tensor arguments (CPU) are written in place. `seed` shuffles the order in which threads run between
    synchronisation points; `checked` runs the kernel on guarded copies of the tensors so that any
    out-of-bounds access raises; `timeout` (seconds) bounds the launch. `racecheck` (True or "shared":
    shared memory; "global": shared memory and the tensors) raises RaceError on conflicting accesses of
    two threads with nothing ordering them; `initcheck` raises UninitializedReadError on a read of shared
    memory no thread of the block has written. seed, racecheck and initcheck left at None come from
    NATGEN_EMU_SEED, NATGEN_EMU_RACECHECK and NATGEN_EMU_INITCHECK. Raises an EmulatorError subclass on
    any fault of the kernel.
    """
    grid3, block3 = _dim3(grid, "grid"), _dim3(block, "block")
    if not isinstance(shared_mem, numbers.Integral) or shared_mem < 0:
        raise LaunchConfigError(f"shared_mem={shared_mem!r} must be a non-negative int (bytes)")
    seed = resolve_seed(seed)
    race_level, init_on = resolve_racecheck(racecheck), resolve_initcheck(initcheck)
    sanitize = race_level > 0 or init_on
    compiled = load_source(source, tuple(include_dirs), filename, sanitize=sanitize)
    if kernel_name not in compiled.param_info:
        known = ", ".join(sorted(compiled.param_info)) or "none"
        raise LaunchConfigError(f"no __global__ function {kernel_name!r} in the source (found: {known})")
    blob, tensors = _prepare(compiled, kernel_name, args)
    regions, fixups = _regions(tensors)
    fault = compiled.native.launch(
        kernel_name, grid3, block3, int(shared_mem), None if seed is None else int(seed) & (2**64 - 1),
        bool(checked), float(timeout or 0.0), blob, regions, fixups, race_level, init_on,
    )
    if fault is not None:
        kind, message, block_index, thread_index, other = fault
        error_class = FAULT_CLASSES.get(kind, EmulatorError)
        if sanitize:
            message = resolve(message, compiled.native.path)
        launch_level = error_class in (LaunchConfigError,) or (thread_index is None and kind == 4)
        where = dict(kernel=kernel_name, block=None if launch_level else tuple(block_index),
                     thread=None if thread_index is None else tuple(thread_index))
        if error_class is RaceError and other is not None:
            where.update(other_block=tuple(other[0]), other_thread=tuple(other[1]))
        raise error_class(message, **where)
