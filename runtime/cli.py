"""The `natgen` command: list, show, build, explain, demo (and check, which build.py --check runs)."""
from __future__ import annotations

import json
import math
import sys
import time

import click

from .codegen.space import enumerate_space, matches, split_filters
from .table import table

DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "float32": "float32", "fp16": "float16", "f16": "float16",
                 "float16": "float16", "half": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16",
                 "fp64": "float64", "f64": "float64", "float64": "float64"}


def _dims(value) -> str:
    return value if isinstance(value, str) else "x".join(str(x) for x in value)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """natgen: ahead-of-time generated neighborhood-attention kernels."""


@main.command("list")
@click.option("--filter", "filter_", default=None, help="comma-separated globs on instance names")
@click.option("--rejected", is_flag=True, help="list the candidates the policy leaves out, with the reason")
@click.option("--json", "as_json", is_flag=True, help="print manifest entries as JSON")
@click.option("--policy", default="default", type=click.Choice(["default", "full"]), show_default=True)
def list_(filter_, rejected, as_json, policy):
    """List kernel instances (with registers / smem / spills / CTAs per SM once built)."""
    filters = split_filters(filter_)
    if rejected:
        space = enumerate_space(policy, filters)
        if as_json:
            click.echo(json.dumps([{"name": r.name, "reason": r.reason} for r in space.rejected], indent=1))
        else:
            click.echo(table(["name", "left out because"], [(r.name, r.reason) for r in space.rejected]))
            click.echo(f"\n{len(space.rejected)} candidates left out by policy {policy!r}")
        return
    from .manifest import load
    from .selector import ctas_per_sm
    instances = [i for i in load() if matches(i.name, filters)]
    if as_json:
        click.echo(json.dumps([i.entry for i in instances], indent=1, sort_keys=True))
        return
    archs = sorted({arch for i in instances for arch in i.entry.get("build", {})})
    headers = ["name", "family", "rank", "K", "D", "dtype", "head_dim", "waste"]
    for arch in archs:
        headers += [f"{arch} regs", "smem", "spills", "CTAs/SM"]
    rows = []
    for inst in instances:
        spec = inst.spec
        row = [inst.name, spec.family, spec.rank, _dims(spec.kernel_size), _dims(spec.dilation), spec.dtype,
               spec.head_dim, f"{inst.launch.get('computed_keys_per_useful_key', 1.0):.2f}"]
        for arch in archs:
            build = inst.build(arch)
            if build:
                row += [build["registers"], build["smem_bytes"] + inst.launch.get("dynamic_smem", 0),
                        build["spill_stores"] + build["spill_loads"], ctas_per_sm(inst.launch, build, arch)]
            else:
                row += [None] * 4
        rows.append(row)
    click.echo(table(headers, rows))
    families = {}
    for inst in instances:
        families[inst.spec.family] = families.get(inst.spec.family, 0) + 1
    summary = ", ".join(f"{n} {f}" for f, n in sorted(families.items()))
    click.echo(f"\n{len(instances)} instances ({summary or 'none'})" + ("" if archs else
               "; not built yet: `natgen build` adds registers/smem/spills"))


@main.command()
@click.argument("name")
@click.option("--ptx", is_flag=True, help="compile with nvcc and print the PTX instead")
@click.option("--arch", default="sm_80", show_default=True)
def show(name, ptx, arch):
    """Print the generated source of instance NAME (or its PTX)."""
    from .manifest import find
    try:
        instance = find(name)
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from None
    if ptx:
        if instance.entry["toolchain"] != "nvcc":
            raise click.ClickException(f"{name} is a {instance.entry['toolchain']} instance: it has no PTX")
        from .codegen.nvcc import compile_ptx
        try:
            click.echo(compile_ptx(instance.source_path, arch))
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from None
    else:
        click.echo(instance.source_path.read_text(), nl=False)


@main.command()
@click.option("--filter", "filter_", default=None, help="comma-separated globs: compile only these instances")
@click.option("--arch", default="sm_80,sm_90", show_default=True, help="comma-separated CUDA archs")
@click.option("--jobs", "-j", default=None, type=int, help="parallel compiles (default: CPU count)")
@click.option("--render-only", is_flag=True, help="render generated/ without compiling")
@click.option("--spec", "specs", multiple=True, metavar="NAME",
              help="an instance outside the default library (e.g. from `natgen list --rejected`): rendered into "
                   "the cache's extra library and compiled (repeatable)")
