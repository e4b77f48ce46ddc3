"""`natgen bench`: natgen beside its peers on the standard problem sets of BENCHMARKS.md.

Every peer of a set is measured in the same run on the same inputs (warm-up, then the minimum of N
interleaved rounds, a round being the per-call mean of ~20 ms of back-to-back calls), and reported with the FLOP and byte conventions of SEMANTICS.md:

    forward FLOPs  = 4 * batch * heads * N * prod(K) * head_dim      (N = prod(spatial))
    backward FLOPs = 2.5 * forward      (a --backward run times forward + backward: 3.5 * forward)
    forward bytes  = 4 * batch * heads * N * head_dim * sizeof(dtype)  (q, k, v read, out written once)

The figures are *effective*: the dense `sdpa` peer does N / prod(K) times more arithmetic than the
neighborhood needs, and is still credited with the neighborhood's FLOPs, so every row of a table is
comparable. A peer that is not installed, does not support the case, runs out of memory or fails is
a row with the reason, never dropped.

Peers:
    natgen     natgen.naXd(backend=None): the best available backend (the row names it and the instance)
    reference  natgen.naXd(backend="reference"): the pure-torch gather implementation
    flex       torch.nn.attention.flex_attention under torch.compile, with a BlockMask built from
               `neighborhood_mask_mod` (SEMANTICS.md's rule in tensor arithmetic), inputs [B, H, N, d]
    natten     the natten package's naXd (same heads-last layout), with its own backend choice
    sdpa       dense torch scaled_dot_product_attention over all N tokens, inputs [B, H, N, d]

Layout changes a peer needs are done once outside the timed region (each peer gets inputs in its
own native layout); block masks are built once per set, outside the timed region, as a user would.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .window import sees_1d

PEERS = ("natgen", "reference", "flex", "natten", "sdpa")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
# A window of at most this many keys counts as "small K": memory-bound on every machine we target
# (ideal arithmetic intensity prod(K) / sizeof(dtype) FLOP/byte), so the table also shows GB/s.
SMALL_WINDOW = 64
# Rough sustained rates used ONLY to skip a peer on the CPU before starting a call that would take
# absurdly long (more than SKIP_FACTOR budgets and a minute); never used for any reported figure. Dense SDPA is
# charged its dense FLOPs (4 * B * H * N^2 * d), the others the neighborhood's.
ASSUMED_CPU_GFLOPS = {"natgen": 50.0, "reference": 20.0, "flex": 50.0, "natten": 20.0, "sdpa": 200.0}
SKIP_FACTOR = 30


@dataclass(frozen=True)
class ProblemSet:
    name: str
    rank: int
    batch: int
    heads: int
    spatial: Tuple[int, ...]
    head_dim: int
    kernel_size: Tuple[int, ...]
    dilation: Tuple[int, ...]
    stride: Tuple[int, ...] = ()
    is_causal: Tuple[bool, ...] = ()
    shrunk_from: Optional[int] = None     # the set's own batch when --batch shrank it

    def __post_init__(self):
        def per_dim(value, default):
            value = default if value in ((), None) else value
            return tuple(value) if isinstance(value, (tuple, list)) else (value,) * self.rank
        object.__setattr__(self, "spatial", per_dim(self.spatial, None))
        object.__setattr__(self, "kernel_size", per_dim(self.kernel_size, None))
        object.__setattr__(self, "dilation", per_dim(self.dilation, 1))
        object.__setattr__(self, "stride", per_dim(self.stride, 1))
        object.__setattr__(self, "is_causal", per_dim(self.is_causal, False))
        if not (len(self.spatial) == len(self.kernel_size) == len(self.dilation) == self.rank):
            raise ValueError(f"problem set {self.name!r}: spatial/kernel/dilation need {self.rank} entries")

    @property
    def tokens(self) -> int:
        return math.prod(self.spatial)

    @property
    def window(self) -> int:
        return math.prod(self.kernel_size)

    def with_batch(self, batch: Optional[int]) -> "ProblemSet":
        """The same set with its batch shrunk to `batch` (never grown; spatial never changes)."""
        if batch is None or batch >= self.batch:
            return self
        if batch < 1:
            raise ValueError(f"--batch {batch} must be >= 1")
        return dataclasses.replace(self, batch=batch, shrunk_from=self.shrunk_from or self.batch)

    def describe(self) -> str:
        dims = lambda t: "x".join(str(x) for x in t)  # noqa: E731
        batch = f"batch {self.batch}" + (f" (shrunk from {self.shrunk_from})" if self.shrunk_from else "")
        extra = ""
        if any(s != 1 for s in self.stride):
            extra += f", stride {dims(self.stride)}"
        if any(self.is_causal):
            extra += f", causal {dims(int(c) for c in self.is_causal)}"
        return (f"na{self.rank}d, {batch}, heads {self.heads}, spatial {dims(self.spatial)}, head_dim "
                f"{self.head_dim}, kernel {dims(self.kernel_size)}, dilation {dims(self.dilation)}{extra}")


def _set(name, rank, batch, heads, spatial, head_dim, kernel, dilation):
    return ProblemSet(name, rank, batch, heads, spatial, head_dim, kernel, dilation)


# BENCHMARKS.md, "Standard problem sets", verbatim.
SETS: Dict[str, ProblemSet] = {s.name: s for s in [
    _set("nat-1d", 1, 128, 16, (144,), 32, 49, 1),
    _set("nat-2d", 2, 128, 16, (14, 14), 32, 7, 1),
    _set("dinat-2d", 2, 128, 16, (28, 28), 32, 7, 4),
    _set("nat-3d", 3, 1, 8, (14, 14, 14), 32, 7, 1),
    _set("long-1d", 1, 1, 24, (32768,), 128, 2048, 1),
    _set("image-2d", 2, 1, 24, (256, 256), 128, 80, 1),
    _set("video-3d", 3, 1, 24, (30, 48, 80), 128, (18, 24, 24), 1),
    _set("cpu-2d", 2, 1, 4, (32, 32), 32, 7, 1),
    _set("cpu-1d", 1, 4, 4, (1024,), 64, 31, 2),
]}
DEFAULT_SETS = {"cpu": ("cpu-2d", "cpu-1d"),
                "cuda": ("nat-1d", "nat-2d", "dinat-2d", "nat-3d", "long-1d", "image-2d", "video-3d")}
DEFAULT_DTYPE = {"cpu": torch.float32, "cuda": torch.float16}


# ------------------------------------------------------------------------------------------ formulas
def forward_flops(ps: ProblemSet) -> float:
    """SEMANTICS.md: 4 * batch * heads * N * prod(K) * head_dim."""
    return 4.0 * ps.batch * ps.heads * ps.tokens * ps.window * ps.head_dim


def backward_flops(ps: ProblemSet) -> float:
    """SEMANTICS.md: backward = 2.5 x forward."""
    return 2.5 * forward_flops(ps)


def measured_flops(ps: ProblemSet, backward: bool) -> float:
    """FLOPs credited to one timed call: forward, or forward + backward."""
    return forward_flops(ps) + (backward_flops(ps) if backward else 0.0)


def forward_bytes(ps: ProblemSet, dtype: torch.dtype) -> float:
    """SEMANTICS.md: minimum forward bytes = 4 * batch * heads * N * head_dim * sizeof(dtype)."""
    return 4.0 * ps.batch * ps.heads * ps.tokens * ps.head_dim * torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------ flex mask_mod
def neighborhood_mask_mod(spatial, kernel_size, stride=1, dilation=1, is_causal=False):
    """A flex_attention mask_mod(b, h, q_idx, kv_idx) for flat row-major token indices implementing
    SEMANTICS.md's rule per spatial dim with tensor arithmetic (dilation groups, stride groups,
    inward border shift, causal)."""
    rank = len(spatial)

    def per_dim(value):
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank

    spatial = tuple(int(x) for x in spatial)
    dims = list(zip(spatial, per_dim(kernel_size), per_dim(stride), per_dim(dilation), per_dim(is_causal)))
    row_strides = [math.prod(spatial[a + 1:]) for a in range(rank)]

    def mask_mod(b, h, q_idx, kv_idx):
        sees = None
        for axis, (L, K, S, D, C) in enumerate(dims):
            i = (q_idx // row_strides[axis]) % L
            j = (kv_idx // row_strides[axis]) % L
            axis_mask = sees_1d(i, j, L, K, S, D, bool(C))
            sees = axis_mask if sees is None else sees & axis_mask
        return sees

    return mask_mod


def flex_block_mask(ps: ProblemSet, device):
    from torch.nn.attention.flex_attention import create_block_mask
    mask_mod = neighborhood_mask_mod(ps.spatial, ps.kernel_size, ps.stride, ps.dilation, ps.is_causal)
    # _compile=True builds the mask block by block instead of materializing N x N booleans at once.
    return create_block_mask(mask_mod, None, None, ps.tokens, ps.tokens, device=device,
                             _compile=ps.tokens > 4096)


_COMPILED_FLEX = None


def compiled_flex():
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention
        import torch._dynamo.config as dynamo_config
        # one compiled graph per (set, dtype, forward/backward): more than dynamo's default cache
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


# -------------------------------------------------------------------------------------------- peers
class PeerUnavailable(Exception):
    """The peer cannot run this case; the message is what the table shows."""


@dataclass
class Runner:
    call: Callable[[], object]        # one timed call: forward, or forward + backward
    implementation: str               # what ran, for the table
    compiles: bool = False            # the first call compiles (its time says nothing about the budget)


@dataclass
class Case:
    ps: ProblemSet
    device: torch.device
    dtype: torch.dtype
    backward: bool
    q: torch.Tensor                   # [B, *spatial, H, d]
    k: torch.Tensor
    v: torch.Tensor
    grad: torch.Tensor                # fixed cotangent, [B, *spatial, H, d]

    def heads_first(self):
        """(q, k, v, grad) as [B, H, N, d] contiguous copies (made outside the timed region)."""
        ps = self.ps

        def convert(t):
            return t.detach().reshape(ps.batch, ps.tokens, ps.heads, -1).transpose(1, 2).contiguous()
        return tuple(convert(t) for t in (self.q, self.k, self.v, self.grad))


def _make_case(ps: ProblemSet, device, dtype, backward, seed=0) -> Case:
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (ps.batch, *ps.spatial, ps.heads, ps.head_dim)
    q, k, v, grad = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(4))
    return Case(ps, device, dtype, backward, q, k, v, grad)


def _timed_call(fn, case: Case, inputs, grad):
    """fn(*inputs) -> output; a forward call, or forward + backward of the fixed cotangent `grad`."""
    if not case.backward:
        def call():
            with torch.no_grad():
                return fn(*inputs)
        return call
    leaves = [t.detach().requires_grad_(True) for t in inputs]

    def call():
        out = fn(*leaves)
        return torch.autograd.grad(out, leaves, grad)
    return call


def _natgen_op(rank):
    import natgen
    return {1: natgen.na1d, 2: natgen.na2d, 3: natgen.na3d}[rank]


def _peer_natgen(case: Case, backend=None) -> Runner:
    import natgen
    ps = case.ps
    params = dict(kernel_size=ps.kernel_size, stride=ps.stride, dilation=ps.dilation, is_causal=ps.is_causal)
    try:
        name, instance = natgen.choose(ps.rank, case.q, case.k, case.v, backend=backend, **params)
    except (RuntimeError, ValueError) as exc:
        raise PeerUnavailable(_first_line(exc)) from None
    implementation = f"{name}: {instance}" if instance else (
        name if backend == "reference" else f"{name} (no generated kernel fits)")
    if case.backward and name != "reference" and natgen.choose(ps.rank, case.q, case.k, case.v, backend=backend,
                                                               op="backward", **params)[0] == "reference":
        implementation += " + reference backward"
    op = _natgen_op(ps.rank)

    def fn(q, k, v):
        return op(q, k, v, backend=backend, **params)
    return Runner(_timed_call(fn, case, (case.q, case.k, case.v), case.grad), implementation,
                  compiles=instance is not None)


def _peer_reference(case: Case) -> Runner:
    return _peer_natgen(case, backend="reference")


def _peer_flex(case: Case) -> Runner:
    try:
        from torch.nn.attention import flex_attention as _  # noqa: F401
    except ImportError:
        raise PeerUnavailable(f"not available in torch {torch.__version__}") from None
    if case.backward and case.device.type == "cpu":
        raise PeerUnavailable("no CPU backward (flex_attention supports backward only on GPU)")
    ps = case.ps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block_mask = flex_block_mask(ps, case.device)
    q, k, v, grad = case.heads_first()
    flex = compiled_flex()
    scale = ps.head_dim ** -0.5

    def fn(q, k, v):
        return flex(q, k, v, block_mask=block_mask, scale=scale)
    try:
        rows_, columns = (math.ceil(ps.tokens / size) for size in block_mask.BLOCK_SIZE)
        used = int(block_mask.kv_num_blocks[0, 0].sum())
        if block_mask.full_kv_num_blocks is not None:
            used += int(block_mask.full_kv_num_blocks[0, 0].sum())
        sparsity = f", {used}/{rows_ * columns} blocks"
    except Exception:  # noqa: BLE001 - cosmetic only
        sparsity = ""
    return Runner(_timed_call(fn, case, (q, k, v), grad),
                  f"flex_attention (torch.compile) + BlockMask{sparsity}", compiles=True)


def _peer_natten(case: Case) -> Runner:
    try:
        import natten
    except ImportError:
        raise PeerUnavailable("not installed (pip install --no-build-isolation natten)") from None
    except Exception as exc:  # noqa: BLE001 - a broken install is reported, not raised
        raise PeerUnavailable(f"import failed: {_first_line(exc)}") from None
    ps = case.ps
    op = getattr(natten, f"na{ps.rank}d")
    try:
        from natten.backends import choose_backend
        backend = choose_backend(case.q, case.k, case.v, torch_compile=False)
    except Exception as exc:  # noqa: BLE001
        raise PeerUnavailable(_first_line(exc)) from None
    version = getattr(natten, "__version__", "?")
    if backend.startswith("flex"):
        backend += " (compiled)" if natten.is_flex_compile_allowed() else " (eager)"

    def fn(q, k, v):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # natten's flex path warns on every eager call
            return op(q, k, v, kernel_size=ps.kernel_size, stride=ps.stride, dilation=ps.dilation,
                      is_causal=ps.is_causal)
    return Runner(_timed_call(fn, case, (case.q, case.k, case.v), case.grad),
                  f"natten {version}: {backend}", compiles=True)


def _peer_sdpa(case: Case) -> Runner:
    q, k, v, grad = case.heads_first()
    scale = case.ps.head_dim ** -0.5

    def fn(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    return Runner(_timed_call(fn, case, (q, k, v), grad), f"dense SDPA over all {case.ps.tokens} tokens")


PEER_FACTORIES: Dict[str, Callable[[Case], Runner]] = {
    "natgen": _peer_natgen, "reference": _peer_reference, "flex": _peer_flex, "natten": _peer_natten,
    "sdpa": _peer_sdpa,
}


# ------------------------------------------------------------------------------------------- timing
@dataclass
class Measurement:
    peer: str
    implementation: str = ""
    seconds: Optional[float] = None   # min over the rounds of the per-call time
    calls: int = 0                    # timed rounds the minimum is over
    per_round: int = 1                # back-to-back calls in one round
    status: str = ""                  # why there is no figure, or a note about the figure


@dataclass
class SetResult:
    ps: ProblemSet
    device: str
    dtype: torch.dtype
    backward: bool
    repeats: int
    warmup: int = 2
    measurements: List[Measurement] = field(default_factory=list)

    @property
    def flops(self) -> float:
        return measured_flops(self.ps, self.backward)

    def by_peer(self, peer) -> Optional[Measurement]:
        return next((m for m in self.measurements if m.peer == peer), None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    if ". " in line:        # the first sentence is enough for a table cell
        line = line[:line.index(". ") + 1]
    if "not support backward on cpu" in line.lower():
        return f"no CPU backward ({type(exc).__name__}: {line})"
    return f"{type(exc).__name__}: {line}"[:160] if line else type(exc).__name__


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _estimated_cpu_seconds(peer: str, ps: ProblemSet, backward: bool) -> float:
    work = measured_flops(ps, backward)
    if peer == "sdpa":
        work *= ps.tokens / ps.window      # dense: every query against every key
    return work / (ASSUMED_CPU_GFLOPS.get(peer, 20.0) * 1e9)


# A round times this long a block of back-to-back calls (at least one) and keeps the mean: a lone sub-ms call
# measures the wake-up of an idle thread pool and cold caches as much as the op (on 2 cores: natgen's cpu-2d
# forward alone 0.68 ms a call back to back, 0.8-1.05 ms as one call after a pause or after another peer).
ROUND_SECONDS = 0.02
MAX_PER_ROUND = 50


def _per_round(seconds: float) -> int:
    return max(1, min(MAX_PER_ROUND, math.ceil(ROUND_SECONDS / max(seconds, 1e-9))))


def _timed(runner: Runner, device: torch.device, calls: int = 1) -> float:
    """Seconds per call over `calls` back-to-back calls."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        runner.call()
    _sync(device)
    return (time.perf_counter() - start) / calls


