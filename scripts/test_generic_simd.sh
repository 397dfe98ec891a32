#!/usr/bin/env bash
# Build vitkern._C with VITKERN_GENERIC_SIMD=1 (no x86 AVX-512/AVX2 code: the portable
# scalar loops a non-x86 build such as aarch64 compiles) into a scratch copy of the
# sources and run the cpu-kernel tests against it.
#
#   bash scripts/test_generic_simd.sh [extra pytest args]
#
# Uses the venv from scripts/setup_env.sh (VITKERN_VENV, default .venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${VITKERN_VENV:-$ROOT/.venv}/bin/python"
WORK="$(mktemp -d /tmp/vitkern-generic.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
cp -r "$ROOT/vitkern" "$ROOT/csrc" "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/README.md" "$WORK/"
rm -f "$WORK"/vitkern/_C*.so "$WORK"/vitkern/_build_info.py
start=$(date +%s)
( cd "$WORK" && VITKERN_GENERIC_SIMD=1 MAX_JOBS="${MAX_JOBS:-2}" \
    "$PY" setup.py -q build_ext --inplace --build-temp "$WORK/build" > "$WORK/build.log" 2>&1 ) \
  || { tail -50 "$WORK/build.log"; exit 1; }
echo "generic-SIMD build: $(( $(date +%s) - start )) s"
# No 256/512-bit vector instructions may remain (baseline x86-64 code uses xmm only).
n_wide=$(objdump -d --no-show-raw-insn "$WORK"/vitkern/_C*.so | grep -cE '%[yz]mm[0-9]' || true)
[[ "$n_wide" -eq 0 ]] || { echo "the generic build still has $n_wide AVX/AVX-512 instructions"; exit 1; }
export PYTHONPATH="$WORK"
cd "$WORK"  # not the repository root: its vitkern/ must not shadow the generic copy
"$PY" - <<'PY'
import os
import vitkern._ext as e
m = e.load_extension()
assert m is not None, e.extension_error()
assert m.__file__.startswith(os.environ["PYTHONPATH"]), m.__file__
assert "scalar only" in m.simd_paths(), m.simd_paths()
print("generic extension:", m.__file__, "|", m.simd_paths())
PY
"$PY" -m pytest -q -p no:cacheprovider "$ROOT/tests/test_cpu_kernels.py" "$ROOT/tests/test_extension.py" -m "not slow" "$@"
