"""The core never imports Nerfstudio: the plugin depends on the core, never the reverse."""

import ast
from pathlib import Path

import mvfm_nerfstudio

PACKAGE = Path(mvfm_nerfstudio.__file__).parent


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    absolute = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    absolute += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]
    relative = [(n.level, n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]
    return absolute, relative


def test_core_modules_do_not_import_nerfstudio_or_the_plugin():
    core = [p for p in PACKAGE.rglob("*.py") if "nerfstudio_plugin" not in p.relative_to(PACKAGE).parts]
    assert len(core) > 20
    offenders = []
    for path in core:
        absolute, relative = _imports(path)
        rel = path.relative_to(PACKAGE)
        if any(m.split(".")[0] == "nerfstudio" or m.startswith("mvfm_nerfstudio.nerfstudio_plugin") for m in absolute):
            offenders.append(str(rel))
        # relative imports resolved against the module's package
        for level, module in relative:
            base = list(rel.parent.parts)[: len(rel.parent.parts) - (level - 1)] if level > 1 else list(rel.parent.parts)
            target = ".".join(base + ([module] if module else []))
            if target.split(".")[0] == "nerfstudio_plugin":
                offenders.append(f"{rel} -> {target}")
    assert not offenders, offenders


def test_plugin_package_init_is_import_light():
    """Entry points import the plugin package: its __init__ must not pull in Nerfstudio (circular imports)."""
    absolute, relative = _imports(PACKAGE / "nerfstudio_plugin" / "__init__.py")
    assert not absolute and not relative
