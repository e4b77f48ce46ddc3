"""Compile CUDA kernel source into a loadable kernel module, with an on-disk and in-process cache.

One module per source text: every non-template `__global__` function found at file scope (or inside
`extern "C" { }`) gets an entry, so launching several kernels of one source compiles once.

Two kinds of shared object live in the cache directory:
  * kernel modules, one per source and variant: natgen_emu.h + the source + natgen_emu_module.h, a plain
    shared object exporting the C table of natgen_emu_abi.h (no pybind11, no Python headers: ~1 s to
    compile). The checked variant (racecheck/initcheck) is compiled with -fsanitize=thread, whose memory
    access callbacks natgen_emu_check.h implements, and with line tables for its reports;
  * the host module, natgen_emu_host.cpp: the one pybind11 extension, compiled once per cache directory
    (and compiler / Python / pybind11 version), which dlopen()s kernel modules and launches them.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from .errors import CompileError

EMULATOR_DIR = Path(__file__).resolve().parent
WRAPPER_VERSION = "2"  # bump when the generated wrapper changes shape
# Kernel modules. -O1 would compile ~0.4 s faster per source but runs generated kernels ~40% slower.
COMPILE_FLAGS = (
    "-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-fno-gnu-unique",
    # GPU code type-puns freely (half2 <-> uint32_t); nvcc tolerates it, so the host build must too.
    "-fno-strict-aliasing",
    # probe every page of a large stack frame, so a fiber's stack overflow always hits its guard
    "-fstack-clash-protection",
    "-DNATGEN_EMULATOR=1",
)
# the checked variant: every load/store of kernel code calls a natgen_emu_check.h hook; no ThreadSanitizer
# runtime is linked (compile and link are separate steps so the driver does not add it)
SANITIZE_FLAGS = ("-fsanitize=thread", "-g1", "-DNATGEN_EMU_SANITIZE=1")
GCC_SANITIZE_FLAGS = ("--param", "tsan-instrument-func-entry-exit=0")
SANITIZE_LINK_FLAGS = ("-shared", "-Wl,--no-undefined", "-ldl")
HOST_FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden")
# what a kernel module is compiled against (besides the source and natgen_device.cuh)
KERNEL_HEADERS = ("natgen_emu.h", "natgen_emu_check.h", "natgen_emu_abi.h", "natgen_emu_module.h")
HOST_SOURCES = ("natgen_emu_host.cpp", "natgen_emu_abi.h")

_memory_cache: dict[str, "CompiledSource"] = {}
_lock = threading.Lock()
stats = {"compiles": 0, "disk_hits": 0, "memory_hits": 0, "corrupt_entries": 0, "host_compiles": 0}
_host = None  # the loaded host extension module


def templates_dir() -> Path:
    return paths.TEMPLATES_DIR


def cache_dir() -> Path:
    return paths.cache_dir() / "emulator"


def compiler() -> str:
    return os.environ.get("CXX", "g++")


_compiler_ids: dict[str, str] = {}


def compiler_id(cxx: str) -> str:
    if cxx not in _compiler_ids:
        try:
            out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            raise CompileError(f"host compiler {cxx!r} is not usable: {exc}") from exc
        _compiler_ids[cxx] = out.splitlines()[0] if out else cxx
    return _compiler_ids[cxx]


# ---------------------------------------------------------------------------------------------- parse
def _blank(match: re.Match) -> str:
    """Replace a comment/string/directive with spaces, keeping newlines so offsets and lines stay put."""
    return re.sub(r"[^\n]", " ", match.group(0))


def strip_non_code(source: str) -> str:
    pattern = r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|^[ \t]*#[^\n]*(?:\\\n[^\n]*)*'
    return re.sub(pattern, _blank, source, flags=re.S | re.M)


@dataclass(frozen=True)
class KernelDecl:
    name: str
    param_names: tuple[str, ...]


_GLOBAL_DECL = re.compile(r"\b__global__\b")
_SKIP_WORDS = {"__launch_bounds__", "__attribute__", "__align__", "alignas", "__declspec"}


def _matching_paren(text: str, open_index: int) -> int:
    depth = 0
    for i in range(open_index, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "(<[":
            depth += 1
        elif ch in ")>]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _param_name(param: str) -> str:
    param = re.sub(r"\[[^\]]*\]", "", param.split("=")[0]).strip()
    ids = re.findall(r"[A-Za-z_]\w*", param)
    return ids[-1] if ids else "?"


def _scope_is_file_level(code: str, position: int) -> bool:
    """True when every brace open at `position` belongs to an `extern "C" {` block."""
    stack: list[bool] = []
    raw = code[:position]
    for match in re.finditer(r"[{}]", raw):
        if match.group(0) == "{":
            before = raw[max(0, match.start() - 40) : match.start()]
            stack.append(bool(re.search(r'\bextern\s*"\s*"\s*$|\bextern\s*$', before)))
        elif stack:
            stack.pop()
    return all(stack)


def find_kernels(source: str) -> list[KernelDecl]:
    """The `__global__` functions a module can launch (templates and namespaced kernels are skipped)."""
    # extern "C" keeps its quotes' length but loses their text; recognise it before blanking strings
    code = strip_non_code(source)
    kernels: dict[str, KernelDecl] = {}
    for match in _GLOBAL_DECL.finditer(code):
        statement_start = max(code.rfind(";", 0, match.start()), code.rfind("}", 0, match.start()),
                              code.rfind("{", 0, match.start()))
        if re.search(r"\btemplate\b", code[statement_start + 1 : match.start()]):
            continue
        pos = match.end()
        name = None
        while True:
            ident = re.compile(r"\s*([A-Za-z_]\w*)\s*(\(?)").match(code, pos)
            if not ident:
                break
            word, paren = ident.group(1), ident.group(2)
            if word in _SKIP_WORDS and paren:
                close = _matching_paren(code, ident.end() - 1)
                pos = close + 1
                continue
            if paren:
                name = word
                open_index = ident.end() - 1
                break
            pos = ident.end()
        if not name or not _scope_is_file_level(code, match.start()):
            continue
        close = _matching_paren(code, open_index)
        params = code[open_index + 1 : close]
        names = tuple(_param_name(p) for p in _split_top_level(params) if p.strip() != "void")
        kernels.setdefault(name, KernelDecl(name, names))
    return list(kernels.values())


_EXTERN_SHARED = re.compile(
    r"\bextern\s+__shared__\s+((?:(?:__align__|alignas)\s*\(\s*\w+\s*\)\s*)*)"
    r"((?:[A-Za-z_][\w:]*\s*(?:<[^;>]*>)?\s*)+?)"
    r"((?:(?:__align__|alignas)\s*\(\s*\w+\s*\)\s*)*)([A-Za-z_]\w*)\s*\[\s*\]\s*;"
)


def rewrite_dynamic_shared(source: str) -> str:
    """`extern __shared__ T name[];` -> a reference to the launch's dynamic shared memory.

    C++ has no storage class that makes `extern __shared__` both legal and per-launch sized, so this
    one declaration form is rewritten in place (same line, same line count); everything else in the
    source compiles exactly as nvcc sees it.
    """

    def replace(match: re.Match) -> str:
        type_text = " ".join(match.group(2).split())
        name = match.group(4)
        return f"{type_text}* const& {name} = ::natgen_emu::dynamic_shared_as<{type_text}>();"

    return _EXTERN_SHARED.sub(replace, source)


# -------------------------------------------------------------------------------------------- compile
def wrapper_source(filename: str, kernels: list[KernelDecl], key: str) -> str:
    entries = "".join(f"\n        NATGEN_EMU_KERNEL({k.name})," for k in kernels)
    return (
        "// generated by natgen.emulator: do not edit\n"
        '#include "natgen_emu.h"\n'
        f'#include "{filename}"\n'
        '#include "natgen_emu_module.h"\n'
        "extern \"C\" NATGEN_EMU_MODULE_EXPORT const natgen_emu_module* NATGEN_EMU_MODULE_FUNCTION() {\n"
        f'    static const natgen_emu_module* module = ::natgen_emu::export_module("{key}", {{{entries}\n'
        "    });\n"
        "    return module;\n"
        "}\n"
    )


@dataclass
class CompiledSource:
    key: str
    native: object  # natgen_emu_host.KernelModule
    kernels: dict[str, KernelDecl]
    param_info: dict[str, tuple[int, list[tuple[bool, str, int, int]]]]


def _hash_parts(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def _header_texts() -> list[bytes]:
    paths = [*(EMULATOR_DIR / name for name in KERNEL_HEADERS), templates_dir() / "natgen_device.cuh"]
    return [p.read_bytes() for p in paths]


def sanitize_flags(cxx: str) -> tuple[str, ...]:
    return SANITIZE_FLAGS + (() if "clang" in compiler_id(cxx).lower() else GCC_SANITIZE_FLAGS)


def cache_key(source: str, include_dirs: tuple[str, ...], filename: str, sanitize: bool = False) -> str:
    """Key of a kernel module: everything its object code depends on (it holds no Python/pybind11 code)."""
    cxx = compiler()
    flags = COMPILE_FLAGS + (sanitize_flags(cxx) + SANITIZE_LINK_FLAGS if sanitize else ())
    return _hash_parts([source.encode(), *_header_texts(), compiler_id(cxx).encode(), cxx.encode(),
                        " ".join(flags).encode(), WRAPPER_VERSION.encode(), platform.machine().encode(),
                        "\0".join(include_dirs).encode(), filename.encode()])


def _module_name(key: str) -> str:
    return f"natgen_emu_{key[:32]}"


def module_path(key: str) -> Path:
    return cache_dir() / f"{_module_name(key)}.so"


def _run_compiler(cmd: list[str], build: Path, out: Path, target: Path, what: str) -> None:
    """Run one compile in `build`, then move its output onto `target` atomically."""
    proc = subprocess.run(cmd, cwd=build, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompileError(f"host compiler failed on {what}:\n{proc.stderr.strip()}")
    os.replace(out, target)  # atomic: readers see the old entry or the complete new one


def _compile(source: str, key: str, kernels: list[KernelDecl], include_dirs: tuple[str, ...], filename: str,
             sanitize: bool = False) -> Path:
    target = module_path(key)
    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix="build-", dir=target.parent))
    try:
        (build / filename).write_text(rewrite_dynamic_shared(source))
        (build / "wrapper.cpp").write_text(wrapper_source(filename, kernels, key))
        out = build / target.name
        includes = [f"-I{EMULATOR_DIR}", f"-I{templates_dir()}", *(f"-I{d}" for d in include_dirs)]
        stats["compiles"] += 1
        if sanitize:
            obj = build / "wrapper.o"
            flags = [f for f in COMPILE_FLAGS if f != "-shared"]
            cmd = [compiler(), *flags, *sanitize_flags(compiler()), *includes, "-x", "c++", "-c", "wrapper.cpp",
                   "-o", str(obj)]
            _run_compiler(cmd, build, obj, obj, filename)
            _run_compiler([compiler(), *SANITIZE_LINK_FLAGS, str(obj), "-o", str(out)], build, out, target, filename)
        else:
            cmd = [compiler(), *COMPILE_FLAGS, *includes, "-x", "c++", "wrapper.cpp", "-o", str(out)]
            _run_compiler(cmd, build, out, target, filename)
        return target
    finally:
        shutil.rmtree(build, ignore_errors=True)


# ----------------------------------------------------------------------------------------- host module
def _host_key() -> str:
    import pybind11

    cxx = compiler()
    return _hash_parts([*((EMULATOR_DIR / name).read_bytes() for name in HOST_SOURCES), compiler_id(cxx).encode(),
                        cxx.encode(), " ".join(HOST_FLAGS).encode(), sys.version.encode(),
                        pybind11.__version__.encode(), sysconfig.get_config_var("EXT_SUFFIX").encode()])


def _import_extension(name: str, path: Path):
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile_host(name: str, target: Path) -> None:
    import pybind11

    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix="build-host-", dir=target.parent))
    try:
        out = build / target.name
        cmd = [compiler(), *HOST_FLAGS, f"-DNATGEN_EMU_HOST_MODULE={name}", f"-I{EMULATOR_DIR}",
               f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
               str(EMULATOR_DIR / "natgen_emu_host.cpp"), "-o", str(out), "-ldl"]
        stats["host_compiles"] += 1
        _run_compiler(cmd, build, out, target, "natgen_emu_host.cpp")
    finally:
        shutil.rmtree(build, ignore_errors=True)


def host_module():
    """The pybind11 extension that loads and launches kernel modules (built on first use, then cached)."""
    global _host
    if _host is None:
        key = _host_key()
        name = f"natgen_emu_host_{key[:16]}"
        path = cache_dir() / f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}"
        module = None
        if path.exists():
            try:
                module = _import_extension(name, path)
            except ImportError:
                stats["corrupt_entries"] += 1  # rebuilt below; os.replace swaps it atomically
        if module is None:
            _compile_host(name, path)
            module = _import_extension(name, path)
        _host = module
    return _host


# ---------------------------------------------------------------------------------------------- load
def _load(path: Path, key: str):
    """Load the kernel module at `path`; ImportError unless it is the module compiled for `key`."""
    return host_module().KernelModule(str(path), key)


def compile_to_cache(source: str, include_dirs: tuple[str, ...] = (), filename: str = "kernel.cu",
                     sanitize: bool = False) -> Path:
    """Ensure the module for `source` is in the disk cache (compiling if needed); return its path."""
    key = cache_key(source, tuple(include_dirs), filename, sanitize)
    path = module_path(key)
    if not path.exists():
        _compile(source, key, find_kernels(source), tuple(include_dirs), filename, sanitize)
    return path


def load_source(source: str, include_dirs: tuple[str, ...] = (), filename: str = "kernel.cu",
                sanitize: bool = False) -> CompiledSource:
    """The module of `source`; sanitize=True: the variant built for racecheck/initcheck."""
    include_dirs = tuple(str(d) for d in include_dirs)
    key = cache_key(source, include_dirs, filename, sanitize)
    with _lock:
        cached = _memory_cache.get(key)
        if cached is not None:
            stats["memory_hits"] += 1
            return cached
        kernels = find_kernels(source)
        path = module_path(key)
        host_module()  # build/load it first, so that its errors are never taken for a corrupt kernel entry
        native = None
        if path.exists():
            try:
                native = _load(path, key)
                stats["disk_hits"] += 1
            except ImportError:
                # A truncated or foreign file: ignore it and rebuild (os.replace swaps it atomically).
                stats["corrupt_entries"] += 1
                native = None
        if native is None:
            _compile(source, key, kernels, include_dirs, filename, sanitize)
            native = _load(path, key)
        param_info = {name: (blob_size, [tuple(p) for p in params]) for name, blob_size, params in native.kernels()}
        compiled = CompiledSource(key, native, {k.name: k for k in kernels}, param_info)
        _memory_cache[key] = compiled
        return compiled


def clear_memory_cache() -> None:
    with _lock:
        _memory_cache.clear()
