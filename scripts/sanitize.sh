#!/usr/bin/env bash
# Build vitkern._C (C++ CPU kernels) once with AddressSanitizer + UndefinedBehaviorSanitizer
# into a scratch copy of the sources and run the cpu-backend tests against it. Any ASan
# report or UBSan finding aborts the process (halt_on_error), which fails the run.
#
#   bash scripts/sanitize.sh [extra pytest args]
#
# Uses the venv from scripts/setup_env.sh (VITKERN_VENV, default .venv). The sanitizer
# runtimes are preloaded because the python executable itself is not instrumented;
# leak detection is off (CPython and torch keep allocations alive at exit by design).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${VITKERN_VENV:-$ROOT/.venv}/bin/python"
# VITKERN_ASAN_DIR keeps the sanitized build between runs (development); default: a temp dir.
if [[ -n "${VITKERN_ASAN_DIR:-}" ]]; then
  WORK="$VITKERN_ASAN_DIR"; mkdir -p "$WORK"
else
  WORK="$(mktemp -d /tmp/vitkern-asan.XXXXXX)"
  trap 'rm -rf "$WORK"' EXIT
fi
rm -rf "$WORK/vitkern"
cp -r "$ROOT/vitkern" "$ROOT/csrc" "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/README.md" "$WORK/"
rm -f "$WORK"/vitkern/_C*.so
start=$(date +%s)
(
  cd "$WORK"
  VITKERN_DEBUG=1 MAX_JOBS="${MAX_JOBS:-2}" \
    VITKERN_EXTRA_CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -O1 -g" \
    "$PY" setup.py -q build_ext --inplace --build-temp "$WORK/build" > "$WORK/build.log" 2>&1 \
    || { tail -50 "$WORK/build.log"; exit 1; }
)
echo "sanitizer build: $(( $(date +%s) - start )) s"
n_checks=$(nm -D "$WORK"/vitkern/_C*.so | grep -c "__asan_report\|__ubsan_handle" || true)
[[ "$n_checks" -gt 0 ]] || { echo "the extension is not instrumented"; exit 1; }
echo "instrumented: $n_checks sanitizer entry points referenced"
ASAN_LIB="$(gcc -print-file-name=libasan.so)"
UBSAN_LIB="$(gcc -print-file-name=libubsan.so)"
export LD_PRELOAD="$ASAN_LIB $UBSAN_LIB"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_odr_violation=0:alloc_dealloc_mismatch=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export PYTHONPATH="$WORK"
cd "$WORK"  # not the repository root: its vitkern/ must not shadow the sanitized copy
"$PY" - <<'PY'
import vitkern, vitkern._ext as e
m = e.load_extension()
assert m is not None, e.extension_error()
import os
assert m.__file__.startswith(os.environ["PYTHONPATH"]), m.__file__
print("sanitized extension:", m.__file__)
PY
"$PY" -m pytest -q -p no:cacheprovider \
  "$ROOT/tests/test_cpu_sp_attention.py" "$ROOT/tests/test_cpu_kernels.py" "$ROOT/tests/test_cpu_model.py" \
  "$ROOT/tests/test_robustness.py" "$ROOT/tests/test_validation.py" -m "not slow" "$@"
