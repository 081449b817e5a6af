"""The GPU path: what can be checked on the CPU (device plumbing, backend choice, distributed cache), and the
same paths on CUDA (marked ``cuda``: skipped without a GPU; ``benchmarks/gpu_check.sh`` runs them)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port, orbit_cameras, randomize_adapters
from mvfm_nerfstudio import create_mvfm
from mvfm_nerfstudio.feature_store import FeatureStore
from mvfm_nerfstudio.geometry.cameras import validate_cam_to_world, validate_intrinsics
from mvfm_nerfstudio.splatting import GSPLAT_FIX, resolve_backend
from mvfm_nerfstudio.utils.runtime import compute_precision, resolve_device
from test_plugin_feature_store import N, _config, _source, _write_images

CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


# ---------------------------------------------------------------------------------------------- on the CPU


def test_auto_rasterizer_falls_back_with_one_warning_and_gsplat_names_the_fix():
    broken = lambda: (False, "gsplat's CUDA kernels are not built (no CUDA toolkit / nvcc found)")  # noqa: E731
    cuda_dev = torch.device("cuda", 0)
    assert resolve_backend("auto", torch.device("cpu"), probe=broken) == "torch"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_backend("auto", cuda_dev, probe=broken) == "torch"
    assert len(caught) == 1 and "nvcc" in str(caught[0].message)
    with pytest.raises(RuntimeError, match="nvcc") as err:
        resolve_backend("gsplat", cuda_dev, probe=broken)
    assert GSPLAT_FIX in str(err.value)
    assert resolve_backend("auto", cuda_dev, probe=lambda: (True, "")) == "gsplat"
    with pytest.raises(RuntimeError, match="CUDA device"):
        resolve_backend("gsplat", torch.device("cpu"), probe=broken)


def test_device_names_have_one_convention():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto", default="cpu") == torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu")
    if not CUDA:
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_compute_precision_never_autocasts_on_the_cpu():
    x = torch.randn(4, 4)
    with compute_precision(torch.device("cpu"), bf16=True):
        assert (x @ x).dtype == torch.float32


def test_resident_features_sample_like_the_memory_map(tmp_path):
    paths = _write_images(tmp_path)
    store = FeatureStore(_config(tmp_path), _source(paths)).prepare()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, N, (200,), generator=g)
    xy = torch.rand(200, 2, generator=g, dtype=torch.float64) * torch.tensor([60.0, 45.0], dtype=torch.float64)
    reference = store.sample(idx, xy)  # memory-mapped path
    mapped = store.feature_map(2)
    assert store.keep_on(torch.device("cpu"))
    torch.testing.assert_close(store.sample(idx, xy), reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(store.feature_map(2), mapped)
    assert not FeatureStore(_config(tmp_path), _source(paths)).prepare().keep_on(torch.device("cpu"), max_bytes=10)


def _store_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    import torch.distributed as dist
    from pathlib import Path

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    paths = sorted(Path(root).glob("img*.png"))
    store = FeatureStore(_config(Path(root)), _source(paths)).prepare()
    np.save(f"{out}/rank{rank}.npy", np.stack([store.feature_map(i).numpy() for i in range(len(store))]))
    with open(f"{out}/rank{rank}.txt", "w") as f:
        f.write(f"{store.mvfm_forwards} {int(store.cache_hit)}")
    dist.destroy_process_group()


def test_in_a_distributed_job_of_a_one_batch_scene_rank_0_computes_and_every_rank_loads_its_entry(tmp_path):
    # Scenes of several batches are split across ranks: tests/test_sharded_extraction.py.
    _write_images(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    mp.start_processes(_store_worker, args=(2, free_port(), str(tmp_path), str(out)), nprocs=2, join=True,
                       start_method="spawn")
    counts = [(out / f"rank{r}.txt").read_text().split() for r in range(2)]
    assert int(counts[0][0]) >= 1 and counts[1] == ["0", "0"]  # rank 1 ran no forward and did not "hit" first
    np.testing.assert_array_equal(np.load(out / "rank0.npy"), np.load(out / "rank1.npy"))


# ---------------------------------------------------------------------------------------------- on CUDA


@cuda
@pytest.mark.cuda
def test_camera_validation_and_the_mvfm_forward_run_on_cuda_and_match_the_cpu():
    model = create_mvfm("dinov2_vits14_reg", weights="random", tiny=True, attention="knn", num_neighbors=2)
    randomize_adapters(model, seed=1)
    k, c2w = orbit_cameras(1, 4, 56, 84, seed=0)
    images = torch.rand(1, 4, 3, 56, 84, generator=torch.Generator().manual_seed(0))
    validate_intrinsics(k.cuda())
    validate_cam_to_world(c2w.cuda())
    with torch.no_grad():
        ref = model(images, k, c2w)
        gpu = model.cuda()(images.cuda(), k.cuda(), c2w.cuda())
        with compute_precision(torch.device("cuda"), bf16=True):
            half = model(images.cuda(), k.cuda(), c2w.cuda())
    torch.testing.assert_close(gpu.cpu(), ref, atol=2e-3, rtol=2e-3)  # TF32 matmuls
    assert (half.float().cpu() - ref).abs().max() < 0.1 * ref.abs().max()


@cuda
@pytest.mark.cuda
def test_feature_store_on_cuda_matches_the_cpu_and_keeps_features_on_the_gpu(tmp_path):
    paths = _write_images(tmp_path)
    cpu = FeatureStore(_config(tmp_path / "a", device="cpu"), _source(paths)).prepare()
    gpu = FeatureStore(_config(tmp_path / "b", device="cuda"), _source(paths)).prepare()
    np.testing.assert_allclose(np.asarray(gpu.features, np.float32), np.asarray(cpu.features, np.float32), atol=2e-2)
    assert gpu.keep_on(torch.device("cuda"))
    idx = torch.arange(N)
    xy = torch.full((N, 2), 10.5, dtype=torch.float64)
    torch.testing.assert_close(gpu.sample(idx, xy).cpu(), cpu.sample(idx, xy), atol=2e-2, rtol=0)


@cuda
@pytest.mark.cuda
def test_training_steps_on_cuda(tmp_path_factory, tmp_path):
    from _mvfm_training_helpers import generated_scene, tiny_config
    from mvfm_nerfstudio.training import Trainer

    scene = generated_scene(tmp_path_factory.getbasetemp())
    trainer = Trainer(tiny_config(scene, tmp_path / "run", steps=3, device="cuda", eval_sets=2))
    trainer.train()
    assert trainer.device.type == "cuda" and all(np.isfinite(h["loss"]) for h in trainer.history)
    assert trainer.scenes[0].base.device.type == "cpu"
