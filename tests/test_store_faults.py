"""Nothing lost when the bucket misbehaves: the GCS emulator behind ``tests/fault_proxy.py``,
which answers a seeded 5% of requests with 503 / 429 or drops the connection (before the store
sees the request, or after it applied it). Training + checkpoint + resume, export and sampling
in the bucket give exactly what a fault-free run gives; a fault that outlasts every retry stops
the run with one line naming the object, and leaves nothing that a resume takes for complete.
"""

import contextlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from etils import epath

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import fault_proxy  # noqa: E402
from conftest import _forget_gcs_clients  # noqa: E402

FAULT_RATE = 0.05
# configs/tiny.py with one resolution level (as tests/test_multiprocess.py): this file is about
# the store, and compiling the model dominates its time on a 2-core machine.
SMALL_MODEL = {"model.channel_mult": "1", "model.attention_resolutions": "16"}
TRAIN_ARGS = [
    *(f"--config.{k}={v}" for k, v in SMALL_MODEL.items()),
    "--config.train.num_steps=4", "--config.train.log_every=1",
    "--config.train.checkpoint_every=2", "--config.train.eval_every=0",
    "--config.train.sample_every=0", "--config.train.tensorboard=False",
    "--config.train.max_to_keep=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def proxy(gcs_bucket):
    """The URL of a fault proxy (a process) in front of the module's emulator; the env vars
    that gcsfs and TensorStore read point at it for this module (and the processes it starts).
    Faults start off: each test sets its rate."""
    upstream = os.environ["STORAGE_EMULATOR_HOST"]
    server = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "fault_proxy.py"), f"--upstream={upstream}"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stdout.readline().strip()
        assert line.startswith("PROXY "), f"fault_proxy did not start: {line!r}"
        url = line.split()[1]
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", url)
            mp.setenv("TENSORSTORE_GCS_HTTP_URL", url)
            _forget_gcs_clients()
            yield url
    finally:
        _forget_gcs_clients()
        server.terminate()
        server.wait(timeout=10)


def _main(cwd, mode, workdir, *args, check=True, timeout=600):
    cmd = [sys.executable, "-m", "adm_jax.main", f"--config={REPO / 'configs' / 'tiny.py'}",
           f"--mode={mode}", f"--workdir={workdir}", *args]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{mode}: {proc.stderr[-4000:]}"
    return proc


@contextlib.contextmanager
def _started(cwd, mode, workdir, *args, timeout=600):
    """The entry point running in the background while inside; waited for on exit."""
    cmd = [sys.executable, "-m", "adm_jax.main", f"--config={REPO / 'configs' / 'tiny.py'}",
           f"--mode={mode}", f"--workdir={workdir}", *args]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                text=True)  # fmt: skip
        try:
            yield proc
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            err.seek(0)
            proc.stderr = err  # for the caller's message (read before leaving the file)


