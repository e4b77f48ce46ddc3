"""Compile tier: a deterministic sample of the default library through real nvcc for sm_80 and sm_90."""
import pytest

from natgen.codegen import nvcc
from natgen.codegen.library import GENERATED_DIR, load_manifest

NVCC = nvcc.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")
SAMPLE_PER_FAMILY = 4


def sample_entries():
    """Every CUDA family, evenly spaced over its sorted instances (so ranks, dtypes and head_dims vary)."""
    by_family = {}
    for entry in load_manifest()["instances"]:
        if entry["toolchain"] == "nvcc":
            by_family.setdefault(entry["spec"]["family"], []).append(entry)
    picked = []
    for family, entries in sorted(by_family.items()):
        step = max(1, len(entries) // SAMPLE_PER_FAMILY)
        picked += entries[step // 2::step][:SAMPLE_PER_FAMILY]
    return picked


SAMPLE = sample_entries()


@pytest.mark.codegen
def test_parse_ptxas_figures():
    text = """ptxas info    : Compiling entry function 'kern' for 'sm_80'
ptxas info    : Function properties for kern
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 8192 bytes smem, 472 bytes cmem[0]"""
    figures = nvcc.parse_ptxas(text)
    assert figures == {"registers": 96, "smem_bytes": 8192, "stack_bytes": 16, "spill_stores": 8, "spill_loads": 12}
    with pytest.raises(ValueError, match="no 'Used N registers'"):
        nvcc.parse_ptxas("garbage")


@pytest.mark.compile
@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("entry", SAMPLE, ids=[e["name"] for e in SAMPLE])
def test_sample_compiles_without_spills(entry, arch, tmp_path, monkeypatch):
    monkeypatch.setenv("NATGEN_CACHE_DIR", str(tmp_path))
    path = GENERATED_DIR / entry["file"]
    figures = nvcc.compile_cubin(path, path.read_text(), arch, NVCC)
    assert figures["spill_stores"] == 0 and figures["spill_loads"] == 0, figures
    assert 0 < figures["registers"] <= 255
    assert nvcc.cubin_path(figures["cubin_key"]).stat().st_size > 0
    # a second build of the same source is a cache hit (no new compile, same figures)
    assert nvcc.compile_cubin(path, path.read_text(), arch, NVCC) == figures


@pytest.mark.compile
@needs_nvcc
def test_compile_error_is_reported_with_the_source_line(tmp_path, monkeypatch):
    monkeypatch.setenv("NATGEN_CACHE_DIR", str(tmp_path))
    broken = tmp_path / "broken.cu"
    broken.write_text('extern "C" __global__ void broken() {\n  int x = undefined_name;\n}\n')
    with pytest.raises(RuntimeError, match=r"broken\.cu.*undefined_name|undefined_name"):
        nvcc.compile_cubin(broken, broken.read_text(), "sm_80", NVCC)


@pytest.mark.codegen
def test_recorded_build_figures_have_no_spills():
    """Whatever `natgen build` recorded in the committed manifest must be spill-free on every arch."""
    spilling = [(entry["name"], arch, figures["spill_stores"], figures["spill_loads"])
                for entry in load_manifest()["instances"] for arch, figures in entry.get("build", {}).items()
                if figures.get("spill_stores") or figures.get("spill_loads")]
    assert not spilling, f"{len(spilling)} cubins spill, e.g. {spilling[:5]}"
