"""Several real JAX processes on 127.0.0.1 (``jax.distributed`` + gloo collectives), each with
simulated CPU devices, running the real entry point: what a TPU pod slice or a GPU cluster
does, without one. Every process has a deadline, so a hang fails the test instead of CI.

* 2 processes x 4 devices == 1 process x 8 devices (same global batch, same mesh shape): the
  loss curve and the parameters to float32 round-off, data order included;
* SIGTERM reaching the two processes 1.5 s apart: both stop at the SAME step, one checkpoint,
  both exit 0; the resumed run is bitwise equal to the uninterrupted one;
* SIGKILL of one process: the other exits with an error (no hang), and the restarted job
  resumes from the last checkpoint, again bitwise equal to the uninterrupted run;
* export from 4 processes (a 1-process restore loads it), sampling in 4 processes (the same
  .npz as one process), and feature extraction + metrics sharded over 2 processes.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Seconds: the most a process may take for one launch (startup, compile, a few steps).
LAUNCH_DEADLINE = 420
# After SIGKILL of one process, the others must have exited within this many seconds.
SIGKILL_EXIT_BOUND = 90
# After the second SIGTERM, both processes must have exited within this many seconds.
SIGTERM_EXIT_BOUND = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """N processes of one command; stdout/stderr of each in ``logdir/name.<i>.log``."""

    def __init__(self, name, argv, *, num_processes, logdir, total_devices=8, extra_env=None):
        self.name, self.logdir = name, pathlib.Path(logdir)
        port = _free_port()
        self.procs, self.logs = [], []
        for i in range(num_processes):
            per_process = total_devices // num_processes
            env = dict(
                os.environ,
                JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={per_process}",
                PYTHONPATH=str(REPO),
                PYTHONUNBUFFERED="1",
                **(extra_env or {}),
            )
            if num_processes > 1:
                env.update(
                    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                    JAX_NUM_PROCESSES=str(num_processes),
                    JAX_PROCESS_ID=str(i),
                    JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                )
            log = self.logdir / f"{name}.{i}.log"
            self.logs.append(log)
            with open(log, "w") as f:
                self.procs.append(
                    subprocess.Popen(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
                )

    def tail(self, n=3000) -> str:
        return "\n".join(f"--- {log.name}:\n{log.read_text()[-n:]}" for log in self.logs)

    def wait(self, timeout=LAUNCH_DEADLINE) -> list[int]:
        deadline = time.time() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"{self.name}: still running after {timeout} s (hang)\n{self.tail()}")
        return [p.returncode for p in self.procs]

    def check(self, timeout=LAUNCH_DEADLINE) -> None:
        codes = self.wait(timeout)
        assert codes == [0] * len(codes), f"{self.name}: exit codes {codes}\n{self.tail()}"

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def main_argv(workdir, *flags, config="configs/tiny.py", mode="train"):
    return [
        sys.executable, "-m", "adm_jax.main", f"--config={config}", f"--workdir={workdir}",
        f"--mode={mode}", "--heartbeat_timeout=20", *flags,
    ]  # fmt: skip


def read_losses(workdir) -> dict[int, float]:
    from adm_jax.train.metrics import read_metrics

    return {s: r["train/loss"] for s, r in read_metrics(str(workdir)).items() if "train/loss" in r}


def checkpoint_steps(workdir) -> list[int]:
    d = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def wait_until(predicate, job, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if any(p.poll() is not None for p in job.procs):
            pytest.fail(f"{job.name}: a process ended before {what}\n{job.tail()}")
        time.sleep(0.1)
    job.kill()
    pytest.fail(f"{job.name}: {what} did not happen within {timeout} s\n{job.tail()}")


def ema_params(workdir, rate=0.9):
    import jax

    from adm_jax.train import restore_inference

    return jax.device_get(restore_inference(str(workdir), ema_rate=rate).params)


NUM_STEPS = 10
# configs/tiny.py with one resolution level (16x16, attention there): these tests are about
# processes, and compiling the step in every process dominates their time on a 2-core machine.
SMALL_MODEL = ["--config.model.channel_mult=1", "--config.model.attention_resolutions=16"]
TRAIN_FLAGS = [
    *SMALL_MODEL, f"--config.train.num_steps={NUM_STEPS}", "--config.train.log_every=1",
    "--config.train.eval_every=0", "--config.train.sample_every=0",
    "--config.train.max_to_keep=20",
]  # fmt: skip


@pytest.mark.slow
def test_multiprocess_train_preempt_kill_resume_export_sample(tmp_path, tiny_tfds_dir):
    data = f"--config.data.data_dir={tiny_tfds_dir}"
    flags = [data, *TRAIN_FLAGS, "--config.train.checkpoint_every=1000"]

    # 1 process x 8 devices, then 2 processes x 4 devices: same mesh (data 4, fsdp 2).
    one, two = tmp_path / "one", tmp_path / "two"
    Job("one", main_argv(one, *flags), num_processes=1, logdir=tmp_path).check()
    Job("two", main_argv(two, *flags), num_processes=2, logdir=tmp_path).check()
    a, b = read_losses(one), read_losses(two)
    assert sorted(a) == sorted(b) == list(range(1, NUM_STEPS + 1))
    for step in a:  # float32 round-off (collectives sum in another order)
        np.testing.assert_allclose(b[step], a[step], rtol=2e-5, err_msg=f"loss at step {step}")
    import jax

    # Adam moves a parameter whose gradient is round-off noise by about lr (1e-4) per step in
    # the noise's direction, so parameters agree to a tenth of one step, not to 1e-6.
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5),
        ema_params(one), ema_params(two),
    )  # fmt: skip
    uninterrupted = ema_params(two)

    # Staggered SIGTERM: one maintenance notice reaching two hosts 1.5 s apart.
    pre = tmp_path / "preempted"
    job = Job("sigterm", main_argv(pre, *flags), num_processes=2, logdir=tmp_path)
    wait_until(lambda: len(read_losses(pre)) >= 2, job, LAUNCH_DEADLINE, "step 2")
    job.procs[0].send_signal(signal.SIGTERM)
    time.sleep(1.5)
    job.procs[1].send_signal(signal.SIGTERM)
    sent = time.time()
    job.check(timeout=SIGTERM_EXIT_BOUND)
    exit_seconds = time.time() - sent
    stops = [
        int(line.split("Stopped at step ")[1].split()[0])
        for log in job.logs
        for line in log.read_text().splitlines()
        if "Stopped at step " in line
    ]
    assert len(stops) == 2 and stops[0] == stops[1], f"stop steps {stops}\n{job.tail()}"
    stop = stops[0]
    assert stop < NUM_STEPS, f"the run finished (step {stop}) before the SIGTERM took effect"
    assert checkpoint_steps(pre) == [stop]
    print(f"SIGTERM: both processes stopped at step {stop}, exited {exit_seconds:.1f} s after "
          "the second signal")  # fmt: skip

    # Resume; SIGKILL one process after its next checkpoint; the other must not hang.
    kill_flags = [data, *TRAIN_FLAGS, "--config.train.checkpoint_every=2"]
    job = Job("sigkill", main_argv(pre, *kill_flags), num_processes=2, logdir=tmp_path)
    wait_until(
        lambda: any(s > stop for s in checkpoint_steps(pre)), job, LAUNCH_DEADLINE,
        "a checkpoint after the resume",
    )  # fmt: skip
    killed_at = time.time()
    job.procs[1].send_signal(signal.SIGKILL)
    codes = job.wait(timeout=SIGKILL_EXIT_BOUND)
    survivor_seconds = time.time() - killed_at
    assert codes[1] == -signal.SIGKILL
    if codes[0] == 0:  # it may legitimately have finished all steps before noticing
        assert max(checkpoint_steps(pre)) == NUM_STEPS, job.tail()
    else:
        survivor = job.logs[0].read_text()
        assert "adm_jax process 0/2" in survivor or "another task died" in survivor, job.tail()
    print(f"SIGKILL of process 1: process 0 exited with {codes[0]} after {survivor_seconds:.1f} s")

    # The restarted job resumes from the last finalized checkpoint and ends where the
    # uninterrupted run did, bitwise.
    resumed_from = max(checkpoint_steps(pre))
    Job("restart", main_argv(pre, *kill_flags), num_processes=2, logdir=tmp_path).check()
    assert max(checkpoint_steps(pre)) == NUM_STEPS
    c = read_losses(pre)
    for step in range(resumed_from + 1, NUM_STEPS + 1):
        assert c[step] == b[step], f"loss at step {step}: {c[step]} != {b[step]} (uninterrupted)"
    jax.tree.map(np.testing.assert_array_equal, ema_params(pre), uninterrupted)

    # A finished run says so and exits without compiling.
    started = time.time()
    job = Job("finished", main_argv(pre, *kill_flags), num_processes=2, logdir=tmp_path)
    job.check()
    assert "already finished" in job.logs[0].read_text()
    assert "Compiled the train step" not in job.logs[0].read_text()
    print(f"rerun of a finished run: {time.time() - started:.1f} s")

    # The trained run, exported from 4 processes and sampled in 4 and in 1.
    _export_and_sample_in_four_processes(pre, NUM_STEPS, tmp_path)


def _export_and_sample_in_four_processes(run, step, tmp_path):
    """Export from 4 processes loads in 1; 4-process sampling writes the 1-process .npz."""
    import jax

    from adm_jax.checkpoints import load_inference_checkpoint

    Job(
        "export", main_argv(run, *SMALL_MODEL, mode="export"),
        num_processes=4, logdir=tmp_path,
    ).check()  # fmt: skip
    out = run / "export" / f"step_{step:08d}"
    assert (out / "model.json").is_file()
    got = jax.device_get(load_inference_checkpoint(out).params)
    jax.tree.map(np.testing.assert_array_equal, got, ema_params(run, rate=0.9999))

    sample_flags = [
        *SMALL_MODEL, f"--config.sample.checkpoint={out}", "--config.sample.batch_size=8",
        "--config.sample.num_samples=16", "--config.sample.classifier_scale=0",
    ]  # fmt: skip
    npz = "samples/samples_16x16x16x3.npz"
    for name, n in (("sample1", 1), ("sample4", 4)):
        wd = tmp_path / name
        Job(name, main_argv(wd, *sample_flags, mode="sample"), num_processes=n,
            logdir=tmp_path).check()  # fmt: skip
    with np.load(tmp_path / "sample1" / npz) as a, np.load(tmp_path / "sample4" / npz) as b:
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
        # uint8 pixels: float round-off of the sharded network may move a few by one.
        diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


_SHARDED_METRICS = textwrap.dedent(
    """
    import json, os, sys
    from adm_jax import main  # noqa: F401  (sets up sys.path for configs)
    import jax, numpy as np
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                                   int(os.environ["JAX_NUM_PROCESSES"]),
                                   int(os.environ["JAX_PROCESS_ID"]))
    from adm_jax.evaluation import features, metrics
    rng = np.random.default_rng(0)
    w = rng.normal(size=(48, 16)).astype(np.float32)
    def fn(variables, images):  # a cheap stand-in for Inception: same sharded path
        x = images.reshape(images.shape[0], -1).astype(np.float32) / 255.0
        h = x @ variables["w"]
        return {"pool3": h, "spatial_features_2023": h[:, :8],
                "softmax_nobias": jax.nn.softmax(h[:, :10])}
    extractor = features.FeatureExtractor({"w": w}, fn=fn, batch_size=8)
    ref = rng.integers(0, 256, (40, 4, 4, 3), dtype=np.uint8)
    sam = rng.integers(0, 256, (36, 4, 4, 3), dtype=np.uint8)
    fr = extractor([ref[:17], ref[17:]])
    fs = extractor([sam])
    out = metrics.metrics_from_features(
        fr["pool3"], fs["pool3"], sample_spatial=fs["spatial_features_2023"],
        sample_probs=fs["softmax_nobias"], ref_spatial=fr["spatial_features_2023"],
        split_size=12, row_batch_size=16, col_batch_size=16, mesh=extractor.mesh)
    if jax.process_index() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({k: None if v is None else float(v) for k, v in out.items()}, f)
    """
)


@pytest.mark.slow
def test_sharded_feature_extraction_and_metrics_across_processes(tmp_path):
    """The evaluator's sharded path (features over every device of 2 processes, replicated
    back; k-NN precision/recall over the mesh) gives the 1-process numbers."""
    results = {}
    for n in (1, 2):
        out = tmp_path / f"metrics{n}.json"
        Job(f"metrics{n}", [sys.executable, "-c", _SHARDED_METRICS, str(out)], num_processes=n,
            logdir=tmp_path).check()  # fmt: skip
        results[n] = json.loads(out.read_text())
    assert results[1].keys() == results[2].keys()
    for k, v in results[1].items():
        if v is None:
            assert results[2][k] is None, k
        else:
            np.testing.assert_allclose(results[2][k], v, rtol=1e-5, err_msg=k)