def build(filter_, arch, jobs, render_only, specs):
    """Render generated/ and compile the selected instances (nvcc cubins, CPU modules)."""
    from .codegen.builder import build as run_build
    archs = [a.strip() for a in arch.split(",") if a.strip()]
    try:
        run_build(split_filters(filter_), archs, jobs, render_only, specs=specs)
    except (RuntimeError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


@main.command(hidden=True)
def check():
    """Exit 1 when generated/ differs from a fresh render."""
    from .codegen.library import check_library
    problems = check_library()
    if problems:
        click.echo(f"generated/ is out of date ({len(problems)} differences); run `python build.py`:", err=True)
        for line in problems[:40]:
            click.echo(f"  {line}", err=True)
        if len(problems) > 40:
            click.echo(f"  ... and {len(problems) - 40} more", err=True)
        sys.exit(1)
    from .codegen.space import DEFAULT_INSTANCE_BUDGET
    from .codegen.library import load_manifest
    count = len(load_manifest()["instances"])
    click.echo(f"generated/ matches a fresh render ({count} instances, budget {DEFAULT_INSTANCE_BUDGET})")


def _meta_problem(rank, shape, kernel_size, stride, dilation, causal, dtype, head_dim, batch, heads):
    import torch
    from .problem import make_problem
    spatial = tuple(int(x) for x in shape.lower().split("x"))
    if len(spatial) != rank:
        raise click.BadParameter(f"--shape {shape} has {len(spatial)} dims, --rank is {rank}")
    torch_dtype = getattr(torch, DTYPE_ALIASES[dtype.lower()])
    q = torch.empty((batch, *spatial, heads, head_dim), dtype=torch_dtype, device="meta")

    def per_dim(text, cast):
        parts = [cast(x) for x in str(text).lower().split("x")]
        return parts[0] if len(parts) == 1 else tuple(parts)

    return make_problem(rank, q, q, q, per_dim(kernel_size, int), per_dim(stride, int), per_dim(dilation, int),
                        per_dim(causal, lambda x: x in ("1", "true", "yes")))


@main.command()
@click.option("--rank", type=click.IntRange(1, 3), required=True)
@click.option("--shape", required=True, help="spatial extent, e.g. 56x56")
@click.option("--kernel-size", required=True, help="e.g. 7 or 7x9")
@click.option("--stride", default="1", show_default=True)
@click.option("--dilation", default="1", show_default=True)
@click.option("--causal", default="0", show_default=True, help="0/1 per dim, e.g. 1x0")
@click.option("--dtype", default="fp16", type=click.Choice(sorted(DTYPE_ALIASES)), show_default=True)
@click.option("--head-dim", default=32, show_default=True)
@click.option("--batch", default=1, show_default=True)
@click.option("--heads", default=8, show_default=True)
@click.option("--target", default="sm_80", show_default=True, help="sm_80, sm_90, ... or cpu")
@click.option("--backward", is_flag=True, help="the backward kernel (among the chosen forward's partners)")
def explain(rank, shape, kernel_size, stride, dilation, causal, dtype, head_dim, batch, heads, target, backward):
    """Show which instance a problem gets and why every other candidate lost."""
    from . import selector
    try:
        problem = _meta_problem(rank, shape, kernel_size, stride, dilation, causal, dtype, head_dim, batch, heads)
        tgt = selector.Target("cpu") if target == "cpu" else selector.Target("cuda", target)
    except (ValueError, TypeError) as exc:
        raise click.ClickException(str(exc)) from None
    if target == "cpu":
        from .cpu import compute_problem
        problem = compute_problem(problem)  # the CPU family computes half inputs in float32
    op = "bwd" if backward else "fwd"
    candidates = None
    click.echo(f"problem: {selector.describe(problem)}; target {target}; {'backward' if backward else 'forward'}")
    if backward:
        try:
            forward = selector.select("fwd", problem, tgt).instance
        except selector.NoKernelError:
            click.echo("no forward instance supports this problem: the reference backend runs it and its gradients")
            return
        candidates = selector.partner_candidates(forward)
        click.echo(f"forward: {forward.name}; its backward partners: {', '.join(forward.partners) or 'none'}")
        if not candidates:
            click.echo("no backward kernel: the gradients are recomputed through the reference backend")
            return
    ranked = selector.rank_instances(op, problem, tgt, candidates)
    if backward:  # the other backward kernels lost first of all because the forward does not name them
        others = [r for r in selector.rank_instances(op, problem, tgt)
                  if r.instance.op == "bwd" and r.instance.name not in forward.partners]
        for r in others:
            r.reasons.insert(0, f"not a backward partner of {forward.name}")
        ranked += others
    supported = [r for r in ranked if r.supported]
    if not supported:
        click.echo("no instance supports this problem: the reference backend would run it")
    else:
        best = supported[0]
        click.echo(f"chosen:  {best.instance.name}  (static cost {best.cost:.3f}; {best.details})")
        if backward:
            click.echo(f"         dQ: {selector.dq_reason(best.instance)}")
        if target == "cpu":
            from . import cpu_isa
            try:
                click.echo(f"         ISA variant: {cpu_isa.describe()}")
                if DTYPE_ALIASES[dtype] == "bfloat16" and not backward and cpu_isa.current() == "avx512bf16":
                    click.echo("         bf16 inputs: the specialized forward's scores are AVX512_BF16 dot products "
                               f"(within the tolerance rule; {cpu_isa.ENV}=avx512 keeps the bits of converting first)")
            except ValueError as exc:
                raise click.ClickException(str(exc)) from None
        waste = best.details.get("computed_keys_per_useful_key")
        if waste is not None:
            click.echo(f"         computes {waste} (query, key) pairs per useful pair on this problem")
        if len(supported) > 1:
            click.echo("\nsupported but costlier (figures for this problem):")
            click.echo(table(["instance", "cost", "figures"],
                             [(r.instance.name, f"{r.cost:.3f}", r.details) for r in supported[1:]]))
    same_rank = [r for r in ranked if not r.supported and r.instance.spec.rank == rank]
    other = len(ranked) - len(supported) - len(same_rank)
    if same_rank:
        click.echo(f"\nrejected ({len(same_rank)} of rank {rank}; {other} of other ranks not shown):")
        click.echo(table(["instance", "why not"], [(r.instance.name, "; ".join(r.reasons)) for r in same_rank]))


@main.command()
@click.option("--size", default=24, show_default=True, help="spatial extent of the 2-D demo problem")
def demo(size):
    """Render, build a small set, run na2d on the best available backend and check it against the reference."""
    import torch
    from . import ops
    from .codegen import library
    from .codegen.builder import build as run_build

    click.echo("== 1. generate")
    try:
        counts = library.write_library()
        click.echo(f"rendered {counts['total']} instances ({counts['written']} written, {counts['unchanged']} "
                   f"unchanged) into {library.GENERATED_DIR}")
    except library.ReadOnlyLibrary:
        count = len(library.load_manifest()["instances"])
        click.echo(f"installed package: using the {count} shipped instances in {library.GENERATED_DIR} "
                   "(never rewritten)")
    # the CUDA instances for the demo problem and the CPU instance that runs it here
    demo_filter = ["na2d_fwd_*_k7x7_d1x1_c00_f32_h32_*", "na2d_fwd_cpu_k7x7_*_c00_f32_h32_*"]
    click.echo("\n== 2. build " + ", ".join(demo_filter))
    try:
        run_build(demo_filter, ["sm_80"], None, echo=lambda m: click.echo(m) if not m.startswith("rendered") else None,
                  progress=False)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    from .manifest import load, reload
    reload()
    for inst in load():
        if matches(inst.name, demo_filter):
            figures = inst.build("sm_80")
            if inst.entry["toolchain"] != "nvcc":
                built = "C++ module (compiled into the build cache)"
            elif figures:
                built = f"sm_80: {figures['registers']} registers, {figures['spill_stores']} spill bytes"
            else:
                built = "no cubin (nvcc missing)"
            click.echo(f"  {inst.name}  {built}")

    click.echo(f"\n== 3. run na2d: batch 1, {size}x{size}, 4 heads, head_dim 32, kernel 7, fp32")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, size, size, 4, 32, generator=gen).to(device) for _ in range(3))
    from .problem import make_problem
    from .reference import na_reference
    problem64 = make_problem(2, q.double(), k.double(), v.double(), 7)
    expected = na_reference(q.double(), k.double(), v.double(), problem64)
    backends = [ops.choose(2, q, k, v, 7)[0]]
    if device == "cpu" and "emulator" in ops.BACKENDS and ops.BACKENDS["emulator"].available():
        backends.append("emulator")
    if "reference" not in backends:
        backends.append("reference")
    rows = []
    for backend in backends:
        name, instance = ops.choose(2, q, k, v, 7, backend=backend)
        ops.neighborhood_attention(2, q, k, v, 7, backend=backend)  # warm-up: compiles / loads
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            out = ops.neighborhood_attention(2, q, k, v, 7, backend=backend)
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        error = (out.double() - expected).abs().max().item()
        rows.append((name + (" (best available)" if backend == backends[0] else ""), instance or "(pure torch)",
                     f"{error:.2e}", f"{best * 1e3:.2f}"))
    click.echo(table(["backend", "instance", "max |err| vs fp64", "ms (min of 3)"], rows))


