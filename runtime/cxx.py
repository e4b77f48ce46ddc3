"""The "cxx" toolchain: generated CPU instances -> shared libraries in a content-addressed cache.

Each instance is a plain shared library exporting `extern "C" int <spec name>(const Args*, int)` (kernels
are extern "C" and named after their spec, so a profiler shows which instance ran), called through ctypes,
which releases the GIL. Why not
a pybind11 extension per instance: pybind11's headers alone cost ~5 s of the ~8.5 s compile of one instance
(measured with g++ 12 -O3), i.e. they would double the build of the default library, and a one-pointer
interface needs none of pybind11's type conversions. It also makes modules independent of the Python ABI.

Cache: natgen.paths.cache_dir(), under cpu/<key[:2]>/<name>-<key[:16]>.so, where key =
sha256(source, the headers it includes, compiler identity, flags). A module is written to
a unique temp file and os.replace()d into place (readers never see half a file) while a per-key file lock
makes a second process wait for the first compile instead of repeating it. Each module has a JSON sidecar
with the sha256 of its bytes: a module whose bytes do not match (truncated, corrupted) is ignored and rebuilt.

The source is always the library's file (generated/cpu/*.cpp, or the cache's extra library): the runtime
compiles what was generated and never renders anything. `codegen.builder` calls `build_entries` for
`natgen build`; the runtime calls `load(instance)`, compiling on first use.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import ctypes
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Optional

from . import cpu_isa, paths
from .files import atomic_write

log = logging.getLogger("natgen.cxx")

FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fopenmp", "-fvisibility=hidden", "-fno-math-errno",
         "-Wno-psabi", "-DNDEBUG")
COMPILES = 0          # compiles done by this process (tests read it to prove cache reuse)
_loaded = {}          # cache key -> Kernel
_by_name = {}         # (instance name, library folder) -> Kernel (skips reading and hashing the source)
_lock = threading.Lock()
_count_lock = threading.Lock()


class CompileError(RuntimeError):
    pass


def cache_dir() -> Path:
    return paths.cache_dir() / "cpu"


def find_compiler() -> Optional[str]:
    # the backend's available() asks on every call: memoized on what the answer depends on (CXX, PATH),
    # since shutil.which stats every PATH entry (~0.1 ms per na2d call, measured)
    return _find_compiler(os.environ.get("CXX"), os.environ.get("PATH"))


@functools.lru_cache(maxsize=16)
def _find_compiler(cxx: Optional[str], path: Optional[str]) -> Optional[str]:
    for candidate in (cxx, "g++", "c++"):
        found = candidate and shutil.which(candidate, path=path)
        if found:
            return found
    return None


@functools.lru_cache(maxsize=None)
def compiler_identity(compiler: str) -> str:
    result = subprocess.run([compiler, "--version"], capture_output=True, text=True)
    return (result.stdout.splitlines() or ["unknown"])[0]


def _include_dirs():
    return (str(paths.TEMPLATES_DIR),)


@functools.lru_cache(maxsize=16)
def _headers_bytes(names: tuple) -> bytes:
    return b"".join(name.encode() + b"\0" + (paths.TEMPLATES_DIR / name).read_bytes() for name in names)


def cache_key(source: str, compiler: str, headers: tuple = ()) -> str:
    """sha256 of the source, the headers it includes (the manifest entry's "headers"), compiler, flags."""
    digest = hashlib.sha256()
    for part in (source.encode(), _headers_bytes(tuple(headers)), compiler_identity(compiler).encode(),
                 " ".join(FLAGS).encode()):
        digest.update(part + b"\0")
    return digest.hexdigest()


def _paths(name: str, key: str):
    folder = cache_dir() / key[:2]
    stem = f"{name}-{key[:16]}"
    return folder / f"{stem}.so", folder / f"{stem}.json", folder / f"{stem}.lock"


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _valid(module_path: Path, sidecar: Path, key: str) -> bool:
    try:
        meta = json.loads(sidecar.read_text())
        return meta.get("key") == key and meta.get("sha256") == _sha256_file(module_path)
    except (OSError, ValueError):
        return False


def compile_source(name: str, source: str, compiler: Optional[str] = None, headers: tuple = ()) -> Path:
    """Path of the compiled module for `source` (compiling it unless a valid cached copy exists); `headers`
    are the natgen headers it includes (part of the cache key)."""
    global COMPILES
    compiler = compiler or find_compiler()
    if compiler is None:
        raise CompileError("no C++ compiler found (set CXX or install g++)")
    key = cache_key(source, compiler, headers)
    module_path, sidecar, lock_path = _paths(name, key)
    if _valid(module_path, sidecar, key):
        return module_path
    module_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent compile of the same key finishes first
        try:
            if _valid(module_path, sidecar, key):
                return module_path
            with tempfile.TemporaryDirectory(prefix="natgen-cxx-") as work:
                src = Path(work) / f"{name}.cpp"
                src.write_text(source)
                out = Path(work) / f"{name}.so"
                includes = [f"-I{d}" for d in _include_dirs()]
                command = [compiler, *FLAGS, *includes, str(src), "-o", str(out)]
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:
                    raise CompileError(f"{name}: {' '.join(command)}\n{result.stderr[-4000:]}")
                # unique temp name in the cache folder, then rename: readers see old or new, never half
                fd, tmp = tempfile.mkstemp(dir=module_path.parent, prefix=f".{module_path.name}.", suffix=".tmp")
                os.close(fd)
                shutil.copyfile(out, tmp)
                os.replace(tmp, module_path)
            atomic_write(sidecar, json.dumps({"key": key, "name": name, "sha256": _sha256_file(module_path),
                                               "compiler": compiler_identity(compiler),
                                               "flags": list(FLAGS)}, sort_keys=True).encode())
            with _count_lock:
                COMPILES += 1
            log.info("natgen: compiled %s -> %s", name, module_path)
            return module_path
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Kernel:
    """One loaded instance: `run(args_address, arg_fields)` calls its extern "C" entry point on the ISA
    variant natgen.cpu_isa names (read on every call, so cpu_isa.use / force take effect at once)."""

    def __init__(self, name: str, path: Path):
        self.name, self.path = name, path
        self._library = ctypes.CDLL(str(path))  # OSError for a file that is not a loadable library
        self._entry = getattr(self._library, name)
        self._entry.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        self._entry.restype = ctypes.c_int
        variants = getattr(self._library, f"{name}_variants")
        variants.restype = ctypes.c_char_p
        self.variants = tuple(variants().decode().split(","))  # compiled in, best first

    def run(self, args_address: int, arg_fields: int) -> None:
        status = self._entry(args_address, arg_fields, cpu_isa.code())
        if status:
            raise RuntimeError(self._failure(status, arg_fields))

    def _failure(self, status: int, arg_fields: int) -> str:
        if status == 1:
            return f"{self.name}: argument layout mismatch ({arg_fields} fields); rebuild natgen"
        if status in (3, 4):
            what = "was built without" if status == 3 else "needs instructions this CPU lacks for"
            return (f"{self.name}: the module {what} ISA variant {cpu_isa.current()!r} (its variants: "
                    f"{', '.join(self.variants)}; set {cpu_isa.ENV} to one of them)")
        if status == 5:
            return (f"{self.name}: the kernel does not read the input_dtype code it was given (the manifest's "
                    "launch fact 'inputs' lists those it reads); rebuild natgen")
        return f"{self.name}: the kernel raised a C++ exception (out of memory?)"


def compile_instance(instance) -> Path:
    """The compiled module of a manifest instance of the CPU family (compiling it unless cached)."""
    return compile_source(instance.entry["symbol"], instance.source_path.read_text(), None,
                          tuple(instance.entry.get("headers", ())))


def load(instance) -> Kernel:
    """Load (compiling on first use) the shared library of a manifest instance of the CPU family."""
    handle = (instance.name, str(instance.root))
    module = _by_name.get(handle)
    if module is not None:
        return module
    source = instance.source_path.read_text()
    compiler = find_compiler()
    if compiler is None:
        raise CompileError("no C++ compiler found (set CXX or install g++)")
    headers = tuple(instance.entry.get("headers", ()))
    key = cache_key(source, compiler, headers)
    symbol = instance.entry["symbol"]
    with _lock:
        module = _loaded.get(key)
        if module is not None:
            _by_name[handle] = module
            return module
        for attempt in range(2):
            path = compile_source(symbol, source, compiler, headers)
            try:
                module = Kernel(symbol, path)
                break
            except (OSError, AttributeError):
                if attempt:
                    raise
                log.warning("natgen: cached module %s does not load; rebuilding", path)
                _paths(symbol, key)[1].unlink(missing_ok=True)
        _loaded[key] = module
        _by_name[handle] = module
        return module


def build_entries(entries, jobs=None, generated_dir=paths.GENERATED_DIR, echo=print, progress=True) -> dict:
    """Compile manifest entries of the "cxx" toolchain into the cache (`natgen build`)."""
    from tqdm import tqdm  # build-time only: importing natgen never loads it

    compiler = find_compiler()
    if compiler is None:
        echo("no C++ compiler: CPU instances are left to compile on first use")
        return {"compiled": 0, "failed": []}
    jobs = jobs or os.cpu_count() or 1
    before = COMPILES
    failed = []
    echo(f"compiling {len(entries)} CPU modules with {jobs} jobs [{compiler_identity(compiler)}] into {cache_dir()}")

    def work(entry):
        source = (Path(generated_dir) / entry["file"]).read_text()
        compile_source(entry["name"], source, compiler, tuple(entry.get("headers", ())))

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(work, entry): entry["name"] for entry in entries}
        bar = tqdm(total=len(futures), unit="module", disable=not progress, file=sys.stderr)
        for future in as_completed(futures):
            try:
                future.result()
            except Exception as exc:  # one failing instance is reported, the rest still build
                failed.append((futures[future], "cpu", str(exc)))
            bar.update(1)
        bar.close()
    compiled = COMPILES - before
    echo(f"CPU modules: {compiled} compiled, {len(entries) - compiled - len(failed)} cached, {len(failed)} failed")
    return {"compiled": compiled, "failed": failed}

