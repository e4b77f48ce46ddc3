"""Writes the rendered instance library (generated/) and its manifest, and checks it is up to date.

generated/manifest.json is the single contract between build time and run time: the runtime reads only it.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from . import render as render_mod
from .families import REGISTRY
from .space import Space, enumerate_space
from .spec import KernelSpec

SCHEMA_VERSION = 1
GENERATED_DIR = Path(__file__).resolve().parent.parent / "generated"
MANIFEST_NAME = "manifest.json"
SUBDIRS = {"nvcc": "cuda", "cxx": "cpu"}


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def relative_file(spec: KernelSpec) -> str:
    family = REGISTRY[spec.family]
    return f"{SUBDIRS[family.TOOLCHAIN]}/{spec.name}{family.SOURCE_SUFFIX}"


def manifest_text(manifest: dict) -> str:
    return json.dumps(manifest, indent=1, sort_keys=True) + "\n"


def load_manifest(generated_dir: Path = GENERATED_DIR) -> dict:
    path = Path(generated_dir) / MANIFEST_NAME
    if not path.exists():
        return {"schema": SCHEMA_VERSION, "policy": "default", "instances": []}
    return json.loads(path.read_text())


def render_library(space: Optional[Space] = None, templates_dir: Path = render_mod.TEMPLATES_DIR,
                   previous: Optional[dict] = None):
    """Render every accepted spec. Returns ({relative path: text}, manifest dict).

    Build statistics of an instance are carried over from `previous` while its source and the device
    headers are unchanged, so a re-render never throws away what a build measured.
    """
    space = space or enumerate_space("default")
    previous_by_name = {entry["name"]: entry for entry in (previous or {}).get("instances", [])}
    headers = render_mod.headers_hash(templates_dir)
    files: Dict[str, str] = {}
    instances: List[dict] = []
    for spec in space.accepted:
        family = REGISTRY[spec.family]
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
            "launch": family.launch(spec),
            "build": {},
        }
        old = previous_by_name.get(spec.name)
        if old and old.get("source_sha256") == entry["source_sha256"] and old.get("headers_sha256") == headers:
            entry["build"] = old.get("build", {})
        instances.append(entry)
    manifest = {"schema": SCHEMA_VERSION, "policy": space.policy, "instances": instances}
    return files, manifest


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
    """Merge {instance name: {arch: ptxas figures}} into the manifest (atomically)."""
    generated_dir = Path(generated_dir)
    manifest = load_manifest(generated_dir)
    for entry in manifest["instances"]:
        for arch, figures in stats.get(entry["name"], {}).items():
            entry["build"][arch] = figures
            entry["build"] = dict(sorted(entry["build"].items()))
    atomic_write(generated_dir / MANIFEST_NAME, manifest_text(manifest).encode())
