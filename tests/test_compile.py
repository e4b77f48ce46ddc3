"""Compile tier: a deterministic sample of the default library through real nvcc for sm_80 and sm_90."""
import pytest

from natgen.codegen import nvcc
from natgen.codegen.library import GENERATED_DIR, load_manifest
from natgen.codegen.render import TEMPLATES_DIR

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


def _find_libnvrtc():
    """libnvrtc from the nvidia-cuda-nvrtc wheel (the `nvrtc` extra), the system, or the CUDA toolkit."""
    import ctypes
    import ctypes.util
    import glob
    import os
    candidates = []
    try:
        import nvidia  # namespace package of NVIDIA's wheels
        for base in nvidia.__path__:
            candidates += sorted(glob.glob(os.path.join(base, "*", "lib", "libnvrtc.so*")))
    except ImportError:
        pass
    system = ctypes.util.find_library("nvrtc")
    candidates += [system] if system else []
    candidates += sorted(glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*"))
    for path in candidates:
        if "builtins" in os.path.basename(path):
            continue
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


NVRTC = _find_libnvrtc()


@pytest.mark.compile
@pytest.mark.skipif(NVRTC is None or nvcc.cuda_include_dir() is None, reason="libnvrtc or the CUDA headers not found")
@pytest.mark.parametrize("entry", SAMPLE, ids=[e["name"] for e in SAMPLE])
def test_sample_compiles_through_nvrtc(entry):
    """The runtime compiles through NVRTC (via CuPy) when no cubin was built; NVRTC has no C library
    headers, so the same sources must compile there too."""
    import ctypes
    path = GENERATED_DIR / entry["file"]
    program = ctypes.c_void_p()
    assert NVRTC.nvrtcCreateProgram(ctypes.byref(program), path.read_bytes(), str(path).encode(), 0, None, None) == 0
    options = [b"-std=c++17", b"--use_fast_math", b"-arch=compute_80",
               f"-I{TEMPLATES_DIR}".encode(), f"-I{nvcc.cuda_include_dir()}".encode()]
    status = NVRTC.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    NVRTC.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    NVRTC.nvrtcGetProgramLog(program, log)
    NVRTC.nvrtcDestroyProgram(ctypes.byref(program))
    assert status == 0, log.value.decode(errors="replace")


@pytest.mark.compile
@needs_nvcc
def test_tensor_core_backward_ptx_runs_on_the_tensor_cores():
    """`natgen show NAME --ptx` of a tensor-core backward instance: every entry point but the preprocess runs
    mma.sync, fed by ldmatrix (plain and transposed)."""
    from click.testing import CliRunner
    from natgen.cli import main
    name = "na2d_bwd_tcbwd_kany_dany_c10_bf16_h64_q16x4_sm80"
    result = CliRunner().invoke(main, ["show", name, "--ptx", "--arch", "sm_90"])
    assert result.exit_code == 0, result.output
    ptx = result.output
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in ptx
    assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in ptx
    bodies = ptx.split(".entry ")[1:]
    uses = {body.split("(", 1)[0].strip().rsplit("_", 1)[-1]: "mma.sync" in body for body in bodies}
    assert uses == {"preprocess": False, "dkdv": True, "extra": True, "dq": True}, uses
