"""Where natgen's files are: the shipped instance library, the kernel headers, and the cache directory.

One place for each. A source checkout keeps `generated/` and `templates/` beside `runtime/`; an installed
package carries them as `natgen/generated` and `natgen/templates`. Only a source checkout may be written
to (rendering, manifest updates); an installed package is read-only to natgen, and everything a build
produces there (compiled modules, ptxas figures, instances outside the default policy) goes to the cache.
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent

if (PACKAGE_DIR / "generated").is_dir():          # installed: natgen/generated beside natgen/*.py
    GENERATED_DIR = PACKAGE_DIR / "generated"
    TEMPLATES_DIR = PACKAGE_DIR / "templates"
    SOURCE_ROOT = None
else:                                             # source checkout: runtime/ beside generated/
    GENERATED_DIR = PACKAGE_DIR.parent / "generated"
    TEMPLATES_DIR = PACKAGE_DIR.parent / "templates"
    SOURCE_ROOT = PACKAGE_DIR.parent if (PACKAGE_DIR.parent / "pyproject.toml").is_file() else None

# True in a source checkout (editable installs included): `generated/` may be re-rendered there.
SOURCE_CHECKOUT = SOURCE_ROOT is not None
MANIFEST_NAME = "manifest.json"


def cache_dir() -> Path:
    """$NATGEN_CACHE_DIR, else ~/.cache/natgen: compiled modules, cubins, build figures, extra instances."""
    root = os.environ.get("NATGEN_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "natgen"


def extra_library_dir() -> Path:
    """Instances rendered outside the shipped library (`natgen build --spec`), with their own manifest."""
    return cache_dir() / "library"


def build_stats_path() -> Path:
    """ptxas figures of builds made where the shipped manifest may not be written (an installed package)."""
    return cache_dir() / "build-stats.json"
