"""natgen.emulator as a sanitizer: racecheck, initcheck and cp.async ordering.

Planted bugs (each one a kernel that the plain emulator runs to the right answer, or to a wrong one no
test would notice) must raise, naming the kernel, block, both threads, the memory and the source lines;
their fixed versions, and correct kernels that synchronise through shuffles, partial-mask __syncwarp,
atomics and double-buffered cp.async pipelines, must pass under several schedules. Bugs planted in
natgen's own generated kernels must be caught as well.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

from natgen import emulator as emu

pytestmark = [pytest.mark.emulated, pytest.mark.usefixtures("clean_emulator_env")]

CHECKS_SRC = r"""
#include "natgen_device.cuh"

// ----------------------------------------------------------------------- shared memory races
extern "C" __global__ void shift(const float* x, float* y, int sync) {
    __shared__ float buf[256];
    const int t = threadIdx.x;
    buf[t] = x[t];                          // MARK shift-write
    if (sync) __syncthreads();
    y[t] = t > 0 ? buf[t - 1] : 0.f;        // MARK shift-read
}

extern "C" __global__ void cross_warp(const float* x, float* y) {
    __shared__ float buf[64];
    const int t = threadIdx.x;
    buf[t] = x[t];
    y[t] = buf[t == 32 ? 31 : t];
}

// The buffer is reused every iteration: one barrier per iteration orders the read after the write, but
// not the next iteration's write after this read (sync=0). sync=1 double-buffers it.
extern "C" __global__ void reuse(float* out, int iters, int double_buffer) {
    __shared__ float buf[2][64];
    float acc = 0.f;
    for (int i = 0; i < iters; ++i) {
        const int b = double_buffer ? (i & 1) : 0;
        buf[b][threadIdx.x] = acc + float(i);                // MARK reuse-write
        __syncthreads();
        acc += buf[b][(threadIdx.x + 1) % blockDim.x];       // MARK reuse-read
    }
    out[threadIdx.x] = acc;
}

// Pairs of lanes exchange through shared memory. mode 0: no synchronisation; 1: __syncwarp();
// 2: a shuffle; 3: __syncwarp over just the pair; 4: a ballot.
extern "C" __global__ void warp_pairs(const float* x, float* y, int mode) {
    __shared__ float buf[32];
    const int lane = threadIdx.x;
    buf[lane] = x[lane];                                     // MARK pairs-write
    float v = 0.f;
    if (mode == 1) __syncwarp();
    if (mode == 2) v = __shfl_xor_sync(0xffffffffu, 1.f, 1);
    if (mode == 3) __syncwarp(3u << (lane & ~1));
    if (mode == 4) v = float(__ballot_sync(0xffffffffu, 1) & 1u);
    y[lane] = buf[lane & ~1] + 0.f * v;                      // MARK pairs-read
}

// Thread 0 resets a counter that everyone then increments atomically. sync=0 forgets the barrier.
extern "C" __global__ void counter(int* out, int sync) {
    __shared__ int count;
    if (threadIdx.x == 0) count = 0;                         // MARK counter-reset
    if (sync) __syncthreads();
    atomicAdd(&count, 1);                                    // MARK counter-add
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = count;
}

// ----------------------------------------------------------------------- uninitialized shared memory
extern "C" __global__ void masked_next(const float* x, float* y) {
    __shared__ float buf[33];
    const int t = threadIdx.x;
    buf[t] = x[t];
    __syncthreads();
    const float next = buf[t + 1];                           // MARK next-read
    y[t] = t + 1 < int(blockDim.x) ? next : 0.f;            // the unwritten buf[32] is masked away
}

extern "C" __global__ void counter_never_reset(int* out) {
    __shared__ int count;
    atomicAdd(&count, 1);                                    // MARK never-reset-add
    __syncthreads();
    if (threadIdx.x == 0) out[0] = count;
}

// Lanes 0-7 stage the rows of one 8x8 b16 matrix (all but row `skip`), then the warp loads it.
extern "C" __global__ void ldmatrix_rows(const unsigned short* src, unsigned* out, int skip) {
    __shared__ __align__(16) unsigned short tile[8 * 8];
    const int lane = threadIdx.x;
    if (lane < 8 && lane != skip)
        for (int c = 0; c < 8; ++c) tile[lane * 8 + c] = src[lane * 8 + c];
    __syncthreads();
    uint32_t r[1];
    ng::ldmatrix_x1(r, &tile[(lane % 8) * 8]);               // MARK ldmatrix
    out[lane] = r[0];
}

