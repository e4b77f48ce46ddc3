"""Writes the rendered instance library (generated/) and its manifest, and checks it is up to date.

generated/manifest.json is the single contract between build time and run time: the runtime reads only it
(and the build figures and extra instances kept in the cache, which use the same schema). Only a source
checkout's generated/ is ever written; in an installed package the shipped library is read-only and builds
record their figures in the cache (natgen.paths).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from .. import paths
from ..files import atomic_write  # noqa: F401  (re-exported for the generator's modules)
from ..manifest import SCHEMA_VERSION
from . import abi
from . import render as render_mod
from .families import REGISTRY
from .space import Space, enumerate_space
from .spec import KernelSpec

GENERATED_DIR = paths.GENERATED_DIR
MANIFEST_NAME = paths.MANIFEST_NAME
SUBDIRS = {"nvcc": "cuda", "cxx": "cpu"}


class ReadOnlyLibrary(RuntimeError):
    pass


def require_writable(generated_dir: Path) -> None:
    """Refuse to write the shipped library of an installed package (it may be shared or read-only)."""
    if Path(generated_dir).resolve() == paths.GENERATED_DIR.resolve() and not paths.SOURCE_CHECKOUT:
        raise ReadOnlyLibrary(
            f"{generated_dir} belongs to an installed natgen and is never rewritten: builds record their "
            f"figures in {paths.cache_dir()}; render the library from a source checkout (python build.py)")


def _family_cost(family, spec: KernelSpec) -> dict:
    return family.cost(spec) if hasattr(family, "cost") else dict(family.COST)


def relative_file(spec: KernelSpec) -> str:
    family = REGISTRY[spec.family]
    return f"{SUBDIRS[family.TOOLCHAIN]}/{spec.name}{family.SOURCE_SUFFIX}"


def manifest_text(manifest: dict) -> str:
    return json.dumps(manifest, indent=1, sort_keys=True) + "\n"


def load_manifest(generated_dir: Path = GENERATED_DIR) -> dict:
    path = Path(generated_dir) / MANIFEST_NAME
    if not path.exists():
        return {"schema": SCHEMA_VERSION, "policy": "default", "abis": abi.layouts(), "instances": []}
    return json.loads(path.read_text())


def render_library(space: Optional[Space] = None, templates_dir: Path = render_mod.TEMPLATES_DIR,
                   previous: Optional[dict] = None):
    """Render every accepted spec. Returns ({relative path: text}, manifest dict).

    Build statistics of an instance are carried over from `previous` while its source and the device
    headers are unchanged, so a re-render never throws away what a build measured.
    """
    space = space or enumerate_space("default")
    files, instances = render_entries(space.accepted, templates_dir, previous)
    manifest = {"schema": SCHEMA_VERSION, "policy": space.policy, "abis": abi.layouts(), "instances": instances}
    return files, manifest


def render_entries(specs, templates_dir: Path = render_mod.TEMPLATES_DIR, previous: Optional[dict] = None):
    """({relative path: text}, [manifest entries]) for these specs; partners are named when rendered too."""
    previous_by_name = {entry["name"]: entry for entry in (previous or {}).get("instances", [])}
    names = {spec.name for spec in specs}
    files: Dict[str, str] = {}
    instances: List[dict] = []
    for spec in specs:
        family = REGISTRY[spec.family]
        headers = render_mod.headers_hash(templates_dir, family.HEADERS)
        text = render_mod.render(spec, templates_dir)
        rel = relative_file(spec)
        files[rel] = text
        entry = {
            "name": spec.name,
            "spec": spec.to_json(),
            "file": rel,
            "symbol": spec.name,
            "toolchain": family.TOOLCHAIN,
            "source_sha256": render_mod.sha256_text(text),
            "template_sha256": render_mod.template_hash(family.TEMPLATE, str(templates_dir)),
            "headers_sha256": headers,
            "headers": list(family.HEADERS),
            "op": spec.op,
            "abi": family.ABI,
            "launch": family.launch(spec),
            "cost": _family_cost(family, spec),
            "prebuild": getattr(family, "prebuild", lambda s: True)(spec),
            "partners": {"bwd": [p.name for p in getattr(family, "partners", lambda s: [])(spec)
                                 if p.name in names]},
            "build": {},
        }
        old = previous_by_name.get(spec.name)
        if old and old.get("source_sha256") == entry["source_sha256"] and old.get("headers_sha256") == headers:
            entry["build"] = old.get("build", {})
        instances.append(entry)
    return files, instances


def _existing_generated(generated_dir: Path) -> Dict[str, Path]:
    found = {}
    for sub in SUBDIRS.values():
        base = generated_dir / sub
        if base.is_dir():
            for path in base.iterdir():
                if path.is_file():
                    found[f"{sub}/{path.name}"] = path
    return found


def write_library(generated_dir: Path = GENERATED_DIR, space: Optional[Space] = None) -> dict:
    """Render into generated/, writing only files whose bytes changed and removing instances that left the
    space. Returns counts {written, unchanged, removed, total}."""
    generated_dir = Path(generated_dir)
    require_writable(generated_dir)
    files, manifest = render_library(space, previous=load_manifest(generated_dir))
    written = unchanged = 0
    for rel, text in files.items():
        path = generated_dir / rel
        data = text.encode()
        if path.exists() and path.read_bytes() == data:
            unchanged += 1
            continue
        atomic_write(path, data)
        written += 1
    removed = 0
    for rel, path in _existing_generated(generated_dir).items():
        if rel not in files:
            path.unlink()
            removed += 1
    manifest_path = generated_dir / MANIFEST_NAME
    data = manifest_text(manifest).encode()
    if not manifest_path.exists() or manifest_path.read_bytes() != data:
        atomic_write(manifest_path, data)
    return {"written": written, "unchanged": unchanged, "removed": removed, "total": len(files)}


def check_library(generated_dir: Path = GENERATED_DIR) -> List[str]:
    """Differences between generated/ and a fresh render (empty when up to date)."""
    generated_dir = Path(generated_dir)
    previous = load_manifest(generated_dir)
    files, manifest = render_library(previous=previous)
    problems = []
    existing = _existing_generated(generated_dir)
    for rel, text in sorted(files.items()):
        path = generated_dir / rel
        if not path.exists():
            problems.append(f"missing: generated/{rel}")
        elif path.read_bytes() != text.encode():
            problems.append(f"differs from a fresh render: generated/{rel}")
    for rel in sorted(set(existing) - set(files)):
        problems.append(f"not in the space any more: generated/{rel}")
    manifest_path = generated_dir / MANIFEST_NAME
    if not manifest_path.exists() or manifest_path.read_text() != manifest_text(manifest):
        problems.append(f"differs from a fresh render: generated/{MANIFEST_NAME}")
    return problems


def update_build_stats(stats: Dict[str, Dict[str, dict]], generated_dir: Path = GENERATED_DIR) -> None:
    """Merge {instance name: {arch: ptxas figures}} into the manifest (atomically); for an installed
    package's read-only library, into the cache's figures file instead (the runtime overlays it)."""
    generated_dir = Path(generated_dir)
    try:
        require_writable(generated_dir)
    except ReadOnlyLibrary:
        _record_in_cache(stats, load_manifest(generated_dir))
        return
    manifest = load_manifest(generated_dir)
    for entry in manifest["instances"]:
        for arch, figures in stats.get(entry["name"], {}).items():
            entry["build"][arch] = figures
            entry["build"] = dict(sorted(entry["build"].items()))
    atomic_write(generated_dir / MANIFEST_NAME, manifest_text(manifest).encode())


def _record_in_cache(stats: Dict[str, Dict[str, dict]], manifest: dict) -> None:
    path = paths.build_stats_path()
    try:
        recorded = json.loads(path.read_text())
        if not isinstance(recorded, dict):
            recorded = {}
    except (OSError, ValueError):
        recorded = {}  # missing or corrupt: start afresh (the figures are re-measured by any build)
    shas = {entry["name"]: entry["source_sha256"] for entry in manifest["instances"]}
    for name, per_arch in stats.items():
        if name not in shas:
            continue
        record = recorded.get(name)
        if not isinstance(record, dict) or record.get("source_sha256") != shas[name]:
            record = {"source_sha256": shas[name], "build": {}}
        record["build"].update(per_arch)
        recorded[name] = record
    atomic_write(path, (json.dumps(recorded, indent=1, sort_keys=True) + "\n").encode())


def write_extra(specs: List[KernelSpec]) -> List[dict]:
    """Render specs outside the shipped library into the cache's extra library (its own manifest), which the
    runtime loads beside the shipped one. Returns their entries."""
    root = paths.extra_library_dir()
    previous = load_manifest(root)
    files, entries = render_entries(specs, previous=previous)
    for rel, text in files.items():
        atomic_write(root / rel, text.encode())
    by_name = {entry["name"]: entry for entry in previous.get("instances", [])
               if previous.get("schema") == SCHEMA_VERSION}
    by_name.update({entry["name"]: entry for entry in entries})
    manifest = {"schema": SCHEMA_VERSION, "policy": "extra", "abis": abi.layouts(),
                "instances": [by_name[name] for name in sorted(by_name)]}
    atomic_write(root / MANIFEST_NAME, manifest_text(manifest).encode())
    return entries
