"""launch/tpu_pod.sh against a simulated cloud: tests/fake_cloud/gcloud on PATH, whose TPU
workers are folders with their own HOME on this machine, each ``ssh --command`` a real local
bash process with the environment a Cloud TPU worker gives jax (2 workers x 4 CPU devices for
a v4-16), and the bucket a real GCS API server on 127.0.0.1 (``gcs_bucket`` in conftest.py).

The end-to-end test runs the commands of docs/tpu.md's tested block, line by line, with only
the environment variables the page's settings block names: `up` (create, ship this checkout,
the real ``launch/install.sh tpu`` on each worker, a detached 2-process training run of
configs/tiny.py with its workdir in the bucket), status, logs, a preemption (every process of
the slice SIGKILLed, state PREEMPTED), `up` again (deletes and recreates the slice, installs,
starts; training resumes from the last checkpoint), stop (SIGTERM: a final checkpoint, exit 0)
and delete. The fast tests check the one-line errors and the queued-resources path.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

FAKE_CLOUD = REPO / "tests" / "fake_cloud"
DOC = REPO / "docs" / "tpu.md"
SCRIPT = "launch/tpu_pod.sh"
# What the fake workers may see of this process's environment: the bucket emulator (on a real
# worker: the VM's credentials), a uv cache shared by the fake workers and this machine's
# certificate bundle (for downloads), and the test session's XLA compilation cache.
WORKER_ENV = (
    "STORAGE_EMULATOR_HOST EPATH_USE_TF TENSORSTORE_GCS_HTTP_URL GOOGLE_AUTH_TOKEN_FOR_TESTING "
    "UV_CACHE_DIR SSL_CERT_FILE JAX_COMPILATION_CACHE_DIR "
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"
)
# One uv cache for every fake worker and every test run: installs after the first are
# hard links (seconds), as on a machine that installed once before.
UV_CACHE = pathlib.Path(tempfile.gettempdir()) / "adm_jax_tpu_pod_test_uv_cache"
# Seconds: one command of the page (up includes two installs and the start).
COMMAND_TIMEOUT = 420
# configs/tiny.py, one resolution level, checkpoints every 2 steps, more steps than the test
# lets it run: it is preempted, resumed and stopped mid-run.
TRAIN_FLAGS = (
    "--config.model.channel_mult=1 --config.model.attention_resolutions=16 "
    "--config.train.num_steps=100000 --config.train.log_every=1 "
    "--config.train.checkpoint_every=2 --config.train.eval_every=0 "
    "--config.train.sample_every=0 --config.train.tensorboard=False"
)


def doc_blocks() -> tuple[list[str], list[str]]:
    """(settings lines, command lines) of docs/tpu.md's two fenced blocks after the markers."""
    text = DOC.read_text()

    def block(marker):
        found = re.search(re.escape(marker) + r".*?```bash\n(.*?)```", text, re.S)
        assert found, f"docs/tpu.md: no ```bash block after {marker!r}"
        return [
            line.split(" #", 1)[0].strip()
            for line in found.group(1).splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]

    return block("<!-- settings -->"), block("<!-- commands: tests/test_launch_tpu_pod.py -->")


