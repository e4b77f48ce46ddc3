"""A benchmark run as text (one table per set, with its header) and as JSON, and the machine it ran on."""
from __future__ import annotations

import dataclasses
import json
from typing import List, Sequence, Tuple

import torch

from ..table import table
from .problems import forward_bytes
from .timing import ROUND_SECONDS, SetResult

# A window of at most this many keys counts as "small K": memory-bound on every machine we target
# (ideal arithmetic intensity prod(K) / sizeof(dtype) FLOP/byte), so the table also shows GB/s.
SMALL_WINDOW = 64


def rate_unit(device: str) -> Tuple[str, float]:
    return ("TFLOP/s", 1e12) if device == "cuda" else ("GFLOP/s", 1e9)


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def show_bandwidth(result: SetResult) -> bool:
    """GB/s is shown for small windows (memory-bound) and forward runs: the byte count is defined for the
    forward only."""
    return result.ps.window <= SMALL_WINDOW and not result.backward


def rows(result: SetResult) -> Tuple[List[str], List[list]]:
    unit, scale = rate_unit(result.device)
    bandwidth = show_bandwidth(result)
    headers = ["peer", "implementation", "ms", unit] + (["GB/s"] if bandwidth else []) + ["natgen speed-up", "note"]
    natgen = result.by_peer("natgen")
    natgen_s = natgen.seconds if natgen is not None else None
    table_rows = []
    for m in result.measurements:
        if m.seconds is None:
            row = [m.peer, m.implementation or None, None, None] + ([None] if bandwidth else []) + [None, m.status]
        else:
            rate = result.flops / m.seconds / scale
            row = [m.peer, m.implementation, f"{m.seconds * 1e3:.3f}", f"{rate:.3g}"]
            if bandwidth:
                row.append(f"{forward_bytes(result.ps, result.dtype) / m.seconds / 1e9:.3g}")
            row.append(f"{m.seconds / natgen_s:.2f}x" if natgen_s else None)
            row.append(m.status or None)
        table_rows.append(row)
    return headers, table_rows


def header(result: SetResult) -> str:
    mode = "forward + backward" if result.backward else "forward"
    flops = result.flops
    return (f"== {result.ps.name}: {result.ps.describe()}, {dtype_name(result.dtype)}, {mode}, "
            f"{result.device}\n   {flops / 1e9:.4g} GFLOP a call ("
            + ("3.5 x " if result.backward else "") + "4*B*H*N*prod(K)*d); min of "
            f"{result.repeats} interleaved rounds after {result.warmup} warm-up calls, a round = the mean of "
            f"~{ROUND_SECONDS * 1e3:g} ms of back-to-back calls (ms = per call); "
            "natgen speed-up = peer ms / natgen ms")


def format_result(result: SetResult) -> str:
    headers, table_rows = rows(result)
    return header(result) + "\n" + table(headers, table_rows)


def to_json(results: Sequence[SetResult]) -> list:
    out = []
    for r in results:
        unit, scale = rate_unit(r.device)
        entry = {"set": r.ps.name, "problem": dataclasses.asdict(r.ps), "device": r.device,
                 "dtype": dtype_name(r.dtype), "backward": r.backward, "repeats": r.repeats,
                 "flops_per_call": r.flops, "forward_bytes": forward_bytes(r.ps, r.dtype), "peers": []}
        natgen = r.by_peer("natgen")
        for m in r.measurements:
            entry["peers"].append({
                "peer": m.peer, "implementation": m.implementation, "ms": m.seconds and m.seconds * 1e3,
                "calls": m.calls, "calls_per_round": m.per_round, "status": m.status,
                unit: m.seconds and r.flops / m.seconds / scale,
                "GB/s": m.seconds and forward_bytes(r.ps, r.dtype) / m.seconds / 1e9 if not r.backward else None,
                "natgen_speedup": (m.seconds / natgen.seconds if m.seconds and natgen and natgen.seconds else None)})
        out.append(entry)
    return out


def write_json(results: Sequence[SetResult], path) -> None:
    with open(path, "w") as f:
        json.dump(to_json(results), f, indent=1)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), or "" when unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or ""


def machine_description(device="cpu") -> str:
    parts = []
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name())
    else:
        import os
        from .. import cpu_isa
        parts.append(f"{cpu_model() or 'CPU'} ({cpu_isa.cpu_class()}), {os.cpu_count()} cores, "
                     f"{torch.get_num_threads()} torch threads, natgen ISA variant {cpu_isa.current()}")
    parts.append(f"torch {torch.__version__}")
    return "; ".join(parts)
