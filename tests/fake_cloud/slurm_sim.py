"""A simulated SLURM cluster on this machine, behind the real command names (sbatch, srun,
squeue, scontrol, scancel in this folder), for testing launch/slurm_gpu.sh end to end.

What is real: the processes (the batch script runs as a process, srun starts one process per
task), the environment variables SLURM gives a batch step and a step's tasks (what jax's SLURM
detection reads), the output file, signals (--signal, scancel --signal, preemption) and
requeue (the batch script runs again with SLURM_RESTART_COUNT incremented). What is simulated:
every node is this machine. Node names are 127.0.0.1, 127.0.0.2, ... (the job's node list reads
``127.0.0.[1-2]``, the bracket form real clusters print), so the first node's name, from which
jax derives the coordinator address, is an address of this machine with no name lookup. The
nodes have no GPU: each GPU of --gpus-per-node is one simulated XLA CPU device, and tasks run
with JAX_PLATFORMS=cpu and gloo collectives. Time limits are not enforced; the warning signal
of --signal is delivered on request (``time-limit-warning``).

The controller's state (one JSON file per job) lives in $FAKE_SLURM_STATE. Test-only
commands, for events the cluster causes rather than the user:

    python tests/fake_cloud/slurm_sim.py preempt JOBID            # PreemptMode=REQUEUE
    python tests/fake_cloud/slurm_sim.py time-limit-warning JOBID  # the --signal, as at the limit
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

STATE_ENV = "FAKE_SLURM_STATE"
# Seconds between SIGTERM and SIGKILL when a job or step is ended (slurm.conf KillWait), and
# a preempted job's time to save before SIGKILL (GraceTime); environment overrides for tests.
KILL_WAIT = float(os.environ.get("FAKE_SLURM_KILL_WAIT", "30"))
GRACE_TIME = float(os.environ.get("FAKE_SLURM_GRACE_TIME", "120"))
ACTIVE_STATES = ("PENDING", "RUNNING")


class SlurmError(Exception):
    """A usage error: the command prints it as one line and exits 1 (as the real CLI)."""


# ---------------------------------------------------------------------------------------------
# Controller state


def state_dir() -> Path:
    path = os.environ.get(STATE_ENV)
    if not path:
        raise SlurmError(
            f"{STATE_ENV} is unset: point it at a directory for the simulated cluster's state"
        )
    (Path(path) / "jobs").mkdir(parents=True, exist_ok=True)
    return Path(path)


@contextlib.contextmanager
def _locked(name: str):
    with open(state_dir() / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _job_path(job_id: int) -> Path:
    return state_dir() / "jobs" / f"{job_id}.json"


def load_job(job_id: int) -> dict:
    path = _job_path(job_id)
    if not path.exists():
        raise SlurmError(f"Invalid job id specified: {job_id}")
    return json.loads(path.read_text())


def update_job(job_id: int, change=None, **changes) -> dict:
    """Read-modify-write under the job's lock: ``change(job)`` edits in place, then ``changes``."""
    with _locked(f"job{job_id}"):
        job = load_job(job_id)
        if change:
            change(job)
        job.update(changes)
        tmp = _job_path(job_id).with_suffix(".tmp")
        tmp.write_text(json.dumps(job, indent=1))
        tmp.replace(_job_path(job_id))
        return job


def all_jobs() -> list[dict]:
    paths = sorted((state_dir() / "jobs").glob("*.json"), key=lambda p: int(p.stem))
    return [json.loads(p.read_text()) for p in paths]


def _port_is_free(port: int) -> bool:
    for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::")):
        with socket.socket(family) as s:
            try:
                s.bind((address, port))
            except OSError as err:
                if family == socket.AF_INET6 and err.errno == errno.EAFNOSUPPORT:  # no IPv6 here
                    continue
                return False
    return True


def coordinator_port(job_id: int) -> int:
    """The port jax's SlurmCluster derives from the job id (jax/_src/clusters/slurm_cluster.py)."""
    return job_id % 2**12 + (65535 - 2**12 + 1)


