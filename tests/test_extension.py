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


def _elf_dynamic(path: str) -> tuple[list[str], set[str]]:
    """(DT_NEEDED libraries, undefined dynamic symbols) of a 64-bit little-endian ELF file."""
    import struct

    data = open(path, "rb").read()
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    # (type, offset, size, link, entsize) of every section
    sections = [struct.unpack_from("<4xI16xQQI12xQ", data, shoff + i * shentsize) for i in range(shnum)]

    def cstr(table_off: int, off: int) -> str:
        start = table_off + off
        return data[start : data.index(b"\0", start)].decode()

    needed, undefined = [], set()
    for kind, off, size, link, entsize in sections:
        strtab = sections[link][1]
        if kind == 11:  # SHT_DYNSYM: st_name u32, info u8, other u8, shndx u16, value u64, size u64
            for i in range(1, size // entsize):
                name, shndx = struct.unpack_from("<I2xH", data, off + i * entsize)
                if shndx == 0 and name:
                    undefined.add(cstr(strtab, name).split("@")[0])
        elif kind == 6:  # SHT_DYNAMIC: (tag i64, value u64), DT_NEEDED = 1
            for i in range(size // entsize):
                tag, val = struct.unpack_from("<qQ", data, off + i * entsize)
                if tag == 1:
                    needed.append(cstr(strtab, val))
    return needed, undefined


@needs_ext
def test_extension_build_record_and_torch_floor():
    from vitkern._ext import _version_tuple, build_info

    info = build_info()
    assert info is not None, "vitkern/_build_info.py is written by setup.py next to _C"
    ext = load_extension()
    # One floor, recorded twice: the Python build record and TORCH_TARGET_VERSION compiled into _C.
    assert info["torch_floor"] == ext.torch_floor, (info, ext.torch_floor)
    assert _version_tuple(torch.__version__) >= _version_tuple(info["torch_floor"])
    assert ext.built_with_torch == info["torch_version"].split("+")[0], (ext.built_with_torch, info)
    paths = ext.simd_paths()
    assert ("scalar only" in paths) == bool(info["generic_simd"]), (paths, info)


@needs_ext
def test_extension_is_abi3_and_uses_only_the_stable_abis():
    """_C.abi3.so: Python's limited API 3.10, torch only through its C shim (no C++ symbol of
    ATen, c10 or torch, no libtorch_python), so one binary serves every CPython >= 3.10 and
    every torch >= the floor."""
    ext = load_extension()
    path = ext.__file__
    if not path.endswith(".so"):
        pytest.skip(f"not an ELF extension: {path}")
    assert os.path.basename(path) == "_C.abi3.so", path
    assert ext.module.PY_LIMITED_API == 0x030A0000, hex(ext.module.PY_LIMITED_API)
    needed, undefined = _elf_dynamic(path)
    assert "libtorch_cpu.so" in needed, needed
    assert not [n for n in needed if "python" in n or "torch_python" in n], needed
    # Mangled C++ names of torch's namespaces (at::, c10::, torch::, pybind11::) would bind _C
    # to one torch release's C++ ABI.
    cxx_torch = sorted(s for s in undefined if s.startswith(("_ZN2at", "_ZN3c10", "_ZN5torch", "_ZN8pybind11")))
    assert not cxx_torch, cxx_torch[:10]
    # Every Python symbol is one of the limited-API functions module.cpp uses (a full-API one
    # such as PyUnicode_AsUTF8AndSize before 3.10 would break the abi3 promise).
    python = {s for s in undefined if s.startswith(("Py", "_Py"))}
    assert python <= {
        "PyModule_Create2",
        "PyModule_AddStringConstant",
        "PyModule_AddIntConstant",
        "PyUnicode_FromString",
        "PyBool_FromLong",
        "_Py_Dealloc",
    }, sorted(python)
    assert {s for s in undefined if s.startswith(("aoti_torch_", "torch_"))}, "torch reached through its C shim"


_OPS = (
    "check_shape",
    "sp_attention_forward",
    "sp_attention_backward",
    "layernorm_mlp_forward",
    "layernorm_mlp_backward",
    "patch_embed_forward",
    "patch_embed_backward",
    "spatial_prior_forward",
    "spatial_prior_backward",
    "pack_gemm_weight",
    "linear_forward",
    "block_forward",
)


@needs_ext
def test_ops_are_registered_in_the_vitkern_C_namespace():
    ext = load_extension()
    assert ext.ops_namespace == "vitkern_C"
    for name in _OPS:
        op = getattr(torch.ops.vitkern_C, name).default
        assert op._schema.name == f"vitkern_C::{name}", op._schema
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vitkern_C::{name}", "CPU"), name
        assert getattr(ext, name) is op  # the launchers call the dispatcher's operator
    with pytest.raises(AttributeError, match="no operator vitkern_C::no_such_op"):
        ext.no_such_op  # noqa: B018
    # A CUDA-only / other-backend tensor is refused by the dispatcher, not read as CPU memory.
    with pytest.raises(NotImplementedError, match="Meta"):
        ext.spatial_prior_forward(torch.empty(2, 5, 5, device="meta"), 3, 3, 0)


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
    "fake.BUILD_INFO = dict(torch_version='2.99.0', torch_minor='2.99', torch_floor='2.99', python='3.11',\n"
    "                       generic_simd=False, debug=False)\n"
    "sys.modules['vitkern._build_info'] = fake\n"
    "with warnings.catch_warnings(record=True) as w:\n"
    "    warnings.simplefilter('always')\n"
    "    import torch, vitkern\n"
    "    r = vitkern.available_backends()\n"
    "msgs = [str(x.message) for x in w if 'vitkern._C' in str(x.message)]\n"
)


def test_torch_below_the_floor_names_the_needed_version_and_the_cost(tmp_path):
    """A torch older than _C's stable-ABI floor: _C is not imported, one warning names the
    torch version needed and the one installed, and what the fallback costs."""
    code = _FAKE_BUILD + (
        "assert len(msgs) == 1, msgs\n"
        "m = msgs[0]\n"
        "assert 'needs torch>=2.99' in m and f'torch {torch.__version__} is installed' in m, m\n"
        "assert 'slower' in m, m\n"
        "assert 'vitkern._C' not in sys.modules, 'a _C above the installed torch must not be imported'\n"
        "assert r['cpu'] and 'needs torch>=2.99' in r['cpu'], r\n"
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
def test_torch_floor_override_tries_to_load(tmp_path):
    code = _FAKE_BUILD + "assert not msgs, msgs\nassert r['cpu'] is None, r\nprint('ok')\n"
    env = {**os.environ, "VITKERN_IGNORE_TORCH_VERSION": "1"}
    env.pop("VITKERN_DISABLE_EXTENSION", None)
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


_ATEN_BLAS = """
import torch, vitkern
from vitkern._ext import load_extension
from vitkern.ops import layernorm_mlp, patch_embed, sp_attention
assert load_extension().blas_backend().startswith("aten::mm"), load_extension().blas_backend()
g = torch.Generator().manual_seed(0)
def rnd(*s):
    return torch.randn(*s, generator=g, dtype=torch.float64)
def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()
def check(fn, args, what):
    f32 = [a.float().requires_grad_() for a in args]
    f64 = [a.clone().requires_grad_() for a in args]
    out = fn(*f32, backend="cpu")
    assert vitkern.last_backend() == "cpu", what
    ref = fn(*f64, backend="reference")
    assert rel(out, ref) < 1e-5, (what, rel(out, ref))
    go = rnd(*out.shape)
    g32 = torch.autograd.grad(out, f32, go.float())
    g64 = torch.autograd.grad(ref, f64, go)
    for i, (a, b) in enumerate(zip(g32, g64)):
        assert rel(a, b) < 1e-5, (what, i, rel(a, b))
check(lambda x, w1, b1, w2, b2, backend: layernorm_mlp(x, None, None, w1, b1, w2, b2, backend=backend),
      (rnd(37, 24), rnd(40, 24) * 0.2, rnd(40), rnd(24, 40) * 0.2, rnd(24)), "layernorm_mlp")
check(lambda q, k, v, om, backend: sp_attention(q, k, v, om, grid=(3, 4), num_prefix_tokens=1, backend=backend),
      (rnd(2, 2, 13, 8), rnd(2, 2, 13, 8), rnd(2, 2, 13, 8), rnd(2, 5, 7)), "sp_attention")
check(lambda im, w, b, backend: patch_embed(im, w, b, backend=backend),
      (rnd(2, 3, 12, 8), rnd(10, 3, 4, 4), rnd(10)), "patch_embed")
print("ok")
"""


@needs_ext
def test_blas_fallback_through_aten_mm_matches_the_reference(tmp_path):
    """VITKERN_BLAS=aten: the block GEMMs take the stable dispatcher's aten::mm (the path of a
    torch build that exports no sgemm_); forward and every gradient still match float64."""
    from conftest import SUBPROCESS_CWD, subprocess_env

    res = subprocess.run(
        [sys.executable, "-c", _ATEN_BLAS],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=SUBPROCESS_CWD,
        env=subprocess_env(VITKERN_BLAS="aten"),
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


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
