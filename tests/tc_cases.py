"""Problems for the tensor-core families (tcs, tcg), shared by the emulated and the gpu test tiers.

Each case names the family that must serve it; every case launches that family's best instance through
the runtime's launch plan, so every family x rank x dtype x causal variant is checked. Cases with
`selected=True` are ones the selector's static cost model prefers a tensor-core instance for: those are
also run through natgen.choose (asserting the family) and the public natgen.naXd entry point. The others
(larger head_dim, where the cost model's occupancy term still favours SIMT) are not.
"""
from __future__ import annotations

import itertools
import math
import os
import random
import zlib
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from oracle import assert_close_by_rule

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    family: str
    rank: int
    spatial: Tuple[int, ...]
    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]
    causal: Tuple[bool, ...]
    dtype: str
    head_dim: int = 32
    n_extra: int = 0
    batch: int = 1
    heads: int = 1
    selected: bool = False
    heads_kv: int = 0  # key/value heads (grouped-query attention); 0: as many as `heads`

    @property
    def id(self) -> str:
        dims = lambda t: "x".join(str(int(x)) for x in t)  # noqa: E731
        return (f"{self.family}-{self.rank}d-L{dims(self.spatial)}-k{dims(self.kernel_size)}-s{dims(self.stride)}"
                f"-d{dims(self.dilation)}-c{dims(self.causal)}-{self.dtype}-h{self.head_dim}-x{self.n_extra}"
                f"-b{self.batch}h{self.heads}" + (f"kv{self.heads_kv}" if self.heads_kv else ""))


def _tup(value, rank):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank


def case(family, spatial, kernel_size, stride=1, dilation=1, causal=False, dtype="f16", **kw) -> Case:
    rank = len(spatial)
    return Case(family, rank, tuple(spatial), _tup(kernel_size, rank), _tup(stride, rank), _tup(dilation, rank),
                _tup(causal, rank), dtype, **kw)


def core_cases():
    cases = []
    # specialized: K, D = 1 compile-time, non-causal; borders, several query tiles, stride, extra tokens
    for dtype in DTYPES:
        cases += [
            case("tcs", (150,), 13, dtype=dtype, n_extra=2 if dtype == "f16" else 0, batch=2),
            case("tcs", (21, 13), 7, stride=(2, 1), dtype=dtype, heads=2),
            case("tcs", (6, 9, 7), 5, dtype=dtype, n_extra=3 if dtype == "bf16" else 0),
        ]
    # generic: every causal variant of every rank, each with dilation groups / even K / stride / extras
    for dtype in DTYPES:
        for causal in itertools.product((False, True), repeat=1):
            cases.append(case("tcg", (97,), 10, stride=3 if causal[0] else 1, dilation=2, causal=causal,
                              dtype=dtype, n_extra=3 if dtype == "f16" else 0))
        for causal in itertools.product((False, True), repeat=2):
            cases.append(case("tcg", (19, 14), (4, 6), stride=(1, 2), dilation=(2, 1), causal=causal, dtype=dtype,
                              n_extra=2 if causal == (True, False) else 0))
        for causal in itertools.product((False, True), repeat=3):
            cases.append(case("tcg", (7, 6, 9), (3, 4, 2), stride=(1, 2, 1), dilation=(2, 1, 3), causal=causal,
                              dtype=dtype, n_extra=1 if causal == (False, True, False) else 0))
    # large windows: many key tiles per CTA (online softmax across tiles, double buffering)
    cases += [
        case("tcg", (300,), 150, dtype="bf16"),
        case("tcg", (40, 36), 24, stride=(1, 3), dtype="f16", n_extra=4),
        # head_dim 64 / 128 (smaller key tiles for 128); the cost model's occupancy term currently keeps
        # these on SIMT, so they run the family directly
        case("tcg", (70,), 20, dilation=3, causal=True, dtype="f16", head_dim=64, selected=False),
        case("tcg", (18, 11), 5, dilation=(1, 2), dtype="bf16", head_dim=128, n_extra=2, selected=False),
        case("tcs", (17, 15), 9, dtype="bf16", head_dim=64, selected=False),
        case("tcs", (5, 6, 7), 3, dtype="f16", head_dim=128, selected=False),
        # one-pass region body (templates/tcs_region_body.cuh.j2): tiles at both borders with extents not a
        # multiple of the tile, head_dim 32/64/128, more extra tokens than the region holds (several extra
        # slabs), and a stride whose union exceeds the region (several region slabs and score groups)
        case("tcs", (70,), 9, dtype="bf16", head_dim=128, n_extra=85, selected=False),
        case("tcs", (13, 22), 5, dtype="f16", head_dim=64, n_extra=3, selected=False),
        case("tcs", (25, 19), 9, stride=(3, 2), dtype="f16", heads=2, selected=False),
        case("tcs", (7, 30), 3, dtype="bf16", n_extra=1, selected=False),
        case("tcs", (5, 7, 9), 3, dtype="bf16", head_dim=64, n_extra=2, selected=False),
        case("tcs", (6, 5, 11), 3, stride=(1, 3, 2), dtype="f16", selected=False),
        # enough CTAs (batch x heads) to fill a device's waves: the static cost model picks tensor cores here
        case("tcs", (16, 16), 7, dtype="f16", batch=12, heads=9, selected=True),
        case("tcg", (256,), 63, causal=True, dtype="bf16", batch=12, heads=9, selected=True),
    ]
    return cases