// An mma whose A fragment is loaded from shared memory, where element `skip` was never stored.
extern "C" __global__ void mma_from_shared(const __half* A, const __half* B, float* D, int skip) {
    __shared__ __align__(16) unsigned short a_s[16 * 16];
    const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
    const unsigned short* a_bits = reinterpret_cast<const unsigned short*>(A);
    for (int i = lane; i < 256; i += 32)
        if (i != skip) a_s[i] = a_bits[i];
    __syncwarp();
    auto pair = [&](int lo) { return uint32_t(a_s[lo]) | (uint32_t(a_s[lo + 1]) << 16); };  // MARK mma-load
    const uint32_t a[4] = {pair(g * 16 + 2 * t), pair((g + 8) * 16 + 2 * t), pair(g * 16 + 2 * t + 8),
                           pair((g + 8) * 16 + 2 * t + 8)};
    const unsigned short* b_bits = reinterpret_cast<const unsigned short*>(B);
    const uint32_t b[2] = {uint32_t(b_bits[(2 * t) * 8 + g]) | (uint32_t(b_bits[(2 * t + 1) * 8 + g]) << 16),
                           uint32_t(b_bits[(2 * t + 8) * 8 + g]) | (uint32_t(b_bits[(2 * t + 9) * 8 + g]) << 16)};
    const float c[4] = {0.f, 0.f, 0.f, 0.f};
    float d[4];
    ng::mma_m16n8k16_f16f32(d, a, b, c);
    for (int i = 0; i < 4; ++i) D[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = d[i];
}

// ----------------------------------------------------------------------- cp.async
// Two groups (x[0:128] -> buf[0], x[128:256] -> buf[1]), then mode 0: wait<0>; 1: wait<1> (group 1
// may be in flight); 2: no wait; 3: the second copy is never committed, then wait<0>.
extern "C" __global__ void two_groups(const float* x, float* y, int mode) {
    __shared__ __align__(16) float buf[2][4 * 32];
    const int t = threadIdx.x;
    ng::cp_async_16(&buf[0][4 * t], &x[4 * t]);              // MARK group0
    ng::cp_async_commit();
    ng::cp_async_16(&buf[1][4 * t], &x[128 + 4 * t]);        // MARK group1
    if (mode != 3) ng::cp_async_commit();
    if (mode == 0 || mode == 3) ng::cp_async_wait<0>();
    if (mode == 1) ng::cp_async_wait<1>();
    __syncthreads();
    const int u = (t + 1) % 32;
    for (int k = 0; k < 4; ++k) {
        y[4 * t + k] = buf[0][4 * u + k];
        y[128 + 4 * t + k] = buf[1][4 * u + k];              // MARK group1-read
    }
}

// The double-buffered pipeline of natgen's tensor-core kernels: prefetch tile+1 while computing tile.
// y[t] = sum over tiles of x[tile * 64 + (t + 1) % 64]. mode 0: correct; 1: without the barrier that
// keeps the prefetch off the stage others still read; 2: waits for too little (wait<2>).
extern "C" __global__ void pipeline(const float* x, float* y, int tiles, int mode) {
    __shared__ __align__(16) float buf[2][64];
    const int t = threadIdx.x;
    auto load = [&](int stage, int tile) {
        if (t < 16) ng::cp_async_16(&buf[stage][4 * t], &x[tile * 64 + 4 * t]);  // MARK pipeline-load
    };
    load(0, 0);
    ng::cp_async_commit();
    float acc = 0.f;
    for (int tile = 0; tile < tiles; ++tile) {
        if (tile + 1 < tiles) load((tile + 1) & 1, tile + 1);
        ng::cp_async_commit();
        if (mode == 2) ng::cp_async_wait<2>();
        else ng::cp_async_wait<1>();
        __syncthreads();
        acc += buf[tile & 1][(t + 1) % 64];                  // MARK pipeline-read
        if (mode != 1) __syncthreads();
    }
    y[t] = acc;
}

// ----------------------------------------------------------------------- no false positives
// Block sum: warp shuffles, a shared partial per warp, shared and global atomics.
extern "C" __global__ void block_sum(const float* x, float* total, float* per_block) {
    __shared__ float partial[32];
    __shared__ float block_total;
    const int t = threadIdx.x, lane = t % 32, warp = t / 32;
    const float mine = x[blockIdx.x * blockDim.x + t];
    const float v = ng::warp_sum(mine);
    if (lane == 0) partial[warp] = v;
    if (t == 0) block_total = 0.f;
    __syncthreads();
    if (warp == 0) {
        float p = lane < int(blockDim.x / 32) ? partial[lane] : 0.f;
        p = ng::warp_sum(p);
        if (lane == 0) per_block[blockIdx.x] = p;
    }
    atomicAdd(&block_total, mine);
    __syncthreads();
    if (t == 0) atomicAdd(total, block_total);
}

// ----------------------------------------------------------------------- global memory (racecheck="global")
extern "C" __global__ void every_block_writes(float* y) { y[0] = float(blockIdx.x); }   // MARK global-waw
extern "C" __global__ void add_left_output(const float* x, float* y) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    y[i] = x[i];
    if (i > 0) y[i] += y[i - 1];                              // MARK global-raw
}
extern "C" __global__ void all_read_all(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    float s = 0.f;
    for (int j = 0; j < n; ++j) s += x[j];
    y[i] = s + x[i];
}
"""


def line_of(marker: str) -> str:
    """'kernel.cu:N' of the line of CHECKS_SRC that carries `// MARK marker`."""
    for number, line in enumerate(CHECKS_SRC.splitlines(), start=1):
        if line.rstrip().endswith(f"MARK {marker}"):
            return f"kernel.cu:{number}"
    raise LookupError(marker)


@pytest.fixture(scope="module")
def run():
    """Launch a CHECKS_SRC kernel; keyword options go to emulator.launch."""
    return lambda name, grid, block, args, **kw: emu.launch(CHECKS_SRC, name, grid, block, args, timeout=120, **kw)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Where a float32 tensor holds the emulator's shared-memory poison (all bits set)."""
    return t.view(torch.int32) == -1


