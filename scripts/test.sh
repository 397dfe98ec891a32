#!/usr/bin/env bash
# The README's test command. Does its own setup on a fresh machine (venv, torch,
# wheel build with the compiled extension, install), then runs the test suite
# against the *installed* package. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
# pytest (not `python -m pytest`) so the source tree is not put on sys.path:
# `import vitkern` must find the installed wheel with its _C.
VITKERN_REQUIRE_EXTENSION=1 "$VITKERN_VENV_BIN/pytest" tests "$@"
