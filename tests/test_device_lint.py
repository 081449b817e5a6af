"""A lint the suite runs: tensor factories in code that handles caller tensors must say where they live.

``torch.tensor([...])`` without ``device=`` makes a CPU tensor; subtracted from a caller's CUDA tensor it
raises "Expected all tensors to be on the same device" (this crashed every camera-conditioned forward on
CUDA). CI has no GPU, so this check stands in: every ``torch.tensor / eye / zeros / ones / arange / linspace
/ full / empty / rand* / randperm`` call in the modules below passes ``device=``, or carries a short reason
comment ``# device: <why a CPU tensor is right>`` on its line. (``*_like`` factories follow their argument.)

Scope: modules that compute on tensors a caller passes in (models, geometry, losses, metrics, the plugin's
models). The data readers and the scene generator build CPU tensors from files by design and are not scanned.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import List

import mvfm_nerfstudio

PACKAGE = Path(mvfm_nerfstudio.__file__).parent

SCANNED = (
    "geometry", "models", "backbones", "splatting", "features.py", "training/losses.py", "training/trainer.py",
    "evaluation/metrics.py", "evaluation/evaluate.py", "feature_store/store.py", "segmentation/masks.py",
    "nerfstudio_plugin/feature_head.py", "nerfstudio_plugin/features_model.py", "nerfstudio_plugin/splat_model.py",
    "nerfstudio_plugin/viewer_panels.py", "nerfstudio_plugin/datamanager.py", "probes", "text",
)
FACTORIES = {"tensor", "eye", "zeros", "ones", "arange", "linspace", "full", "empty", "rand", "randn", "randint",
             "randperm"}
MARKER = "# device:"


def factory_calls_without_device(path: Path) -> List[str]:
    """``file:line`` of every factory call without ``device=`` and without a ``# device:`` reason comment."""
    source = path.read_text()
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        base = node.func.value
        if not (isinstance(base, ast.Name) and base.id == "torch" and node.func.attr in FACTORIES):
            continue
        if any(k.arg == "device" for k in node.keywords):
            continue
        span = lines[node.lineno - 1 : (node.end_lineno or node.lineno)]
        if any(MARKER in line for line in span):
            continue
        found.append(f"{path.name}:{node.lineno}: torch.{node.func.attr}(...) without device=")
    return found


def scanned_files(root: Path) -> List[Path]:
    files = []
    for entry in SCANNED:
        target = root / entry
        files += sorted(target.rglob("*.py")) if target.is_dir() else ([target] if target.is_file() else [])
    return files


def test_tensor_factories_in_caller_facing_code_name_their_device():
    files = scanned_files(PACKAGE)
    assert len(files) > 20
    problems = [p for f in files for p in factory_calls_without_device(f)]
    assert not problems, "tensor factories without device= (add device=..., or '# device: <reason>'):\n" + \
        "\n".join(problems)


def test_the_lint_catches_the_camera_validation_bug(tmp_path):
    """The pattern that crashed on CUDA (a CPU constant subtracted from the caller's tensor) is flagged; device=
    or a reason comment clears it."""
    bad = tmp_path / "cameras.py"
    bad.write_text("import torch\n\ndef check(flat):\n    last_row = torch.tensor([0.0, 0.0, 1.0], dtype=flat.dtype)\n"
                   "    eye = torch.eye(3)\n    ok = torch.eye(3, device=flat.device)\n"
                   "    table = torch.arange(4)  # device: an index table for CPU-side bookkeeping\n")
    assert factory_calls_without_device(bad) == [
        "cameras.py:4: torch.tensor(...) without device=", "cameras.py:5: torch.eye(...) without device="]
