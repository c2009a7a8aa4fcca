"""The demo end to end on a drastically reduced config, and its independent digit classifier."""

import copy
import json
import os
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/

from conftest import DEMO_SMOKE_OVERRIDES  # noqa: E402

from adm_jax import demo  # noqa: E402


def _tiny_demo_config():
    from configs import demo as demo_config

    config = demo_config.get_config()
    config.update_from_flattened_dict(DEMO_SMOKE_OVERRIDES)
    return config


@pytest.mark.slow
@pytest.mark.xdist_group("demo")
def test_demo_runs_every_stage_and_reruns_nothing(demo_smoke_run, monkeypatch):
    config = _tiny_demo_config()
    workdir, rows = demo_smoke_run

    groups = [(r["group"], r["sampler"], r["nfe"], r["scale"]) for r in rows]
    assert groups == [
        ("uncond", "ddpm", 2, 10.0),
        ("cond", "ddpm", 2, 0.0),
        ("cond", "ddpm", 2, 10.0),
        ("cfg", "ddpm", 2, 3.0),
        ("fast", "dpm++", 3, 1.0),
    ]
    for row in rows:
        for name in ("fid", "precision", "recall", "accuracy"):
            assert np.isfinite(row[name]), (row, name)
        assert (workdir / row["grid"]).exists()
    for name in ("metrics.md", "metrics.json", "loss.png", "real_digits.png", "timings.json"):
        assert (workdir / name).exists(), name
    assert "NOT on Inception" in (workdir / "metrics.md").read_text()
    assert "| real digits |" in (workdir / "metrics.md").read_text()
    with open(workdir / "metrics.json") as f:
        metrics = json.load(f)
    assert len(metrics["rows"]) == 5
    # Real training digits against the held-out ones: the ceiling row of the table.
    real_row = metrics["real_digits_row"]
    assert 0.0 < real_row["precision"] <= 1.0 and 0.0 < real_row["recall"] <= 1.0, real_row
    assert np.isfinite(real_row["fid"]) and 0.0 <= real_row["accuracy"] <= 1.0
    shards = sorted((workdir / "samples").glob("**/scale_*/shards/batch_*.npz"))
    assert len(shards) == 10  # 5 rows x 16 samples / batch 8
    mtimes = [os.path.getmtime(p) for p in shards]

    # A rerun finds every stage's outputs: no training, no judge, no sampling.
    from adm_jax import train

    def fail(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(train, "train_and_evaluate", fail)
    monkeypatch.setattr(train, "train_classifier", fail)
    monkeypatch.setattr(demo, "train_judge", fail)
    rerun = demo.run(config, str(workdir))
    assert [os.path.getmtime(p) for p in shards] == mtimes
    for a, b in zip(rows, rerun, strict=True):
        assert a == pytest.approx(b)

    # A workdir made with another config is not silently reused: one error naming the field.
    changed = copy.deepcopy(config)
    changed.model.num_channels = 64
    with pytest.raises(ValueError, match=r"model\.num_channels=32 \(workdir\) vs 64"):
        demo.run(changed, str(workdir))
    changed = copy.deepcopy(config)
    changed.demo.judge_width = 8
    with pytest.raises(ValueError, match=r"judge_width=4 \(workdir\) vs 8"):
        demo.run(changed, str(workdir))


def test_judge_features_and_accuracy():
    rng = np.random.default_rng(0)
    # Two trivially separable "digits": a bright square on the left or on the right.
    labels = rng.integers(0, 2, 64).astype(np.int32)
    images = np.zeros((64, 16, 16, 1), np.uint8)
    for i, y in enumerate(labels):
        images[i, 4:12, slice(1, 7) if y == 0 else slice(9, 15)] = 255
    module, params = demo.train_judge(
        images, labels, steps=40, batch_size=32, lr=3e-3, width=4, features=8, num_classes=2,
        log_every=0,
    )  # fmt: skip
    out = demo.classify_digits(module, params, images, batch_size=24)
    assert out["features"].shape == (64, 8)
    assert out["probs"].shape == (64, 2)
    np.testing.assert_allclose(out["probs"].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(out["pred"], out["probs"].argmax(-1))
    assert demo.target_accuracy(out["pred"], labels) == 1.0
    assert demo.target_accuracy(1 - out["pred"], labels) == 0.0

    # Grey digits stored as RGB (three equal channels) are the same digits.
    rgb = demo.classify_digits(module, params, np.repeat(images, 3, axis=-1))
    np.testing.assert_allclose(rgb["features"], out["features"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        demo.target_accuracy(out["pred"], labels[:3])