# ------------------------------------------------------------------------------- racecheck, shared memory
def test_missing_barrier_hidden_by_default_order_is_a_race(run):
    x = torch.arange(256, dtype=torch.float32) + 1
    expected = torch.cat([torch.zeros(1), x[:-1]])
    y = torch.zeros(256)
    run("shift", 1, 256, [x, y, 0])  # threads run in index order: the race-free answer
    assert torch.equal(y, expected)
    with pytest.raises(emu.RaceError) as info:
        run("shift", 1, 256, [x, torch.zeros(256), 0], racecheck=True)
    err = info.value
    assert err.kernel == "shift" and err.block == (0, 0, 0)
    assert err.thread == (1, 0, 0) and err.other_thread == (0, 0, 0) and err.other_block == (0, 0, 0)
    message = str(err)
    assert "'shift::buf' byte 0" in message
    assert f"read by thread (1,0,0) at {line_of('shift-read')}" in message
    assert f"after a write by thread (0,0,0) at {line_of('shift-write')}" in message
    for seed in (None, 1, 2):
        y = torch.zeros(256)
        run("shift", 1, 256, [x, y, 1], racecheck=True, initcheck=True, seed=seed)
        assert torch.equal(y, expected)


def test_race_between_warps_names_the_missing_barrier(run):
    # thread 32 (warp 1) reads what thread 31 (warp 0) wrote: only __syncthreads can order that
    x = torch.arange(64, dtype=torch.float32)
    y = torch.zeros(64)
    run("cross_warp", 1, 64, [x, y])
    assert torch.equal(y, x[torch.where(torch.arange(64) == 32, 31, torch.arange(64))])  # hidden by the order
    with pytest.raises(emu.RaceError, match="with no __syncthreads between them") as info:
        run("cross_warp", 1, 64, [x, torch.zeros(64)], racecheck=True)
    assert info.value.thread == (32, 0, 0) and info.value.other_thread == (31, 0, 0)


def test_reuse_without_second_barrier_is_a_write_after_read_race(run):
    out = torch.zeros(64)
    run("reuse", 1, 64, [out, 3, 0])  # passes silently without the check
    with pytest.raises(emu.RaceError) as info:
        run("reuse", 1, 64, [torch.zeros(64), 3, 0], racecheck=True)
    message = str(info.value)
    assert f"write by thread" in message and f"at {line_of('reuse-write')} after a read by" in message
    assert line_of("reuse-read") in message
    fixed = [torch.zeros(64) for _ in range(3)]
    for seed, y in zip((None, 3, 4), fixed):
        run("reuse", 1, 64, [y, 3, 1], racecheck=True, initcheck=True, seed=seed)
    # every thread's acc goes 0 -> 0 -> 1 -> 4 (acc += neighbour's acc + i), in every schedule
    assert all(torch.equal(y, torch.full((64,), 4.0)) for y in fixed)