def _failure(exc: BaseException) -> str:
    if isinstance(exc, PeerUnavailable):
        return str(exc)
    return "OOM" if _is_oom(exc) else _first_line(exc)


_PROCESS_WARM = set()


def _warm_process(device: torch.device, seconds: float = 0.5) -> None:
    """The first timed work in a process runs slow (thread pool start, allocator, clocks): burn a
    moment of matmuls once per device so that the first peer measured is not penalized."""
    if device.type in _PROCESS_WARM:
        return
    _PROCESS_WARM.add(device.type)
    a = torch.randn(256, 256, device=device)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        a = torch.tanh(a @ a)
        _sync(device)


def _start(peer: str, case: Case, budget: float, warmup: int):
    """Build the peer's runner and warm it up: (Measurement, runner or None when it is done)."""
    result = Measurement(peer)
    if case.device.type == "cpu":
        estimate = _estimated_cpu_seconds(peer, case.ps, case.backward)
        if estimate > max(SKIP_FACTOR * budget, 60.0):
            result.status = (f"skipped: would take ~{estimate:.0f} s a call on this CPU (budget {budget:g} s); "
                             "shrink with --batch")
            return result, None
    try:
        runner = PEER_FACTORIES[peer](case)
        result.implementation = runner.implementation
        cold = min(_timed(runner, case.device) for _ in range(max(warmup, 1)))
    except Exception as exc:  # noqa: BLE001 - every failure is a row in the table
        result.status = _failure(exc)
        del exc
        _release(case.device)
        return result, None
    if cold > budget and not runner.compiles:
        # one call already costs more than the budget: report the warm-up call itself
        result.seconds, result.calls = cold, 1
        result.status = f"1 call only (> {budget:g} s budget)"
        return result, None
    result.per_round = _per_round(cold)
    return result, runner


