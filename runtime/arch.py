"""GPU architecture names: one spelling (`sm_80`) everywhere, and the per-SM limits the cost model uses."""
from __future__ import annotations

import re

_ARCH_RE = re.compile(r"sm_?(\d+)a?")

# Per-SM limits used for occupancy (CUDA programming guide, compute capability tables).
ARCH_LIMITS = {
    "sm_80": {"threads": 2048, "registers": 65536, "smem": 164 * 1024, "ctas": 32, "sms": 108},
    "sm_86": {"threads": 1536, "registers": 65536, "smem": 100 * 1024, "ctas": 16, "sms": 84},
    "sm_89": {"threads": 1536, "registers": 65536, "smem": 100 * 1024, "ctas": 24, "sms": 128},
    "sm_90": {"threads": 2048, "registers": 65536, "smem": 228 * 1024, "ctas": 32, "sms": 132},
}


def arch_number(arch: str) -> int:
    """'sm_90' / 'sm90' / 'sm_90a' -> 90; anything else is a ValueError naming the value."""
    match = _ARCH_RE.fullmatch(arch) if isinstance(arch, str) else None
    if not match:
        raise ValueError(f"arch={arch!r} must look like sm_80 or sm_90")
    return int(match.group(1))


def normalize(arch: str) -> str:
    """The one spelling: 'sm80' / 'sm_80' -> 'sm_80' (an 'a' suffix is kept)."""
    number = arch_number(arch)
    return f"sm_{number}a" if arch.endswith("a") else f"sm_{number}"


def name_token(arch: str) -> str:
    """How an arch appears inside an instance name: 'sm_80' -> 'sm80' (names use no underscore inside a field)."""
    return arch.replace("_", "")


def arch_limits(arch: str) -> dict:
    return ARCH_LIMITS.get(arch) or ARCH_LIMITS["sm_90" if arch_number(arch) >= 90 else "sm_80"]
