"""A whole run with its workdir in a bucket: train -> resume (the real entry point, in
subprocesses) -> export -> sample -> evaluate (the functions the entry point calls), against a
real GCS API server on 127.0.0.1 (fake-gcs-server; see ``gcs_bucket`` in conftest.py), and
nothing written to the local disk.

Why GCS and this emulator: Orbax writes arrays through TensorStore, whose only object-store
driver Orbax uses is ``gcs`` (``s3://`` checkpoints are not supported by Orbax 0.12), and
TensorStore's gcs driver can be pointed at an emulator (``TENSORSTORE_GCS_HTTP_URL``), as can
gcsfs (``STORAGE_EMULATOR_HOST``), which etils.epath uses for every other file when
``EPATH_USE_TF=false``. TensorFlow's own gfile (epath's default when TF is installed, and what
TensorBoard's event writer uses) has no emulator endpoint, so the test turns TensorBoard off.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from conftest import GOLDEN_DIR  # noqa: E402


def _run(cwd, *args, mode="train"):
    cmd = [
        sys.executable, "-m", "adm_jax.main", f"--config={REPO / 'configs' / 'tiny.py'}",
        f"--mode={mode}", *args,
    ]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{mode}: {proc.stderr[-4000:]}"
    return proc


def _local_files(root: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.slow
def test_run_in_a_bucket_writes_nothing_locally(tmp_path, gcs_bucket, tiny_tfds_dir, monkeypatch):
    from etils import epath

    from adm_jax.checkpoints import load_inference_checkpoint
    from adm_jax.train.metrics import read_metrics

    cwd = tmp_path / "cwd"  # the processes' working directory: must stay empty
    cwd.mkdir()
    workdir = f"{gcs_bucket}/runs/tiny"
    train = [
        f"--workdir={workdir}", f"--config.data.data_dir={tiny_tfds_dir}",
        "--config.train.log_every=1", "--config.train.checkpoint_every=2",
        "--config.train.eval_every=2", "--config.train.sample_every=0",
        "--config.train.tensorboard=False",
    ]  # fmt: skip
    _run(cwd, *train, "--config.train.num_steps=2")
    resumed = _run(cwd, *train, "--config.train.num_steps=4")
    assert "Resumed from gs://bkt/runs/tiny/checkpoints/2" in resumed.stderr
    steps = sorted(int(p.name) for p in epath.Path(workdir, "checkpoints").iterdir()
                   if p.name.isdigit())  # fmt: skip
    assert steps == [2, 4]
    metrics = read_metrics(workdir)
    assert sorted(k for k in metrics if "train/loss" in metrics[k]) == [1, 2, 3, 4]
    assert np.isfinite(metrics[4]["val/loss"])

    # export, sample and evaluate: the functions --mode=export|sample|evaluate call, run here
    # (this process already compiled the tiny sampler and Inception for other tests).
    from adm_jax import evaluation, sampling, train
    from configs import tiny

    config = tiny.get_config()
    with config.unlocked():
        config.sample.num_samples = 8
        config.sample.batch_size = 8
        config.sample.classifier_scale = 0.0
    exported = load_inference_checkpoint(train.export(config, workdir))
    assert exported.extra["step"] == 4
    samples = epath.Path(sampling.sample(config, workdir))
    assert os.fspath(samples) == f"{workdir}/samples/samples_8x16x16x3.npz"
    with samples.open("rb") as f, np.load(f) as data:
        images = data["arr_0"]
    assert images.shape == (8, 16, 16, 3) and images.dtype == np.uint8

    reference = epath.Path(gcs_bucket, "reference.npz")
    rng = np.random.default_rng(0)
    with reference.open("wb") as f:
        np.savez(f, rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    weights = epath.Path(gcs_bucket, "weights", "fid_inception_299.npz")
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.write_bytes((GOLDEN_DIR / "fid_inception_299.npz").read_bytes())
    with config.unlocked():
        config.evaluate.sample_npz = os.fspath(samples)
        config.evaluate.reference_batch = os.fspath(reference)
        config.evaluate.inception_weights = os.fspath(weights)
        config.evaluate.inception_sha256 = "none"
        config.evaluate.batch_size = 8
    # Two 2048-d matrix square roots would dominate the test; the Frechet distance's math is
    # tested against the goldens in test_evaluation_metrics.py.
    from adm_jax.evaluation import metrics as metrics_lib

    monkeypatch.setattr(metrics_lib, "frechet_distance", lambda *args, **kwargs: 1.0)
    evaluation.evaluate(config, workdir)
    record = json.loads(epath.Path(workdir, "evaluation", "samples_8x16x16x3.json").read_text())
    assert np.isfinite(record["fid"]) and record["num_samples"] == 8

    assert _local_files(cwd) == []
    assert not pathlib.Path("gs:").exists() and not (REPO / "gs:").exists()