def _train_losses(workdir) -> dict[int, float]:
    text = epath.Path(workdir, "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def _params(checkpoint_dir):
    import jax

    from adm_jax.checkpoints import load_inference_checkpoint

    return jax.device_get(load_inference_checkpoint(os.fspath(checkpoint_dir)).params)


@pytest.fixture(scope="module")
def runs(proxy, tiny_tfds_dir, tmp_path_factory):
    """``(reference, workdir, faults)``: the tiny config trained 4 steps fault-free on a local
    disk in one go, and in the bucket at 5% faults, stopped at step 2 and resumed."""
    tmp = tmp_path_factory.mktemp("store_faults")
    data = f"--config.data.data_dir={tiny_tfds_dir}"
    reference = tmp / "reference"
    fault_proxy.control(proxy, rate=FAULT_RATE, seed=0)
    workdir = "gs://bkt/faults/run"
    try:
        # The fault-free reference trains beside the first bucket run (it never touches the
        # bucket): the two startups overlap.
        with _started(tmp, "train", reference, data, *TRAIN_ARGS) as fault_free:
            _main(tmp, "train", workdir, data, *TRAIN_ARGS, "--config.train.num_steps=2")
        assert fault_free.returncode == 0, f"reference: {fault_free.stderr.read()[-4000:]}"
        resumed = _main(tmp, "train", workdir, data, *TRAIN_ARGS)
    finally:
        faults = fault_proxy.control(proxy, rate=0.0)
    assert "Resumed from gs://bkt/faults/run/checkpoints/2" in resumed.stderr
    print(f"fault proxy during training: {faults}")
    return str(reference), workdir, faults


@contextlib.contextmanager
def _faults(proxy, seed):
    """5% faults while inside; asserts that some were injected (else the test proves
    nothing)."""
    before = fault_proxy.control(proxy, rate=FAULT_RATE, seed=seed)
    try:
        yield
    finally:
        after = fault_proxy.control(proxy, rate=0.0)
    injected = {k: after[k] - before[k] for k in fault_proxy.KINDS}
    print(f"faults injected: {injected} in {after['requests'] - before['requests']} requests")
    assert sum(injected.values()) > 0, injected


@pytest.mark.slow
def test_training_with_faults_equals_a_fault_free_run(proxy, runs):
    import jax

    from adm_jax import train
    from configs import tiny

    reference, workdir, faults = runs
    # Every kind of fault happened while training (else this test proves nothing).
    assert all(faults[k] > 0 for k in fault_proxy.KINDS), faults
    assert _train_losses(workdir) == _train_losses(reference)
    steps = [e.name for e in epath.Path(workdir, "checkpoints").iterdir()]
    assert steps == ["4"], steps  # max_to_keep=1: the newest, and no half-written leftovers
    # Both runs took and released the workdir lock through the faults.
    assert not epath.Path(workdir, "adm_jax.lock").exists()
    config = tiny.get_config()
    config.update_from_flattened_dict(SMALL_MODEL)
    expected = _params(train.export(config, reference))
    with _faults(proxy, seed=1):
        exported = _params(train.export(config, workdir))
    jax.tree.map(np.testing.assert_array_equal, exported, expected)


def _samples(workdir):
    """``--mode=sample``'s function (in this process, which compiles the tiny sampler once
    for both runs): the final .npz and every shard."""
    from adm_jax import sampling
    from configs import tiny

    config = tiny.get_config()
    config.update_from_flattened_dict(SMALL_MODEL)
    with config.unlocked():
        config.sample.num_samples = 8
        config.sample.batch_size = 4
        config.sample.classifier_scale = 0.0
    from adm_jax import paths

    final = epath.Path(sampling.sample(config, workdir))
    root = epath.Path(workdir, "samples")
    shards = [
        root / rel for rel in paths.walk_files(root) if rel.endswith(".npz") and "batch_" in rel
    ]
    arrays = {}
    for f in [final, *sorted(shards)]:
        with f.open("rb") as fh, np.load(fh) as data:
            arrays[f.name] = {k: data[k] for k in data.files}
    return arrays


@pytest.mark.slow
def test_sampling_with_faults_equals_a_fault_free_run(proxy, runs):
    import jax

    reference, workdir, _ = runs
    expected = _samples(reference)
    with _faults(proxy, seed=2):
        samples = _samples(workdir)
    assert samples.keys() == expected.keys() and len(samples) == 3, samples.keys()
    for name, arrays in samples.items():
        jax.tree.map(np.testing.assert_array_equal, arrays, expected[name])


@pytest.fixture
def short_backoff(monkeypatch):
    """gcsfs's, TensorStore's and paths.with_retries's waits shortened (not their number of
    attempts), so a fault that outlasts every retry fails in seconds, not the minute it takes
    in production."""
    import asyncio
    import types

    import gcsfs.retry

    from adm_jax import paths

    async def no_wait(_seconds):
        await asyncio.sleep(0)

    monkeypatch.setattr(gcsfs.retry, "asyncio", types.SimpleNamespace(sleep=no_wait))
    monkeypatch.setattr(paths, "RETRY_FIRST_DELAY_S", 0.01)
    monkeypatch.setitem(paths.TENSORSTORE_RETRIES, "initial_delay_s", 0.01)
    monkeypatch.setitem(paths.TENSORSTORE_RETRIES, "max_delay_s", 0.05)


def _persistently_failing(proxy, fragment: str):
    """Context: every request whose line holds ``fragment`` fails (503) while inside."""

    @contextlib.contextmanager
    def ctx():
        fault_proxy.control(proxy, fail_matching=fragment)
        try:
            yield
        finally:
            stats = fault_proxy.control(proxy, fail_matching="")
            assert stats["persistent"] > 0, f"no request matched {fragment!r}: {stats}"

    return ctx()


def test_a_persistent_fault_stops_the_run_with_one_line(proxy, short_backoff, capsys):
    from adm_jax import main as main_lib

    workdir = "gs://bkt/faults/locked_out"
    argv = ["adm_jax", "--mode=train", f"--config={REPO / 'configs' / 'tiny.py'}",
            f"--workdir={workdir}"]  # fmt: skip
    with _persistently_failing(proxy, "adm_jax.lock"):
        code = main_lib.run(argv)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    print(line)
    assert code == main_lib.EXIT_FAILED, line
    assert line.startswith(
        f"adm_jax: read {workdir}/adm_jax.lock: the store kept failing (HttpError: "
    ) and line.endswith("; gave up after 3 attempts"), line
    assert not epath.Path(workdir, "adm_jax.lock").exists()


def test_a_save_that_fails_half_way_keeps_the_newest_complete_step(proxy, short_backoff):
    """max_to_keep=1 and the save of step 6 fails at its last write (the commit marker, after
    every array is in the bucket): step 4 survives, nothing takes step 6 for complete, and a
    restart resumes from 4 and saves 6 again."""
    import jax.numpy as jnp

    from adm_jax.checkpoints import tools as checkpoint_tools
    from adm_jax.checkpoints import training as checkpointing

    workdir = "gs://bkt/faults/half_way"
    state = lambda v: {"w": jnp.full((8, 8), float(v))}  # noqa: E731
    ckpt = checkpointing.Checkpointer(workdir, max_to_keep=1)
    for step in (2, 4):
        ckpt.save(step, state(step))
    ckpt.wait()
    with _persistently_failing(proxy, "%2F6%2Fcommit_success"):
        with pytest.raises(checkpointing.CheckpointSaveError) as failed:
            ckpt.save(6, state(6))
            ckpt.wait()
    print(failed.value, [(e.name, e.complete) for e in checkpoint_tools.list_checkpoints(workdir)])
    assert "saving step 6" in str(failed.value) and "last good checkpoint: 4" in str(failed.value)
    ckpt.manager.close()
    listed = [(e.step, e.complete) for e in checkpoint_tools.list_checkpoints(workdir)]
    assert listed == [(4, True), (6, False)], listed

    restarted = checkpointing.Checkpointer(workdir, max_to_keep=1)  # a new run
    assert restarted.all_steps() == [4]
    restored, step = restarted.restore_latest_intact(state(0))
    assert step == 4 and float(restored["w"][0, 0]) == 4.0
    restarted.save(6, state(6))
    restarted.close()
    listed = [(e.step, e.complete) for e in checkpoint_tools.list_checkpoints(workdir)]
    assert listed == [(6, True)], listed


def test_a_resume_while_the_store_fails_sets_nothing_aside(proxy, short_backoff):
    """A newest step that cannot be read because the store keeps failing is not "damaged":
    the resume stops with one line and step 4 stays a checkpoint (set aside, a transient
    outage would have thrown away the newest work)."""
    import jax.numpy as jnp

    from adm_jax.checkpoints import training as checkpointing

    workdir = "gs://bkt/faults/outage"
    state = lambda v: {"w": jnp.full((8, 8), float(v))}  # noqa: E731
    ckpt = checkpointing.Checkpointer(workdir, max_to_keep=2)
    for step in (2, 4):
        ckpt.save(step, state(step))
    ckpt.close()
    restarted = checkpointing.Checkpointer(workdir, max_to_keep=2)
    with _persistently_failing(proxy, "%2Fcheckpoints%2F4%2F"):
        with pytest.raises(OSError, match="the store kept failing") as failed:
            restarted.restore_latest_intact(state(0))
    print(failed.value)
    assert f"reading {workdir}/checkpoints/4 failed" in str(failed.value)
    names = sorted(p.name for p in epath.Path(workdir, "checkpoints").iterdir())
    assert names == ["2", "4"], names
    restored, step = restarted.restore_latest_intact(state(0))
    assert step == 4 and float(restored["w"][0, 0]) == 4.0
    restarted.close()


@pytest.mark.slow
def test_nll_with_faults_equals_a_fault_free_run(proxy, runs, tiny_tfds_dir):
    """``--mode=nll``'s function: restores the exported model from the bucket, reads the data
    locally and writes nll.json into the bucket, through faults; same bits/dim."""
    from adm_jax import evaluation
    from configs import tiny

    reference, workdir, _ = runs
    config = tiny.get_config()
    config.update_from_flattened_dict(
        {**SMALL_MODEL, "data.data_dir": tiny_tfds_dir, "nll.num_samples": 8}
    )
    expected = evaluation.nll(config, reference, progress=False)
    with _faults(proxy, seed=3):
        result = evaluation.nll(config, workdir, progress=False)
    written = json.loads(epath.Path(workdir, "nll.json").read_text())
    drop = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "checkpoint")}  # noqa: E731
    assert drop(result) == drop(expected)
    assert drop(written) == drop(json.loads(json.dumps(expected)))