def _next_job_id() -> int:
    """Sequential ids, skipping those whose coordinator port is taken on this machine (a real
    node is fresh; this machine also runs other tests)."""
    with _locked("jobid"):
        counter = state_dir() / "last_job_id"
        job_id = int(counter.read_text()) if counter.exists() else 1000
        while True:
            job_id += 1
            if _port_is_free(coordinator_port(job_id)):
                break
        counter.write_text(str(job_id))
        return job_id


# ---------------------------------------------------------------------------------------------
# Options


def node_names(count: int) -> list[str]:
    return [f"127.0.0.{i + 1}" for i in range(count)]


def compressed_nodelist(count: int) -> str:
    return "127.0.0.1" if count == 1 else f"127.0.0.[1-{count}]"


# sbatch options this simulation implements: name -> (takes a value, short form).
SBATCH_OPTIONS = {
    "nodes": (True, "N"),
    "gpus-per-node": (True, None),
    "ntasks-per-node": (True, None),
    "job-name": (True, "J"),
    "output": (True, "o"),
    "open-mode": (True, None),
    "signal": (True, None),
    "time": (True, "t"),
    "requeue": (False, None),
    "no-requeue": (False, None),
    "exclusive": (False, None),
    "parsable": (False, None),
}
SRUN_OPTIONS = {
    "nodes": (True, "N"),
    "ntasks": (True, "n"),
    "ntasks-per-node": (True, None),
    "kill-on-bad-exit": (None, "K"),  # optional value
}


def parse_options(command: str, argv: list[str], spec: dict) -> tuple[dict, list[str]]:
    """Options up to the first non-option argument (the script or the program); returns
    (options, the rest). Unknown options are refused in one line."""
    shorts = {short: name for name, (_, short) in spec.items() if short}
    options, i = {}, 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        arg = argv[i]
        if arg.startswith("--"):
            name, has_value, value = arg[2:].partition("=")
        else:
            name, value = shorts.get(arg[1:2], arg[1:2]), arg[2:]
            has_value = bool(value)
        if name not in spec:
            raise SlurmError(
                f"unrecognized option '{arg}' (this simulated {command} implements: "
                + ", ".join(f"--{n}" for n in spec)
                + ")"
            )
        takes_value = spec[name][0]
        if takes_value is True and not has_value:
            i += 1
            if i == len(argv):
                raise SlurmError(f"option '--{name}' requires an argument")
            value = argv[i]
        elif takes_value is False and has_value:
            raise SlurmError(f"option '--{name}' doesn't allow an argument")
        options[name] = value if (takes_value or has_value) else True
        i += 1
    return options, argv[i:]


def script_directives(script: str) -> list[str]:
    """The #SBATCH lines' arguments: sbatch reads them up to the first command line."""
    args = []
    for line in Path(script).read_text().splitlines()[1:]:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        if stripped.startswith("#SBATCH"):
            args += shlex.split(stripped[len("#SBATCH") :], comments=True)
    return args


def _positive_int(options: dict, name: str, default: int) -> int:
    value = options.get(name, default)
    if name == "gpus-per-node":
        value = str(value).rsplit(":", 1)[-1]  # --gpus-per-node=h100:8
    if not str(value).isdigit() or int(value) < 1:
        raise SlurmError(f"invalid --{name} '{value}': expected a positive integer")
    return int(value)


def parse_signal(spec: str) -> dict:
    """--signal=[{R|B}:]<sig_num>[@sig_time] -> {signal, seconds, batch_only}."""
    match = re.fullmatch(r"(?:([RB]+):)?([A-Z0-9]+)(?:@(\d+))?", spec)
    if not match:
        raise SlurmError(f"invalid --signal specification '{spec}'")
    flags, name, seconds = match.groups()
    try:
        number = int(name) if name.isdigit() else signal.Signals[f"SIG{name}"].value
    except KeyError:
        raise SlurmError(f"invalid --signal specification '{spec}': unknown signal") from None
    return {"signal": number, "seconds": int(seconds or 60), "batch_only": "B" in (flags or "")}


# ---------------------------------------------------------------------------------------------
# sbatch and the controller


