"""Procedural scene generator: exact depth, determinism, file format (incl. Nerfstudio's own parser), CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import tiny_scene_path
from mvfm_nerfstudio.data import SceneError, load_scene, make_scene
from mvfm_nerfstudio.data.generator import build_scene, orbit_cameras, render_view, tiny_config


def test_depth_is_exact_z_depth_and_reprojects_to_the_same_surface():
    root = tiny_scene_path()
    scene = load_scene(root)
    cfg = tiny_config(seed=0)
    geo, (k, c2w) = build_scene(cfg), orbit_cameras(cfg)
    exact = render_view(geo, k, c2w[2], cfg.height, cfg.width)
    depth = scene.load_depth([2])[0].double()
    finite = torch.isfinite(exact["depth"])
    assert torch.equal(torch.isfinite(depth), finite)  # invalid exactly where there is sky
    assert float((depth[finite] - exact["depth"][finite]).abs().max()) <= cfg.depth_unit_scale_factor / 2 + 1e-6
    # z-depth, not ray length: the camera-frame z of the exact hit point
    cam = (exact["points"] - c2w[2, :3, 3]) @ c2w[2, :3, :3]
    assert torch.allclose(cam[..., 2][finite], exact["depth"][finite], atol=1e-9)

    # lift every pixel of view 2 with the stored depth, project into view 3: where the point is
    # visible there (its depth agrees), colour and object id agree with view 3's pixel
    ids = scene.load_object_ids([2, 3])
    rgb = scene.load_views([2, 3]).images
    v, u = torch.nonzero(finite, as_tuple=True)
    pix = torch.stack([u + 0.5, v + 0.5, torch.ones_like(u, dtype=torch.float64)], -1).double()
    world = (pix @ torch.linalg.inv(k).T * depth[v, u, None]) @ c2w[2, :3, :3].T + c2w[2, :3, 3]
    cam3 = (world - c2w[3, :3, 3]) @ c2w[3, :3, :3]
    xy = (cam3 @ k.T)[:, :2] / cam3[:, 2:]
    col, row = xy[:, 0].floor().long(), xy[:, 1].floor().long()
    inside = (cam3[:, 2] > 0) & (col >= 0) & (col < cfg.width) & (row >= 0) & (row < cfg.height)
    d3 = scene.load_depth([3])[0].double()
    vis = inside.clone()
    vis[inside] = (d3[row[inside], col[inside]] - cam3[inside, 2]).abs() < 0.01 * cam3[inside, 2]
    # only points that land near a pixel centre, so nearest sampling compares the same surface point
    centred = vis & ((xy - xy.floor() - 0.5).abs() < 0.15).all(-1)
    assert int(centred.sum()) > 50
    same_id = ids[0, v[centred], u[centred]] == ids[1, row[centred], col[centred]]
    assert float(same_id.float().mean()) > 0.98
    colour_diff = (rgb[0][:, v[centred], u[centred]] - rgb[1][:, row[centred], col[centred]]).abs().mean(0)
    assert float(colour_diff.median()) < 0.05


def test_generator_is_deterministic_and_seeded(tmp_path):
    cfg = tiny_config(seed=0, write_colmap=False)
    a = make_scene(cfg, tmp_path / "a", progress=False)
    for sub in ("images", "depth", "object_ids"):
        for name in ("frame_00000.png", "frame_00007.png"):
            assert (a / sub / name).read_bytes() == (tiny_scene_path() / sub / name).read_bytes()
    b = make_scene(tiny_config(seed=1, num_views=1, write_colmap=False), tmp_path / "b", progress=False)
    assert (a / "images" / "frame_00000.png").read_bytes() != (b / "images" / "frame_00000.png").read_bytes()
    with pytest.raises(SceneError, match="exists and is not empty"):
        make_scene(cfg, a, progress=False)


def test_written_files_follow_the_nerfstudio_format():
    root = tiny_scene_path()
    meta = json.loads((root / "transforms.json").read_text())
    assert meta["camera_model"] == "PINHOLE" and (meta["w"], meta["h"]) == (128, 96)
    assert meta["cx"] == 64.0 and meta["cy"] == 48.0 and meta["fl_x"] == meta["fl_y"]
    frame = meta["frames"][0]
    assert set(frame) == {"file_path", "transform_matrix", "depth_file_path", "object_id_path", "normal_file_path"}
    assert "mask_path" not in frame  # object ids must not become Nerfstudio loss masks
    depth = np.array(Image.open(root / frame["depth_file_path"]))
    assert depth.dtype == np.uint16 and (depth == 0).any() and (depth > 0).mean() > 0.5
    ids = np.array(Image.open(root / frame["object_id_path"]))
    objects = json.loads((root / "objects.json").read_text())["objects"]
    listed = {o["id"] for o in objects}
    assert len(objects) == 1 + tiny_config().num_objects and {o["type"] for o in objects} >= {"ground", "sphere"}
    assert set(np.unique(ids).tolist()) - {0} <= listed
    seen = set()
    for f in meta["frames"]:
        seen |= set(np.unique(np.array(Image.open(root / f["object_id_path"]))).tolist())
    assert listed <= seen  # every object is visible somewhere


def test_nerfstudio_dataparser_reads_generated_scene():
    # The one data test that imports nerfstudio: its own parser must accept our transforms.json.
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    root = tiny_scene_path()
    outputs = NerfstudioDataParserConfig(data=root).setup().get_dataparser_outputs("train")
    assert len(outputs.image_filenames) >= 7
    assert outputs.mask_filenames is None
    assert len(outputs.metadata["depth_filenames"]) == len(outputs.image_filenames)
    # nerfstudio takes the factor from its config (default 1e-3), not the file: ours must match it
    assert outputs.metadata["depth_unit_scale_factor"] == pytest.approx(tiny_config().depth_unit_scale_factor)
    assert int(outputs.cameras.width[0]) == 128 and int(outputs.cameras.height[0]) == 96
    assert float(outputs.cameras.fx[0]) == pytest.approx(float(load_scene(root).intrinsics[0, 0, 0]))


def test_cli_writes_a_loadable_scene(tmp_path):
    import tyro

    from mvfm_nerfstudio.scripts.make_scene import MakeSceneArgs, main

    args = tyro.cli(MakeSceneArgs, args=[
        "--num-views", "3", "--height", "40", "--width", "48", "--num-objects", "2", "--seed", "5",
        "--supersample", "2", "--output-dir", str(tmp_path / "cli"),
    ])
    out = main(args)
    scene = load_scene(out)
    assert len(scene) == 3 and scene.image_size(0) == (40, 48) and scene.tracks is not None