def run_set(ps: ProblemSet, peers: Sequence[str], device="cpu", dtype=None, backward=False, repeats=5,
            budget=10.0, echo: Optional[Callable[[str], None]] = None, warmup: int = 2) -> SetResult:
    """Every peer warmed up, then `repeats` rounds per peer (interleaved, so that a drifting machine affects
    all peers alike), a round being the mean of ROUND_SECONDS of back-to-back calls (at least one); each peer
    keeps its minimum. A call slower than `budget` seconds ends that peer's repeats."""
    device = torch.device(device)
    dtype = dtype or DEFAULT_DTYPE[device.type]
    unknown = [p for p in peers if p not in PEER_FACTORIES]
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}; choose from {list(PEER_FACTORIES)}")
    if len(set(peers)) != len(peers):
        raise ValueError(f"peers {list(peers)} name a peer twice")
    _warm_process(device)
    case = _make_case(ps, device, dtype, backward)
    result = SetResult(ps, device.type, dtype, backward, repeats, warmup)
    active = []
    for peer in peers:
        if echo:
            echo(f"  {ps.name}: warming up {peer} ...")
        measurement, runner = _start(peer, case, budget, warmup)
        result.measurements.append(measurement)
        if runner is not None:
            active.append((measurement, runner))
    if echo and active:
        echo(f"  {ps.name}: {repeats} rounds of {', '.join(m.peer for m, _ in active)}")
    for index in range(repeats):
        still = []
        for measurement, runner in active:
            try:
                elapsed = _timed(runner, device, measurement.per_round)
            except Exception as exc:  # noqa: BLE001
                measurement.status = _failure(exc) + (f" (after {index} good calls)" if index else "")
                measurement.seconds = measurement.seconds if index else None
                del exc
                _release(device)
                continue
            measurement.seconds = min(measurement.seconds or math.inf, elapsed)
            measurement.calls = index + 1
            if elapsed > budget and index + 1 < repeats:
                measurement.status = f"{index + 1} of {repeats} calls (> {budget:g} s budget)"
                continue
            still.append((measurement, runner))
        active = still
    del active
    _release(device)
    return result


