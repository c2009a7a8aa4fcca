"""The real entry point in subprocesses on a tiny TFDS dataset built here: train + export,
train_classifier + export, and fail-fast config errors. (Exact resume after SIGKILL is tested
with two processes in test_multiprocess.py.)"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ENV = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    PYTHONPATH=str(REPO),
)


@pytest.fixture
def tfds_dir(tiny_tfds_dir):
    return tiny_tfds_dir


def main_cmd(workdir, *flags, config="configs/tiny.py", mode="train"):
    return [
        sys.executable, "-m", "adm_jax.main", f"--config={config}", f"--workdir={workdir}",
        f"--mode={mode}", *flags,
    ]  # fmt: skip


def run_main(*args, **kwargs):
    proc = subprocess.run(
        main_cmd(*args, **kwargs), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def read_metrics(workdir):
    from adm_jax.train.metrics import read_metrics

    return read_metrics(str(workdir))


def test_invalid_override_fails_before_compiling(tmp_path):
    proc = subprocess.run(
        main_cmd(tmp_path, "--config.train.batch_size=12"),
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "train.batch_size: 12" in proc.stderr and "divisible by the 8 devices" in proc.stderr


@pytest.mark.slow
def test_train_export_then_classifier(tmp_path, tfds_dir):
    from adm_jax.checkpoints import load_inference_checkpoint

    wd = tmp_path / "diffusion"
    data = f"--config.data.data_dir={tfds_dir}"
    run_main(
        wd, data, "--config.train.num_steps=4", "--config.train.log_every=2",
        "--config.train.checkpoint_every=2", "--config.train.eval_every=4",
        "--config.train.sample_every=4",
    )  # fmt: skip
    m = read_metrics(wd)
    assert np.isfinite(m[4]["train/loss"]) and np.isfinite(m[4]["val/loss"])
    assert {"train/loss_q0", "train/vb", "train/grad_norm", "perf/img_per_sec"} <= set(m[2])
    assert (wd / "samples" / "step_00000004.png").exists()
    out = run_main(wd, mode="export").stdout.strip().splitlines()[-1]
    ckpt = load_inference_checkpoint(out)
    assert ckpt.kind == "unet" and ckpt.extra["step"] == 4 and ckpt.extra["ema_rate"] == 0.9999
    assert ckpt.model_kwargs["num_classes"] == 1000 and ckpt.diffusion_kwargs["learn_sigma"]

    wd = tmp_path / "classifier"
    run_main(
        wd, data, "--config.train.num_steps=2", "--config.train.log_every=1",
        "--config.train.eval_every=2", config="configs/tiny.py:classifier",
        mode="train_classifier",
    )  # fmt: skip
    m = read_metrics(wd)
    assert 0 <= m[2]["train/acc@1"] <= 1 and "val/acc@5" in m[2]
    out = run_main(wd, config="configs/tiny.py:classifier", mode="export").stdout.split()[-1]
    ckpt = load_inference_checkpoint(out)
    assert ckpt.kind == "classifier" and ckpt.extra["ema_rate"] is None  # no EMA: raw params
