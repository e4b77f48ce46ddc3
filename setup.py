"""Package discovery: every package below each root of pyproject's package-dir mapping (the one place roots
are named), so a new subpackage cannot be left out of the wheel. Everything else is in pyproject.toml."""
import pathlib
import sys

from setuptools import find_packages, setup

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

HERE = pathlib.Path(__file__).resolve().parent
ROOTS = tomllib.loads((HERE / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def discover():
    packages = set(ROOTS)
    for package, folder in ROOTS.items():
        packages.update(f"{package}.{sub}" for sub in find_packages(str(HERE / folder)))
    # a subpackage of one root that is itself a root (none today) is found once, under its own name
    return sorted(packages)


setup(packages=discover())
