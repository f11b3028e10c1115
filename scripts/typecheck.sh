#!/usr/bin/env bash
# mypy over the installed layout: quantmill.convert lives in convert/ (pyproject's package-dir), which mypy
# cannot follow from the source tree, so it checks a tree of symlinks in build/typecheck shaped like the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=build/typecheck/quantmill
rm -rf build/typecheck && mkdir -p "$tree"
ln -s "$PWD"/quantmill/* "$tree"/
for dir in convert quantize verify calib_data; do ln -s "$PWD/$dir" "$tree/$dir"; done
cd build/typecheck && exec "$OLDPWD"/.venv/bin/mypy --config-file "$OLDPWD"/pyproject.toml --cache-dir ../mypy-cache -p quantmill
