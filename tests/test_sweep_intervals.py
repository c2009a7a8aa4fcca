"""The guidance sweep's interval axis: sample.sweep_guidance_intervals ("full;lo,hi")."""

import json
import os

import pytest
from test_sampling_methods import STEPS, ckpts  # noqa: F401  (the fixture)
from test_sampling_sampler import _config

from adm_jax.evaluation import sweep
from adm_jax.sampling import io


def test_parse_guidance_intervals():
    assert sweep.parse_guidance_intervals("") == []
    assert sweep.parse_guidance_intervals("full; 0.3,5") == ["full", "0.3,5"]
    assert sweep.interval_dirname("0.3,5") == "interval_0.3-5"
    grid = sweep.sampler_grid({"sweep_samplers": "ddim"}, intervals="full;0.3,5")
    assert grid == [
        {"sampler": "ddim", "use_ddim": False, "guidance_interval": ""},
        {"sampler": "ddim", "use_ddim": False, "guidance_interval": "0.3,5"},
    ]
    assert sweep.sampler_grid({}) == [{}]  # no axis: the old grid
    with pytest.raises(ValueError, match=r"^sample\.sweep_guidance_intervals: expected") as e:
        sweep.parse_guidance_intervals("full;5,1")
    assert "\n" not in str(e.value)


def test_sweep_over_guidance_intervals(ckpts, tmp_path):  # noqa: F811
    """Classifier-free scale 3 with dpm++ at every step and inside (1e6, 1e7) (no step): a
    folder per interval, an Interval column; the empty interval is the conditional model."""
    config = _config(
        ckpts, tmp_path, checkpoint=ckpts["cfg"], num_samples=8, steps=STEPS, sampler="dpm++",
        sweep_scales="3", sweep_guidance_intervals="full;1e6,1e7",
    )  # fmt: skip

    def metrics(npz_path):
        images, _ = io.load_samples_npz(npz_path)
        return {"fid": float(images.mean())}

    rows = sweep.guidance_sweep(config, str(tmp_path), metrics_fn=metrics)
    assert [(r["sampler"], r["guidance_interval"], r["scale"]) for r in rows] == [
        ("dpm++", "full", 3.0),
        ("dpm++", "1e6,1e7", 3.0),
    ]
    for folder in ("interval_full/scale_3", "interval_1e6-1e7/scale_3"):
        assert os.path.exists(tmp_path / folder / "samples_8x8x8x3.npz"), folder
    assert rows[0]["fid"] != rows[1]["fid"]
    table = (tmp_path / "sweep.md").read_text().splitlines()
    assert table[0] == "| Interval | Scale | FID |"
    assert table[3].startswith("| 1e6,1e7 | 3 |")
    assert json.loads((tmp_path / "sweep.json").read_text())[1]["guidance_interval"] == "1e6,1e7"
