"""mvfm-eval: base vs MVFM on the same held-out sets, JSON + PNGs, checkpoint-driven model rebuild, real data."""

from __future__ import annotations

import json
import warnings

import pytest
from _mvfm_training_helpers import generated_scene, tiny_config

from mvfm_nerfstudio.evaluation.runner import EvalConfig, run_evaluation
from mvfm_nerfstudio.training import Trainer


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return generated_scene(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def checkpoint(scene, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_ckpt")
    return Trainer(tiny_config(scene, out, steps=30, num_views=3, eval_sets=0)).train()


def _eval(scene, out, **kw) -> dict:
    cfg = EvalConfig(scenes=(scene,), output_dir=out, num_sets=6, num_views=3, progress=False, num_threads=1, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a backbone-fingerprint mismatch when the random backbone is not rebuilt
        return run_evaluation(cfg)


def test_eval_writes_metrics_and_figures(scene, checkpoint, tmp_path):
    payload = _eval(scene, tmp_path, adapters=checkpoint)
    r = payload["scenes"][scene.name]
    # settings come from the checkpoint: tiny random backbone, its seed, resolution and split
    assert payload["resolved"]["tiny"] is True and payload["resolved"]["weights"] == "random"
    assert payload["resolved"]["image_size"] == 112 and payload["resolved"]["holdout_every"] == 4
    for model in ("base", "mvfm"):
        m = r[model]
        assert m["num_matches"] > 100 and 0 < m["loc_err"] < 1
        assert m["pck@7px"] <= m["pck@14px"] <= m["pck@28px"]
        # every set holds a held-out view, but only pairs touching it count as held-out pairs
        assert 0 < m["heldout_pairs"]["num_matches"] < m["num_matches"]
    assert sum(row["count"] for row in r["viewpoint_curve"]) == r["mvfm"]["num_matches"]
    assert r["mvfm"]["loc_err"] != r["base"]["loc_err"]
    assert 0 < r["base_sim"] < 1
    assert json.loads((tmp_path / "metrics.json").read_text())["scenes"][scene.name]["base_sim"] == r["base_sim"]
    for png in ("viewpoint_curve.png", f"matches_{scene.name}.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000

    # an untrained MVFM is exactly the base model; the base numbers do not depend on the adapters
    untrained = _eval(scene, tmp_path / "untrained", tiny=True, weights="random", model_seed=0, image_size=112,
                      holdout_every=4, plots=False)["scenes"][scene.name]
    assert untrained["mvfm"]["loc_err"] == untrained["base"]["loc_err"]
    assert untrained["base_sim"] == pytest.approx(1.0, abs=1e-5)
    assert untrained["base"] == r["base"]


def test_eval_cli_prints_a_table(scene, checkpoint, tmp_path, capsys):
    from mvfm_nerfstudio.scripts.eval import entrypoint

    entrypoint(["--scenes", str(scene), "--adapters", str(checkpoint), "--output-dir", str(tmp_path),
                "--num-sets", "2", "--num-views", "2", "--no-plots", "--no-progress", "--num-threads", "1"])
    out = capsys.readouterr().out
    assert "base vs MVFM" in out and "metrics.json" in out
    payload = json.loads((tmp_path / "metrics.json").read_text())
    assert payload["num_views"] == 2 and not (tmp_path / "viewpoint_curve.png").exists()


@pytest.mark.real_data
def test_short_adaptation_on_a_real_scene_improves_heldout_loc_err(shared_data, tmp_path):
    """150 steps of a tiny random backbone on DTU scan24 (~15 s): held-out Loc. Err. clearly below the base's."""
    scene = shared_data / "scenes" / "dtu_scan24_monosdf"
    cfg = tiny_config(scene, tmp_path, steps=150, num_views=4, lr=2e-3, temperature=0.05, eval_sets=8,
                      holdout_every=8, checkpoint_every=1000)
    trainer = Trainer(cfg)
    trainer.train()
    r = trainer.last_eval["dtu_scan24_monosdf"]
    print(f"DTU held-out Loc. Err. base {r['base']['loc_err']:.4f} MVFM {r['mvfm']['loc_err']:.4f}")
    assert r["mvfm"]["num_matches"] > 1000
    assert r["mvfm"]["loc_err"] < 0.8 * r["base"]["loc_err"]
    assert r["mvfm"]["heldout_pairs"]["loc_err"] < r["base"]["heldout_pairs"]["loc_err"]
