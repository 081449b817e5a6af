"""A wheel install works as well as the editable one: package data (presets), entry points, no repository paths.

The test builds the wheel, installs it (without dependencies) into a fresh virtual environment that sees
the project's dependencies from this environment's site-packages (but not its editable install of this
package), and runs ``mvfm-train --preset tiny-test`` from a folder outside the repository.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from data_helpers import tiny_scene_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(out)], check=True, cwd=out)
    (path,) = out.glob("mvfm_nerfstudio-*.whl")
    return path


def test_wheel_contains_presets_and_entry_points(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    presets = sorted(Path(n).name for n in names if n.startswith("mvfm_nerfstudio/configs/train/") and n.endswith(".yaml"))
    assert presets == ["paper-dinov2.yaml", "scene-adapt-cpu.yaml", "tiny-test.yaml"]
    normals = sorted(Path(n).name for n in names if n.startswith("mvfm_nerfstudio/configs/normals/") and n.endswith(".yaml"))
    assert normals == ["normals-cpu.yaml", "tiny-test.yaml"]
    assert not any(n.startswith(("tests/", "benchmarks/", "docs/")) for n in names)
    assert "mvfm-features = mvfm_nerfstudio.nerfstudio_plugin.features_method:mvfm_features" in entry_points
    assert "mvfm-train = mvfm_nerfstudio.scripts.train:entrypoint" in entry_points
    assert "mvfm-normals = mvfm_nerfstudio.scripts.normals:entrypoint" in entry_points


@pytest.mark.slow
def test_mvfm_train_tiny_preset_from_a_wheel_install_outside_the_repository(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # the dependencies come from this environment; a plain path entry does not run its .pth files, so the
    # editable install of this package there is not seen
    Path(site, "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # without PYTHONPATH: with PYTHONPATH=<checkout> (how a worktree is tested), pip sees the egg-info the wheel
    # build leaves in the checkout as an installed mvfm_nerfstudio and skips the install
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)], check=True,
                   env=env)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(py), "-c", "import mvfm_nerfstudio; print(mvfm_nerfstudio.__file__)"], cwd=work, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the installed wheel, not the repository
    run = subprocess.run(
        [str(venv / "bin" / "mvfm-train"), "--preset", "tiny-test", "--scenes", str(tiny_scene_path()),
         "--output-dir", str(work / "run"), "--steps", "3", "--holdout-every", "4", "--no-tensorboard",
         "--no-progress"], cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    config = json.loads((work / "run" / "config.json").read_text())
    assert config["tiny"] is True and config["steps"] == 3 and config["image_size"] == 112  # from the preset
    assert (work / "run" / "adapters.safetensors").is_file()
