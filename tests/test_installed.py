"""Packaging and installation: what `import natgen` loads, the read-only installed library, atomic writes.

These run against whatever natgen is importable: the checkout (editable) in the main test run, and the
installed wheel and sdist in CI's installed-package check."""
import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

import natgen
from natgen import manifest, paths

pytestmark = pytest.mark.validation


def _python(code, env=None):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env=dict(os.environ, **(env or {})), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_import_loads_neither_jinja2_nor_the_generator():
    out = _python("""
        import sys, natgen
        print(sorted(m for m in sys.modules if m.split('.')[0] == 'jinja2' or m.startswith('natgen.codegen')))
    """)
    assert out.strip() == "[]"


def test_cpu_call_works_with_jinja2_absent():
    out = _python("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] == 'jinja2':
                    raise ImportError('jinja2 is blocked in this test')
        sys.meta_path.insert(0, Block())
        import torch, natgen
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 20, 2, 8, generator=g) for _ in range(3))
        out = natgen.na1d(q, k, v, 5, backend='cpu')
        ref = natgen.na1d(q, k, v, 5, backend='reference')
        print(float((out - ref).abs().max()), natgen.choose(1, q, k, v, 5)[0])
    """)
    error, backend = out.split()
    assert backend == "cpu" and float(error) < 1e-5


def test_installed_library_is_never_written(tmp_path, monkeypatch):
    from natgen.codegen import library
    monkeypatch.setattr(paths, "SOURCE_CHECKOUT", False)
    monkeypatch.setenv("NATGEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(library.ReadOnlyLibrary, match="never rewritten"):
        library.write_library(paths.GENERATED_DIR)
    shipped = (paths.GENERATED_DIR / paths.MANIFEST_NAME).read_bytes()
    name = next(i.name for i in manifest.load() if i.spec.family == "simt")
    library.update_build_stats({name: {"sm_99": {"registers": 77, "smem_bytes": 0}}}, paths.GENERATED_DIR)
    assert (paths.GENERATED_DIR / paths.MANIFEST_NAME).read_bytes() == shipped
    recorded = json.loads(paths.build_stats_path().read_text())
    assert recorded[name]["build"]["sm_99"]["registers"] == 77
    manifest.reload()
    try:
        assert manifest.find(name).build("sm_99")["registers"] == 77  # the runtime sees the cache's figures
    finally:
        manifest.reload()


def test_corrupt_cache_files_are_ignored(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NATGEN_CACHE_DIR", str(tmp_path))
    paths.build_stats_path().write_text("{not json")
    paths.extra_library_dir().mkdir(parents=True)
    (paths.extra_library_dir() / paths.MANIFEST_NAME).write_text('{"schema": 999, "instances": []}')
    manifest.reload()
    try:
        assert len(manifest.load()) == len(json.loads((paths.GENERATED_DIR / "manifest.json").read_text())["instances"])
        assert "ignoring" in caplog.text
    finally:
        manifest.reload()


def test_atomic_write_gives_a_plain_files_mode(tmp_path):
    from natgen.files import atomic_write
    umask = os.umask(0o027)
    os.umask(umask)
    target = tmp_path / "x.json"
    atomic_write(target, b"{}")
    plain = tmp_path / "plain"
    plain.write_bytes(b"{}")
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask
    assert target.read_bytes() == b"{}" and not list(tmp_path.glob(".*.tmp"))


def test_extra_instances_come_from_an_explicit_build_step(tmp_path, monkeypatch):
    """A spec outside the default policy exists only after `natgen build --spec` rendered it into the cache;
    the runtime then loads and selects it like a shipped one."""
    from click.testing import CliRunner
    from natgen import selector
    from natgen.cli import main
    from natgen.problem import make_problem
    monkeypatch.setenv("NATGEN_CACHE_DIR", str(tmp_path))
    name = "na1d_fwd_simt_k5_d2_c0_f16_h32_q4_sm80"  # the default policy leaves dilated simt specs out
    manifest.reload()
    try:
        with pytest.raises(KeyError):
            manifest.find(name)
        result = CliRunner().invoke(main, ["build", "--spec", name, "--render-only"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        manifest.reload()
        instance = manifest.find(name)
        assert instance.source_path.is_file() and str(instance.source_path).startswith(str(tmp_path))
        q = torch.empty(1, 40, 2, 32, dtype=torch.float16, device="meta")
        problem = make_problem(1, q, q, q, 5, dilation=2)
        ranked = selector.rank_instances("fwd", problem, selector.Target("cuda", "sm_80"))
        mine = next(r for r in ranked if r.instance.name == name)
        assert mine.supported and mine.cost < float("inf")
    finally:
        manifest.reload()


@pytest.mark.skipif(not paths.SOURCE_CHECKOUT, reason="checks the source tree's package discovery")
def test_every_package_folder_is_discovered_for_the_wheel():
    sys.path.insert(0, str(paths.SOURCE_ROOT))
    try:
        spec_text = (paths.SOURCE_ROOT / "setup.py").read_text()
        namespace = {"__file__": str(paths.SOURCE_ROOT / "setup.py"), "__name__": "natgen_setup_probe"}
        exec(compile(spec_text.replace("setup(packages=discover())", ""), "setup.py", "exec"), namespace)
        packages = namespace["discover"]()
    finally:
        sys.path.remove(str(paths.SOURCE_ROOT))
    roots = namespace["ROOTS"]
    for package, folder in roots.items():
        for init in (paths.SOURCE_ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(paths.SOURCE_ROOT / folder).parts
            assert ".".join((package, *relative)) in packages, init
    assert "natgen.codegen.families" in packages and "natgen.emulator" in packages
