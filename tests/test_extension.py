"""vitkern._C: built, installed and loaded; its kernels match the reference."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import TOL, assert_close_rel, randn

import vitkern
from vitkern._ext import extension_error, load_extension
from vitkern.ops import spatial_prior_matrix

REQUIRE = os.environ.get("VITKERN_REQUIRE_EXTENSION", "0") == "1"
needs_ext = pytest.mark.skipif(load_extension() is None and not REQUIRE, reason=f"_C not built: {extension_error()}")


def test_extension_loaded_when_required():
    if not REQUIRE:
        pytest.skip("set VITKERN_REQUIRE_EXTENSION=1 (the README test command does) to require the built _C")
    assert load_extension() is not None, extension_error()
    assert vitkern.available_backends()["cpu"] is None
    # The tests run against the installed package, not a source tree without the build.
    assert "site-packages" in vitkern.__file__, vitkern.__file__


def _elf_section_names(path: str) -> set[str]:
    """Section names of a 64-bit little-endian ELF file (enough for the extension)."""
    import struct

    data = open(path, "rb").read()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not a 64-bit little-endian ELF"
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i):  # (name offset, file offset of the section)
        base = shoff + i * shentsize
        return struct.unpack_from("<I", data, base)[0], struct.unpack_from("<Q", data, base + 0x18)[0]

    strtab = header(shstrndx)[1]
    names = set()
    for i in range(shnum):
        off = strtab + header(i)[0]
        names.add(data[off : data.index(b"\0", off)].decode())
    return names


@needs_ext
def test_extension_build_record_matches_installed_torch():
    from vitkern._ext import build_info

    info = build_info()
    assert info is not None, "vitkern/_build_info.py is written by setup.py next to _C"
    assert info["torch_minor"] == ".".join(torch.__version__.split(".")[:2])
    paths = load_extension().simd_paths()
    assert ("scalar only" in paths) == bool(info["generic_simd"]), (paths, info)


@needs_ext
def test_release_extension_is_stripped_and_small():
    from vitkern._ext import build_info

    if build_info()["debug"]:
        pytest.skip("a VITKERN_DEBUG=1 build keeps its debug info on purpose")
    path = load_extension().__file__
    if not path.endswith(".so"):
        pytest.skip(f"not an ELF extension: {path}")
    sections = _elf_section_names(path)
    assert ".text" in sections
    assert not {s for s in sections if s.startswith(".debug")}, sorted(sections)
    assert os.path.getsize(path) < 4 * 2**20, f"{path}: {os.path.getsize(path) / 2**20:.1f} MB"


_FAKE_BUILD = (
    "import sys, types, warnings\n"
    "fake = types.ModuleType('vitkern._build_info')\n"
    "fake.BUILD_INFO = dict(torch_version='2.99.0', torch_minor='2.99', cxx11_abi=True, python='3.11',\n"
    "                       generic_simd=False, debug=False)\n"
    "sys.modules['vitkern._build_info'] = fake\n"
    "with warnings.catch_warnings(record=True) as w:\n"
    "    warnings.simplefilter('always')\n"
    "    import torch, vitkern\n"
    "    r = vitkern.available_backends()\n"
    "msgs = [str(x.message) for x in w if 'vitkern._C' in str(x.message)]\n"
)


def test_torch_mismatch_names_both_versions_and_the_cost(tmp_path):
    """_C built for another torch minor release: not imported, one warning says why and what it costs."""
    code = _FAKE_BUILD + (
        "assert len(msgs) == 1, msgs\n"
        "m = msgs[0]\n"
        "assert 'built for torch 2.99.0' in m and f'torch {torch.__version__} is installed' in m, m\n"
        "assert 'torch==2.99.*' in m and 'slower' in m, m\n"
        "assert 'vitkern._C' not in sys.modules, 'a mismatched _C must not be imported'\n"
        "assert r['cpu'] and 'built for torch 2.99.0' in r['cpu'], r\n"
        "print('ok')\n"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("VITKERN_IGNORE_TORCH_VERSION", "VITKERN_DISABLE_EXTENSION")
    }
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


@needs_ext
def test_torch_mismatch_override_tries_to_load(tmp_path):
    code = _FAKE_BUILD + "assert not msgs, msgs\nassert r['cpu'] is None, r\nprint('ok')\n"
    env = {**os.environ, "VITKERN_IGNORE_TORCH_VERSION": "1"}
    env.pop("VITKERN_DISABLE_EXTENSION", None)
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("grid,num_prefix,heads", [((14, 14), 1, 2), ((3, 5), 0, 3), ((5, 2), 4, 1), ((1, 1), 0, 1)])
def test_spatial_prior_cpu_matches_reference(dtype, grid, num_prefix, heads, gen, poison_empty):
    omega = randn(heads, 2 * grid[0] - 1, 2 * grid[1] - 1, dtype=dtype, gen=gen).requires_grad_()
    out = spatial_prior_matrix(omega, grid, num_prefix, backend="cpu")
    assert vitkern.last_backend("spatial_prior") == "cpu"
    ref = spatial_prior_matrix(omega, grid, num_prefix, backend="reference")
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # a gather: bit exact
    g = randn(*out.shape, dtype=dtype, gen=gen)
    (d_cpu,) = torch.autograd.grad(out, omega, g)
    # Truth: the reference backward in float64 (it accumulates in the input dtype,
    # the kernel in fp32, so the kernel is compared with float64, not with it).
    omega64 = omega.detach().double().requires_grad_()
    (d_true,) = torch.autograd.grad(
        spatial_prior_matrix(omega64, grid, num_prefix, backend="reference"), omega64, g.double()
    )
    assert d_cpu.dtype == dtype
    assert_close_rel(d_cpu, d_true, TOL[dtype], f"d omega {dtype}")


@needs_ext
def test_spatial_prior_backward_is_deterministic(gen):
    omega = randn(3, 27, 27, gen=gen).requires_grad_()
    out = spatial_prior_matrix(omega, (14, 14), 1, backend="cpu")
    g = randn(*out.shape, gen=gen)
    grads = [torch.autograd.grad(out, omega, g, retain_graph=True)[0] for _ in range(3)]
    assert all(torch.equal(grads[0], x) for x in grads[1:])


@needs_ext
def test_spatial_prior_gradcheck_cpu(gen):
    omega = randn(2, 3, 5, dtype=torch.float64, gen=gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda o: spatial_prior_matrix(o, (2, 3), 1, backend="cpu"), (omega,))


@needs_ext
def test_cpp_checks_raise_runtime_error_not_crash():
    ext = load_extension()
    with pytest.raises(RuntimeError, match=r"omega must have shape \(-1, 5, 5\)"):
        ext.spatial_prior_forward(torch.randn(2, 4, 5), 3, 3, 0)
    with pytest.raises(RuntimeError, match="num_prefix_tokens must be >= 0"):
        ext.spatial_prior_forward(torch.randn(2, 5, 5), 3, 3, -1)
    with pytest.raises(RuntimeError, match="must be a floating tensor"):
        ext.spatial_prior_forward(torch.ones(2, 5, 5, dtype=torch.int32), 3, 3, 0)
    with pytest.raises(RuntimeError, match=r"grad must have shape \(2, 10, 10\)"):
        ext.spatial_prior_backward(torch.randn(2, 10, 9), 3, 3, 1)
    with pytest.raises(RuntimeError, match="x must have shape"):
        ext.check_shape(torch.randn(2, 3), "x", [2, 4])


def test_import_survives_a_broken_extension(tmp_path):
    """A missing/broken _C gives one warning and the reference backend, never ImportError."""
    code = (
        "import warnings, sys\n"
        "sys.modules['vitkern._C'] = None\n"  # makes `import vitkern._C` raise ImportError
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, vitkern\n"
        "    r = vitkern.available_backends()\n"
        "    vitkern.ops.sp_attention(*[torch.randn(1, 1, 4, 8)] * 3)\n"
        "msgs = [str(x.message) for x in w if 'vitkern._C' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert r['cpu'] and 'not available' in r['cpu'], r\n"
        "assert vitkern.last_backend() == 'reference'\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
