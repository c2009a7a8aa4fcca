"""The demo end to end on a drastically reduced config, its independent digit classifier, and
the Colab notebook's code (which runs the demo first: both reuse one smoke run, so they live in
one file, which is one unit of work for `pytest -n 2 --dist loadfile`)."""

import copy
import json
import os
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/

from conftest import DEMO_SMOKE_OVERRIDES, REPO_ROOT  # noqa: E402
from test_launch import SKIPPED_TAGS, _cells  # noqa: E402

from adm_jax import demo  # noqa: E402


def _tiny_demo_config():
    from configs import demo as demo_config

    config = demo_config.get_config()
    config.update_from_flattened_dict(DEMO_SMOKE_OVERRIDES)
    return config


@pytest.mark.slow
def test_demo_runs_every_stage_and_reruns_nothing(demo_smoke_run, monkeypatch):
    config = _tiny_demo_config()
    workdir, rows = demo_smoke_run

    groups = [(r["group"], r["sampler"], r["nfe"], r["scale"]) for r in rows]
    assert groups == [
        ("uncond", "ddpm", 2, 10.0),
        ("cond", "ddpm", 2, 0.0),
        ("cond", "ddpm", 2, 10.0),
        ("cfg", "ddpm", 2, 3.0),
        ("fast", config.demo.fast_sampler, 3, 1.0),
        ("interval", "ddpm", 2, 3.0),
        ("inpaint", "repaint", 2, config.demo.inpaint_scale),
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
    assert len(metrics["rows"]) == 7
    # Real training digits against the held-out ones: the ceiling row of the table.
    real_row = metrics["real_digits_row"]
    assert 0.0 < real_row["precision"] <= 1.0 and 0.0 < real_row["recall"] <= 1.0, real_row
    assert np.isfinite(real_row["fid"]) and 0.0 <= real_row["accuracy"] <= 1.0
    shards = sorted((workdir / "samples").glob("**/shards/batch_*.npz"))
    assert len(shards) == 14  # 7 rows x 16 samples / batch 8
    # The inpainting row: held-out digits, half kept, each towards another digit.
    inpaint = workdir / "samples" / "inpaint"
    assert (inpaint / "edits.png").exists()
    (edited,) = inpaint.glob("samples_*.npz")
    with np.load(inpaint / "inputs.npz") as inputs, np.load(edited) as out:
        assert out["arr_0"].shape == inputs["arr_0"].shape
        assert (out["arr_1"] != inputs["arr_1"]).all()
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


# ---------------------------------------------------------------- the Colab notebook's code


def _tiny_reference_checkpoint(path, kind, flags):
    """A random state dict in the reference's layout for these README flags."""
    from adm_jax.convert import state_dict_spec
    from adm_jax.models import reference_kwargs_from_flags

    spec = state_dict_spec(kind, reference_kwargs_from_flags(kind, flags))
    rng = np.random.default_rng(0)
    state_dict = {
        key: (rng.standard_normal(p.torch_shape) * 0.05).astype(np.float32)
        for key, p in spec.items()
    }
    np.savez(path, **state_dict)
    return str(path)


@pytest.mark.slow
def test_notebook_code_runs_on_cpu(tmp_path, monkeypatch, capsys, demo_smoke_run):
    """Runs every cell but TPU-only ones, in order, with small parameters: the install cell in
    this checkout (the pins of requirements.txt are installed: it must find nothing to
    install; PIP_NO_INDEX makes any pip call fail rather than download), the device check,
    the demo on a smoke config (in the shared smoke run's workdir, so it completes at once),
    the download cell (the checkpoints exist, the URLs are unreachable: nothing is fetched),
    conversion of and guided sampling from a (random, tiny) reference-format checkpoint in
    place of the OpenAI one, DPM-Solver++, and classifier-free guidance."""
    workdir = demo_smoke_run[0]  # the shards record their checkpoints' absolute paths
    model_flags = (
        "--image_size 64 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 "
        "--attention_resolutions 32 --class_cond True --learn_sigma True "
        "--num_head_channels 16 --diffusion_steps 1000 --noise_schedule cosine"
    )
    classifier_flags = (
        "--image_size 64 --classifier_width 32 --classifier_depth 1 "
        "--classifier_attention_resolutions 8"
    )
    overrides = {
        "RUNTIME": "cpu",  # conftest runs JAX on the CPU (JAX_PLATFORMS=cpu) on any machine
        "WORKDIR": str(workdir),
        "DEMO_OVERRIDES": DEMO_SMOKE_OVERRIDES,
        "MODEL_URL": "http://127.0.0.1:9/m.pt",  # the discard port: a download would fail
        "MODEL_CHECKPOINT": _tiny_reference_checkpoint(tmp_path / "m.npz", "unet", model_flags),
        "MODEL_FLAGS": model_flags,
        "CLASSIFIER_URL": "http://127.0.0.1:9/c.pt",
        "CLASSIFIER_CHECKPOINT": _tiny_reference_checkpoint(
            tmp_path / "c.npz", "classifier", classifier_flags
        ),
        "CLASSIFIER_FLAGS": classifier_flags,
        "CONVERTED_DIR": str(tmp_path / "converted"),
        "LABELS": [1, 2],
        "TIMESTEP_RESPACING": "ddim3",
        "FAST_STEPS": 3,
    }
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    namespace = {"__name__": "__notebook__"}
    code = [c for c in _cells() if c.cell_type == "code"]
    for index, cell in enumerate(code):
        tags = set(cell.metadata.get("tags", []))
        if SKIPPED_TAGS & tags:
            continue
        exec(compile(cell.source, f"<notebook code cell {index}>", "exec"), namespace)
        if "parameters" in tags:
            assert set(overrides) <= set(namespace), set(overrides) - set(namespace)
            namespace.update(overrides)
    out = capsys.readouterr().out

    # The install cell: this checkout, CPU jax and every non-test pin, all present.
    assert namespace["checkout"] == REPO_ROOT
    assert "nothing to install" in out
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    test_only = namespace["TEST_ONLY"]
    assert test_only <= set(pins) and "pytest" in test_only and "jax" not in test_only
    expected = {f"{name}=={pins[name]}" for name in set(pins) - test_only}
    assert set(namespace["requirements"]) == expected
    assert namespace["detect_runtime"]()[0] in ("tpu", "gpu", "cpu")
    monkeypatch.setenv("TPU_NAME", "colab-tpu")
    assert namespace["detect_runtime"]()[0] == "tpu"
    assert namespace["satisfied"](f"jax=={pins['jax']}")
    if namespace["installed"]("libtpu") is None:  # the extra's libtpu is part of the check
        assert not namespace["satisfied"](f"jax[tpu]=={pins['jax']}")

    assert "m.npz: " in out and "downloading" not in out
    assert (workdir / "openai_guided_samples.png").stat().st_size > 0
    assert (tmp_path / "converted" / "model" / "model.json").exists()
    assert (workdir / "openai_dpmpp_2m_sde_3.png").stat().st_size > 0
    assert (workdir / "demo_classifier_free.png").stat().st_size > 0
    with open(workdir / "metrics.json") as f:
        assert len(namespace["rows"]) == len(json.load(f)["rows"]) == 7
