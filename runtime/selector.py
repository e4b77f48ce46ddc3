"""Problem -> best instance, with the reason every other candidate lost.

Selection is data plus one small pure function: each instance either cannot serve the problem (and says
why) or gets a static cost; the cheapest wins. The cost model reads manifest figures, except the wasted-work
figure of the tensor-core families, which their family module computes for the problem at hand (a runtime-K
instance's waste depends on K and the borders, which no single recorded figure can stand for).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from .codegen.families import REGISTRY
from .codegen.nvcc import arch_number
from .codegen.spec import ANY, TORCH_DTYPE_TOKENS
from .manifest import Instance, load
from .problem import Problem

log = logging.getLogger("natgen.selector")

# Per-SM limits used for occupancy (CUDA programming guide, compute capability tables).
ARCH_LIMITS = {
    "sm_80": {"threads": 2048, "registers": 65536, "smem": 164 * 1024, "ctas": 32, "sms": 108},
    "sm_86": {"threads": 1536, "registers": 65536, "smem": 100 * 1024, "ctas": 16, "sms": 84},
    "sm_89": {"threads": 1536, "registers": 65536, "smem": 100 * 1024, "ctas": 24, "sms": 128},
    "sm_90": {"threads": 2048, "registers": 65536, "smem": 228 * 1024, "ctas": 32, "sms": 132},
}
# Relative time per useful key of each family, before waste and occupancy (lower is faster). The
# tensor-core families beat the SIMT one by the mma throughput ratio; specialization removes index math.
FAMILY_BASE_COST = {"tcs": 1.0, "tcg": 1.3, "simt": 6.0, "cpu": 1.0}
SPECIALIZED_DISCOUNT = 0.85
# Resident warps per SM beyond which more occupancy stops hiding latency. The SIMT family is latency
# bound (one dependent shuffle chain per key) and wants many warps; tensor-core CTAs keep several mma
# and cp.async stages in flight per warp, so a few warps per scheduler already saturate them.
SATURATING_WARPS = {"simt": 32, "tcs": 8, "tcg": 8}
REGISTER_ALLOCATION_UNIT = 256


@dataclass(frozen=True)
class Target:
    """Where the problem will run: 'cuda' (arch like sm_80, with an SM count) or 'cpu'."""
    kind: str
    arch: str = "sm_80"
    sms: Optional[int] = None


@dataclass
class Ranked:
    instance: Instance
    cost: float = math.inf
    reasons: List[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    @property
    def supported(self) -> bool:
        return not self.reasons


def arch_limits(arch: str) -> dict:
    return ARCH_LIMITS.get(arch) or ARCH_LIMITS["sm_90" if arch_number(arch) >= 90 else "sm_80"]


def ctas_per_sm(launch: dict, build: Optional[dict], arch: str) -> int:
    """Resident CTAs per SM from ptxas figures (registers, static smem) and the launch shape."""
    limits = arch_limits(arch)
    threads = launch["threads"]
    bounds = [limits["ctas"], limits["threads"] // threads]
    smem = launch.get("dynamic_smem", 0) + (build or {}).get("smem_bytes", 0)
    if smem:
        bounds.append(limits["smem"] // smem)
    if build and build.get("registers"):
        per_warp = math.ceil(build["registers"] * 32 / REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
        bounds.append(limits["registers"] // (per_warp * math.ceil(threads / 32)))
    return max(0, min(bounds))


def not_supported_reasons(instance: Instance, problem: Problem, target: Target) -> List[str]:
    spec, reasons = instance.spec, []
    if (spec.family == "cpu") != (target.kind == "cpu"):
        reasons.append(f"family {spec.family} does not run on {target.kind}")
    if spec.op != "fwd":
        reasons.append("not a forward kernel")
    if spec.rank != problem.rank:
        reasons.append(f"rank {spec.rank} != {problem.rank}")
    dtype = TORCH_DTYPE_TOKENS.get(str(problem.dtype).replace("torch.", ""))
    if spec.dtype != dtype:
        reasons.append(f"dtype {spec.dtype} != {dtype}")
    if spec.head_dim != ANY and spec.head_dim != problem.head_dim:
        reasons.append(f"head_dim {spec.head_dim} != {problem.head_dim}")
    if spec.head_dim != ANY and problem.head_dim_v != problem.head_dim:
        reasons.append(f"value head_dim {problem.head_dim_v} differs from query head_dim {problem.head_dim}")
    if spec.kernel_size != ANY and tuple(spec.kernel_size) != problem.kernel_size:
        reasons.append(f"kernel_size {tuple(spec.kernel_size)} != {problem.kernel_size}")
    if spec.dilation != ANY and tuple(spec.dilation) != problem.dilation:
        reasons.append(f"dilation {tuple(spec.dilation)} != {problem.dilation}")
    if tuple(spec.causal) != problem.is_causal:
        reasons.append(f"causal mask {tuple(spec.causal)} != {problem.is_causal}")
    if target.kind == "cuda" and spec.arch.startswith("sm"):
        if arch_number(target.arch) < arch_number(spec.arch):
            reasons.append(f"needs {spec.arch}, device is {target.arch}")
    limits = instance.launch.get("limits", {})
    if problem.n_extra > limits.get("max_extra", math.inf):
        reasons.append(f"{problem.n_extra} extra tokens > {limits['max_extra']}")
    if problem.window > limits.get("max_window", math.inf):
        reasons.append(f"window of {problem.window} keys > {limits['max_window']}")
    return reasons


def static_cost(instance: Instance, problem: Problem, target: Target) -> Tuple[float, dict]:
    spec, launch = instance.spec, instance.launch
    problem_waste = getattr(REGISTRY.get(spec.family), "problem_waste", None)
    # the manifest's figure is for a fixed reference problem: the fallback for families without a model
    waste = (problem_waste(spec, problem) if problem_waste
             else float(launch.get("computed_keys_per_useful_key", 1.0)))
    cost = FAMILY_BASE_COST.get(spec.family, 10.0) * waste
    if spec.kernel_size != ANY:
        cost *= SPECIALIZED_DISCOUNT
    details = {"computed_keys_per_useful_key": round(waste, 3)}
    if target.kind == "cuda":
        build = instance.build(target.arch)
        resident = ctas_per_sm(launch, build, target.arch)
        if resident == 0:
            return math.inf, {"ctas_per_sm": 0}
        sms = target.sms or arch_limits(target.arch)["sms"]
        ctas = math.ceil(problem.num_tokens / launch["queries_per_cta"]) * problem.heads * problem.batch
        slots = sms * resident
        waves = math.ceil(ctas / slots)
        wave_efficiency = ctas / (waves * slots)
        warps = resident * launch["threads"] / 32
        occupancy_factor = min(1.0, warps / SATURATING_WARPS.get(spec.family, 32))
        cost /= max(wave_efficiency, 1e-3) * max(occupancy_factor, 0.125)
        details.update(ctas_per_sm=resident, waves=waves, wave_efficiency=round(wave_efficiency, 3),
                       registers=(build or {}).get("registers"))
    return cost, details


def rank_instances(problem: Problem, target: Target, instances: Optional[Sequence[Instance]] = None) -> List[Ranked]:
    ranked = []
    for instance in instances if instances is not None else load():
        entry = Ranked(instance, reasons=not_supported_reasons(instance, problem, target))
        if entry.supported:
            entry.cost, entry.details = static_cost(instance, problem, target)
            if math.isinf(entry.cost):
                entry.reasons.append("cannot be resident on this arch (0 CTAs per SM)")
        ranked.append(entry)
    ranked.sort(key=lambda r: (not r.supported, r.cost, r.instance.name))
    return ranked


class NoKernelError(RuntimeError):
    pass


def select(problem: Problem, target: Target, instances: Optional[Sequence[Instance]] = None) -> Ranked:
    ranked = rank_instances(problem, target, instances)
    if not ranked or not ranked[0].supported:
        near = [r for r in ranked if r.instance.spec.rank == problem.rank][:6]
        lines = "; ".join(f"{r.instance.name} because {', '.join(r.reasons)}" for r in near)
        raise NoKernelError(f"no {target.kind} kernel for this problem ({describe(problem)}): {lines}")
    best = ranked[0]
    log.debug("selected %s (cost %.3f, %s) for %s", best.instance.name, best.cost, best.details, describe(problem))
    return best


def describe(problem: Problem) -> str:
    dtype = str(problem.dtype).replace("torch.", "")
    return (f"rank {problem.rank}, batch {problem.batch}, spatial {'x'.join(map(str, problem.spatial))}, "
            f"heads {problem.heads}, head_dim {problem.head_dim}, kernel {problem.kernel_size}, "
            f"stride {problem.stride}, dilation {problem.dilation}, causal {problem.is_causal}, {dtype}, "
            f"{problem.n_extra} extra tokens")