@main.command()
@click.option("--set", "set_names", multiple=True, metavar="NAME",
              help="a standard problem set (repeatable; default: cpu-2d, cpu-1d on the CPU, the GPU sets "
                   "on cuda): nat-1d nat-2d dinat-2d nat-3d long-1d image-2d video-3d cpu-2d cpu-1d, and with a "
                   "relative positional bias dinat-2d-rpb cpu-dinat-rpb")
@click.option("--device", default=None, type=click.Choice(["cpu", "cuda"]),
              help="default: cuda when available, else cpu")
@click.option("--peers", default="natgen,reference,flex,natten,sdpa", show_default=True,
              help="comma-separated: natgen, reference, unfused (natgen.functional's qk + softmax + av), flex, "
                   "natten, sdpa")
@click.option("--backward", is_flag=True, help="time forward + backward of a fixed cotangent")
@click.option("--dtype", default=None, help="fp32/fp16/bf16/fp64 (default: fp32 on the CPU, fp16 on cuda)")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(1), help="timed calls (min is kept)")
@click.option("--batch", default=None, type=click.IntRange(1), help="shrink every set's batch to at most N")
@click.option("--budget", default=10.0, show_default=True, type=float,
              help="seconds: a peer whose call takes longer stops repeating (and is skipped if far beyond)")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False), help="write a bar chart PNG")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="write the figures as JSON")
