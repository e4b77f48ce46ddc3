"""Read access to the instance library: the runtime's only view of what was generated and built.

Sources, in order: the shipped generated/manifest.json; the build figures an installed package's builds
recorded in the cache (applied to the entries whose source they were measured on); the extra library in
the cache (`natgen build --spec`). A corrupt or foreign cache file is ignored with a warning.
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from . import paths
from .spec import KernelSpec

log = logging.getLogger("natgen.manifest")

GENERATED_DIR = paths.GENERATED_DIR
SCHEMA_VERSION = 2


@dataclass(frozen=True, eq=False)
class Instance:
    spec: KernelSpec
    entry: dict
    root: Path = GENERATED_DIR          # the library folder entry["file"] is relative to
    layout: Optional[dict] = None       # the ABI record {padding, fields} the runtime packs from

    @property
    def name(self) -> str:
        return self.entry["name"]

    @property
    def op(self) -> str:
        return self.entry["op"]

    @property
    def launch(self) -> dict:
        return self.entry["launch"]

    @property
    def source_path(self) -> Path:
        return self.root / self.entry["file"]

    @property
    def partners(self) -> List[str]:
        return self.entry.get("partners", {}).get("bwd", [])

    def build(self, arch: str) -> Optional[dict]:
        return self.entry.get("build", {}).get(arch)


def _read(path: Path) -> dict:
    data = json.loads(path.read_text())
    if data.get("schema") != SCHEMA_VERSION:
        raise RuntimeError(f"{path} has schema {data.get('schema')}, this natgen reads schema {SCHEMA_VERSION}: "
                           "re-run `python build.py` (or `natgen build`)")
    return data


def _instances(data: dict, root: Path) -> List[Instance]:
    layouts = data.get("abis", {})
    return [Instance(KernelSpec.from_json(entry["spec"]), entry, root, layouts.get(entry.get("abi")))
            for entry in data["instances"]]


def _overlay_build_stats(instances: List[Instance]) -> None:
    path = paths.build_stats_path()
    if not path.exists():
        return
    try:
        recorded = json.loads(path.read_text())
        assert isinstance(recorded, dict)
    except (OSError, ValueError, AssertionError):
        log.warning("natgen: ignoring unreadable build figures in %s", path)
        return
    for instance in instances:
        record = recorded.get(instance.name)
        if isinstance(record, dict) and record.get("source_sha256") == instance.entry.get("source_sha256"):
            instance.entry.setdefault("build", {}).update(record.get("build", {}))


@functools.lru_cache(maxsize=4)
def load(path: Optional[str] = None) -> List[Instance]:
    """Every instance the runtime may load (cached per process; `reload()` after a build)."""
    manifest_path = Path(path) if path else GENERATED_DIR / paths.MANIFEST_NAME
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path} is missing: run `python build.py` (or `natgen build`) first")
    instances = _instances(_read(manifest_path), manifest_path.parent)
    if path is None:
        _overlay_build_stats(instances)
        extra = paths.extra_library_dir() / paths.MANIFEST_NAME
        if extra.exists():
            try:
                shipped = {instance.name for instance in instances}
                instances += [i for i in _instances(_read(extra), extra.parent) if i.name not in shipped]
            except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
                log.warning("natgen: ignoring the extra instance library %s (%s)", extra, exc)
    return instances


@functools.lru_cache(maxsize=4)
def _by_name(path: Optional[str] = None) -> Dict[str, Instance]:
    return {instance.name: instance for instance in load(path)}


@functools.lru_cache(maxsize=4)
def _by_shape(path: Optional[str] = None) -> Dict[tuple, Instance]:
    index: Dict[tuple, Instance] = {}
    for instance in load(path):
        index.setdefault((instance.spec.family, instance.spec.rank, instance.spec.dtype), instance)
    return index


def reload() -> None:
    load.cache_clear()
    _by_name.cache_clear()
    _by_shape.cache_clear()


def family_instance(family: str, rank: int, dtype_token: str) -> Instance:
    """The instance of a family with one instance per rank and dtype (the unfused families, CUDA and CPU)."""
    try:
        return _by_shape()[(family, rank, dtype_token)]
    except KeyError:
        raise LookupError(f"the library has no {family} instance for rank {rank}, {dtype_token} "
                          "(re-run `python build.py --render-only`)") from None


def find(name: str) -> Instance:
    try:
        return _by_name()[name]
    except KeyError:
        raise KeyError(f"no instance named {name!r} in the manifest (`natgen list --filter` finds names)") from None
