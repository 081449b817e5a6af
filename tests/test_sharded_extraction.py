"""Sharded extraction: 2 gloo processes split a scene's view sets and write the entry one process writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import free_port
from mvfm_nerfstudio.feature_store import FeatureStore
from mvfm_nerfstudio.utils.runtime import torch_threads
from test_plugin_feature_store import _config, _source, _write_images

N_VIEWS = 7
# 'scene' in chunks of <= 3 views (3 chunks: one rank runs two) and 'neighbors' (overlapping sets, a view averaged
# over several; 2 sets per forward): the merge must follow the single-process order of the sets
GROUPINGS = {"scene": dict(view_grouping="scene", max_views_per_pass=3),
             "neighbors": dict(view_grouping="neighbors", sets_per_batch=2)}


def _worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    paths = sorted(Path(root).glob("img*.png"), key=lambda p: int(p.stem[3:]))
    report = {}
    for name, options in GROUPINGS.items():
        store = FeatureStore(_config(Path(root) / name, **options), _source(paths)).prepare()
        report[name] = {"sets": store.extraction.sets_run, "forwards": store.mvfm_forwards, "path": str(store.path)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def _entry_files(path: Path):
    meta = json.loads((path / "meta.json").read_text())
    return np.load(path / "features.npy"), load_file(str(path / "bases.safetensors")), meta


def test_two_gloo_processes_write_the_entry_one_process_writes_bit_for_bit(tmp_path):
    paths = _write_images(tmp_path, n=N_VIEWS)
    out = tmp_path / "out"
    out.mkdir()
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path), str(out)), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for name, options in GROUPINGS.items():
        sharded = Path(ranks[0][name]["path"])
        assert ranks[1][name]["path"] == str(sharded)
        with torch_threads(1):  # the workers' thread count: the same kernels, so the same bits
            single = FeatureStore(_config(tmp_path / f"single-{name}", **options), _source(paths)).prepare()
        assert single.path.name == sharded.name  # same key
        f1, b1, m1 = _entry_files(single.path)
        f2, b2, m2 = _entry_files(sharded)
        np.testing.assert_array_equal(f2, f1)  # bitwise: every set ran the same forward pass
        assert b1.keys() == b2.keys() and all(torch.equal(b1[k], b2[k]) for k in b1)
        assert m1 == m2
        all_sets = list(range(len(m1["view_sets"])))
        s0, s1 = ranks[0][name]["sets"], ranks[1][name]["sets"]
        assert s0 and s1 and sorted(s0 + s1) == all_sets  # both ranks worked, every set ran exactly once
        assert ranks[0][name]["forwards"] + ranks[1][name]["forwards"] == single.mvfm_forwards
        assert not list(sharded.parent.glob(".*partial*"))  # every rank's scratch is gone
        assert float(np.abs(f1.astype(np.float32)).max()) > 0


def test_mvfm_extract_in_one_process_and_under_torchrun_write_the_same_entry(tmp_path_factory, tmp_path):
    from _mvfm_training_helpers import generated_scene

    from mvfm_nerfstudio.scripts.extract import entrypoint

    scene = generated_scene(tmp_path_factory.getbasetemp())
    common = ["--scene", str(scene), "--views", "scene", "--features.weights", "random", "--features.tiny",
              "--features.feature-resolution", "6", "--features.max-views-per-pass", "6"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    with torch_threads(1):  # in this process (the CLI without torchrun), at the workers' thread count
        entrypoint([*common, "--features.cache-dir", str(tmp_path / "one")])
    sharded = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                              "--master-port", str(free_port()), "-m", "mvfm_nerfstudio.scripts.extract", *common,
                              "--features.cache-dir", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    assert "(2 processes)" in sharded.stdout
    (one,), (two,) = (tmp_path / "one").iterdir(), (tmp_path / "two").iterdir()
    assert one.name == two.name and len(json.loads((one / "meta.json").read_text())["view_sets"]) == 3
    np.testing.assert_array_equal(np.load(two / "features.npy"), np.load(one / "features.npy"))