# ----------------------------------------------------------------------------------------------
# The other paths that write into (or read from) a bucket: evaluate, sweep, edit, convert and
# a data set in a bucket. Each runs once fault-free on local files and once in the bucket at 5%
# faults; the results must be the same.


@pytest.fixture(scope="module")
def eval_files(proxy, tmp_path_factory):
    """``(local, remote)``: the same samples .npz, reference batch (images only) and Inception
    weights (the seeded random network of tests/golden) on the local disk and in the bucket
    (uploaded fault-free)."""
    from conftest import GOLDEN_DIR

    local = tmp_path_factory.mktemp("eval_files")
    rng = np.random.default_rng(7)
    np.savez(local / "samples_12x16x16x3.npz", rng.integers(0, 256, (12, 16, 16, 3), np.uint8))
    np.savez(local / "reference.npz", rng.integers(0, 256, (10, 16, 16, 3), np.uint8))
    (local / "inception.npz").write_bytes((GOLDEN_DIR / "fid_inception_299.npz").read_bytes())
    remote = "gs://bkt/faults/eval_files"
    for name in ("samples_12x16x16x3.npz", "reference.npz", "inception.npz"):
        epath.Path(remote, name).write_bytes((local / name).read_bytes())
    return str(local), remote


@pytest.fixture
def cheap_inception(monkeypatch):
    """The Inception network replaced by a few pixel statistics (the evaluator's own math,
    file reading and writing unchanged; compiling Inception on a CPU takes a minute)."""
    from test_evaluation_io import _cheap_features

    from adm_jax.evaluation import features

    monkeypatch.setattr(features, "inception_fn", _cheap_features)


