"""``vitkern selftest`` (vitkern/selftest.py): the verdict table and the exit status, on
the cpu backend and on the Triton backend under the interpreter (a fresh process: the
interpreter must be chosen before triton is imported)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import SUBPROCESS_CWD, subprocess_env

from vitkern import selftest, testing


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in subprocess_env().items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "vitkern.cli", "selftest", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
        cwd=SUBPROCESS_CWD,
    )


@pytest.mark.skipif(sys.platform != "linux", reason="interpreter run tested on Linux")
def test_selftest_cli_passes_on_cpu_and_interpreter():
    pytest.importorskip("triton")
    res = _run_cli("--device", "cpu", "--backend", "cpu", "triton", "--dtype", "float32")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("op "))
    assert lines[header].split()[:3] == ["op", "backend", "dtype"]
    rows = [
        ln
        for ln in lines[header + 1 :]
        if ln.split()
        and ln.split()[0] in ("patch_embed", "layernorm_mlp", "layernorm_mlp_gated", "sp_attention", "ViT", "SP-ViT")
    ]
    for backend in ("cpu", "triton"):
        mine = [r for r in rows if r.split()[1 if not r.startswith(("ViT", "SP-ViT")) else 2] == backend]
        ops = {r.split()[0] for r in mine}
        assert ops == {"patch_embed", "layernorm_mlp", "layernorm_mlp_gated", "sp_attention", "ViT", "SP-ViT"}, (
            backend,
            mine,
        )
        assert all(r.rstrip().endswith("PASS") for r in mine)
    assert len(rows) == 2 * (len(testing.SELFTEST_CASES) + 2)
    assert f"{len(rows)}/{len(rows)} passed on cpu" in res.stdout


def test_selftest_exits_non_zero_on_a_failure(monkeypatch, capsys):
    """A check over its tolerance turns the exit status to 1 and its row to FAIL."""
    pytest.importorskip("vitkern._C")
    monkeypatch.setitem(testing.TOL, torch.float32, 1e-30)
    args = selftest.argparse.Namespace(device="cpu", dtype=["float32"], backend=["cpu"], no_models=True, seed=0)
    assert selftest.run(args) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "FAILED" in out
    monkeypatch.setitem(testing.TOL, torch.float32, 1e-5)
    assert selftest.run(args) == 0