def run_bench(sets: Sequence[ProblemSet], peers: Sequence[str] = PEERS, device="cpu", dtype=None,
              backward=False, repeats=5, budget=10.0, echo=None, warmup: int = 2) -> List[SetResult]:
    return [run_set(ps, peers, device, dtype, backward, repeats, budget, echo, warmup) for ps in sets]


# ------------------------------------------------------------------------------------------- output
def _rate_unit(device: str) -> Tuple[str, float]:
    return ("TFLOP/s", 1e12) if device == "cuda" else ("GFLOP/s", 1e9)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def show_bandwidth(result: SetResult) -> bool:
    """GB/s is shown for small windows (memory-bound) and forward runs: SEMANTICS.md gives only the
    forward byte formula."""
    return result.ps.window <= SMALL_WINDOW and not result.backward


def rows(result: SetResult) -> Tuple[List[str], List[list]]:
    unit, scale = _rate_unit(result.device)
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
    return (f"== {result.ps.name}: {result.ps.describe()}, {_dtype_name(result.dtype)}, {mode}, "
            f"{result.device}\n   {flops / 1e9:.4g} GFLOP a call ("
            + ("3.5 x " if result.backward else "") + "4*B*H*N*prod(K)*d); min of "
            f"{result.repeats} interleaved rounds after {result.warmup} warm-up calls, a round = the mean of "
            f"~{ROUND_SECONDS * 1e3:g} ms of back-to-back calls (ms = per call); "
            "natgen speed-up = peer ms / natgen ms")


