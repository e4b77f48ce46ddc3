#!/usr/bin/env bash
# Build the wheel and the sdist and install each, one after the other, into a virtual environment outside the
# source tree made fresh for them (not editable; torch installed once, the wheel uninstalled before the sdist
# goes in), each with its own empty cache directory; make the installed package read-only, and there run
# `import natgen`, `natgen list`, a short pytest subset and (the wheel) `natgen demo` against it.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'chmod -R u+w "$work" 2>/dev/null || true; rm -rf "$work"' EXIT
start=$(date +%s)
echo "== building wheel and sdist into $work/dist"
python -m pip install -q build
(cd "$work" && python -m build --outdir "$work/dist" "$repo" > "$work/build.log" 2>&1) || { tail -40 "$work/build.log"; exit 1; }
ls -l "$work/dist"
venv="$work/venv"
python -m venv "$venv"
"$venv/bin/python" -m pip install -q torch==2.13.0 pytest pytest-timeout
echo "fresh venv with torch: $(( $(date +%s) - start )) s"
for artifact in "$work"/dist/natgen-*.whl "$work"/dist/natgen-*.tar.gz; do
    kind=$([[ "$artifact" == *.whl ]] && echo wheel || echo sdist)
    echo "== $kind: $(basename "$artifact") ($(du -k "$artifact" | cut -f1) KB) into the venv"
    "$venv/bin/python" -m pip uninstall -q -y natgen 2>/dev/null || true
    ! "$venv/bin/python" -c 'import natgen' 2>/dev/null || { echo "natgen still importable before the $kind"; exit 1; }
    "$venv/bin/python" -m pip install -q "$artifact"
    site="$("$venv/bin/python" -c 'import natgen, os; print(os.path.dirname(natgen.__file__))')"
    case "$site" in "$venv"/*) ;; *) echo "natgen imported from $site, not from the venv"; exit 1;; esac
    echo "installed at $site: $(find "$site" -type f -not -path '*/__pycache__/*' | wc -l) files"
    (cd "$site" && find . -type f -not -path '*/__pycache__/*' | sed 's#^\./##; s#/[^/]*$##; s#^[^/]*\.[a-z]*$#.#' | sort | uniq -c)
    before="$(cd "$site" && find . -type f -not -path '*/__pycache__/*' -exec sha256sum {} + | sort | sha256sum)"
    chmod -R a-w "$site"   # an installed natgen must never write into itself
    export NATGEN_CACHE_DIR="$work/cache-$kind"
    run=("env" "PATH=$venv/bin:$PATH")
    (cd "$work" && "${run[@]}" python -c 'import sys, natgen; assert "jinja2" not in sys.modules; print("import natgen:", natgen.__version__, "(jinja2 not loaded)")')
    (cd "$work" && "${run[@]}" natgen list --filter 'na2d_fwd_cpu_*' | tail -3)
    # the demo compiles and runs kernels from the installed files; the sdist installs the same files
    [ "$kind" = wheel ] && (cd "$work" && "${run[@]}" natgen demo)
    rm -rf "$work/tests-$kind" && mkdir "$work/tests-$kind"
    cp -r "$repo/tests" "$work/tests-$kind/tests" && cp "$repo/pyproject.toml" "$work/tests-$kind/"
    # the wheel runs a wider subset; the sdist builds the same files, so its installed-package tests suffice
    subset=(tests/test_installed.py)
    [ "$kind" = wheel ] && subset+=(tests/test_validation.py)
    (cd "$work/tests-$kind" && "${run[@]}" python -m pytest -q -p no:cacheprovider "${subset[@]}" -x)
    after="$(cd "$site" && find . -type f -not -path '*/__pycache__/*' -exec sha256sum {} + | sort | sha256sum)"
    [ "$before" = "$after" ] || { echo "the installed package was modified"; exit 1; }
    chmod -R u+w "$site"
    echo "== $kind: installed-package checks passed (package unchanged; $(( $(date +%s) - start )) s so far)"
done