def test_warp_exchange_without_syncwarp_is_a_race(run):
    x = torch.arange(32, dtype=torch.float32) * 3
    expected = x[torch.arange(32) & ~1]
    y = torch.zeros(32)
    run("warp_pairs", 1, 32, [x, y, 0])
    assert torch.equal(y, expected)  # the default order hides it
    with pytest.raises(emu.RaceError, match=r"no __syncthreads or warp synchronisation \(__syncwarp") as info:
        run("warp_pairs", 1, 32, [x, torch.zeros(32), 0], racecheck=True)
    assert info.value.thread == (1, 0, 0) and info.value.other_thread == (0, 0, 0)
    assert line_of("pairs-read") in str(info.value) and line_of("pairs-write") in str(info.value)


@pytest.mark.parametrize("mode", [1, 2, 3, 4], ids=["syncwarp", "shuffle", "pair-mask-syncwarp", "ballot"])
def test_warp_synchronisation_orders_the_exchange(run, mode):
    x = torch.arange(32, dtype=torch.float32) * 3
    for seed in (None, 11, 12):
        y = torch.zeros(32)
        run("warp_pairs", 1, 32, [x, y, mode], racecheck=True, initcheck=True, seed=seed)
        assert torch.equal(y, x[torch.arange(32) & ~1])


def test_plain_store_racing_with_atomics(run):
    out = torch.zeros(1, dtype=torch.int32)
    run("counter", 1, 64, [out, 0])
    assert out.tolist() == [64]  # right by luck of the order
    with pytest.raises(emu.RaceError) as info:
        run("counter", 1, 64, [out, 0], racecheck=True)
    message = str(info.value)
    assert f"atomic by thread (1,0,0) at {line_of('counter-add')}" in message
    assert f"after a write by thread (0,0,0) at {line_of('counter-reset')}" in message
    for seed in (None, 21):
        out = torch.zeros(2, dtype=torch.int32)
        run("counter", 2, 64, [out, 1], racecheck=True, initcheck=True, seed=seed)
        assert out.tolist() == [64, 64]


def test_shuffles_and_atomics_reduction_has_no_false_positive(run):
    # small integers: every partial sum is exact, so any schedule gives the same bits
    x = (torch.arange(4 * 128) % 7).float()
    for racecheck, seed in ((True, None), ("global", None), ("global", 31), (True, 32)):
        total, per_block = torch.zeros(1), torch.zeros(4)
        run("block_sum", 4, 128, [x, total, per_block], racecheck=racecheck, initcheck=True, seed=seed)
        assert torch.equal(per_block, x.view(4, 128).sum(1))
        assert total.item() == x.sum().item()


# ------------------------------------------------------------------------------- initcheck
def test_masked_read_of_unwritten_shared_memory(run):
    x = torch.arange(32, dtype=torch.float32)
    y = torch.zeros(32)
    run("masked_next", 1, 32, [x, y])
    assert torch.equal(y, torch.cat([x[1:], torch.zeros(1)]))  # the poison is masked away: passes silently
    run("masked_next", 1, 32, [x, y], racecheck=True)  # no race either
    with pytest.raises(emu.UninitializedReadError) as info:
        run("masked_next", 1, 32, [x, y], initcheck=True)
    err = info.value
    assert err.kernel == "masked_next" and err.block == (0, 0, 0) and err.thread == (31, 0, 0)
    assert f"'masked_next::buf' byte 128" in str(err) and line_of("next-read") in str(err)


def test_atomic_on_a_counter_nobody_reset(run):
    with pytest.raises(emu.UninitializedReadError, match=re.escape(line_of("never-reset-add"))):
        run("counter_never_reset", 1, 32, [torch.zeros(1, dtype=torch.int32)], initcheck=True)


def test_ldmatrix_of_an_unwritten_row(run):
    src = torch.arange(64, dtype=torch.int16)
    out = torch.zeros(32, dtype=torch.int32)
    run("ldmatrix_rows", 1, 32, [src, out, -1], racecheck=True, initcheck=True)
    got = out.tolist()
    for lane in range(32):  # lane L holds (row L/4, cols 2(L%4), +1) of the 8x8 matrix
        r, c = lane // 4, 2 * (lane % 4)
        assert got[lane] & 0xFFFFFFFF == (r * 8 + c) | ((r * 8 + c + 1) << 16)
    with pytest.raises(emu.UninitializedReadError, match=re.escape(line_of("ldmatrix"))) as info:
        run("ldmatrix_rows", 1, 32, [src, out, 3], initcheck=True)
    assert info.value.thread == (3, 0, 0)  # the lane that passed the unwritten row's address
    assert "'ldmatrix_rows::tile' byte 48" in str(info.value)