def _eval_config(files: str, **sample):
    from configs import tiny

    config = tiny.get_config()
    config.update_from_flattened_dict(SMALL_MODEL)
    with config.unlocked():
        config.evaluate.sample_npz = f"{files}/samples_12x16x16x3.npz"
        config.evaluate.reference_batch = f"{files}/reference.npz"
        config.evaluate.inception_weights = f"{files}/inception.npz"
        config.evaluate.inception_sha256 = "none"
        config.evaluate.batch_size = 8
        for key, value in sample.items():
            setattr(config.sample, key, value)
    return config


def _without(record: dict, *keys) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
def test_evaluate_with_faults_equals_a_fault_free_run(proxy, eval_files, cheap_inception, tmp_path):
    """``--mode=evaluate``'s function: samples, reference batch and Inception weights read
    from the bucket and the record written into it, through faults; the same record."""
    from adm_jax import evaluation

    local, remote = eval_files
    expected = evaluation.evaluate(_eval_config(local), str(tmp_path / "work"))
    workdir = "gs://bkt/faults/evaluate"
    with _faults(proxy, seed=4):
        record = evaluation.evaluate(_eval_config(remote), workdir)
    written = json.loads(epath.Path(workdir, "evaluation", "samples_12x16x16x3.json").read_text())
    paths_ = ("sample_npz", "reference_batch")
    assert _without(written, *paths_) == _without(json.loads(json.dumps(expected)), *paths_)
    assert _without(record, *paths_) == _without(expected, *paths_)
    assert written["num_samples"] == 12 and written["num_reference"] == 10


