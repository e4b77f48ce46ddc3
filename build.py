#!/usr/bin/env python3
"""Render natgen's kernel library into generated/ and compile it.

    python build.py                       render + compile the default policy (nvcc for CUDA instances)
    python build.py --check               exit 1 if generated/ differs from a fresh render
    python build.py --filter 'na2d_*' --arch sm_80,sm_90 --jobs 2
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    try:
        from natgen.cli import main as cli_main
    except ImportError:
        sys.exit("natgen is not installed: run `pip install -e .` first (see README.md)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--check" in argv:
        argv.remove("--check")
        return cli_main(["check", *argv], standalone_mode=True)
    return cli_main(["build", *argv], standalone_mode=True)


if __name__ == "__main__":
    main()
