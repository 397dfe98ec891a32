#!/usr/bin/env bash
# The README's main-job command: sets everything up (as scripts/test.sh does),
# then runs `vitkern bench`. Extra arguments go to `vitkern bench`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
"$VITKERN_VENV_BIN/vitkern" bench "$@"
