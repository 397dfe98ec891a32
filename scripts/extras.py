"""Print the requirements of pyproject.toml's optional-dependency groups, one per line.

    python scripts/extras.py dev [more groups]  > requirements.txt

Self-references (``vitkern[test,bench]``) are expanded, so pyproject.toml stays the one
list of dependencies and scripts/setup_env.sh installs from it without building vitkern.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def expand(groups: dict[str, list[str]], name: str, seen: set[str]) -> list[str]:
    if name not in groups:
        raise SystemExit(f"no optional-dependency group {name!r} in pyproject.toml (have {sorted(groups)})")
    if name in seen:
        return []
    seen.add(name)
    out: list[str] = []
    for req in groups[name]:
        m = re.fullmatch(r"vitkern\[([^\]]+)\]", req.replace(" ", ""))
        out += [r for sub in m.group(1).split(",") for r in expand(groups, sub, seen)] if m else [req]
    return out


def main(argv: list[str]) -> None:
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    groups = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    seen: set[str] = set()
    reqs = [r for g in (argv or ["dev"]) for r in expand(groups, g, seen)]
    print("\n".join(dict.fromkeys(reqs)))


if __name__ == "__main__":
    main(sys.argv[1:])
