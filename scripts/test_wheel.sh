#!/usr/bin/env bash
# The wheel carries the recipe library (make test-wheel; CI runs it through make test).
# Build the wheel, install it without dependencies into a fresh venv that borrows the test venv's
# packages (a .pth line naming their site-packages), and run the README's library commands from a
# folder with no recipes/: they must find the recipes, templates and schemas inside the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$PWD/$VENV/bin/python"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SECONDS=0

rm -rf build  # setuptools' build/lib would carry stale files into the wheel
# The venv's setuptools builds it when there is one (no download); else pip fetches it (build isolation).
isolation=$("$PY" -c "import setuptools" 2>/dev/null && echo --no-build-isolation || true)
"$PY" -m pip wheel -q --no-deps $isolation -w "$WORK/dist" . >/dev/null
rm -rf build
"$PY" -m venv --without-pip "$WORK/venv"
purelib='import sysconfig; print(sysconfig.get_paths()["purelib"])'
"$PY" -c "$purelib" >"$("$WORK/venv/bin/python" -c "$purelib")/test-venv-packages.pth"
"$PY" -m pip --python "$WORK/venv/bin/python" install -q --no-deps "$WORK"/dist/*.whl

mkdir "$WORK/elsewhere"
cd "$WORK/elsewhere"
export HF_HUB_OFFLINE=1  # the library's models are planned from the stored configs
unset PYTHONPATH
T="$WORK/venv/bin/tli-recipe"
"$WORK/venv/bin/python" -c "import sys, tli_recipe; f = tli_recipe.__file__; print(f); sys.exit(not f.startswith('$WORK/venv/'))"
set -x
"$T" list >/dev/null
"$T" render recipes/templates/tli.yaml.j2 --var base=Qwen/Qwen3-4B --var every=2 -o out/recipes/qwen3-4b-k2.yaml
"$T" render tli --var base=Qwen/Qwen3-4B --var every=8 >/dev/null
"$T" variants recipes/templates/tli.yaml.j2 --var base=Qwen/Qwen3-4B --grid every=4,8 --out-dir out/recipes/ >/dev/null
"$T" variants recipes/matrices/llama.yaml --check >/dev/null
"$T" diff recipes/llama3.2-1b-k4.yaml recipes/llama3.2-1b-k8.yaml >/dev/null
"$T" validate out/recipes/qwen3-4b-k2.yaml qwen3-4b-k4 >/dev/null
"$T" plan qwen3-4b-k4 >/dev/null
"$T" schema -o schemas/recipe.schema.json
set +x
# The rendered recipe's editor link resolves to the schema inside the installed wheel.
"$WORK/venv/bin/python" - <<'PY'
from pathlib import Path
from urllib.parse import unquote, urlparse

line = Path("out/recipes/qwen3-4b-k2.yaml").read_text().splitlines()[0]
link = line.split("$schema=", 1)[1]
target = Path(unquote(urlparse(link).path)) if link.startswith("file://") else Path("out/recipes", link)
assert target.is_file() and "site-packages/tli_recipe/_data/library/schemas" in str(target.resolve()), line
PY
echo "test-wheel: the wheel's library works from another folder ($SECONDS s)"
