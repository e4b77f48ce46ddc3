"""`python build.py` / `natgen build`: render generated/, then compile what the filter selects."""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from tqdm import tqdm

from .. import cxx, paths
from . import library, nvcc
from .families import REGISTRY
from .space import matches
from .spec import KernelSpec


def _echo(message: str) -> None:
    print(message, file=sys.stderr)


def build(filters: Optional[Sequence[str]] = None, archs: Sequence[str] = nvcc.DEFAULT_ARCHS,
          jobs: Optional[int] = None, render_only: bool = False, generated_dir: Path = library.GENERATED_DIR,
          echo: Callable[[str], None] = _echo, progress: bool = True, specs: Sequence[str] = ()) -> dict:
    """Render the default library, then compile the instances matching `filters` for each arch.

    `specs` (instance names, e.g. outside the default policy) are rendered into the cache's extra library
    instead, and compiled. In an installed package the shipped library is never re-rendered: its instances
    are compiled as shipped and their figures recorded in the cache.
    Returns a summary dict; raises RuntimeError listing every instance that failed to compile.
    """
    counts = None
    if specs:
        parsed = [KernelSpec.parse(name) for name in specs]
        entries = library.write_extra(parsed)
        generated_dir = paths.extra_library_dir()
        echo(f"rendered {len(entries)} instance(s) into {generated_dir}")
        manifest = {"instances": entries}
    else:
        try:
            counts = library.write_library(generated_dir)
            echo(f"rendered {counts['total']} instances into {generated_dir} "
                 f"({counts['written']} written, {counts['unchanged']} unchanged, {counts['removed']} removed)")
        except library.ReadOnlyLibrary:
            echo(f"installed package: building the shipped library as it is ({generated_dir} is never rewritten; "
                 f"figures go to {paths.build_stats_path()})")
        manifest = library.load_manifest(generated_dir)
    summary = {"rendered": counts, "compiled": 0, "failed": [], "skipped_toolchains": []}
    if render_only:
        return summary
    # without a filter, what the family marks for building ahead; the rest compiles on first use
    selected = [entry for entry in manifest["instances"]
                if (matches(entry["name"], filters) if filters else entry.get("prebuild", True))]
    if filters and not selected:
        raise RuntimeError(f"no instance matches --filter {','.join(filters)}; `natgen list` shows the names")
    by_toolchain: Dict[str, List[dict]] = {}
    for entry in selected:
        by_toolchain.setdefault(entry["toolchain"], []).append(entry)
    jobs = jobs or os.cpu_count() or 1

    cuda_entries = by_toolchain.pop("nvcc", [])
    if cuda_entries:
        compiler = nvcc.find_nvcc()
        if compiler is None:
            echo("nvcc not found: rendered sources only (CUDA instances compile through NVRTC on first use)")
            summary["skipped_toolchains"].append("nvcc")
        else:
            summary.update(_compile_cuda(cuda_entries, archs, jobs, compiler, generated_dir, echo, progress))
    for toolchain, entries in by_toolchain.items():
        builder = _EXTRA_BUILDERS.get(toolchain)
        if builder is None:
            summary["skipped_toolchains"].append(toolchain)
            continue
        result = builder(entries, jobs=jobs, generated_dir=generated_dir, echo=echo, progress=progress)
        summary["compiled"] += result.get("compiled", 0)
        summary["failed"] += result.get("failed", [])
    if summary["failed"]:
        lines = "\n".join(f"  {name} [{arch}]: {message.splitlines()[-1] if message else ''}"
                          for name, arch, message in summary["failed"])
        raise RuntimeError(f"{len(summary['failed'])} compile(s) failed:\n{lines}")
    from ..manifest import reload
    reload()  # this process sees the new figures
    return summary


def _compile_cuda(entries, archs, jobs, compiler, generated_dir, echo, progress) -> dict:
    tasks = []
    for entry in entries:
        spec = KernelSpec.from_json(entry["spec"])
        for arch in archs:
            if nvcc.arch_number(arch) >= nvcc.arch_number(spec.arch):
                tasks.append((entry, arch))
    stats: Dict[str, Dict[str, dict]] = {}
    failed = []
    echo(f"compiling {len(tasks)} cubins ({len(entries)} instances x {','.join(archs)}) with {jobs} jobs "
         f"[{nvcc.nvcc_version(compiler)}]")

    def work(entry, arch):
        path = Path(generated_dir) / entry["file"]
        return nvcc.compile_cubin(path, path.read_text(), arch, compiler)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(work, entry, arch): (entry["name"], arch) for entry, arch in tasks}
        bar = tqdm(total=len(futures), unit="cubin", disable=not progress, file=sys.stderr)
        for future in as_completed(futures):
            name, arch = futures[future]
            try:
                stats.setdefault(name, {})[arch] = future.result()
            except Exception as exc:  # a failing instance is reported, the rest still build
                failed.append((name, arch, str(exc)))
            bar.update(1)
        bar.close()
    library.update_build_stats(stats, generated_dir)
    spills = sum(1 for per_arch in stats.values() for f in per_arch.values() if f["spill_stores"] or f["spill_loads"])
    echo(f"compiled {len(tasks) - len(failed)} cubins; {spills} with spills; {len(failed)} failed")
    return {"compiled": len(tasks) - len(failed), "failed": failed}


# toolchain -> builder(entries, jobs=, generated_dir=, echo=, progress=) -> {"compiled": n, "failed": [...]}
_EXTRA_BUILDERS: Dict[str, Callable] = {"cxx": cxx.build_entries}
