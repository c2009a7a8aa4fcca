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


def _main(cwd, mode, workdir, *args, check=True, timeout=300):
    cmd = [sys.executable, "-m", "adm_jax.main", f"--config={REPO / 'configs' / 'tiny.py'}",
           f"--mode={mode}", f"--workdir={workdir}", *args]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{mode}: {proc.stderr[-4000:]}"
    return proc


@contextlib.contextmanager
def _started(cwd, mode, workdir, *args, timeout=300):
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
    """gcsfs's and paths.with_retries's waits shortened (not their number of attempts), so a
    fault that outlasts every retry fails in seconds, not the minute it takes in production."""
    import asyncio
    import types

    import gcsfs.retry

    from adm_jax import paths

    async def no_wait(_seconds):
        await asyncio.sleep(0)

    monkeypatch.setattr(gcsfs.retry, "asyncio", types.SimpleNamespace(sleep=no_wait))
    monkeypatch.setattr(paths, "RETRY_FIRST_DELAY_S", 0.01)


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
