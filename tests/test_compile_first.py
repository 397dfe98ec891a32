"""``torch.compile(model, fullgraph=True)`` as the very first call of a fresh process.

Each case runs in its own interpreter, where nothing vitkern-related has run eagerly
before the compiled call: inference, then a training step (forward, backward, optimizer
step), then two more image sizes (``dynamic_img_size=True`` model; with torch.compile's default
dynamic-shape handling and with ``dynamic=False``), on every backend this machine has (Triton under the
interpreter). The compiled results are checked against eager runs made afterwards.
Nothing in the traced path may import, load or probe (the extension is loaded and triton
probed when ``vitkern`` is imported).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
from conftest import SUBPROCESS_CWD, subprocess_env

import vitkern

_SCRIPT = textwrap.dedent(
    """
    import sys, torch, vitkern
    kind, backend, compiler, dynamic = sys.argv[1:5]
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, dynamic_img_size=True)
    if kind == "sp_vit":
        cfg.update(spatial_prior=True, sp_layers=1)
    model = vitkern.ViT(**cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, 32, 32)
    dynamic = {"static": False, "default": None}[dynamic]
    cmodel = torch.compile(model, fullgraph=True, dynamic=dynamic, backend=compiler)

    # 1. inference: the first vitkern call of the process is the compiled one
    model.eval()
    with torch.no_grad():
        y = cmodel(x)
    assert vitkern.backend_report() == {}, "an eager vitkern call ran before the compiled one"

    # 2. a training step
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = cmodel(x).logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    opt.zero_grad()

    # 3. two more image sizes in the same process (static: one graph each; default: the
    # second size recompiles with symbolic sizes, the third reuses that graph)
    x2, x3 = torch.randn(1, 3, 48, 40), torch.randn(1, 3, 40, 64)
    with torch.no_grad():
        y2, y3 = cmodel(x2), cmodel(x3)

    # eager references, now that the compiled calls are done
    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    with torch.no_grad():
        assert rel(y2, model(x2)) < 1e-4 and rel(y3, model(x3)) < 1e-4, "other image sizes"
        for p, g in zip(model.parameters(), grads.values()):
            p.add_(0.1 * g)  # undo the SGD step
        assert rel(y, model(x)) < 1e-4, "inference"
    model.zero_grad()
    model(x).logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        assert rel(grads[n], p.grad) < 1e-3, n
    used = {op: rec.backend for op, rec in vitkern.backend_report().items()}
    assert set(used.values()) <= {backend, "reference"} and backend in used.values(), used
    print("OK", used)
    """
)


def _backends() -> list[str]:
    """Every backend of the table that runs CPU tensors here, one with an interpreter switch
    (triton: TRITON_INTERPRET=1) with the switch on, as the subprocess sets it."""
    out = []
    for b in vitkern.BACKEND_TABLE:
        with mock.patch.dict(os.environ, {b.cpu_env: "1"} if b.cpu_env else {}):
            if b.status() is None and b.runs_on("cpu"):
                out.append(b.name)
    return out


def _run(kind: str, backend: str, compiler: str, dynamic: str) -> None:
    env = {
        **subprocess_env(),
        "VITKERN_BACKEND": backend,
    }
    cpu_env = vitkern.get_backend(backend).cpu_env
    if cpu_env:
        env[cpu_env] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, kind, backend, compiler, dynamic],
        cwd=SUBPROCESS_CWD,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-6000:]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("kind", ["vit", "sp_vit"])
def test_compile_fullgraph_first_call(kind, backend):
    """Dynamo capture plus AOTAutograd (fake kernels, backward graph), no C++ codegen;
    torch.compile's default dynamic-shape handling across the image sizes."""
    _run(kind, backend, "aot_eager", "default")


@pytest.mark.parametrize("kind", ["vit", "sp_vit"])
def test_compile_fullgraph_first_call_inductor(kind):
    """The default compiler (inductor) on the backend ``auto`` picks here, ``dynamic=False``."""
    backend = "cpu" if vitkern.available_backends()["cpu"] is None else "reference"
    _run(kind, backend, "inductor", "static")