def gqa_cases():
    """Grouped-query attention (k, v and extras with fewer heads than q) in each tensor-core body: the
    chunked specialized and generic ones, and the one-pass region body (its extra-token slabs too)."""
    return [
        case("tcs", (21, 13), 7, stride=(2, 1), dtype="f16", heads=4, heads_kv=2, batch=2),
        case("tcs", (150,), 13, dtype="bf16", heads=3, heads_kv=1, n_extra=2),
        case("tcs", (13, 22), 5, dtype="f16", head_dim=64, heads=4, heads_kv=1, n_extra=3, selected=False),
        case("tcs", (5, 7, 9), 3, dtype="bf16", head_dim=64, heads=4, heads_kv=2, n_extra=2, selected=False),
        case("tcg", (19, 14), (4, 6), stride=(1, 2), dilation=(2, 1), causal=(True, False), dtype="bf16",
             heads=6, heads_kv=3, n_extra=2),
        case("tcg", (97,), 10, stride=3, dilation=2, causal=True, dtype="f16", heads=4, heads_kv=1, n_extra=3),
        case("tcg", (7, 6, 9), (3, 4, 2), stride=(1, 2, 1), dilation=(2, 1, 3), causal=(False, True, False),
             dtype="f16", heads=2, heads_kv=1, n_extra=1),
    ]


