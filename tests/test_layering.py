"""The package's layering (docs/ARCHITECTURE.md §1): timm / Hugging Face knowledge lives in
vitkern/interop/, which imports vitkern.models and never the reverse; ViT.from_timm reaches
its conversion through a hook that vitkern.interop installs. Read from the source with ``ast``
(every import statement, at module level or inside functions), so a hidden cycle fails."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import vitkern

PKG = Path(vitkern.__file__).resolve().parent
# models/timm_registry.py: the earlier place of vitkern.interop.timm_registry, kept as an alias.
MODELS_ALIAS = PKG / "models" / "timm_registry.py"


def _imports_of(source: str, package: str) -> list[tuple[str, list[str], int]]:
    """(absolute module, imported names, line) for every import statement of ``source``, a
    module of ``package`` (relative imports are resolved against it)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                module = ".".join([*base, module] if module else base)
            out.append((module, [a.name for a in node.names], node.lineno))
    return out


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    return _imports_of(path.read_text(), ".".join(("vitkern", *path.relative_to(PKG).parent.parts)))


def _targets(module: str, names: list[str]) -> list[str]:
    """The modules an import can load: ``from vitkern import interop`` loads vitkern.interop."""
    return [module, *(f"{module}.{n}" for n in names)]


def _is_interop(module: str) -> bool:
    return module in ("vitkern.interop", "vitkern.zoo") or module.startswith("vitkern.interop.")


def test_parser_sees_every_kind_of_import():
    """The check below can fail: imports inside functions, relative ones and
    ``from vitkern import interop`` are all found."""
    src = (
        "import vitkern.interop.hf\n"
        "def f():\n    from vitkern import interop\n"
        "class C:\n    def g(self):\n        from ..interop.timm import x\n"
        "from . import layers\n"
    )
    found = [t for m, names, _ in _imports_of(src, "vitkern.models") for t in _targets(m, names) if _is_interop(t)]
    assert found == ["vitkern.interop.hf", "vitkern.interop", "vitkern.interop.timm", "vitkern.interop.timm.x"]
    assert ("vitkern.models", ["layers"], 7) in _imports_of(src, "vitkern.models")


def test_models_do_not_import_interop():
    files = sorted((PKG / "models").glob("*.py"))
    assert len(files) >= 4 and MODELS_ALIAS in files
    bad = [
        f"{path.relative_to(PKG)}:{line}: {module}"
        for path in files
        if path != MODELS_ALIAS
        for module, names, line in _imports(path)
        if any(_is_interop(t) for t in _targets(module, names))
    ]
    assert not bad, f"vitkern/models must not import vitkern.interop (ViT.from_timm uses set_timm_converter): {bad}"


def test_models_alias_is_only_a_reexport_and_unused():
    """models/timm_registry.py only re-exports vitkern.interop.timm_registry, and nothing in the
    package imports it (so it adds no edge that any vitkern import follows)."""
    tree = ast.parse(MODELS_ALIAS.read_text())
    body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    assert len(body) == 1 and isinstance(body[0], ast.ImportFrom)
    assert body[0].module == "vitkern.interop.timm_registry"
    users = [
        f"{path.relative_to(PKG)}:{line}"
        for path in PKG.rglob("*.py")
        for module, names, line in _imports(path)
        if "vitkern.models.timm_registry" in _targets(module, names)
    ]
    assert not users, users


def test_no_private_names_across_modules():
    """Shared helpers are package-internal public names, not another module's ``_private`` ones."""
    bad = [
        f"{path.relative_to(PKG)}:{line}: {module}.{n}"
        for path in PKG.rglob("*.py")
        for module, names, line in _imports(path)
        if _is_interop(module)
        for n in names
        if n.startswith("_")
    ]
    assert not bad, bad


def test_public_names_and_hook():
    from vitkern import interop, zoo
    from vitkern.interop import from_timm, hf, patch
    from vitkern.models import vit

    assert vit._timm_converter is interop.vit_from_timm is from_timm.vit_from_timm
    assert vitkern.patch_timm is patch.patch_timm and vitkern.from_hf_vit is hf.from_hf_vit
    assert vitkern.to_hf_vit is hf.to_hf_vit
    assert vitkern.save_model is interop.save_model and vitkern.load_model is interop.load_model
    assert zoo.TimmConversionError is interop.TimmConversionError
    assert issubclass(interop.TimmConversionError, ValueError)


def test_from_timm_without_a_registered_converter_says_so(monkeypatch):
    from vitkern.models import vit

    monkeypatch.setattr(vit, "_timm_converter", None)
    with pytest.raises(RuntimeError, match="import vitkern.interop"):
        vitkern.ViT.from_timm(object())


def test_models_timm_registry_alias():
    pytest.importorskip("timm")
    import vitkern.interop.timm_registry as new
    import vitkern.models.timm_registry as old

    assert old.register_timm_models is new.register_timm_models and old.timm_name("x") == "vitkern_x"