@click.option("--quiet", "-q", is_flag=True, help="no progress lines")
@click.option("--overhead", is_flag=True,
              help="host-side microseconds per na2d call on the cpu (eager and torch.compile), emulator and cuda "
                   "paths (kernels replaced by no-ops), cold and cached")
def bench(set_names, device, peers, backward, dtype, repeats, batch, budget, plot_path, json_path, quiet, overhead):
    """Time natgen beside reference, flex, natten and dense SDPA on the standard problem sets."""
    import torch
    if overhead:
        from . import overhead as overhead_mod
        rows = overhead_mod.run()
        from .bench.report import machine_description
        click.echo(f"na2d host overhead per call (1x56x56, 4 heads, head_dim 32, K=7; {machine_description('cpu')}):")
        click.echo(table(["path", "cold us", "cached us", "calls"],
                         [(r["path"], f"{r['cold_us']:.0f}", f"{r['cached_us']:.1f}", r["calls"]) for r in rows]))
        if json_path:
            with open(json_path, "w") as handle:
                json.dump(rows, handle, indent=1)
        return

    from . import bench as bench_mod
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("--device cuda: no CUDA device here")
    unknown = [s for s in set_names if s not in bench_mod.SETS]
    if unknown:
        raise click.ClickException(f"unknown set(s) {unknown}; choose from {', '.join(bench_mod.SETS)}")
    peer_list = list(dict.fromkeys(p.strip() for p in peers.split(",") if p.strip()))
    bad = [p for p in peer_list if p not in bench_mod.PEERS]
    if bad or not peer_list:
        raise click.ClickException(f"--peers {peers!r}: choose from {', '.join(bench_mod.PEERS)}")
    torch_dtype = None
    if dtype is not None:
        name = DTYPE_ALIASES.get(dtype.lower())
        if name is None:
            raise click.ClickException(f"--dtype {dtype!r}: choose from {', '.join(sorted(DTYPE_ALIASES))}")
        torch_dtype = bench_mod.DTYPES[name]
    sets = [bench_mod.SETS[s].with_batch(batch) for s in (set_names or bench_mod.DEFAULT_SETS[device])]
    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.ClickException("--plot needs matplotlib: pip install 'natgen[bench]'") from None
    click.echo(f"machine: {bench_mod.machine_description(device)}")
    for ps in sets:
        if ps.shrunk_from:
            click.echo(f"note: {ps.name} batch shrunk from {ps.shrunk_from} to {ps.batch} (--batch); spatial unchanged")
    echo = None if quiet else (lambda m: click.echo(m, err=True))
    results = []
    for ps in sets:
        result = bench_mod.run_set(ps, peer_list, device, torch_dtype, backward, repeats, budget, echo)
        results.append(result)
        click.echo("\n" + bench_mod.format_result(result))
    if json_path:
        bench_mod.write_json(results, json_path)
        click.echo(f"\nwrote {json_path}")
    if plot_path:
        bench_mod.plot(results, plot_path)
        click.echo(f"wrote {plot_path}")


if __name__ == "__main__":
    main()