def _tree_of_files(root) -> dict[str, bytes]:
    """Every file below ``root`` (relative path -> bytes); .npz files as their arrays' bytes
    (a zip records its members' times)."""
    from adm_jax import paths

    out = {}
    for rel in sorted(paths.walk_files(root)):
        data = epath.Path(root, rel).read_bytes()
        if rel.endswith(".npz"):
            import io

            with np.load(io.BytesIO(data)) as arrays:
                data = b"".join(
                    k.encode() + arrays[k].tobytes() + str(arrays[k].shape).encode()
                    for k in arrays.files
                )
        out[rel] = data
    return out


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
def test_sweep_with_faults_equals_a_fault_free_run(proxy, runs, eval_files, cheap_inception):
    """``--mode=sweep``'s function on the trained model: the samples of scale 0 (shards and
    final .npz), evaluated against the reference batch in the bucket, and sweep.json / .md /
    .png written into the bucket, through faults; every file the same."""
    from adm_jax import evaluation

    reference, workdir, _ = runs
    local, remote = eval_files
    settings = dict(num_samples=8, batch_size=4, classifier_scale=0.0, sweep_scales="0")
    local_out = os.path.join(reference, "sweep")
    expected = evaluation.guidance_sweep(
        _eval_config(local, reference_batch=f"{local}/reference.npz", output_dir=local_out,
                     **settings), reference)  # fmt: skip
    remote_out = f"{workdir}/sweep"
    with _faults(proxy, seed=5):
        rows = evaluation.guidance_sweep(
            _eval_config(remote, reference_batch=f"{remote}/reference.npz",
                         output_dir=remote_out, **settings), workdir)  # fmt: skip
    assert [_without(r, "samples") for r in rows] == [_without(r, "samples") for r in expected]
    written = _tree_of_files(remote_out)
    assert written.keys() == _tree_of_files(local_out).keys(), written.keys()
    assert {"sweep.json", "sweep.md", "sweep.png", "scale_0/samples_8x16x16x3.npz"} <= set(
        written
    ), written.keys()
    for rel, data in _tree_of_files(local_out).items():
        if rel == "sweep.json":  # the rows name their own .npz
            data = data.replace(local_out.encode(), remote_out.encode())
        if rel.endswith("args.json"):
            continue  # the run's arguments name its workdir
        assert written[rel] == data, rel


def _png_folder(root, images: np.ndarray, labels) -> None:
    """``root/<label>/<i>.png`` (local or in the bucket)."""
    import io

    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        path = epath.Path(root, str(label), f"{i}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())


@pytest.mark.slow
def test_edit_with_faults_equals_a_fault_free_run(proxy, runs, tmp_path):
    """``--mode=edit`` (SDEdit, labels from class folders) on the trained model: the input
    folder of PNGs read from the bucket, shards, final .npz and edits.png written into it,
    through faults; every file the same as the fault-free run on local folders."""
    from adm_jax.sampling import edit
    from configs import tiny

    reference, workdir, _ = runs
    rng = np.random.default_rng(11)
    images, labels = rng.integers(0, 256, (6, 16, 16, 3), np.uint8), [0, 1, 2, 0, 1, 2]
    _png_folder(tmp_path / "in", images, labels)
    remote_in = "gs://bkt/faults/edit_in"
    _png_folder(remote_in, images, labels)

    def run(images_dir, out, workdir):
        config = tiny.get_config()
        config.update_from_flattened_dict(SMALL_MODEL)
        with config.unlocked():
            config.sample.batch_size = 4
            config.sample.sampler = "ddim"
            config.sample.steps = 4
            config.sample.classifier_scale = 0.0
            config.edit.kind = "sdedit"
            config.edit.images = images_dir
            config.edit.labels = "subdir"
            config.edit.output_dir = out
        return edit.edit(config, workdir)

    local_out = str(tmp_path / "edits")
    run(str(tmp_path / "in"), local_out, reference)
    remote_out = f"{workdir}/edits/sdedit"
    with _faults(proxy, seed=6):
        final = run(remote_in, remote_out, workdir)
    assert final == f"{remote_out}/samples_6x16x16x3.npz"
    written, expected = _tree_of_files(remote_out), _tree_of_files(local_out)
    assert written.keys() == expected.keys(), written.keys()
    assert {"edits.png", "samples_6x16x16x3.npz"} <= set(written), written.keys()
    assert sum("batch_" in rel for rel in written) == 2, written.keys()
    for rel, data in expected.items():
        if not rel.endswith("args.json"):  # the run's arguments name its folders
            assert written[rel] == data, rel


def test_convert_to_a_bucket_with_faults_equals_a_local_conversion(proxy, golden, tmp_path):
    """``python -m adm_jax.convert``'s function: a reference state_dict (.safetensors) read
    from the bucket and the inference checkpoint (Orbax arrays through TensorStore, model.json
    through gcsfs) written into it, through faults; the same parameters and description."""
    import jax
    from safetensors.numpy import save
    from test_convert import UNET_LEARNSIGMA_FLAGS

    from adm_jax import checkpoints, convert

    _, arrays = golden("unet_learnsigma")
    state_dict = {k[3:]: v for k, v in arrays.items() if k.startswith("sd/")}
    (tmp_path / "model.safetensors").write_bytes(save(state_dict))
    remote = "gs://bkt/faults/convert"
    epath.Path(remote, "model.safetensors").write_bytes(save(state_dict))
    args = [f"--flags={UNET_LEARNSIGMA_FLAGS}"]
    convert.main([f"--checkpoint={tmp_path / 'model.safetensors'}",
                  f"--out={tmp_path / 'converted'}", *args])  # fmt: skip
    with _faults(proxy, seed=7):
        out = convert.main([f"--checkpoint={remote}/model.safetensors",
                            f"--out={remote}/converted", *args])  # fmt: skip
    assert out == f"{remote}/converted"
    expected = checkpoints.load_inference_checkpoint(tmp_path / "converted")
    written = checkpoints.load_inference_checkpoint(out)
    assert (written.kind, written.model_kwargs, written.diffusion_kwargs, written.extra) == (
        expected.kind, expected.model_kwargs, expected.diffusion_kwargs, expected.extra
    )  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal, written.params, expected.params)


