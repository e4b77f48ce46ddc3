"""The design's contracts, checked: one ABI from which signatures, struct and layout come; an op-aware
manifest; a runtime that never imports the generator; calls resolved once; no import cycles."""
import ast
import re
from pathlib import Path

import pytest
import torch

import natgen
from natgen import ops, paths, selector
from natgen.manifest import load

pytestmark = pytest.mark.codegen

RUNTIME = Path(natgen.__file__).resolve().parent
CODEGEN = RUNTIME / "codegen" if (RUNTIME / "codegen").is_dir() else RUNTIME.parent / "codegen"


def _module_name(path: Path) -> str:
    if path.is_relative_to(CODEGEN):
        parts = ("natgen", "codegen", *path.relative_to(CODEGEN).with_suffix("").parts)
    else:
        parts = ("natgen", *path.relative_to(RUNTIME).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path):
    """Modules imported when `path` is imported (module-level statements only, not inside functions)."""
    tree = ast.parse(path.read_text())
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in tree.body:
        nodes = [node] + ([n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
                          if isinstance(node, (ast.If, ast.Try)) else [])
        for item in nodes:
            if isinstance(item, ast.Import):
                found.update(alias.name for alias in item.names)
            elif isinstance(item, ast.ImportFrom):
                if item.level:
                    base = package.split(".")
                    base = base[:len(base) - item.level + 1]
                    module = ".".join(base + ([item.module] if item.module else []))
                else:
                    module = item.module
                found.update(f"{module}.{alias.name}" if f"{module}.{alias.name}" in _MODULES else module
                             for alias in item.names)
    return found


_MODULES = set()


def _sources():
    files = [p for p in RUNTIME.rglob("*.py") if "codegen" not in p.relative_to(RUNTIME).parts]
    return files + list(CODEGEN.rglob("*.py"))


def test_no_import_cycles_at_import_time():
    modules = {_module_name(p): p for p in _sources()}
    _MODULES.update(modules)
    graph = {name: {m for m in _top_level_imports(path) if m in modules and m != name}
             for name, path in modules.items()}
    # importing a package imports its __init__; a submodule import needs its parent package first
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_runtime_never_imports_the_generator():
    """Only the command line (whose build commands are build-time tools) may reach natgen.codegen."""
    for path in _sources():
        if path.is_relative_to(CODEGEN) or path.name == "cli.py":
            continue
        text = path.read_text()
        assert not re.search(r"^\s*(from\s+(\.+|natgen\.)codegen|import\s+jinja2|from\s+jinja2)", text, re.M), path


def test_cuda_signatures_follow_the_manifest_layout():
    """Every generated CUDA kernel's parameters are the manifest's layout, in order, with matching types."""
    types = {"ptr": r"(const\s+)?\w+\*\s*__restrict__", "i32": "int", "f32": "float"}
    checked = 0
    for instance in load():
        if instance.entry["toolchain"] != "nvcc":
            continue
        text = instance.source_path.read_text()
        # a backward instance's entry points all take the layout; a forward has one, named by its symbol
        symbols = [e["symbol"] for e in instance.launch.get("entries", [])] or [instance.entry["symbol"]]
        for symbol in symbols:
            start = text.index(f"{symbol}(") + len(symbol) + 1
            params = [p.strip() for p in text[start:text.index(")", start)].split(",")]
            fields = instance.layout["fields"]
            assert [p.split()[-1] for p in params] == [f["name"] for f in fields], (instance.name, symbol)
            for param, field in zip(params, fields):
                assert re.fullmatch(types[field["type"]] + r"\s+" + field["name"], param), (instance.name, param)
        checked += 1
    assert checked > 400
    assert all(layout["padding"] == "front" for layout in
               __import__("json").loads((paths.GENERATED_DIR / "manifest.json").read_text())["abis"].values())


def test_every_entry_is_op_aware_and_forwards_name_present_partners():
    instances = load()
    names = {i.name for i in instances}
    for instance in instances:
        entry = instance.entry
        assert entry["op"] == instance.spec.op and entry["abi"] in ("cuda_fwd", "cuda_bwd", "cpu", "cuda_unfused",
                                                                    "cpu_unfused")
        assert {"base", "saturating_warps", "waste"} <= set(entry["cost"])
        for partner in instance.partners:
            assert partner in names and "_bwd_" in partner
        if instance.spec.family == "cpu" and instance.op == "fwd":
            assert instance.partners == [instance.name.replace("_fwd_", "_bwd_")]
        # every fused CUDA forward has a backward kernel (the unfused families' backward is composed of their
        # own forward kinds): the SIMT one and its opt-in atomic-dQ twin, and for fp16 / bf16 the tensor-core
        # one too (chosen by cost)
        if entry["toolchain"] == "nvcc" and instance.op == "fwd" and entry["abi"] == "cuda_fwd":
            families = sorted({p.split("_bwd_", 1)[1].split("_", 1)[0] for p in instance.partners})
            half = instance.spec.dtype in ("f16", "bf16") and instance.spec.head_dim in (32, 64, 128)
            assert families == (["simtbwd", "simtbwda", "tcbwd"] if half else ["simtbwd", "simtbwda"]), \
                (instance.name, families)
            assert {p.replace("_simtbwda_", "_simtbwd_") for p in instance.partners
                    if "_simtbwd" in p} == {instance.partners[0]}


def _count_selections(monkeypatch):
    calls = []
    real = selector.select

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(selector, "select", counting)
    return calls


def test_a_repeated_call_is_resolved_once(monkeypatch):
    from natgen import overhead
    calls = _count_selections(monkeypatch)
    q, k, v = (torch.randn(1, 12, 12, 2, 32) for _ in range(3))
    with overhead.dry_run():  # every path, kernels as no-ops
        for backend in ("cpu", "emulator", overhead.DRY_CUDA):
            inputs = [t.half() for t in (q, k, v)] if "cuda" in backend else [q, k, v]
            before = len(calls)
            natgen.na2d(*inputs, 5, backend=backend)
            first = len(calls)
            assert first > before, backend  # the first call selects
            for _ in range(3):
                natgen.na2d(*inputs, 5, backend=backend)
            assert len(calls) == first, backend  # later ones do not


def test_choose_answers_for_forward_and_backward():
    q, k, v = (torch.randn(1, 12, 12, 2, 32) for _ in range(3))
    backend, forward = natgen.choose(2, q, k, v, 5)
    assert backend == "cpu" and "_fwd_cpu_" in forward
    assert natgen.choose(2, q, k, v, 5, op="backward") == ("cpu", forward.replace("_fwd_", "_bwd_"))
    # a CUDA forward's backward is its partner in the SIMT backward family
    emulated = natgen.choose(2, q, k, v, 5, backend="emulator", op="backward")
    assert emulated == ("emulator", "na2d_bwd_simtbwd_kany_dany_c00_f32_h32_q2x2_sm80")
    with pytest.raises(ValueError, match="op='sideways' must be 'forward' or 'backward'"):
        natgen.choose(2, q, k, v, 5, op="sideways")


def test_explain_backward():
    from click.testing import CliRunner
    from natgen.cli import main
    cpu = CliRunner().invoke(main, ["explain", "--rank", "2", "--shape", "56x56", "--kernel-size", "7",
                                    "--head-dim", "32", "--dtype", "fp32", "--target", "cpu", "--backward"],
                             catch_exceptions=False)
    assert cpu.exit_code == 0
    assert "chosen:  na2d_bwd_cpu_k7x7_dany_c00_f32_h32_q8x8_cpu" in cpu.output
    gpu = CliRunner().invoke(main, ["explain", "--rank", "2", "--shape", "56x56", "--kernel-size", "7",
                                    "--backward"], catch_exceptions=False)
    assert gpu.exit_code == 0 and "chosen:  na2d_bwd_tcbwd_k7x7_d1x1_c00_f16_h32_q16x4_sm80" in gpu.output