def sbatch(argv: list[str]) -> int:
    options, rest = parse_options("sbatch", argv, SBATCH_OPTIONS)
    if not rest:
        raise SlurmError("sbatch: a batch script is required (sbatch [options] script [args])")
    script, script_args = rest[0], rest[1:]
    if not Path(script).is_file():
        raise SlurmError(f"Unable to open file {script}")
    if not Path(script).read_text().startswith("#!"):
        raise SlurmError(
            "This does not look like a batch script.  The first line must start with #!"
        )
    directives, _ = parse_options("sbatch", script_directives(script), SBATCH_OPTIONS)
    options = {**directives, **options}  # the command line wins over #SBATCH lines
    nodes = _positive_int(options, "nodes", 1)
    job_id = _next_job_id()
    name = options.get("job-name", Path(script).name)
    submit_dir = os.getcwd()
    output = options.get("output", "slurm-%j.out").replace("%j", str(job_id)).replace("%x", name)
    if options.get("open-mode", "truncate") not in ("append", "truncate"):
        raise SlurmError(f"invalid --open-mode '{options['open-mode']}': append or truncate")
    spool = state_dir() / "spool" / f"job{job_id}"
    spool.mkdir(parents=True)
    # Like slurmd: the job runs a copy of the script made at submission, from the spool folder.
    shutil.copy(script, spool / "slurm_script")
    (spool / "slurm_script").chmod(0o755)
    job = {
        "job_id": job_id,
        "name": name,
        "nodes": nodes,
        "gpus_per_node": _positive_int(options, "gpus-per-node", 1)
        if "gpus-per-node" in options
        else 0,
        "ntasks_per_node": _positive_int(options, "ntasks-per-node", 1),
        # Requeued by a preemption only with --requeue (a cluster with JobRequeue=0);
        # never requeued, not even by scontrol, with --no-requeue.
        "requeue": "requeue" in options and "no-requeue" not in options,
        "no_requeue": "no-requeue" in options,
        "signal": parse_signal(options["signal"]) if "signal" in options else None,
        "open_mode": options.get("open-mode", "truncate"),
        "output": str(Path(submit_dir, output)),
        "script": str(spool / "slurm_script"),
        "script_args": script_args,
        "submit_dir": submit_dir,
        "environment": dict(os.environ),  # --export=ALL, the default
        "state": "PENDING",
        "restart_count": 0,
        "exit_code": None,
        "batch_pid": None,
        "steps": {},
        "next_step": 0,
        "end_request": None,  # "requeue" | "cancel", with "end_deadline"
    }
    _job_path(job_id).write_text(json.dumps(job, indent=1))
    with open(spool / "controller.log", "w") as log:
        subprocess.Popen(
            [sys.executable, __file__, "_controller", str(job_id)],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    print(job_id if "parsable" in options else f"Submitted batch job {job_id}", flush=True)
    return 0


def batch_environment(job: dict) -> dict:
    n, job_id = job["nodes"], str(job["job_id"])
    tasks_per_node = job["ntasks_per_node"]
    env = dict(job["environment"])
    env.update(
        SLURM_JOB_ID=job_id,
        SLURM_JOBID=job_id,
        SLURM_JOB_NAME=job["name"],
        SLURM_JOB_NUM_NODES=str(n),
        SLURM_NNODES=str(n),
        SLURM_JOB_NODELIST=compressed_nodelist(n),
        SLURM_NODELIST=compressed_nodelist(n),
        SLURM_NODEID="0",
        SLURMD_NODENAME=node_names(n)[0],
        SLURM_SUBMIT_DIR=job["submit_dir"],
        SLURM_SUBMIT_HOST=socket.gethostname(),
        SLURM_CLUSTER_NAME="fake",
        SLURM_JOB_PARTITION="gpu",
        SLURM_NTASKS=str(n * tasks_per_node),
        SLURM_NPROCS=str(n * tasks_per_node),
        SLURM_NTASKS_PER_NODE=str(tasks_per_node),
        SLURM_TASKS_PER_NODE=f"{tasks_per_node}(x{n})" if n > 1 else str(tasks_per_node),
        SLURM_JOB_CPUS_PER_NODE=f"{os.cpu_count()}(x{n})" if n > 1 else str(os.cpu_count()),
        SLURM_CPUS_ON_NODE=str(os.cpu_count()),
    )
    if job["gpus_per_node"]:
        gpus = job["gpus_per_node"]
        env.update(
            SLURM_GPUS_ON_NODE=str(gpus),
            SLURM_GPUS_PER_NODE=str(gpus),
            CUDA_VISIBLE_DEVICES=",".join(map(str, range(gpus))),
        )
    if job["restart_count"]:
        env["SLURM_RESTART_COUNT"] = str(job["restart_count"])
    for name in ("SLURM_STEP_ID", "SLURM_STEPID", "SLURM_STEP_NODELIST", "SLURM_STEP_NUM_NODES"):
        env.pop(name, None)  # the batch step is not an srun step
    return env


def _signal_group(pgid: int | None, sig: int) -> None:
    if pgid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def controller(job_id: int) -> int:
    """Runs the batch script; reruns it after a requeue; ends the job's processes."""
    while True:
        job = update_job(job_id, state="RUNNING", steps={}, end_request=None)
        mode = "a" if job["open_mode"] == "append" else "w"
        with open(job["output"], mode) as out:
            batch = subprocess.Popen(
                [job["script"], *job["script_args"]],
                cwd=job["submit_dir"],
                env=batch_environment(job),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        update_job(job_id, batch_pid=batch.pid)
        killed = False
        while batch.poll() is None:
            job = load_job(job_id)
            if job["end_request"] and not killed and time.time() > job["end_deadline"]:
                _signal_group(batch.pid, signal.SIGKILL)  # KillWait / GraceTime is over
                killed = True
            time.sleep(0.1)
        # The job ends with its batch script: whatever it left running (steps) is killed.
        _signal_group(batch.pid, signal.SIGKILL)
        job = load_job(job_id)
        if job["end_request"] == "requeue":
            update_job(job_id, state="PENDING", restart_count=job["restart_count"] + 1)
            continue
        if job["end_request"] == "cancel":
            state = "CANCELLED"
        else:
            state = "COMPLETED" if batch.returncode == 0 else "FAILED"
        update_job(job_id, state=state, exit_code=batch.returncode, batch_pid=None)
        return 0


def _active_job(job_id: int) -> dict:
    job = load_job(job_id)
    if job["state"] not in ACTIVE_STATES:
        raise SlurmError(f"Job/step already completing or completed: {job_id}")
    return job


def _step_pids(job: dict) -> list[int]:
    return [pid for step in job["steps"].values() for pid in step["pids"]]


def _signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def end_job(job_id: int, request: str, wait: float) -> None:
    """SIGTERM to the batch script and every step; SIGKILL after ``wait`` seconds; then the
    controller cancels or requeues the job."""
    job = _active_job(job_id)
    update_job(job_id, end_request=request, end_deadline=time.time() + wait)
    _signal_pids(_step_pids(job), signal.SIGTERM)
    if job["batch_pid"]:
        _signal_pids([job["batch_pid"]], signal.SIGTERM)


# ---------------------------------------------------------------------------------------------
# srun


def srun(argv: list[str]) -> int:
    if "SLURM_JOB_ID" not in os.environ:
        raise SlurmError("this simulated srun runs inside a batch job only (SLURM_JOB_ID unset)")
    options, command = parse_options("srun", argv, SRUN_OPTIONS)
    if not command:
        raise SlurmError("srun: no command given")
    job_id = int(os.environ["SLURM_JOB_ID"])
    job = load_job(job_id)
    nodes = _positive_int(options, "nodes", job["nodes"])
    if nodes > job["nodes"]:
        raise SlurmError(f"--nodes={nodes}: the job has {job['nodes']} node(s)")
    per_node = _positive_int(options, "ntasks-per-node", job["ntasks_per_node"])
    ntasks = _positive_int(options, "ntasks", nodes * per_node)
    kill_on_bad_exit = str(options.get("kill-on-bad-exit", "0")) not in ("0",)
    step_id = update_job(job_id, lambda j: j.update(next_step=j["next_step"] + 1))["next_step"] - 1
    gpus = job["gpus_per_node"]
    names = node_names(nodes)
    tasks = []
    for rank in range(ntasks):
        node = rank // per_node
        env = dict(os.environ)
        env.update(
            SLURM_STEP_ID=str(step_id),
            SLURM_STEPID=str(step_id),
            SLURM_STEP_NODELIST=compressed_nodelist(nodes),
            SLURM_STEP_NUM_NODES=str(nodes),
            SLURM_STEP_NUM_TASKS=str(ntasks),
            SLURM_STEP_TASKS_PER_NODE=f"{per_node}(x{nodes})" if nodes > 1 else str(per_node),
            SLURM_NTASKS=str(ntasks),
            SLURM_NPROCS=str(ntasks),
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank % per_node),
            SLURM_NODEID=str(node),
            SLURMD_NODENAME=names[node],
            SLURM_TOPOLOGY_ADDR=names[node],
            # The simulated nodes are CPUs: each GPU is one XLA CPU device, collectives on gloo.
            JAX_PLATFORMS="cpu",
            JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
            XLA_FLAGS=_with_device_count(env.get("XLA_FLAGS", ""), max(gpus, 1)),
        )
        tasks.append(subprocess.Popen(command, env=env))
    pids = [t.pid for t in tasks]
    update_job(job_id, lambda j: j["steps"].update({str(step_id): {"pids": pids}}))

    def forward(signum, frame):  # srun passes the signals it receives to its tasks
        _signal_pids([t.pid for t in tasks if t.poll() is None], signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(sig, forward)
    terminated_at = None
    while any(t.poll() is None for t in tasks):
        bad = [i for i, t in enumerate(tasks) if t.poll() not in (None, 0)]
        if kill_on_bad_exit and bad and terminated_at is None:
            code = tasks[bad[0]].returncode
            print(f"srun: error: {names[bad[0] // per_node]}: task {bad[0]}: Exited with exit "
                  f"code {code}", file=sys.stderr, flush=True)  # fmt: skip
            print(f"srun: Terminating StepId={job_id}.{step_id}", file=sys.stderr, flush=True)
            _signal_pids([t.pid for t in tasks if t.poll() is None], signal.SIGTERM)
            terminated_at = time.time()
        if terminated_at and time.time() > terminated_at + KILL_WAIT:
            _signal_pids([t.pid for t in tasks if t.poll() is None], signal.SIGKILL)
        time.sleep(0.1)
    update_job(job_id, lambda j: j["steps"].pop(str(step_id), None))
    codes = [t.returncode if t.returncode >= 0 else 128 - t.returncode for t in tasks]
    return max(codes)


def _with_device_count(xla_flags: str, count: int) -> str:
    kept = [f for f in xla_flags.split() if "xla_force_host_platform_device_count" not in f]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={count}"])


# ---------------------------------------------------------------------------------------------
# scancel, scontrol, squeue


def _job_ids(args: list[str], command: str) -> list[int]:
    if not args:
        raise SlurmError(f"{command}: no job identification provided")
    ids = []
    for arg in args:
        if not arg.isdigit():
            raise SlurmError(f"Invalid job id {arg} (this simulation takes numeric job ids)")
        ids.append(int(arg))
    return ids


def scancel(argv: list[str]) -> int:
    spec = {"signal": (True, "s"), "batch": (False, "b"), "full": (False, "f")}
    options, args = parse_options("scancel", argv, spec)
    for job_id in _job_ids(args, "scancel"):
        if "signal" not in options:
            end_job(job_id, "cancel", KILL_WAIT)
            continue
        sig = parse_signal(options["signal"])["signal"]
        job = _active_job(job_id)
        # Steps only by default; --batch: the batch shell only; --full: both.
        if "batch" not in options:
            _signal_pids(_step_pids(job), sig)
        if ("batch" in options or "full" in options) and job["batch_pid"]:
            _signal_pids([job["batch_pid"]], sig)
    return 0


def scontrol(argv: list[str]) -> int:
    if argv[:1] == ["requeue"]:
        for job_id in _job_ids(argv[1:], "scontrol requeue"):
            if load_job(job_id)["no_requeue"]:
                raise SlurmError(f"Requested operation is presently disabled for job {job_id}")
            end_job(job_id, "requeue", KILL_WAIT)
        return 0
    if argv[:2] == ["show", "job"] and len(argv) == 3:
        job = load_job(_job_ids(argv[2:], "scontrol show job")[0])
        code = job["exit_code"] or 0
        fields = {
            "JobId": job["job_id"],
            "JobName": job["name"],
            "JobState": job["state"],
            "Requeue": int(job["requeue"]),
            "Restarts": job["restart_count"],
            "ExitCode": f"{code if code >= 0 else 0}:{-code if code < 0 else 0}",
            "NumNodes": job["nodes"],
            "NodeList": compressed_nodelist(job["nodes"]),
            "StdOut": job["output"],
        }
        print(" ".join(f"{k}={v}" for k, v in fields.items()))
        return 0
    raise SlurmError(
        f"scontrol {' '.join(argv)}: this simulation implements 'requeue JOBID' and "
        "'show job JOBID'"
    )


SQUEUE_FIELDS = {
    "i": lambda j: j["job_id"],
    "j": lambda j: j["name"],
    "T": lambda j: j["state"],
    "t": lambda j: {"RUNNING": "R", "PENDING": "PD"}[j["state"]],
    "D": lambda j: j["nodes"],
    "N": lambda j: compressed_nodelist(j["nodes"]) if j["state"] == "RUNNING" else "",
}


def squeue(argv: list[str]) -> int:
    spec = {
        "jobs": (True, "j"),
        "noheader": (False, "h"),
        "format": (True, "o"),
        "me": (False, None),
    }
    options, rest = parse_options("squeue", argv, spec)
    if rest:
        raise SlurmError(f"squeue: unexpected arguments {rest}")
    wanted = set(_job_ids(options["jobs"].split(","), "squeue")) if "jobs" in options else None
    fmt = options.get("format", "%.18i %.8j %.8t %.6D %N")
    directives = re.findall(r"%\.?\d*([a-zA-Z])", fmt)
    for d in directives:
        if d not in SQUEUE_FIELDS:
            raise SlurmError(f"squeue --format: %{d} is not simulated (use {list(SQUEUE_FIELDS)})")
    jobs = [
        j
        for j in all_jobs()
        if j["state"] in ACTIVE_STATES and (not wanted or j["job_id"] in wanted)
    ]
    if "noheader" not in options:
        headers = {
            "i": "JOBID",
            "j": "NAME",
            "T": "STATE",
            "t": "ST",
            "D": "NODES",
            "N": "NODELIST",
        }
        print(re.sub(r"%\.?\d*([a-zA-Z])", lambda m: headers[m.group(1)], fmt))
    for j in jobs:
        print(re.sub(r"%\.?\d*([a-zA-Z])", lambda m, j=j: str(SQUEUE_FIELDS[m.group(1)](j)), fmt))
    return 0


# ---------------------------------------------------------------------------------------------
# Test-only events


def preempt(job_id: int) -> None:
    """PreemptMode=REQUEUE: SIGTERM to the whole job now, SIGKILL after GraceTime, then the job
    is requeued (cancelled if submitted without --requeue)."""
    job = _active_job(job_id)
    end_job(job_id, "requeue" if job["requeue"] else "cancel", GRACE_TIME)


def time_limit_warning(job_id: int) -> None:
    """The --signal SLURM sends sig_time seconds before the time limit: to the batch shell
    only with B:, else to every step's tasks."""
    job = _active_job(job_id)
    if not job["signal"]:
        raise SlurmError(f"job {job_id} was submitted without --signal")
    sig = job["signal"]["signal"]
    if job["signal"]["batch_only"]:
        _signal_pids([job["batch_pid"]], sig)
    else:
        _signal_pids(_step_pids(job), sig)


COMMANDS = {"sbatch": sbatch, "srun": srun, "squeue": squeue, "scontrol": scontrol}
COMMANDS["scancel"] = scancel


def run_command(name: str, argv: list[str]) -> int:
    """Entry point of the executables in this folder: errors as one line, exit 1."""
    try:
        return COMMANDS[name](argv)
    except SlurmError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 1


def _main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["_controller"]:
            return controller(int(argv[1]))
        if len(argv) == 2 and argv[0] in ("preempt", "time-limit-warning") and argv[1].isdigit():
            (preempt if argv[0] == "preempt" else time_limit_warning)(int(argv[1]))
            return 0
    except SlurmError as err:
        print(f"slurm_sim: error: {err}", file=sys.stderr)
        return 1
    print("usage: slurm_sim.py {preempt|time-limit-warning} JOBID", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