def test_image_folder_in_a_bucket_with_faults_equals_a_local_one(proxy, tiny_tfds_dir, tmp_path):
    """A user's image folder in the bucket built into a TFDS data set (``python -m
    adm_jax.data.prepare``'s function), every image read through faults: the same training
    batches as the data set built from the local copy of the folder. A data_dir in a bucket
    is refused in one line (array_record reads and writes local files only; a gs:// path
    used to hang its reader threads)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from adm_jax import data

    png = pathlib.Path(tiny_tfds_dir).parent / "png"
    remote_png = "gs://bkt/faults/png"
    for f in sorted(png.rglob("*.png")):
        epath.Path(remote_png, f.relative_to(png).as_posix()).write_bytes(f.read_bytes())
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    config = dict(name="tiny_images", image_size=16, channels=3, class_cond=True,
                  random_flip=True, random_crop=False, num_workers=0, shuffle_buffer=0,
                  split="train", max_skipped_fraction=0.0)  # fmt: skip

    def batches(data_dir):
        it = data.create_train_iterator(
            {**config, "data_dir": data_dir}, global_batch_size=16, sharding=sharding, seed=0
        )
        return [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(3)]

    splits = {s: f"{remote_png}/{s}" for s in ("train", "validation")}
    data_dir = str(tmp_path / "tfds")
    with _faults(proxy, seed=8):
        data.build_image_folder_dataset(splits, data_dir, "tiny_images")
    for split in ("train", "validation"):
        built, local = (data.dataset_info({**config, "data_dir": d}, split)
                        for d in (data_dir, tiny_tfds_dir))  # fmt: skip
        assert built == local, split
    for a, b in zip(batches(data_dir), batches(tiny_tfds_dir), strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)

    remote_dir = "gs://bkt/faults/tfds"
    with pytest.raises(ValueError, match="^data_dir gs://bkt/faults/tfds: ArrayRecord files"):
        data.build_image_folder_dataset(splits, remote_dir, "tiny_images")
    with pytest.raises(ValueError, match="^data.data_dir gs://bkt/faults/tfds: ArrayRecord") as e:
        batches(remote_dir)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_a_persistent_fault_in_array_io_stops_training_with_one_line(
    proxy, runs, tiny_tfds_dir, short_backoff, capsys, monkeypatch
):
    """TensorStore's own requests (the checkpoint's arrays) fail for good while step 6 is
    saved: the run stops within TensorStore's bounded retries with one line naming the step,
    the object and the operation (exit code 3, no traceback); ``--mode=checkpoints`` then
    lists 6 as INCOMPLETE, and the next run resumes from 4 and saves 6 again."""
    from adm_jax import main as main_lib
    from adm_jax import paths

    _, source, _ = runs
    workdir = "gs://bkt/faults/array_outage"
    for rel in paths.walk_files(source):  # the runs' bucket workdir at step 4, copied
        epath.Path(workdir, rel).write_bytes(epath.Path(source, rel).read_bytes())
    config = f"--config={REPO / 'configs' / 'tiny.py'}"
    train = ["adm_jax", "--mode=train", config, f"--workdir={workdir}",
             f"--config.data.data_dir={tiny_tfds_dir}", *TRAIN_ARGS,
             "--config.train.num_steps=6"]  # fmt: skip
    # TensorStore uploads arrays with uploadType=media (gcsfs never does): only its requests.
    fragment = "uploadType=media&name=faults%2Farray_outage%2Fcheckpoints%2F6%2F"
    with _persistently_failing(proxy, fragment):
        code = main_lib.run(train)
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    print(line)
    assert code == main_lib.EXIT_FAILED, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert line.startswith(
        f"adm_jax: checkpoint: saving step 6 to {workdir}/checkpoints failed ("
    ), line
    # TensorStore's message: the object (an array file, or a key inside the OCDBT database
    # of step 6) and how often it tried.
    named = rf"Error writing (\S+ in OCDBT database at )?{workdir}/checkpoints/6/state/\S+: "
    assert re.search(named + "All 6 retry attempts failed: injected by fault_proxy", line), line
    assert line.endswith("; the run stopped, last good checkpoint: 4"), line
    failed = [(r[0], r[1]) for r in fault_proxy.requests(proxy) if fragment in r[0]]
    assert failed and all(agent.startswith("tensorstore/") for _, agent in failed), failed

    assert main_lib.run(["adm_jax", "--mode=checkpoints", config, f"--workdir={workdir}"]) == 0
    listing = capsys.readouterr().out
    print(listing)
    rows = lambda text: re.findall(r"^ *(\d+)  (complete|INCOMPLETE) ", text, re.M)  # noqa: E731
    assert rows(listing) == [("4", "complete"), ("6", "INCOMPLETE")], listing

    from adm_jax.checkpoints import training as checkpointing

    resumed_from, restore = [], checkpointing.Checkpointer.restore_latest_intact

    def recorded(self, *args, **kwargs):
        state, step = restore(self, *args, **kwargs)
        resumed_from.append(step)
        return state, step

    monkeypatch.setattr(checkpointing.Checkpointer, "restore_latest_intact", recorded)
    assert main_lib.run(train) == 0, capsys.readouterr().err[-3000:]
    assert resumed_from == [4], resumed_from
    capsys.readouterr()
    assert main_lib.run(["adm_jax", "--mode=checkpoints", config, f"--workdir={workdir}"]) == 0
    listing = capsys.readouterr().out
    assert rows(listing) == [("6", "complete")], listing


def test_a_samples_file_that_cannot_be_written_fails_in_one_line(proxy, short_backoff):
    """A shard or final ``.npz`` of sampling (and a reference batch, written the same way)
    that the bucket keeps refusing: one line naming the operation and the object, nothing
    left at its name."""
    from adm_jax import paths
    from adm_jax.evaluation import reference_batch
    from adm_jax.sampling import io

    images = np.zeros((2, 4, 4, 3), np.uint8)
    folder = "gs://bkt/faults/unwritable"
    for target, write in [
        (f"{folder}/samples_2x4x4x3.npz", lambda t: io.save_samples_npz(t, images)),
        (f"{folder}/VIRTUAL_ref.npz",
         lambda t: reference_batch.write_reference_batch(t, np.zeros(3), np.eye(3))),
    ]:  # fmt: skip
        with _persistently_failing(proxy, "unwritable"):
            with pytest.raises(paths.StoreError) as failed:
                write(target)
        line = str(failed.value)
        print(line)
        assert line.startswith(f"write {target}: the store kept failing (HttpError: "), line
        assert line.endswith("; gave up after 3 attempts") and "\n" not in line, line
        assert not epath.Path(target).exists()
