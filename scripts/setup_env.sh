#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment, installs the pinned
# torch and the build/test/bench tools (the `dev` extra of pyproject.toml, the
# one list of dependencies), then builds the vitkern wheel with its compiled
# extension (vitkern._C, C++) and installs that wheel. Sourced by scripts/test.sh
# and scripts/bench.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VITKERN_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
TORCH_VERSION="${VITKERN_TORCH_VERSION:-2.14.1}"
TORCHVISION_VERSION="${VITKERN_TORCHVISION_VERSION:-0.29.1}"

log() { printf '\033[1m[vitkern setup]\033[0m %s\n' "$*" >&2; }

if [ ! -x "$PY" ]; then
  log "creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  log "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION (a few minutes the first time)"
  "$PY" -m pip install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi
log "installing build and test dependencies (pyproject.toml extra: dev)"
# The extras are read from pyproject.toml (not `pip install .[dev]`, which would build
# vitkern in an isolated environment against another torch).
"$PY" -c "import tomllib" 2>/dev/null || "$PY" -m pip install -q tomli  # Python 3.10
"$PY" "$ROOT/scripts/extras.py" dev > "$VENV/vitkern-dev-requirements.txt"
"$PY" -m pip install -q -r "$VENV/vitkern-dev-requirements.txt"

start=$(date +%s)
rm -rf "$ROOT/dist"
if [ "${CI:-}" = "true" ] || [ "${VITKERN_RELEASE_WHEEL:-0}" = "1" ]; then
  # CI: the release route (scripts/build_wheels.sh: sdist from the committed tree, wheel
  # built from the sdist, auditwheel-repaired), so the tests run against what is published.
  log "building the release wheel (scripts/build_wheels.sh, MAX_JOBS=${MAX_JOBS:-2})"
  VITKERN_PY="$PY" bash "$ROOT/scripts/build_wheels.sh" "$ROOT/dist"
else
  log "building the vitkern wheel (ninja, MAX_JOBS=${MAX_JOBS:-2}; incremental after the first build)"
  ( cd "$ROOT" && MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip wheel . --no-build-isolation --no-deps -q -w "$ROOT/dist" )
fi
log "wheel built in $(( $(date +%s) - start )) s: $(ls "$ROOT"/dist/*.whl)"
"$PY" - "$ROOT"/dist/vitkern-*.whl <<'PYEOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
ext = [n for n in names if n.startswith("vitkern/_C") and n.endswith(".so")]
assert ext, f"the wheel has no compiled extension: {names}"
print(f"[vitkern setup] wheel contains {ext[0]}", file=sys.stderr)
PYEOF
"$PY" -m pip install -q --force-reinstall --no-deps "$ROOT"/dist/vitkern-*.whl

export VITKERN_PY="$PY" VITKERN_VENV_BIN="$VENV/bin"
