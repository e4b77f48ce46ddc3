"""Communication of natgen.distributed against all-gather of K/V and Ulysses all-to-all.

    python docs/distributed_bytes.py            # all three tables
    python docs/distributed_bytes.py --plan     # bytes per rank from the exchange plan, standard sets, 2/4/8 ranks
    python docs/distributed_bytes.py --gloo     # the same, measured on gloo with 2 and 4 CPU processes
    python docs/distributed_bytes.py --timing   # sharded fwd+bwd on 2 CPU processes against one process

Bytes are what one rank sends (the largest over ranks), for one forward and one backward:
- halo: the key/value rows other ranks need from this one (forward) and the gradients of the rows this one
  received (backward), counted from natgen.distributed's plan;
- all-gather: K and V of this rank's slab to each of the P-1 others (forward), the reduce-scatter of dK and dV
  (backward): (P-1) slabs of K+V either way;
- Ulysses: all-to-all of q, k, v to head shards and of the output back (forward), of dO and then dq, dk, dv
  (backward): (P-1)/P of four slabs each way; it needs heads divisible by P.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch

from natgen.distributed import even_sizes, make_plan

# name: (batch, heads, spatial, head_dim, kernel, dilation), as in the standard benchmark sets
SETS = {
    "nat-1d": (128, 16, (144,), 32, 49, 1),
    "nat-2d": (128, 16, (14, 14), 32, 7, 1),
    "dinat-2d": (128, 16, (28, 28), 32, 7, 4),
    "nat-3d": (1, 8, (14, 14, 14), 32, 7, 1),
    "long-1d": (1, 24, (32768,), 128, 2048, 1),
    "image-2d": (1, 24, (256, 256), 128, 80, 1),
    "video-3d": (1, 24, (30, 48, 80), 128, (18, 24, 24), 1),
    "cpu-2d": (1, 4, (32, 32), 32, 7, 1),
    "cpu-1d": (4, 4, (1024,), 64, 31, 2),
}


def _per_axis(value, rank):
    return tuple(value) if isinstance(value, tuple) else (value,) * rank


def _itemsize(name):
    return 4 if name.startswith("cpu") else 2   # fp32 on the CPU sets, fp16/bf16 on the GPU ones


def shardings(rank, ranks):
    """(label, shard_dims, mesh): the first axis alone, and for 2-D/3-D sets a 2 x P/2 mesh over the last two."""
    yield f"axis 0 ({ranks})", (0,), (ranks,)
    if rank >= 2 and ranks >= 4:
        dims = (rank - 2, rank - 1)
        yield f"axes {dims} (2x{ranks // 2})", dims, (2, ranks // 2)


def plan_for(name, shard_dims, mesh):
    batch, heads, spatial, head_dim, kernel, dilation = SETS[name]
    rank = len(spatial)
    sizes = [even_sizes(spatial[a], mesh[shard_dims.index(a)]) if a in shard_dims else [spatial[a]]
             for a in range(rank)]
    plan = make_plan(sizes, shard_dims, mesh, _per_axis(kernel, rank), (1,) * rank, _per_axis(dilation, rank),
                     (False,) * rank)
    return plan


def plan_bytes(name, shard_dims, mesh):
    """Per rank: dict of bytes sent forward and backward by the halo exchange, all-gather and Ulysses, and the
    region the local op computes on relative to the slab."""
    batch, heads, spatial, head_dim, _, _ = SETS[name]
    plan = plan_for(name, shard_dims, mesh)
    row = batch * heads * 2 * head_dim * _itemsize(name)   # one token of K and V
    ranks = plan.ranks
    rows = []
    for r in range(ranks):
        slab_tokens = math.prod(b - a for a, b in plan.slab(r))
        region_tokens = math.prod(hi - lo for lo, hi in plan.region(r))
        ulysses = (ranks - 1) / ranks * slab_tokens * row * 2 if heads % ranks == 0 else float("nan")
        rows.append(dict(halo_fwd=sum(t.tokens for t in plan.outgoing(r)) * row,
                         halo_bwd=sum(t.tokens for t in plan.incoming(r)) * row,
                         allgather=(ranks - 1) * slab_tokens * row,
                         ulysses=ulysses, compute=region_tokens / slab_tokens))
    return rows


def _mb(x):
    return "n/a" if x != x else f"{x / 2 ** 20:,.2f}"


def plan_table():
    print("| set | ranks, sharding | halo fwd | halo bwd | all-gather fwd = bwd | Ulysses fwd = bwd | "
          "all-gather / halo | local compute / slab |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (_, _, spatial, _, _, _) in SETS.items():
        for ranks in (2, 4, 8):
            for label, dims, mesh in shardings(len(spatial), ranks):
                rows = plan_bytes(name, dims, mesh)
                fwd, bwd = max(r["halo_fwd"] for r in rows), max(r["halo_bwd"] for r in rows)
                gather, ulysses = max(r["allgather"] for r in rows), max(r["ulysses"] for r in rows)
                print(f"| {name} | {label} | {_mb(fwd)} | {_mb(bwd)} | {_mb(gather)} | {_mb(ulysses)} | "
                      f"{gather / max(fwd, bwd):.1f}x | {max(r['compute'] for r in rows):.2f}x |")
    print("\nMiB sent by the busiest rank per call; fp16 for the GPU sets, fp32 for the cpu sets; even slabs "
          "(torch.tensor_split). 'local compute / slab': tokens of the region the local op runs on over the "
          "slab's own tokens (the largest over ranks).")


# ------------------------------------------------------------------------------------------ processes
def _loopback_bytes():
    with open("/proc/net/dev") as f:
        for line in f:
            if line.strip().startswith("lo:"):
                return int(line.split(":")[1].split()[8])   # transmitted bytes
    return -1


def _spawn(function, world, *args):
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as scratch:
        mp.start_processes(function, args=(world, os.path.join(scratch, "init"), scratch, *args), nprocs=world,
                           join=True, start_method="spawn")
        found = []
        for me in range(world):
            with open(os.path.join(scratch, f"rank{me}.json")) as f:
                found.append(json.load(f))
    return found


# A process that ran the generated CPU kernels and gloo collectives sometimes aborts in its exit-time
# destructors ("terminate called without an active exception", after destroy_process_group, about one run in
# ten with 4 processes); everything is written by then, so a worker leaves without running them.
def _leave(dist):
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _init(me, world, init_file):
    import warnings
    import torch.distributed as dist
    warnings.filterwarnings("ignore", category=FutureWarning)  # all_gather_into_tensor's rename notice
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=me, world_size=world)
    return dist


def _slab_tensors(name, shard_dims, mesh, me, seed=0):
    batch, heads, spatial, head_dim, kernel, dilation = SETS[name]
    plan = plan_for(name, shard_dims, mesh)
    shape = [b - a for a, b in plan.slab(me)]
    gen = torch.Generator().manual_seed(seed + me)
    return [torch.randn(batch, *shape, heads, head_dim, generator=gen).requires_grad_(True) for _ in range(3)]


def _measure_worker(me, world, init_file, scratch, cases):
    dist = _init(me, world, init_file)
    import natgen.distributed as nd
    results = []
    for name, dims, mesh in cases:
        batch, heads, spatial, head_dim, kernel, dilation = SETS[name]
        op = (nd.na1d, nd.na2d, nd.na3d)[len(spatial) - 1]
        q, k, v = _slab_tensors(name, tuple(dims), tuple(mesh), me)
        op(q, k, v, kernel, dilation=dilation, shard_dims=tuple(dims), mesh=tuple(mesh))  # plan, first call
        found = {}
        nd.reset_sent_bytes()
        # read before the barrier: no rank can have started sending yet
        before = _loopback_bytes()
        dist.barrier()
        out = op(q, k, v, kernel, dilation=dilation, shard_dims=tuple(dims), mesh=tuple(mesh))
        out.backward(torch.ones_like(out))
        dist.barrier()
        found["halo"] = nd.sent_bytes()
        found["halo_lo"] = _loopback_bytes() - before
        # all-gather of K and V as one buffer (padded to the largest slab), and its reduce-scatter
        kv = torch.cat([k.detach().reshape(-1), v.detach().reshape(-1)])
        size = torch.tensor([kv.numel()])
        dist.all_reduce(size, op=dist.ReduceOp.MAX)
        kv = torch.nn.functional.pad(kv, (0, int(size) - kv.numel()))
        gathered = torch.empty(world * kv.numel())
        before = _loopback_bytes()
        dist.barrier()
        dist.all_gather_into_tensor(gathered, kv)
        dist.barrier()
        found["allgather_lo"] = _loopback_bytes() - before
        found["allgather"] = (world - 1) * kv.numel() * kv.element_size()
        # Ulysses: four all-to-alls of a slab-sized buffer (q, k, v to head shards, the output back)
        if heads % world == 0:
            buffer = torch.cat([q.detach().reshape(-1)]).contiguous()
            chunk = buffer.numel() // world
            buffer = buffer[:chunk * world]
            received = torch.empty_like(buffer)
            before = _loopback_bytes()
            dist.barrier()
            for _ in range(4):
                dist.all_to_all_single(received, buffer)
            dist.barrier()
            found["ulysses_lo"] = _loopback_bytes() - before
            found["ulysses"] = 4 * (world - 1) * chunk * buffer.element_size()
        results.append(found)
    with open(os.path.join(scratch, f"rank{me}.json"), "w") as f:
        json.dump(results, f)
    _leave(dist)


def gloo_table():
    print("| set | ranks, sharding | halo fwd (plan / sent) | halo bwd (plan / sent) | all-gather fwd | "
          "Ulysses fwd | loopback, all ranks: halo fwd+bwd / all-gather / Ulysses fwd |")
    print("|---|---|---|---|---|---|---|")
    for world in (2, 4):
        cases = [(name, dims, mesh) for name in ("cpu-2d", "cpu-1d")
                 for _, dims, mesh in shardings(len(SETS[name][2]), world)]
        found = _spawn(_measure_worker, world, cases)
        for index, (name, dims, mesh) in enumerate(cases):
            plan = plan_bytes(name, dims, mesh)
            per_rank = [f[index] for f in found]
            sent_fwd = max(p["halo"]["forward"] for p in per_rank)
            sent_bwd = max(p["halo"]["backward"] for p in per_rank)
            assert [p["halo"]["forward"] for p in per_rank] == [r["halo_fwd"] for r in plan], (name, dims)
            assert [p["halo"]["backward"] for p in per_rank] == [r["halo_bwd"] for r in plan], (name, dims)
            label = next(lbl for lbl, d, m in shardings(len(SETS[name][2]), world) if d == dims)
            ulysses = max(p.get("ulysses", float("nan")) for p in per_rank)
            lo = [per_rank[0]["halo_lo"], per_rank[0]["allgather_lo"], per_rank[0].get("ulysses_lo", float("nan"))]
            print(f"| {name} | {label} | {_mb(max(r['halo_fwd'] for r in plan))} / {_mb(sent_fwd)} | "
                  f"{_mb(max(r['halo_bwd'] for r in plan))} / {_mb(sent_bwd)} | "
                  f"{_mb(max(p['allgather'] for p in per_rank))} | {_mb(ulysses)} | "
                  f"{' / '.join(_mb(x) for x in lo)} (plan: {_mb(sum(r['halo_fwd'] + r['halo_bwd'] for r in plan))} / "
                  f"{_mb(world * max(p['allgather'] for p in per_rank))} / {_mb(world * ulysses)}) |")
    print("\nMiB, fp32. 'sent': payload bytes natgen.distributed handed to isend on the busiest rank (equal to "
          "the plan on every rank: checked). Loopback: transmitted bytes of the lo interface over each exchange "
          "as rank 0 saw them (every rank's traffic, two barriers, TCP framing and any other process's loopback "
          "traffic on the machine; the Ulysses column moves q-sized buffers four times).")


def _timing_worker(me, world, init_file, scratch, name, repeats):
    dist = _init(me, world, init_file)
    import natgen.distributed as nd
    batch, heads, spatial, head_dim, kernel, dilation = SETS[name]
    op = (nd.na1d, nd.na2d, nd.na3d)[len(spatial) - 1]
    q, k, v = _slab_tensors(name, (0,), (world,), me)
    out = op(q, k, v, kernel, dilation=dilation)   # warm-up: plan, kernel load
    out.backward(torch.ones_like(out))
    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        out = op(q, k, v, kernel, dilation=dilation)
        out.backward(torch.ones_like(out))
        dist.barrier()
        best = min(best, time.perf_counter() - start)
    # the exchange alone (forward and the return of the gradients), on the same routes
    from natgen.distributed.exchange import halo_exchange
    from natgen.distributed.layout import resolve
    layout = resolve(len(spatial), q, k, v, kernel, 1, dilation, False, None, None, None, None, (0,), None)
    exchange_best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        regions = halo_exchange(layout.exchange, k, v)
        torch.autograd.backward(regions, [torch.ones_like(r) for r in regions])
        dist.barrier()
        exchange_best = min(exchange_best, time.perf_counter() - start)
    # the local op alone on this rank's region: the sharded step without any communication
    import natgen
    region = [hi - lo for lo, hi in layout.plan.region(me)]
    local = (natgen.na1d, natgen.na2d, natgen.na3d)[len(spatial) - 1]
    tensors = [torch.randn(batch, *region, heads, head_dim).requires_grad_(True) for _ in range(3)]
    local_best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = local(*tensors, kernel, dilation=dilation)
        out.backward(torch.ones_like(out))
        local_best = min(local_best, time.perf_counter() - start)
    with open(os.path.join(scratch, f"rank{me}.json"), "w") as f:
        json.dump([best, exchange_best, local_best], f)
    _leave(dist)


def _whole(name, threads, repeats):
    import natgen
    torch.set_num_threads(threads)
    batch, heads, spatial, head_dim, kernel, dilation = SETS[name]
    op = (natgen.na1d, natgen.na2d, natgen.na3d)[len(spatial) - 1]
    q, k, v = [torch.randn(batch, *spatial, heads, head_dim).requires_grad_(True) for _ in range(3)]
    out = op(q, k, v, kernel, dilation=dilation)   # warm-up
    out.backward(torch.ones_like(out))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = op(q, k, v, kernel, dilation=dilation)
        out.backward(torch.ones_like(out))
        best = min(best, time.perf_counter() - start)
    return best


def timing_table(repeats=60):
    print("| set | 1 process, 1 thread | 1 process, 2 threads | 2 processes x 1 thread (gloo, axis 0) | "
          "halo exchange alone, fwd+bwd | local op alone on the region |")
    print("|---|---|---|---|---|---|")
    threads = torch.get_num_threads()
    for name in ("cpu-2d", "cpu-1d"):
        one = _whole(name, 1, repeats)
        two = _whole(name, 2, repeats)
        found = _spawn(_timing_worker, 2, name, repeats)
        sharded, exchange, local = (max(f[i] for f in found) for i in range(3))
        print(f"| {name} | {one * 1e3:.2f} ms | {two * 1e3:.2f} ms | {sharded * 1e3:.2f} ms | "
              f"{exchange * 1e3:.2f} ms | {local * 1e3:.2f} ms |")
    torch.set_num_threads(threads)
    print(f"\nforward+backward, fp32, min of {repeats} after a warm-up call (the sharded figures: the slowest "
          f"rank's minimum, between barriers); torch {torch.__version__}, {_cpu_model()}, load average "
          f"{os.getloadavg()[0]:.1f} at the end.")


def _cpu_model():
    from natgen.bench.report import cpu_model
    return f"{cpu_model() or 'unknown CPU'}, {os.cpu_count()} cores"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", action="store_true")
    parser.add_argument("--gloo", action="store_true")
    parser.add_argument("--timing", action="store_true")
    args = parser.parse_args(argv)
    everything = not (args.plan or args.gloo or args.timing)
    if args.plan or everything:
        plan_table()
        print()
    if args.gloo or everything:
        gloo_table()
        print()
    if args.timing or everything:
        timing_table()


if __name__ == "__main__":
    sys.exit(main())