def format_result(result: SetResult) -> str:
    from .cli import table
    headers, table_rows = rows(result)
    return header(result) + "\n" + table(headers, table_rows)


def to_json(results: Sequence[SetResult]) -> list:
    out = []
    for r in results:
        unit, scale = _rate_unit(r.device)
        entry = {"set": r.ps.name, "problem": dataclasses.asdict(r.ps), "device": r.device,
                 "dtype": _dtype_name(r.dtype), "backward": r.backward, "repeats": r.repeats,
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


def plot(results: Sequence[SetResult], path) -> None:
    """One bar chart per set: effective throughput per peer, labelled with ms and natgen's speed-up;
    a peer without a figure is an empty slot labelled with the reason."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'natgen[bench]' (or pip install matplotlib)") from None
    count = len(results)
    columns = min(count, 2)
    lines = math.ceil(count / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(7 * columns, 4 * lines), squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    for ax, result in zip(axes.flat, results):
        unit, scale = _rate_unit(result.device)
        natgen = result.by_peer("natgen")
        names, heights, labels = [], [], []
        for m in result.measurements:
            names.append(m.peer)
            if m.seconds is None:
                heights.append(0.0)
                labels.append(m.status[:40])
            else:
                heights.append(result.flops / m.seconds / scale)
                speed = (f"\nnatgen {m.seconds / natgen.seconds:.2f}x" if natgen and natgen.seconds and m.peer != "natgen"
                         else "")
                labels.append(f"{m.seconds * 1e3:.3g} ms{speed}")
        colours = ["tab:green" if n == "natgen" else "tab:grey" for n in names]
        bars = ax.bar(names, heights, color=colours)
        top = max(heights + [1e-9])
        for bar, label, height in zip(bars, labels, heights):
            ax.text(bar.get_x() + bar.get_width() / 2, height + top * 0.02, label, ha="center", va="bottom",
                    fontsize=7, rotation=0 if height else 90)
        ax.set_ylim(0, top * 1.35)
        mode = "fwd+bwd" if result.backward else "fwd"
        ax.set_title(f"{result.ps.name} ({_dtype_name(result.dtype)}, {mode}, {result.device}, "
                     f"batch {result.ps.batch})", fontsize=9)
        ax.set_ylabel(f"effective {unit}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_description(device="cpu") -> str:
    import platform
    parts = []
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name())
    else:
        model = platform.processor() or ""
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        import os
        parts.append(f"{model or 'CPU'}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    parts.append(f"torch {torch.__version__}")
    return "; ".join(parts)
