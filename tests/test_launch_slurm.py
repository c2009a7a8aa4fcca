"""launch/slurm_gpu.sh and launch/gpu.sh end to end, through the commands docs/gpu.md gives,
on a simulated SLURM cluster (tests/fake_cloud: real processes, SLURM's variables, signals and
requeue; every node is this machine, each "GPU" a simulated XLA CPU device).

* the one-time install (launch/install.sh, the real uv commands; ``cpu``: the simulated nodes
  have no GPU) into a fresh venv of a fresh copy of the checkout (the submit directory);
* ``sbatch --nodes=2 --gpus-per-node=4 launch/slurm_gpu.sh configs/tiny.py ...``: two
  processes (one per node) that find each other through jax's own SLURM detection (no
  JAX_COORDINATOR_ADDRESS), train, get the time-limit warning (--signal), stop at one step with
  one checkpoint, requeue themselves, resume there, get preempted (SIGTERM to the whole job,
  requeue by the cluster), resume again and finish: one job, three runs, one log;
* launch/gpu.sh as two hosts with JAX_COORDINATOR_ADDRESS on 127.0.0.1;
* both scripts stop in one line, naming the install command, when the venv is missing.

Time on the 2-core test machine: the SLURM test 160 s (install 12 s with a warm uv cache;
three runs of two processes, the first compiles the step), gpu.sh 50 s, the rest seconds; the
whole file 3.5 minutes. Shared with other test runs (load average 9-10): 500 s and 140 s.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT

FAKE_CLOUD = REPO_ROOT / "tests" / "fake_cloud"
sys.path.insert(0, str(FAKE_CLOUD))
import slurm_sim  # noqa: E402

GPU_DOC = REPO_ROOT / "docs" / "gpu.md"
# The fenced block after each marker is what the test runs (with the variables it sets).
SLURM_BLOCK = "<!-- tests/test_launch_slurm.py runs the SLURM commands below -->"
HOSTS_BLOCK = "<!-- tests/test_launch_slurm.py runs the several-hosts command below -->"

NUM_STEPS = 20
# configs/tiny.py with one resolution level (as tests/test_multiprocess.py): this file is
# about launching; no evaluation or sampling; a checkpoint only when stopped or finished.
TRAIN_FLAGS = [
    "--config.model.channel_mult=1", "--config.model.attention_resolutions=16",
    f"--config.train.num_steps={NUM_STEPS}", "--config.train.log_every=1",
    "--config.train.eval_every=0", "--config.train.sample_every=0",
    "--config.train.checkpoint_every=1000", "--config.train.max_to_keep=20",
    "--heartbeat_timeout=20",
]  # fmt: skip
# Seconds: the most one run of the job may take (start, compile, steps, checkpoint), and the
# install (about 15 s here with a warm uv cache; minutes with a cold one).
RUN_DEADLINE = 300
INSTALL_DEADLINE = 600


def documented_commands(marker: str) -> list[str]:
    """The command lines of the fenced block after ``marker`` in docs/gpu.md (continuation
    lines joined, comments dropped)."""
    text = GPU_DOC.read_text()
    assert marker in text, f"docs/gpu.md lost the marker {marker!r}"
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", text.split(marker, 1)[1], re.S)
    assert block, f"docs/gpu.md: no fenced block after {marker!r}"
    lines = block.group(1).replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def copy_checkout(dest: Path) -> Path:
    """The files git would give a user (tracked, and untracked ones git does not ignore):
    the submit directory, separate from this checkout and its .venv."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO_ROOT,
        capture_output=True, check=True, timeout=60,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def cluster_env(state: Path, **extra) -> dict:
    env = dict(os.environ, FAKE_SLURM_STATE=str(state), FAKE_SLURM_KILL_WAIT="30")
    env["PATH"] = f"{FAKE_CLOUD}{os.pathsep}{env['PATH']}"
    env.pop("VIRTUAL_ENV", None)  # the job activates its own
    env.update(extra)
    return env


