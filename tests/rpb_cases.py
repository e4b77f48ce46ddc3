"""Relative positional bias (rpb) problems for the CUDA forward families, shared by the emulated and gpu tiers.

Each case names the family that must serve it and runs that family's best instance for the problem (the
selector's own ranking, with the rpb problem, so only instances that add a bias qualify) through the
runtime's launch plan; the result is checked against the float64 oracle with the bias (tests/oracle.py).
"""
from __future__ import annotations

import math
import zlib

import torch

from oracle import assert_close_by_rule
from tc_cases import Case, case, params

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def core_cases(wide: bool = True):
    """Every CUDA forward family x rank, the dtypes each takes, borders, dilation groups, stride, causal
    masks, even K and extra tokens (which get no bias). wide=False keeps one dtype per family x rank (each
    case compiles its own instance in the emulator; the gpu tier and NATGEN_EMU_WIDE=1 run them all)."""
    cases = []
    for dtype in ("f32", "f16", "bf16"):
        cases += [  # the generic SIMT instances (runtime K and D)
            case("simt", (13,), 4, dilation=2, causal=dtype == "f16", dtype=dtype, n_extra=2, heads=2),
            case("simt", (7, 8), (3, 4), stride=(1, 2), dilation=(2, 1), causal=(dtype == "bf16", False),
                 dtype=dtype),
            case("simt", (4, 5, 6), (2, 3, 3), dilation=(1, 1, 2), causal=(False, dtype == "f32", True),
                 dtype=dtype, n_extra=1),
        ]
    cases += [  # specialized SIMT (compile-time K, unrolled inner loop)
        case("simt", (9,), 5, dtype="f32", heads=3),
        case("simt", (6, 7), 3, dtype="bf16", head_dim=64),
    ]
    for dtype in ("f16", "bf16"):
        cases += [
            # generic tensor cores: dilation groups, even K, stride, causal, extras, several key tiles
            case("tcg", (70,), 6, stride=2, dilation=2, causal=dtype == "bf16", dtype=dtype, n_extra=3, heads=2),
            case("tcg", (11, 9), (4, 3), dilation=(2, 1), causal=(False, dtype == "f16"), dtype=dtype),
            case("tcg", (5, 6, 7), (2, 3, 4), dilation=(1, 2, 1), causal=(dtype == "f16", False, True),
                 dtype=dtype, n_extra=1),
            # specialized tensor cores, one-pass region body (borders, extras in their own slab)
            case("tcs", (70,), 5, dtype=dtype, n_extra=2, heads=2),
            case("tcs", (9, 20), 3, dtype=dtype),
            case("tcs", (5, 6, 7), 3, dtype=dtype, n_extra=1 if dtype == "bf16" else 0),
        ]
    cases += [
        case("tcs", (18, 7), 5, stride=(2, 1), dtype="f16", head_dim=128),   # chunked body (no one-pass fit)
        case("tcg", (100,), 80, dtype="bf16"),                               # two key tiles: online merge
    ]
    if not wide:
        # one dtype per family x rank, rotating so that every dtype of a family is still met
        rotation = {"simt": ("f16", "bf16", "f32"), "tcg": ("bf16", "f16", "f16"), "tcs": ("f16", "bf16", "f16")}
        generic = [c for c in cases if c.family in rotation and c.head_dim == 32 and c.kernel_size != (80,)
                   and not (c.family == "simt" and c.kernel_size in ((5,), (3, 3)))]
        kept = [c for c in generic if c.dtype == rotation[c.family][c.rank - 1]]
        cases = kept + [c for c in cases if c not in generic]
    return cases


def make_inputs(c: Case, device="cpu"):
    """q, k, v, extras and an rpb of a spread that moves the softmax (so a bias in the wrong slot shows)."""
    generator = torch.Generator().manual_seed(zlib.crc32(("rpb-" + c.id).encode()))
    dtype = DTYPES[c.dtype]
    heads_kv = c.heads_kv or c.heads
    q = torch.randn((c.batch, *c.spatial, c.heads, c.head_dim), generator=generator).to(dtype)
    k, v = (torch.randn((c.batch, *c.spatial, heads_kv, c.head_dim), generator=generator).to(dtype)
            for _ in range(2))
    extra_k = extra_v = None
    if c.n_extra:
        extra_k, extra_v = (torch.randn((c.batch, c.n_extra, heads_kv, c.head_dim), generator=generator).to(dtype)
                            for _ in range(2))
    rpb = (2 * torch.randn((c.heads, *(2 * K - 1 for K in c.kernel_size)), generator=generator)).to(dtype)
    return q, k, v, extra_k, extra_v, rpb


def family_instance(c: Case, problem, target):
    from natgen import selector
    from natgen.manifest import load
    family = [i for i in load() if i.spec.family == c.family]
    ranked = [r for r in selector.rank_instances("fwd", problem, target, family) if r.supported]
    assert ranked, f"no {c.family} instance supports {c.id} with a positional bias"
    return ranked[0].instance


def run_case(c: Case, backend: str):
    """Run one case's family on `backend` ("emulator" or "cuda") with its rpb, check against the oracle."""
    import natgen
    from natgen import selector
    from natgen.problem import make_problem

    device = "cuda" if backend == "cuda" else "cpu"
    q, k, v, extra_k, extra_v, rpb = make_inputs(c)
    dq, dk, dv, drpb = (t.to(device) for t in (q, k, v, rpb))
    dek, dev = ((t.to(device) if t is not None else None) for t in (extra_k, extra_v))
    problem = make_problem(c.rank, dq, dk, dv, c.kernel_size, c.stride, c.dilation, c.causal, None, dek, dev,
                           rpb=drpb)
    if backend == "cuda":
        from natgen import cuda
        target = selector.Target("cuda", cuda.device_arch(dq.device), cuda.device_sms(dq.device))
    else:
        target = selector.Target("cuda", "sm_80")
    instance = family_instance(c, problem, target)
    out, lse = natgen.ops.run_instance(instance.name, c.rank, dq, dk, dv, via=backend, rpb=drpb,
                                       **params(c, dek, dev))
    if backend == "cuda":
        torch.cuda.synchronize()
    assert_close_by_rule(out.cpu(), q, k, v, lse=lse.cpu(), rpb=rpb, **params(c, extra_k, extra_v))
    assert math.isfinite(lse.float().abs().max().item())
    return out, lse
