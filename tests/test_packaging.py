"""Packaging metadata: one dependency list, the wheel's torch floor and its abi3 tag."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_dev_requirements_come_from_pyproject_extras():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "extras.py"), "dev"], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert {"pytest>=8", "ruff>=0.6", "auditwheel>=6", "pytest-benchmark>=4"} <= set(out), out
    assert not [r for r in out if r.startswith("vitkern")], "self-references must be expanded"
    assert len(out) == len(set(out)), "each requirement once"
    assert not (ROOT / "requirements-dev.txt").exists(), "pyproject.toml is the one list of dependencies"


_CAPTURE = (
    "import json, runpy, setuptools\n"
    "kw = {}\n"
    "setuptools.setup = lambda **k: kw.update(k)\n"  # metadata only: nothing is built
    "runpy.run_path('setup.py')\n"
    "print(json.dumps({'version': kw['version'], 'requires': kw['install_requires'], 'options': kw['options']}))\n"
)


def _setup_metadata(**env: str) -> dict:
    full = {**os.environ, **env}
    res = subprocess.run(
        [sys.executable, "-c", _CAPTURE], cwd=ROOT, env=full, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_wheel_metadata_requires_the_stable_abi_floor_and_is_abi3():
    """One wheel for every torch >= the floor and every CPython >= 3.10: plain version 0.1.0
    (no +torch local version), torch>=floor, the bdist_wheel tag cp310-abi3."""
    meta = _setup_metadata()
    assert meta["version"] == "0.1.0", meta
    floor = [r for r in meta["requires"] if r.startswith("torch")]
    assert floor == ["torch>=2.10"], meta["requires"]
    assert meta["options"]["bdist_wheel"] == {"py_limited_api": "cp310"}, meta["options"]
    assert tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 10)