def settings_names(settings: list[str]) -> set[str]:
    return {m for line in settings for m in re.findall(r"\b([A-Z_]+)=", line)}


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A clean git checkout holding this working tree's files (tracked and untracked, not
    ignored): the script ships only committed code, and this tree may have edits in progress."""
    root = tmp_path_factory.mktemp("checkout") / "adm_jax"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True, timeout=60,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "snapshot"]):
        subprocess.run([*git, *command], cwd=root, check=True, timeout=60)
    return root


def cloud_env(state, **settings) -> dict:
    env = dict(os.environ)
    for name in ("ZONE", "BUCKET", "TPU_NAME", "TPU_TYPE", "SPOT", "QUEUED", "WORKDIR"):
        env.pop(name, None)
    ssl = env.get("SSL_CERT_FILE") or env.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
    env.update(
        PATH=f"{FAKE_CLOUD}:{env['PATH']}",
        FAKE_GCLOUD_STATE=str(state),
        FAKE_GCLOUD_WORKER_ENV=WORKER_ENV,
        UV_CACHE_DIR=str(UV_CACHE),
        POLL_SECONDS="0",
        **({"SSL_CERT_FILE": ssl} if os.path.exists(ssl) else {}),
    )
    env.update({k: str(v) for k, v in settings.items()})
    return env


def run(line, cwd, env, timeout=60):
    started = time.time()
    proc = subprocess.run(
        ["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    proc.seconds = time.time() - started
    return proc


def gcloud(env, *args):
    return subprocess.run(
        [str(FAKE_CLOUD / "gcloud"), *args], env=env, capture_output=True, text=True, timeout=60
    )


def slice_state(env, name, zone):
    out = gcloud(env, "compute", "tpus", "tpu-vm", "describe", name, f"--zone={zone}",
                 "--format=value(state)")  # fmt: skip
    return out.stdout.strip() if out.returncode == 0 else None


def marked_processes(state, zone=None, name=None) -> list[int]:
    """Processes started on the fake cloud's VMs (FAKE_TPU_VM=<state>/<zone>/<name>), on the
    one VM if zone and name are given."""
    marker = f"FAKE_TPU_VM={pathlib.Path(state).resolve()}/"
    if zone:
        marker += f"{zone}/{name}"
    pids = []
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(e == marker or (not zone and e.startswith(marker)) for e in environ):
            pids.append(int(proc.name))
    return pids


@pytest.fixture
def cloud_state(tmp_path):
    """The fake cloud's state folder; whatever still runs on its VMs at the end is SIGKILLed
    (a failed test must not leave a training run behind)."""
    state = tmp_path / "cloud"
    yield state
    for pid in marked_processes(state):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def bucket_objects(bucket: str, prefix: str) -> list[str]:
    """Object names under prefix, straight from the GCS API (no client-side listing cache)."""
    host = os.environ["STORAGE_EMULATOR_HOST"]
    name = bucket[len("gs://") :]
    query = urllib.parse.urlencode({"prefix": prefix})
    with urllib.request.urlopen(f"{host}/storage/v1/b/{name}/o?{query}", timeout=10) as r:
        return [item["name"] for item in json.loads(r.read()).get("items", [])]


def read_object(bucket: str, name: str) -> str:
    host = os.environ["STORAGE_EMULATOR_HOST"]
    quoted = urllib.parse.quote(name, safe="")
    url = f"{host}/storage/v1/b/{bucket[len('gs://') :]}/o/{quoted}?alt=media"
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def checkpoint_steps(bucket: str, workdir_prefix: str) -> list[int]:
    """Steps whose checkpoint is committed: on an object store Orbax writes the step's folder
    in place and ``commit_success.txt`` in it last (a run killed mid-save leaves a folder
    without it, which the next run deletes)."""
    prefix = f"{workdir_prefix}/checkpoints/"
    steps = set()
    for name in bucket_objects(bucket, prefix):
        parts = name[len(prefix) :].split("/")
        if len(parts) == 2 and parts[0].isdigit() and parts[1] == "commit_success.txt":
            steps.add(int(parts[0]))
    return sorted(steps)


def wait_for(predicate, timeout, what, details):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    pytest.fail(f"{what} did not happen within {timeout} s\n{details()}")


def worker_logs(state, zone, name) -> str:
    root = pathlib.Path(state) / "tpus" / zone / name
    logs = sorted(root.glob("worker-*/adm_jax_run/run-*.log"))
    return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in logs)


# ----------------------------------------------------------------------------------------------
# The page's commands, end to end.


@pytest.mark.slow
def test_doc_commands_up_preempt_resume_stop_delete(
    cloud_state, checkout, gcs_bucket, tiny_tfds_dir
):
    settings, commands = doc_blocks()
    verbs = [line.split()[1] for line in commands]
    assert verbs == ["up", "status", "logs", "up", "stop", "delete"], commands
    assert all(line.startswith(f"{SCRIPT} ") for line in commands), commands
    zone, name = "us-central2-b", "adm-test"
    given = dict(
        ZONE=zone, BUCKET=gcs_bucket, TPU_NAME=name, TPU_TYPE="v4-16", SPOT=1,
        CONFIG="configs/tiny.py",
        FLAGS=f"--config.data.data_dir={tiny_tfds_dir} {TRAIN_FLAGS}",
    )  # fmt: skip
    assert settings_names(settings) == set(given), "the page's settings block names other variables"
    state = cloud_state
    env = cloud_env(state, **given)
    workdir = "adm_jax/tiny"  # the default: $BUCKET/adm_jax/<config name>
    timings = {}

    def details():
        return worker_logs(state, zone, name)

    def step(index, timeout=COMMAND_TIMEOUT):
        proc = run(commands[index], checkout, env, timeout=timeout)
        timings[f"{index}: {commands[index]}"] = round(proc.seconds, 1)
        print(f"[{proc.seconds:.1f} s] {commands[index]}", flush=True)
        assert proc.returncode == 0, (
            f"{commands[index]}:\n{proc.stdout}\n{proc.stderr}\n{details()}"
        )
        return proc.stdout + proc.stderr

    # up: creates the slice, installs on both workers, starts the run detached.
    out = step(0)
    assert "creating v4-16 slice adm-test" in out and "$7.76 per hour" in out, out
    assert out.count("[install] adm_jax ready: Python 3.1") == 2, out
    assert "worker 0: started pid" in out and "worker 1: started pid" in out, out
    assert len(marked_processes(state, zone, name)) >= 2  # the runs outlived the ssh sessions
    first = wait_for(lambda: checkpoint_steps(gcs_bucket, workdir), 420, "a checkpoint", details)

    out = step(1)  # status
    assert "READY" in out and "$7.76 per hour" in out, out
    assert re.search(r"worker 0: running \(pid \d+\)", out), out
    assert re.search(r"worker 1: running \(pid \d+\)", out), out
    out = step(2)  # logs
    for worker in (0, 1):  # the file's name, then its last lines (absl's I/W/E lines)
        assert f"worker {worker}: == ~/adm_jax_run/run-" in out, out
        assert re.search(rf"^worker {worker}: [IWE]\d{{4}} ", out, re.M), out

    # A spot reclaim: every process on the slice SIGKILLed, the state PREEMPTED.
    preempt = gcloud(env, "_fake", "preempt", name, f"--zone={zone}")
    assert preempt.returncode == 0, preempt.stderr
    assert slice_state(env, name, zone) == "PREEMPTED"
    wait_for(
        lambda: not marked_processes(state, zone, name), 10, "the preempted processes' end", details
    )
    saved = checkpoint_steps(gcs_bucket, workdir)
    assert saved and saved[-1] >= first[-1]

    # up again: recreates the slice (fresh workers: install again) and resumes.
    out = step(3)
    assert "slice adm-test is PREEMPTED: deleting it and creating it again" in out, out
    assert out.count("[install] adm_jax ready") == 2, out
    resumed = re.compile(rf"Resumed from {gcs_bucket}/{workdir}/checkpoints/(\d+)")
    log0 = pathlib.Path(state) / "tpus" / zone / name / "worker-0" / "adm_jax_run" / "latest.log"
    match = wait_for(lambda: log0.exists() and resumed.search(log0.read_text()), 240,
                     "the resumed run's 'Resumed from' line", details)  # fmt: skip
    resumed_step = int(match.group(1))
    assert resumed_step == saved[-1], (resumed_step, saved)
    wait_for(lambda: checkpoint_steps(gcs_bucket, workdir)[-1] > resumed_step, 240,
             "a checkpoint after the resumed step", details)  # fmt: skip

    # stop: SIGTERM, a checkpoint at a step both processes agree on, exit 0, logs in the bucket.
    out = step(4, timeout=300)
    assert out.count("stopped (exit code 0)") == 2, out
    final = checkpoint_steps(gcs_bucket, workdir)[-1]
    assert final > resumed_step
    metrics = [
        json.loads(line)
        for line in read_object(gcs_bucket, f"{workdir}/metrics.jsonl").splitlines()
    ]
    train_steps = [m["step"] for m in metrics if "train/loss" in m]
    # Every step once: the rows up to each checkpoint were flushed to the bucket before the
    # SIGKILL, and the resumed run dropped the ones past its checkpoint, which it trained again.
    assert train_steps == list(range(1, train_steps[-1] + 1)), (resumed_step, train_steps)
    assert train_steps[-1] >= final
    logs = [n for n in bucket_objects(gcs_bucket, f"{workdir}/logs/") if n.endswith(".log")]
    assert sorted(n.rsplit("/", 1)[1] for n in logs) == ["worker-0.log", "worker-1.log"], logs
    assert not marked_processes(state, zone, name), "stop returned before the runs ended"

    out = step(5)  # delete
    assert slice_state(env, name, zone) is None
    print("seconds per command:", json.dumps(timings, indent=1))


# ----------------------------------------------------------------------------------------------
# One-line errors, before anything is created.


def _one_line_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tpu_pod.sh: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _calls(state) -> list[list[str]]:
    log = pathlib.Path(state) / "calls.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


UP = f"{SCRIPT} up configs/tiny.py"


def test_missing_or_malformed_zone(tmp_path, checkout):
    proc = run(UP, checkout, cloud_env(tmp_path, BUCKET="gs://bkt"))
    _one_line_error(proc, "ZONE is not set", "export ZONE=")
    proc = run(UP, checkout, cloud_env(tmp_path, ZONE="us-central2", BUCKET="gs://bkt"))
    _one_line_error(proc, "ZONE=us-central2: expected a Compute Engine zone")
    assert _calls(tmp_path) == []


@pytest.mark.parametrize(
    "bucket, expected",
    [
        (None, "BUCKET is not set"),
        ("my-bucket", "BUCKET=my-bucket: expected gs://NAME"),
        ("gs://bkt/runs", "BUCKET=gs://bkt/runs: expected gs://NAME"),
        ("gs://Upper", "BUCKET=gs://Upper: expected gs://NAME"),
    ],
)
def test_missing_or_malformed_bucket(tmp_path, checkout, bucket, expected):
    settings = {"ZONE": "us-central2-b", **({"BUCKET": bucket} if bucket else {})}
    _one_line_error(run(UP, checkout, cloud_env(tmp_path, **settings)), expected)
    assert _calls(tmp_path) == []


def test_bucket_not_found(tmp_path, checkout, gcs_bucket):
    env = cloud_env(tmp_path, ZONE="us-central2-b", BUCKET="gs://no-such-bucket")
    _one_line_error(run(UP, checkout, env), "BUCKET=gs://no-such-bucket: not found", "404")
    assert [c[:3] for c in _calls(tmp_path)] == [["storage", "buckets", "describe"]]


def test_uncommitted_changes_are_refused_with_their_names(tmp_path, checkout, gcs_bucket):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(checkout), str(clone)], check=True, timeout=60)
    (clone / "configs" / "tiny.py").write_text("# edited\n", encoding="utf-8")
    (clone / "notes.txt").write_text("new\n")
    env = cloud_env(tmp_path / "cloud", ZONE="us-central2-b", BUCKET=gcs_bucket)
    _one_line_error(
        run(UP, clone, env),
        "uncommitted changes (2): configs/tiny.py notes.txt",
        "SHIP_UNCOMMITTED=1",
    )
    assert not any(c[:3] == ["compute", "tpus", "tpu-vm"] for c in _calls(tmp_path / "cloud"))


def test_bad_run_arguments(tmp_path, checkout, gcs_bucket):
    env = cloud_env(tmp_path, ZONE="us-central2-b", BUCKET=gcs_bucket)
    _one_line_error(run(f"{SCRIPT} up", checkout, env), "usage: tpu_pod.sh up|start CONFIG")
    _one_line_error(run(f"{SCRIPT} up configs/nope.py", checkout, env), "CONFIG=configs/nope.py")
    _one_line_error(run(f"{UP} --workdir=/tmp/x", checkout, env), "set WORKDIR instead")
    env["WORKDIR"] = "/tmp/run"
    _one_line_error(run(UP, checkout, env), "WORKDIR=/tmp/run: expected a gs:// path")
    _one_line_error(run(f"{SCRIPT} frobnicate", checkout, env), "unknown command 'frobnicate'")


# ----------------------------------------------------------------------------------------------
# The slice's life without a run: queued resources, status, delete; the fake's own checks.


def test_queued_spot_slice_create_status_delete(cloud_state, checkout):
    tmp_path = cloud_state
    env = cloud_env(tmp_path, ZONE="europe-west4-a", TPU_NAME="q1", TPU_TYPE="v5p-16", QUEUED=1,
                    SPOT=1)  # fmt: skip
    out = run(f"{SCRIPT} create", checkout, env)
    assert out.returncode == 0, out.stderr
    assert "8 chips x $1.68/chip-hour (spot) = about $13.44 per hour" in out.stdout, out.stdout
    for state in ("PROVISIONING", "ACTIVE"):  # the fake advances one state per describe
        assert f"queued resource q1: {state}" in out.stdout, out.stdout
    created = [
        c for c in _calls(tmp_path) if c[:4] == ["compute", "tpus", "queued-resources", "create"]
    ]
    assert len(created) == 1 and "--spot" in created[0] and "--node-id=q1" in created[0]

    status = run(f"{SCRIPT} status", checkout, env)
    assert status.returncode == 0, status.stderr
    assert "slice q1 (v5p-16, spot) in europe-west4-a: READY" in status.stdout, status.stdout
    for worker in (0, 1):
        assert f"worker {worker}: not installed" in status.stdout, status.stdout

    assert gcloud(env, "_fake", "preempt", "q1", "--zone=europe-west4-a").returncode == 0
    status = run(f"{SCRIPT} status", checkout, env)
    assert "in europe-west4-a: PREEMPTED" in status.stdout and "not billed" in status.stdout

    deleted = run(f"{SCRIPT} delete", checkout, env)
    assert deleted.returncode == 0, deleted.stderr
    assert "deleting queued resource q1" in deleted.stdout
    assert slice_state(env, "q1", "europe-west4-a") is None
    again = run(f"{SCRIPT} delete", checkout, env)
    assert again.returncode == 0 and "nothing to delete" in again.stdout


def test_fake_gcloud_fails_loudly_and_checks_states(cloud_state):
    tmp_path = cloud_state
    env = cloud_env(tmp_path)
    unknown = gcloud(env, "compute", "instances", "list")
    assert unknown.returncode == 2 and "fake gcloud: unsupported" in unknown.stderr
    bad_flag = gcloud(env, "compute", "tpus", "tpu-vm", "describe", "x", "--zone=z-a1-b", "--nope")
    assert bad_flag.returncode == 1 and "unrecognized arguments: --nope" in bad_flag.stderr
    create = ["compute", "tpus", "tpu-vm", "create", "t", "--zone=us-east5-a"]
    assert (
        gcloud(env, *create, "--accelerator-type=v6e-16", "--version=v2-alpha-tpuv6e").returncode
        == 0
    )
    described = gcloud(env, "compute", "tpus", "tpu-vm", "describe", "t", "--zone=us-east5-a",
                       "--format=value(state,networkEndpoints[].ipAddress)")  # fmt: skip
    assert described.stdout == "READY\t10.130.0.2;10.130.0.3;10.130.0.4;10.130.0.5\n"
    ssh = ["compute", "tpus", "tpu-vm", "ssh", "t", "--zone=us-east5-a"]
    out = gcloud(
        env, *ssh, "--worker=all", "--command=echo $JAX_PROCESS_ID/$JAX_NUM_PROCESSES $PWD"
    )
    assert sorted(out.stdout.split("\n")[:4]) == [
        f"{i}/4 {tmp_path}/tpus/us-east5-a/t/worker-{i}" for i in range(4)
    ]
    assert gcloud(env, *ssh, "--worker=4", "--command=true").returncode == 1
    assert gcloud(env, "_fake", "preempt", "t", "--zone=us-east5-a").returncode == 0
    refused = gcloud(env, *ssh, "--worker=0", "--command=true")
    assert refused.returncode == 1 and "state PREEMPTED, not READY" in refused.stderr


@pytest.mark.slow
def test_ship_uncommitted_installs_the_working_tree(cloud_state, checkout):
    """SHIP_UNCOMMITTED=1: the workers get the files as they are on disk, edits and new files
    included (on a 1-worker v4-8; the real launch/install.sh runs there)."""
    clone = cloud_state.parent / "clone"
    subprocess.run(["git", "clone", "-q", str(checkout), str(clone)], check=True, timeout=60)
    (clone / "notes.txt").write_text("not committed\n")
    with open(clone / "configs" / "tiny.py", "a") as f:
        f.write("# an uncommitted edit\n")
    env = cloud_env(cloud_state, ZONE="us-central2-b", TPU_NAME="ship", TPU_TYPE="v4-8",
                    SHIP_UNCOMMITTED=1)  # fmt: skip
    for command in ("create", "install"):
        proc = run(f"{SCRIPT} {command}", clone, env, timeout=COMMAND_TIMEOUT)
        assert proc.returncode == 0, f"{command}:\n{proc.stdout}\n{proc.stderr}"
    assert "with uncommitted changes" in proc.stdout, proc.stdout
    assert "[install] adm_jax ready" in proc.stdout, proc.stdout
    home = cloud_state / "tpus" / "us-central2-b" / "ship" / "worker-0"
    assert (home / "adm_jax" / "notes.txt").read_text() == "not committed\n"
    assert (home / "adm_jax" / "configs" / "tiny.py").read_text().endswith("uncommitted edit\n")
    assert not (home / "adm_jax" / ".git").exists()
    assert (home / "adm_jax_venv" / "bin" / "python").exists()
    assert run(f"{SCRIPT} delete", clone, env).returncode == 0