def test_mma_operand_loaded_from_unwritten_shared_memory(run):
    A = torch.randn(16, 16).half()
    B = torch.randn(16, 8).half()
    D = torch.zeros(16, 8)
    run("mma_from_shared", 1, 32, [A, B, D, -1], racecheck=True, initcheck=True)
    assert torch.allclose(D, A.float() @ B.float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(emu.UninitializedReadError, match=re.escape(line_of("mma-load"))):
        run("mma_from_shared", 1, 32, [A, B, D, 37], initcheck=True)


# ------------------------------------------------------------------------------- cp.async ordering
def test_cp_async_lands_at_the_wait_that_covers_its_group(run):
    x = torch.arange(256, dtype=torch.float32) + 1
    rolled = torch.cat([torch.roll(x[:128], -4), torch.roll(x[128:], -4)])
    y = torch.zeros(256)
    run("two_groups", 1, 32, [x, y, 0], racecheck=True, initcheck=True)
    assert torch.equal(y, rolled)
    # wait<1>: the older group has landed, the newer one has not: its destination still holds poison
    y = torch.zeros(256)
    run("two_groups", 1, 32, [x, y, 1])
    assert torch.equal(y[:128], rolled[:128]) and bool(poison(y[128:]).all())
    # an uncommitted copy is not covered by wait<0>; no wait at all lands nothing
    y = torch.zeros(256)
    run("two_groups", 1, 32, [x, y, 3])
    assert torch.equal(y[:128], rolled[:128]) and bool(poison(y[128:]).all())
    y = torch.zeros(256)
    run("two_groups", 1, 32, [x, y, 2])
    assert bool(poison(y).all())


@pytest.mark.parametrize("mode", [1, 2, 3], ids=["wait1", "no-wait", "uncommitted"])
def test_reading_a_copy_in_flight_is_a_race(run, mode):
    x = torch.arange(256, dtype=torch.float32)
    with pytest.raises(emu.RaceError, match="still in flight") as info:
        run("two_groups", 1, 32, [x, torch.zeros(256), mode], racecheck=True)
    message = str(info.value)
    assert "after a cp.async by thread" in message and "'two_groups::buf'" in message
    assert (line_of("group0") if mode == 2 else line_of("group1")) in message


def test_double_buffered_pipeline_is_clean_and_schedule_independent(run):
    tiles = 5
    x = torch.arange(tiles * 64, dtype=torch.float32) % 13
    expected = x.view(tiles, 64)[:, (torch.arange(64) + 1) % 64].sum(0)
    results = []
    for seed in (None, 41, 42):
        y = torch.zeros(64)
        run("pipeline", 1, 64, [x, y, tiles, 0], racecheck="global", initcheck=True, seed=seed)
        results.append(y)
    assert all(torch.equal(r, expected) for r in results)


def test_pipeline_prefetch_over_a_stage_still_being_read(run):
    x = torch.arange(5 * 64, dtype=torch.float32)
    y = torch.zeros(64)
    run("pipeline", 1, 64, [x, y, 5, 1])  # no check: still the right answer in the default order
    assert torch.equal(y, x.view(5, 64)[:, (torch.arange(64) + 1) % 64].sum(0))
    with pytest.raises(emu.RaceError) as info:
        run("pipeline", 1, 64, [x, torch.zeros(64), 5, 1], racecheck=True)
    message = str(info.value)  # a read of the stage the early prefetch now has in flight
    assert "cp.async by thread" in message and "still in flight" in message
    assert line_of("pipeline-load") in message and line_of("pipeline-read") in message


def test_pipeline_waiting_for_too_few_groups(run):
    x = torch.arange(5 * 64, dtype=torch.float32)
    with pytest.raises(emu.RaceError, match="still in flight"):
        run("pipeline", 1, 64, [x, torch.zeros(64), 5, 2], racecheck=True)


# ------------------------------------------------------------------------------- racecheck, global memory
def test_global_write_by_every_block_is_a_race(run):
    y = torch.zeros(1)
    run("every_block_writes", 3, 1, [y], racecheck=True)  # shared-memory racecheck does not look at y
    with pytest.raises(emu.RaceError, match="in different blocks of one launch") as info:
        run("every_block_writes", 3, 1, [y], racecheck="global")
    err = info.value
    assert err.block == (1, 0, 0) and err.other_block == (0, 0, 0)
    assert "global memory byte offset 0 of argument 'y'" in str(err) and line_of("global-waw") in str(err)


def test_global_read_of_another_threads_output(run):
    x = torch.ones(64)
    with pytest.raises(emu.RaceError, match="argument 'y'") as info:
        run("add_left_output", 2, 32, [x, torch.zeros(64)], racecheck="global")
    assert info.value.thread == (1, 0, 0) and info.value.other_thread == (0, 0, 0)
    assert line_of("global-raw") in str(info.value)


def test_global_inputs_read_by_everyone_are_not_a_race(run):
    x = torch.arange(64, dtype=torch.float32)
    y = torch.zeros(64)
    run("all_read_all", 2, 32, [x, y, 64], racecheck="global", initcheck=True, seed=3)
    assert torch.equal(y, x.sum() + x)


# ------------------------------------------------------------------------------- options and environment
def test_options_come_from_the_environment(run, monkeypatch):
    x = torch.arange(256, dtype=torch.float32)
    monkeypatch.setenv("NATGEN_EMU_RACECHECK", "1")
    with pytest.raises(emu.RaceError):
        run("shift", 1, 256, [x, torch.zeros(256), 0])
    run("shift", 1, 256, [x, torch.zeros(256), 0], racecheck=False)  # an explicit argument wins
    monkeypatch.setenv("NATGEN_EMU_RACECHECK", "0")
    monkeypatch.setenv("NATGEN_EMU_INITCHECK", "1")
    with pytest.raises(emu.UninitializedReadError):
        run("masked_next", 1, 32, [x[:32], torch.zeros(32)])
    monkeypatch.setenv("NATGEN_EMU_INITCHECK", "0")
    monkeypatch.setenv("NATGEN_EMU_SEED", "3")
    outs = []
    for seed in ("3", "3", ""):
        monkeypatch.setenv("NATGEN_EMU_SEED", seed)
        y = torch.zeros(256)
        run("shift", 1, 256, [x, y, 0])
        outs.append(y)
    assert torch.equal(outs[0].view(torch.int32), outs[1].view(torch.int32))  # a seed is one fixed schedule
    assert not torch.equal(outs[0], outs[2])  # ... and not the default one: the race shows
    monkeypatch.setenv("NATGEN_EMU_SEED", "")
    monkeypatch.setenv("NATGEN_EMU_RACECHECK", "global")
    with pytest.raises(emu.RaceError, match="argument 'y'"):
        run("every_block_writes", 2, 1, [torch.zeros(1)])


@pytest.mark.parametrize("name,value,rule", [
    ("NATGEN_EMU_SEED", "abc", "must be an integer"),
    ("NATGEN_EMU_RACECHECK", "everything", "must be one of 0, 1, shared, global"),
    ("NATGEN_EMU_INITCHECK", "yes please", "must be 0 or 1"),
])
def test_bad_environment_values_are_named(run, monkeypatch, name, value, rule):
    monkeypatch.setenv(name, value)
    with pytest.raises(emu.LaunchConfigError, match=f"{name}={value!r} {rule}"):
        run("shift", 1, 32, [torch.zeros(32), torch.zeros(32), 1])


def test_bad_arguments_are_named(run):
    with pytest.raises(emu.LaunchConfigError, match="racecheck='all' must be None, False, True, 'shared' or 'global'"):
        run("shift", 1, 32, [torch.zeros(32), torch.zeros(32), 1], racecheck="all")
    with pytest.raises(emu.LaunchConfigError, match="initcheck=1 must be None, False or True"):
        run("shift", 1, 32, [torch.zeros(32), torch.zeros(32), 1], initcheck=1)
    with pytest.raises(emu.LaunchConfigError, match="seed=1.5 must be an int or None"):
        run("shift", 1, 32, [torch.zeros(32), torch.zeros(32), 1], seed=1.5)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_check_kernels_are_valid_cuda(tmp_path):
    path = tmp_path / "checks.cu"
    path.write_text(CHECKS_SRC)
    proc = subprocess.run(["nvcc", "-arch=sm_80", "-std=c++17", "-c", f"-I{emu.build.templates_dir()}", str(path),
                           "-o", str(tmp_path / "checks.o")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