def random_cases(count: int, seed: int = 1234):
    """Seeded random problems: the generic family with any valid K, S, D, causal mask and extras."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        rank = rng.choice((1, 2, 3))
        spatial, kernel, stride, dilation = [], [], [], []
        for _ in range(rank):
            length = rng.randint(4, {1: 140, 2: 24, 3: 9}[rank])
            d = rng.randint(1, max(1, min(3, length // 2)))
            k = rng.randint(2, max(2, length // d))
            spatial.append(length)
            kernel.append(k)
            dilation.append(d)
            stride.append(rng.randint(1, k))
        causal = tuple(rng.random() < 0.4 for _ in range(rank))
        cases.append(case("tcg", tuple(spatial), tuple(kernel), tuple(stride), tuple(dilation), causal,
                          rng.choice(tuple(DTYPES)), n_extra=rng.choice((0, 0, 2)),
                          batch=rng.choice((1, 2)), selected=False))
    return cases


def sample_size() -> int:
    """NATGEN_EMULATED_SAMPLES, else 4 (16 with NATGEN_EMU_WIDE=1)."""
    wide = os.environ.get("NATGEN_EMU_WIDE", "") not in ("", "0")
    return int(os.environ.get("NATGEN_EMULATED_SAMPLES", "16" if wide else "4"))


def make_inputs(c: Case, device="cpu"):
    seed = zlib.crc32(c.id.encode())
    generator = torch.Generator().manual_seed(seed)
    dtype = DTYPES[c.dtype]
    heads_kv = c.heads_kv or c.heads
    q = torch.randn((c.batch, *c.spatial, c.heads, c.head_dim), generator=generator).to(dtype)
    k, v = (torch.randn((c.batch, *c.spatial, heads_kv, c.head_dim), generator=generator).to(dtype)
            for _ in range(2))
    extra_k = extra_v = None
    if c.n_extra:
        extra_k, extra_v = (torch.randn((c.batch, c.n_extra, heads_kv, c.head_dim), generator=generator).to(dtype)
                            for _ in range(2))
    return q, k, v, extra_k, extra_v


def params(c: Case, extra_k, extra_v) -> dict:
    return dict(kernel_size=c.kernel_size, stride=c.stride, dilation=c.dilation, is_causal=c.causal,
                additional_keys=extra_k, additional_values=extra_v)


def family_instance(c: Case, problem, target):
    """The best instance of the case's family for this problem (by the selector's own ranking)."""
    from natgen import selector
    from natgen.manifest import load
    family = [i for i in load() if i.spec.family == c.family]
    ranked = [r for r in selector.rank_instances("fwd", problem, target, family) if r.supported]
    assert ranked, f"no {c.family} instance supports {c.id}"
    return ranked[0].instance


def run_case(c: Case, backend: str, public: bool = False, source_edit=None):
    """Run one case on `backend` ("emulator" or "cuda"), check it against the float64 oracle, return (out, lse).

    public=False launches the family's best instance through the runtime's launch plan; public=True asserts
    that natgen.choose picks the case's family and runs through natgen.naXd (only for `selected` cases).
    source_edit (emulator, public=False): a function of the instance's CUDA source whose result is launched
    instead (tests that plant a bug in a generated kernel); the oracle check is then skipped."""
    import natgen
    from natgen import selector
    from natgen.problem import make_problem

    device = "cuda" if backend == "cuda" else "cpu"
    q, k, v, extra_k, extra_v = make_inputs(c)
    dq, dk, dv = (t.to(device) for t in (q, k, v))
    dek = extra_k.to(device) if extra_k is not None else None
    dev = extra_v.to(device) if extra_v is not None else None
    kw = params(c, dek, dev)
    if public:
        assert c.selected, f"{c.id}: the cost model does not prefer {c.family} here"
        _, name = natgen.choose(c.rank, dq, dk, dv, backend=backend, **kw)
        assert name is not None and f"_{c.family}_" in name, f"{c.id}: selector chose {name}, expected {c.family}"
        op = getattr(natgen, f"na{c.rank}d")
        out, lse = op(dq, dk, dv, return_lse=True, backend=backend, **kw)
    else:
        problem = make_problem(c.rank, dq, dk, dv, c.kernel_size, c.stride, c.dilation, c.causal, None, dek, dev)
        if backend == "cuda":
            from natgen import cuda
            target = selector.Target("cuda", cuda.device_arch(dq.device), cuda.device_sms(dq.device))
        else:
            target = selector.Target("cuda", "sm_80")
        instance = family_instance(c, problem, target)
        if source_edit is not None:
            assert backend == "emulator", "source edits run through the emulator"
            from natgen import emulator
            from natgen.launch import KernelCall
            source = instance.source_path.read_text()
            edited = source_edit(source)
            assert edited != source, f"{c.id}: the source edit changed nothing"
            call = KernelCall(instance, problem)
            call.launcher = lambda tensors: emulator.launch(edited, instance.entry["symbol"], call.plan.grid,
                                                            call.plan.block, call.plan.bind(tensors),
                                                            shared_mem=call.plan.shared_mem)
            return call(dq, dk, dv, dek, dev)
        out, lse = natgen.ops.run_instance(instance.name, c.rank, dq, dk, dv, via=backend, **kw)
        if backend == "cuda":
            torch.cuda.synchronize()
    assert_close_by_rule(out.cpu(), q, k, v, lse=lse.cpu(), **params(c, extra_k, extra_v))
    assert math.isfinite(lse.float().abs().max().item())
    return out, lse
