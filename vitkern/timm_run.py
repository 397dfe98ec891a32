"""Run one of timm's scripts with vitkern's models registered in timm's registry.

    python -m vitkern.timm_run path/to/train.py --model vitkern_vit_small_patch16_224 ...

registers every vitkern model as ``vitkern_<name>`` (see vitkern.interop.timm_registry),
then runs the script as ``__main__`` with the remaining arguments, so timm's train.py,
validate.py and benchmark.py (from timm's repository; they are not in its pip package)
work on vitkern models unchanged.
"""

from __future__ import annotations

import os
import runpy
import sys

USAGE = "usage: python -m vitkern.timm_run path/to/script.py [script arguments...]"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    script = argv[0]
    if not os.path.isfile(script):
        raise SystemExit(f"vitkern.timm_run: no such script {script!r}\n{USAGE}")
    from vitkern.interop.timm_registry import register_timm_models

    register_timm_models()
    sys.argv = [script, *argv[1:]]
    # The script's own folder first on the path, as `python script.py` would have it.
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
