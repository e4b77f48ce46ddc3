"""The ISA variant the CPU kernels run: chosen once per process from the CPU's features, NATGEN_CPU_ISA
overrides it.

Every CPU module holds the kernel body once per variant (templates/natgen_cpu.h): `avx512` (AVX-512
F/BW/VL/DQ + FMA + F16C, 16 fp32 lanes), `avx2` (AVX2 + FMA + F16C, 8 lanes) and `portable` (the baseline ISA, no
specialized fixed-shape paths). `avx512bf16` is the avx512 body with AVX512_BF16's dot products for bf16 inputs:
the specialized forward's scores multiply bf16 channel pairs with float32 sums instead of widening the keys and
queries first (docs/semantics.md: within the tolerance rule, not the bits of converting first; `avx512` keeps
those bits). The entry point takes the variant's code, its index in VARIANTS (the order of
natgen_cpu_config.h's `Isa`), on every call, so `use` / `force` switch variants without reloading anything.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
from typing import Optional, Tuple

ENV = "NATGEN_CPU_ISA"
VARIANTS = ("portable", "avx2", "avx512", "avx512bf16")  # code = index (natgen_cpu_config.h's Isa)
# the CPU flags (as /proc/cpuinfo names them) each variant's instructions need
NEEDS = {"portable": (), "avx2": ("avx2", "fma", "f16c"),
         "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c")}
NEEDS["avx512bf16"] = NEEDS["avx512"] + ("avx512_bf16",)
LANES = {"avx512bf16": 16, "avx512": 16, "avx2": 8, "portable": 8}  # fp32 lanes of a vector
_TORCH_CAPABILITY = {"AVX512": ("avx512", "avx2", "portable"), "AVX2": ("avx2", "portable")}

_state = {"name": None, "code": None, "why": None}


# Where a CPU runs AVX-512 but the wider variant measured slower, the default steps down to this one, keyed by
# (vendor, CPU family as /proc/cpuinfo gives it, in decimal). AMD's Zen 4 (family 25) executes each 512-bit
# operation as two 256-bit halves, so 16 lanes buy no throughput while the wider masks and horizontal
# reductions cost more: on a 2-core AMD EPYC (Zen 4, AVX-512 F/BW/VL/DQ/BF16) the cpu-2d set ran forward
# 0.441 ms on avx2 against 0.548 ms on avx512, forward + backward 2.28 against 2.49 ms (`natgen bench --device
# cpu --set cpu-2d`, torch 2.13.0). Zen 5 (family 26) has 512-bit datapaths, and there avx512 measured faster
# on every set (2-core AMD EPYC, family 26 model 2, min of two runs each: cpu-2d forward 0.226 -> 0.209 ms,
# forward + backward 1.379 -> 0.853; cpu-1d 1.255 -> 0.910 and 13.8 -> 10.4; nat-2d batch 4 0.703 -> 0.477 and
# 4.03 -> 3.99), so it keeps the default. NATGEN_CPU_ISA=avx512 still selects it where it steps down.
SLOWER_WIDE = {("AuthenticAMD", 25): "avx2"}


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> dict:
    """The first processor's /proc/cpuinfo fields (read once per process; empty where there is none)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block ends: the others repeat it
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    return fields


def _cpu_flags() -> Optional[set]:
    flags = _cpuinfo().get("flags")
    return None if flags is None else set(flags.split())


def _family() -> Optional[int]:
    try:
        return int(_cpuinfo().get("cpu family", ""))
    except ValueError:
        return None


def default() -> Tuple[str, str]:
    """The variant used without NATGEN_CPU_ISA, and why: the widest this CPU supports, unless that CPU
    family's wide variant measured slower (SLOWER_WIDE)."""
    have = supported()
    vendor, family = _cpuinfo().get("vendor_id"), _family()
    step_down = SLOWER_WIDE.get((vendor or "", family))
    if have[0] in ("avx512", "avx512bf16") and step_down in have:
        return step_down, (f"{vendor} family {family}'s AVX-512 measured slower than {step_down} "
                           f"(set {ENV}=avx512 to use it)")
    return have[0], "the best variant this CPU supports"


def supported() -> Tuple[str, ...]:
    """The variants this CPU can run, best first."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ("portable",)  # the x86 variants are compiled only for x86-64 (natgen_cpu_target.h)
    flags = _cpu_flags()
    if flags is not None:
        return tuple(name for name in reversed(VARIANTS) if all(flag in flags for flag in NEEDS[name]))
    import torch  # no /proc/cpuinfo: torch's own dispatch level (it needs the same AVX-512 subsets)
    return _TORCH_CAPABILITY.get(torch.backends.cpu.get_cpu_capability(), ("portable",))


# the CPU flags a machine line names (the ones the variants or a peer's kernels turn on)
NOTABLE_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def cpu_class() -> str:
    """The CPU's vendor, family and model and its notable ISA flags, e.g. 'AuthenticAMD family 26 model 2:
    avx2 fma avx512f avx512_bf16' (benchmark tables name the machine by it: one model name covers several)."""
    info, flags = _cpuinfo(), _cpu_flags() or set()
    ident = " ".join(f"{key} {info[field]}" if key else info[field]
                     for key, field in (("", "vendor_id"), ("family", "cpu family"), ("model", "model"))
                     if field in info)
    have = " ".join(flag for flag in NOTABLE_FLAGS if flag in flags)
    return f"{ident or platform.machine()}: {have or 'none of ' + ', '.join(NOTABLE_FLAGS)}"


def check(name: str) -> str:
    """`name` if this CPU can run that variant, else a ValueError naming NATGEN_CPU_ISA's rule."""
    if name not in VARIANTS:
        raise ValueError(f"{ENV}={name!r}: unknown CPU ISA variant; allowed values: {', '.join(reversed(VARIANTS))}")
    have = supported()
    if name not in have:
        raise ValueError(f"{ENV}={name!r}: this CPU lacks the instructions of that variant (it needs "
                         f"{', '.join(NEEDS[name])}); allowed values here: {', '.join(have)}")
    return name


def _choose() -> None:
    wanted = os.environ.get(ENV, "").strip().lower()
    if wanted:
        name, why = check(wanted), f"{ENV}={wanted}"
    else:
        name, why = default()
    _state.update(name=name, code=VARIANTS.index(name), why=why)


def current() -> str:
    """The variant CPU calls run (decided at the first call, from NATGEN_CPU_ISA or the CPU's features)."""
    if _state["name"] is None:
        _choose()
    return _state["name"]


def code() -> int:
    """The current variant's code, as the kernels' entry points take it."""
    c = _state["code"]
    if c is None:
        current()
        c = _state["code"]
    return c


def describe() -> str:
    """One line naming the variant and why it was picked (explain, the backend's log, bench)."""
    name = current()
    lanes = LANES[name]
    return f"{name} ({lanes} fp32 lanes; {_state['why']}; supported here: {', '.join(supported())})"


def force(name: Optional[str]) -> None:
    """Run later CPU calls on variant `name` (checked against this CPU); None goes back to the automatic
    choice (NATGEN_CPU_ISA or the CPU's features)."""
    if name is None:
        _state.update(name=None, code=None, why=None)
        return
    _state.update(name=check(name), code=VARIANTS.index(name), why="forced")


@contextlib.contextmanager
def use(name: str):
    """`with use("avx2"): ...` runs the CPU calls inside on that variant, then restores the previous one."""
    saved = dict(_state)
    force(name)
    try:
        yield
    finally:
        _state.update(saved)
