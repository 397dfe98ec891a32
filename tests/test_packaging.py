"""Packaging metadata: one dependency list, the wheel's torch pin and local version."""

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
    "print(json.dumps({'version': kw['version'], 'requires': kw['install_requires']}))\n"
)


def _setup_metadata(**env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if k != "VITKERN_LOCAL_VERSION"} | env
    res = subprocess.run(
        [sys.executable, "-c", _CAPTURE], cwd=ROOT, env=full, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_wheel_metadata_pins_the_build_torch_minor_release():
    minor = ".".join(torch.__version__.split(".")[:2])
    plain = _setup_metadata()
    assert plain["version"] == "0.1.0" and f"torch=={minor}.*" in plain["requires"], plain
    release = _setup_metadata(VITKERN_LOCAL_VERSION="1")
    assert release["version"] == f"0.1.0+torch{minor}", release
