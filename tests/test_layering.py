"""The package's layers are one-way: no module imports a higher layer, and no import loop exists.

Every ``import`` counts, module-level and inside functions alike (function-level imports hide loops,
they do not remove them); only imports under ``if TYPE_CHECKING:`` are annotations, not dependencies.
The layer order, bottom to top (CONTRIBUTING.md, "Layers"):

0. ``_compat``, ``_version``, ``errors``, ``utils``
1. ``geometry``, ``features``, ``backbones``, ``splatting``, ``configs``
2. ``models``, ``data`` (and the package's public facade ``mvfm_nerfstudio/__init__.py``)
3. ``evaluation``
4. ``training``
5. ``feature_store``
6. ``segmentation``, ``probes``, ``text``
7. ``nerfstudio_plugin``, ``export`` (the only layer that may import Nerfstudio)
8. ``scripts``
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import mvfm_nerfstudio

PACKAGE = Path(mvfm_nerfstudio.__file__).parent

LAYERS: Tuple[Tuple[str, ...], ...] = (
    ("_compat", "_version", "errors", "utils"),
    ("geometry", "features", "backbones", "splatting", "configs"),
    ("models", "data", ""),
    ("evaluation",),
    ("training",),
    ("feature_store",),
    ("segmentation", "probes", "text"),
    ("nerfstudio_plugin", "export"),
    ("scripts",),
)
NERFSTUDIO_LAYERS = ("nerfstudio_plugin", "export", "scripts")


def module_names(root: Path) -> Dict[str, Path]:
    """Dotted names relative to the package (``""`` = the package itself, ``data`` = data/__init__.py)."""
    names = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _type_checking_lines(tree: ast.AST) -> Set[int]:
    lines: Set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(name: str, path: Path, modules: Dict[str, Path]) -> List[Tuple[str, int, bool]]:
    """Internal modules ``name`` imports: ``(target, line, is_nerfstudio)``; targets resolved to existing modules."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    is_package = path.name == "__init__.py"
    here = name.split(".") if name else []
    package = here if is_package else here[:-1]
    found = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        targets: List[str] = []
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top == "nerfstudio":
                    found.append(("nerfstudio", node.lineno, True))
                elif top == "mvfm_nerfstudio":
                    targets.append(alias.name[len("mvfm_nerfstudio"):].lstrip("."))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                module = node.module or ""
                if module.split(".")[0] == "nerfstudio":
                    found.append(("nerfstudio", node.lineno, True))
                    continue
                if module.split(".")[0] != "mvfm_nerfstudio":
                    continue
                base = module[len("mvfm_nerfstudio"):].lstrip(".")
            else:
                up = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                base = ".".join(up + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                targets.append(sub if sub in modules else base)
        for target in targets:
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                found.append((target, node.lineno, False))
    return found


def layer_of(name: str) -> int:
    top = name.split(".")[0]
    for level, members in enumerate(LAYERS):
        if top in members:
            return level
    raise AssertionError(f"module {name or 'mvfm_nerfstudio'} is in no layer: add its folder to LAYERS")


def _graph(root: Path):
    modules = module_names(root)
    return modules, {name: imports_of(name, path, modules) for name, path in modules.items()}


def upward_imports(root: Path) -> List[str]:
    modules, graph = _graph(root)
    problems = []
    for name, edges in graph.items():
        for target, line, nerfstudio in edges:
            where = f"{modules[name].relative_to(root)}:{line}"
            if nerfstudio:
                if name.split(".")[0] not in NERFSTUDIO_LAYERS:
                    problems.append(f"{where} imports nerfstudio (only {', '.join(NERFSTUDIO_LAYERS)} may)")
            elif target == "":
                problems.append(f"{where} imports the public facade mvfm_nerfstudio; import the defining module")
            elif layer_of(target) > layer_of(name):
                problems.append(f"{where} ({name}, layer {layer_of(name)}) imports {target} (layer {layer_of(target)})")
    return list(dict.fromkeys(problems))


def import_cycles(root: Path) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan), each a loop of imports."""
    _, graph = _graph(root)
    adj = {n: sorted({t for t, _, ns in e if not ns}) for n, e in graph.items()}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in adj[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(x or "mvfm_nerfstudio" for x in comp))

    for v in adj:
        if v not in index:
            visit(v)
    return cycles


def test_every_module_is_in_a_layer():
    modules = module_names(PACKAGE)
    assert len(modules) > 40
    for name in modules:
        layer_of(name)


def test_no_module_imports_a_higher_layer():
    problems = upward_imports(PACKAGE)
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_no_import_loops():
    cycles = import_cycles(PACKAGE)
    assert not cycles, f"import loops: {cycles}"


def test_a_planted_upward_import_and_loop_are_caught(tmp_path):
    """The checker itself can fail: a function-level upward import and a two-module loop in a fake package."""
    root = tmp_path / "pkg"
    (root / "geometry").mkdir(parents=True)
    (root / "training").mkdir()
    (root / "__init__.py").write_text("")
    (root / "geometry" / "__init__.py").write_text("")
    (root / "training" / "__init__.py").write_text("")
    (root / "geometry" / "a.py").write_text("def f():\n    from ..training.b import g\n")
    (root / "training" / "b.py").write_text("from ..geometry import a\n\ndef g():\n    pass\n")
    (root / "geometry" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                            "    from ..training.b import g\n")
    problems = upward_imports(root)
    assert len(problems) == 1 and "geometry/a.py:2" in problems[0]
    assert import_cycles(root) == [["geometry.a", "training.b"]]


def test_plugin_package_init_is_import_light():
    """Entry points import the plugin package: its __init__ must not pull in Nerfstudio (circular imports)."""
    modules = module_names(PACKAGE)
    assert imports_of("nerfstudio_plugin", modules["nerfstudio_plugin"], modules) == []
