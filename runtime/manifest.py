"""Read access to generated/manifest.json: the runtime's only view of the instance library."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from .codegen.spec import KernelSpec

GENERATED_DIR = Path(__file__).resolve().parent / "generated"
if not GENERATED_DIR.is_dir():  # source checkout: runtime/ sits beside generated/
    GENERATED_DIR = Path(__file__).resolve().parent.parent / "generated"
SUPPORTED_SCHEMA = 1


@dataclass(frozen=True)
class Instance:
    spec: KernelSpec
    entry: dict

    @property
    def name(self) -> str:
        return self.entry["name"]

    @property
    def launch(self) -> dict:
        return self.entry["launch"]

    @property
    def source_path(self) -> Path:
        return GENERATED_DIR / self.entry["file"]

    def build(self, arch: str) -> Optional[dict]:
        return self.entry.get("build", {}).get(arch)


@functools.lru_cache(maxsize=4)
def load(path: Optional[str] = None) -> List[Instance]:
    manifest_path = Path(path) if path else GENERATED_DIR / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path} is missing: run `python build.py` (or `natgen build`) first")
    data = json.loads(manifest_path.read_text())
    if data.get("schema") != SUPPORTED_SCHEMA:
        raise RuntimeError(f"{manifest_path} has schema {data.get('schema')}, this natgen reads schema "
                           f"{SUPPORTED_SCHEMA}: re-run `python build.py`")
    return [Instance(KernelSpec.from_json(entry["spec"]), entry) for entry in data["instances"]]


def find(name: str) -> Instance:
    for instance in load():
        if instance.name == name:
            return instance
    raise KeyError(f"no instance named {name!r} in the manifest (`natgen list --filter` finds names)")
