"""Source lines and shared variable names for the reports of a checked kernel module.

The C++ side writes `{pc:OFFSET}` (an instruction, as an offset into the module) and `{smem:OFFSET}` (a
byte of static shared memory); these are resolved here with binutils' addr2line and nm, from the line
tables and symbols of the module. Without binutils the raw offsets stay in the message.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from functools import lru_cache

_TOKEN = re.compile(r"\{(pc|smem):([0-9a-f]+)\}")


def _frames(path: str, offsets: list[int]) -> dict[int, str]:
    """offset -> 'file:line' of the innermost frame, with the kernel source line it is inlined into."""
    if not offsets or shutil.which("addr2line") is None:
        return {}
    # a hook's return address is the instruction after the call: look up the call itself
    cmd = ["addr2line", "-e", path, "-i", "-a", *(hex(max(o - 1, 0)) for o in offsets)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    frames: dict[int, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("0x"):
            current = int(line, 16) + 1
            frames[current] = []
        elif current is not None:
            location = line.split(" (discriminator")[0].strip()
            file, _, number = location.rpartition(":")
            if number.isdigit() and number != "0":
                frames[current].append(f"{os.path.basename(file)}:{number}")
    result = {}
    for offset, chain in frames.items():
        if not chain:
            continue
        kernel_frames = [f for f in chain if not f.startswith(("natgen_device.cuh", "natgen_emu"))]
        outer = kernel_frames[0] if kernel_frames else chain[-1]
        result[offset] = chain[0] if chain[0] == outer else f"{chain[0]} (in {outer})"
    return result


@lru_cache(maxsize=64)
def _shared_symbols(path: str) -> tuple[int, tuple[tuple[int, int, str], ...]]:
    """(start of the natgen_shared section, ((offset, size, name), ...)) from the module's symbol table."""
    if shutil.which("nm") is None:
        return 0, ()
    try:
        out = subprocess.run(["nm", "-C", "-S", "--defined-only", path], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return 0, ()
    start, symbols = None, []
    for line in out.splitlines():
        parts = line.split(maxsplit=3)
        if len(parts) == 3 and parts[2] == "__start_natgen_shared":
            start = int(parts[0], 16)
        elif len(parts) == 4 and parts[2].lower() in ("b", "d"):
            symbols.append((int(parts[0], 16), int(parts[1], 16), parts[3]))
    if start is None:
        return 0, ()
    return start, tuple((a - start, size, name) for a, size, name in symbols if a >= start)


def _shared_name(path: str, offset: int) -> str:
    _, symbols = _shared_symbols(path)
    for start, size, name in symbols:
        if start <= offset < start + size:
            return f"'{name}' byte {offset - start} (static shared offset {offset})"
    return f"byte offset {offset}"


def resolve(message: str, module_path: str) -> str:
    """The message with its {pc:..} and {smem:..} tokens replaced by source lines and variable names."""
    tokens = _TOKEN.findall(message)
    if not tokens:
        return message
    lines = _frames(module_path, sorted({int(v, 16) for kind, v in tokens if kind == "pc"}))

    def replace(match: re.Match) -> str:
        kind, value = match.group(1), int(match.group(2), 16)
        if kind == "pc":
            return lines.get(value, f"module offset {value:#x}")
        return _shared_name(module_path, value)

    return _TOKEN.sub(replace, message)