def run(cmd: str, *, cwd, env, timeout) -> subprocess.CompletedProcess:
    done = subprocess.run(
        ["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{cmd}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def job_field(job_id: int, field: str, env) -> str:
    shown = subprocess.run(
        ["scontrol", "show", "job", str(job_id)], env=env, capture_output=True, text=True,
        check=True, timeout=30,
    ).stdout  # fmt: skip
    return re.search(rf"\b{field}=(\S*)", shown).group(1)


def wait_for(predicate, what: str, log: Path, timeout=RUN_DEADLINE):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    tail = log.read_text()[-4000:] if log.exists() else "(no log)"
    pytest.fail(f"{what} did not happen within {timeout} s\n{tail}")


def logged_steps(workdir: Path) -> list[int]:
    """The steps of metrics.jsonl's training rows, in the order written (a resumed run
    appends)."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [row["step"] for row in rows if "train/loss" in row]


def stopped_at(log_text: str) -> list[int]:
    return [int(s) for s in re.findall(r"Stopped at step (\d+)", log_text)]


@pytest.mark.slow
def test_documented_slurm_commands_train_preempt_requeue_resume(tmp_path, tiny_tfds_dir):
    checkout = copy_checkout(tmp_path / "checkout")
    state, venv, workdir = tmp_path / "slurm", tmp_path / "venv", tmp_path / "run"
    flags = " ".join([f"--config.data.data_dir={tiny_tfds_dir}", *TRAIN_FLAGS])
    env = cluster_env(
        state, ACCELERATOR="cpu", ADM_JAX_VENV=str(venv), NODES="2", GPUS="4",
        CONFIG="configs/tiny.py", WORKDIR=str(workdir), FLAGS=flags,
    )  # fmt: skip
    install, submit = documented_commands(SLURM_BLOCK)
    assert install.startswith("bash launch/install.sh ") and submit.startswith("sbatch ")
    assert "--gpus-per-node=" in submit, submit

    started = time.time()
    run(install, cwd=checkout, env=env, timeout=INSTALL_DEADLINE)
    install_seconds = time.time() - started
    assert (venv / "bin" / "python").is_file()

    job_id = int(re.fullmatch(r"Submitted batch job (\d+)\n", run(submit, cwd=checkout, env=env,
                              timeout=60).stdout).group(1))  # fmt: skip
    log = checkout / f"slurm-{job_id}.out"
    try:
        # Run 1: train until step 3, then the time-limit warning (--signal=B:USR1).
        wait_for(lambda: max(logged_steps(workdir), default=0) >= 3, "run 1 at step 3", log)
        subprocess.run(
            [sys.executable, FAKE_CLOUD / "slurm_sim.py", "time-limit-warning", str(job_id)],
            env=env, check=True, timeout=30,
        )  # fmt: skip
        wait_for(lambda: job_field(job_id, "Restarts", env) == "1", "the requeue", log)
        first_stop = stopped_at(log.read_text())
        assert len(first_stop) == 2 and first_stop[0] == first_stop[1], log.read_text()[-4000:]
        first_stop = first_stop[0]

        # Run 2 resumes there; a preemption (SIGTERM to every process of the job) 2 steps on.
        wait_for(lambda: max(logged_steps(workdir)) >= first_stop + 2, "run 2 training", log)
        subprocess.run(
            [sys.executable, FAKE_CLOUD / "slurm_sim.py", "preempt", str(job_id)],
            env=env, check=True, timeout=30,
        )  # fmt: skip
        wait_for(lambda: job_field(job_id, "Restarts", env) == "2", "the second requeue", log)

        # Run 3 resumes and finishes; the job completes.
        wait_for(lambda: job_field(job_id, "JobState", env) == "COMPLETED", "job end", log)
    finally:
        subprocess.run(["scancel", str(job_id)], env=env, capture_output=True, timeout=30)
    text = log.read_text()
    second_stop = stopped_at(text)[2:]
    assert len(second_stop) == 2 and second_stop[0] == second_stop[1], text[-4000:]
    second_stop = second_stop[0]
    assert first_stop < second_stop < NUM_STEPS, (first_stop, second_stop)

    # One process per node, connected by jax's SLURM detection (SLURM_* variables only).
    assert "JAX_COORDINATOR_ADDRESS" not in env
    assert len(re.findall(r"JAX process [01]/2; 4 local / 8 global devices", text)) == 6, text
    # Each process got every "GPU" of its node (jax alone would give it only SLURM_LOCALID's).
    assert text.count("JAX distributed initialized with visible devices: 0,1,2,3") == 6, text
    assert text.count("[slurm_gpu] job") == 3 and "GPUs 0,1,2,3" in text
    assert "time limit near" in text and "SIGTERM (preemption)" in text
    # Each run resumed from the checkpoint the previous one wrote, and the steps continued.
    for stop in (first_stop, second_stop):
        assert re.search(rf"Resumed from \S+/{stop}\b", text), (stop, text[-4000:])
    steps = logged_steps(workdir)
    assert sorted(set(steps)) == list(range(1, NUM_STEPS + 1)), steps
    assert len(steps) == len(set(steps)), f"a step was trained twice: {steps}"
    checkpoints = sorted(
        int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()
    )
    assert checkpoints == [first_stop, second_stop, NUM_STEPS], checkpoints
    assert job_field(job_id, "Restarts", env) == "2"
    print(
        f"install {install_seconds:.0f} s; job {job_id}: stopped at steps {first_stop} (time "
        f"limit) and {second_stop} (preemption), finished {NUM_STEPS}; "
        f"{time.time() - started - install_seconds:.0f} s from sbatch to completion"
    )


@pytest.mark.slow
def test_documented_gpu_sh_several_hosts(tmp_path, tiny_tfds_dir):
    """launch/gpu.sh as two hosts (2 processes x 4 devices) with JAX_COORDINATOR_ADDRESS."""
    (command,) = documented_commands(HOSTS_BLOCK)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tmp_path / "run"
    steps = 4
    flags = [f"--config.data.data_dir={tiny_tfds_dir}", *TRAIN_FLAGS,
             f"--config.train.num_steps={steps}"]  # fmt: skip
    procs, logs = [], []
    for i in range(2):
        env = dict(
            os.environ, HOST0="127.0.0.1", PORT=str(port), NUM_HOSTS="2", HOST_INDEX=str(i),
            CONFIG="configs/tiny.py", WORKDIR=str(workdir), FLAGS=" ".join(flags),
            ADM_JAX_VENV=str(REPO_ROOT / ".venv"), JAX_PLATFORMS="cpu",
            JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
            XLA_FLAGS=slurm_sim._with_device_count(os.environ.get("XLA_FLAGS", ""), 4),
        )  # fmt: skip
        logs.append(tmp_path / f"host{i}.log")
        with open(logs[-1], "w") as out:
            procs.append(subprocess.Popen(["bash", "-c", command], cwd=REPO_ROOT, env=env,
                                          stdout=out, stderr=subprocess.STDOUT))  # fmt: skip
    try:
        codes = [p.wait(timeout=RUN_DEADLINE) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(t[-3000:] for t in texts)
    for i, text in enumerate(texts):
        assert f"JAX process {i}/2; 4 local / 8 global devices" in text, text[-3000:]
    assert logged_steps(workdir)[-1] == steps


def test_missing_venv_is_one_line_naming_the_install_command(tmp_path):
    """The job installs nothing: without the venv, sbatch's job and gpu.sh stop in one line."""
    missing = tmp_path / "no_venv"
    env = cluster_env(tmp_path / "slurm", ADM_JAX_VENV=str(missing))
    out = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=4", "--output",
         str(tmp_path / "slurm-%j.out"), "launch/slurm_gpu.sh", "configs/tiny.py"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    job_id = int(out.stdout)
    log = tmp_path / f"slurm-{job_id}.out"
    wait_for(lambda: job_field(job_id, "JobState", env) not in ("PENDING", "RUNNING"),
             "the job's end", log, timeout=30)  # fmt: skip
    assert job_field(job_id, "JobState", env) == "FAILED"
    assert job_field(job_id, "ExitCode", env) == "2:0"
    expected = (
        f"slurm_gpu.sh: no virtual environment at {missing} (ADM_JAX_VENV); install once on a "
        f"login node, outside the job: bash launch/install.sh cuda12 {missing}"
    )
    assert log.read_text().strip() == expected

    gpu = subprocess.run(
        ["bash", "launch/gpu.sh", "configs/tiny.py"], cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=30, env=dict(os.environ, ADM_JAX_VENV=str(missing)),
    )  # fmt: skip
    assert gpu.returncode == 2
    assert gpu.stdout == ""
    assert gpu.stderr.strip() == (
        f"gpu.sh: no virtual environment at {missing} (ADM_JAX_VENV); install once: "
        f"bash launch/install.sh cuda12 {missing}"
    )


def test_fake_sbatch_refuses_what_it_does_not_simulate(tmp_path):
    """The simulation must not silently accept an option the scripts might start to use."""
    env = cluster_env(tmp_path / "slurm")
    out = subprocess.run(
        ["sbatch", "--gres=gpu:8", "launch/slurm_gpu.sh", "configs/tiny.py"], cwd=REPO_ROOT,
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 1 and "unrecognized option '--gres=gpu:8'" in out.stderr
    # And slurm_gpu.sh's own #SBATCH lines all parse.
    directives, rest = slurm_sim.parse_options(
        "sbatch", slurm_sim.script_directives(REPO_ROOT / "launch" / "slurm_gpu.sh"),
        slurm_sim.SBATCH_OPTIONS,
    )  # fmt: skip
    assert rest == [] and directives["requeue"] is True
    assert slurm_sim.parse_signal(directives["signal"]) == {
        "signal": 10, "seconds": 300, "batch_only": True,
    }  # fmt: skip


@pytest.mark.slow
def test_slurm_job_without_gpu_count_and_a_failing_process(tmp_path):
    """Without --gpus-per-node (no SLURM_GPUS_ON_NODE) and without nvidia-smi the script still
    runs (JAX keeps its own device choice); a process that fails fails the job with its one-line
    error in the log and its exit code."""
    env = cluster_env(tmp_path / "slurm", ADM_JAX_VENV=str(REPO_ROOT / ".venv"))
    out = subprocess.run(
        ["sbatch", "--parsable", "--output", str(tmp_path / "slurm-%j.out"),
         "launch/slurm_gpu.sh", "configs/no_such_config.py", f"--workdir={tmp_path / 'run'}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    job_id = int(out.stdout)
    log = tmp_path / f"slurm-{job_id}.out"
    wait_for(lambda: job_field(job_id, "JobState", env) not in ("PENDING", "RUNNING"),
             "the job's end", log, timeout=RUN_DEADLINE)  # fmt: skip
    text = log.read_text()
    assert f"[slurm_gpu] job {job_id} run 1: 1 node(s) 127.0.0.1, GPUs none" in text, text
    assert job_field(job_id, "JobState", env) == "FAILED", text
    assert job_field(job_id, "ExitCode", env) != "0:0"
    assert "no_such_config.py" in text and "Traceback" not in text, text


def test_fake_cluster_requeue_and_cancel_rules(tmp_path):
    """The simulation's requeue rules, which the scripts rely on: scontrol requeue reruns the
    batch script with SLURM_RESTART_COUNT; --no-requeue refuses it; scancel cancels for good."""
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/usr/bin/env bash\n#SBATCH --open-mode=append\n"
        'echo "run ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST"\nsrun sleep 60\n'
    )
    env = cluster_env(tmp_path / "slurm")

    def submit(*options):
        out = subprocess.run(
            ["sbatch", "--parsable", "--nodes=2", *options, str(script)], cwd=tmp_path, env=env,
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip
        return int(out.stdout)

    def state(job_id):
        return job_field(job_id, "JobState", env)

    requeueable = submit("--requeue")
    log = tmp_path / f"slurm-{requeueable}.out"
    wait_for(lambda: log.exists() and "run 0" in log.read_text(), "run 0", log, timeout=30)
    subprocess.run(["scontrol", "requeue", str(requeueable)], env=env, check=True, timeout=30)
    wait_for(lambda: "run 1 on 127.0.0.[1-2]" in log.read_text(), "the rerun", log, timeout=30)
    assert job_field(requeueable, "Restarts", env) == "1"
    subprocess.run(["scancel", str(requeueable)], env=env, check=True, timeout=30)
    wait_for(lambda: state(requeueable) == "CANCELLED", "the cancel", log, timeout=30)

    never = submit("--no-requeue")
    refused = subprocess.run(
        ["scontrol", "requeue", str(never)], env=env, capture_output=True, text=True, timeout=30
    )
    assert refused.returncode == 1 and "presently disabled" in refused.stderr
    subprocess.run(["scancel", str(never)], env=env, check=True, timeout=30)
    wait_for(lambda: state(never) == "CANCELLED", "the cancel", log, timeout=30)
    assert job_field(never, "Restarts", env) == "0"
