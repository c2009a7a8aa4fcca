"""Soak: train configs/tiny.py as 4 real JAX processes, kill it again and again, and check that
nothing was lost.

    python tests/soak.py --cycles 20 --seed 0            # the long run (docs/robustness.md)

Each cycle starts the job (resuming from its last checkpoint), waits a seeded random moment
after it trains again, and then, chosen by the seeded generator:

* ``sigkill_one``: SIGKILL of one process (a lost VM); the others must exit on their own;
* ``sigterm_all``: SIGTERM to every process at staggered times (a maintenance notice reaching
  the hosts one after another): they stop together at one step and save;
* ``kill_in_save``: SIGKILL of every process while a checkpoint is being written (an Orbax
  temporary directory exists);
* ``kill_in_export``: no training in that cycle: ``--mode=export`` of the workdir's newest
  step, SIGKILLed a seeded moment (0-0.3 s) after it starts writing ``export/step_<N>``, then
  run again; the rerun must succeed and hold exactly what an export nobody killed holds
  (params bitwise, model.json equal, nothing else in the folder). A kill that came after the
  export was complete: the rerun must refuse to write over it (exit code 2), and the export
  is compared as it stands. Drawn only once a complete step exists.

Then the job runs to the end, and the harness checks against an uninterrupted 4-process run:
final params, EMA params and optimizer state bitwise equal (same process count, so the same
step order), metrics.jsonl with every step exactly once, and no checkpoint directory that is
not a complete step. It prints one summary line per cycle and the totals (seconds of work lost
per kill, checkpoint bytes written again). Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NUM_PROCESSES = 4
TOTAL_DEVICES = 8
LAUNCH_DEADLINE = 420  # seconds one launch may take (startup, compile, its steps)
EXIT_BOUND = 90  # seconds within which every process must exit after a kill
KINDS = ("sigkill_one", "sigterm_all", "kill_in_save", "kill_in_export")
TRAIN_KINDS = KINDS[:3]
EXPORT_DEADLINE = 300  # seconds one export may take
# configs/tiny.py with one resolution level, as tests/test_multiprocess.py: compiling the step
# in every process dominates on a small machine.
SMALL_MODEL = {"model.channel_mult": "1", "model.attention_resolutions": "16"}


class SoakFailure(AssertionError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """The N processes of one launch; each one's output in ``logdir/<name>.<i>.log``."""

    def __init__(self, name: str, argv: list[str], logdir: pathlib.Path):
        self.name, port = name, _free_port()
        self.procs, self.logs = [], []
        per_process = TOTAL_DEVICES // NUM_PROCESSES
        for i in range(NUM_PROCESSES):
            env = dict(
                os.environ,
                JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={per_process}",
                PYTHONPATH=str(REPO),
                PYTHONUNBUFFERED="1",
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES=str(NUM_PROCESSES),
                JAX_PROCESS_ID=str(i),
                JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
            )
            log = logdir / f"{name}.{i}.log"
            self.logs.append(log)
            with open(log, "w") as f:
                self.procs.append(
                    subprocess.Popen(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
                )

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def wait(self, timeout: float) -> list[int]:
        deadline = time.time() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                self.kill()
                raise SoakFailure(
                    f"{self.name}: still running after {timeout} s\n{self.tail()}"
                ) from None
        return [p.returncode for p in self.procs]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def tail(self, n: int = 2000) -> str:
        return "\n".join(f"--- {log.name}:\n{log.read_text()[-n:]}" for log in self.logs)

    def text(self, i: int = 0) -> str:
        return self.logs[i].read_text()


def build_tiny_dataset(root: pathlib.Path) -> str:
    """tiny_images as tests/conftest.py builds it: 32 train / 8 validation 16x16 PNGs."""
    import numpy as np
    from PIL import Image

    from adm_jax.data import build_image_folder_dataset

    rng = np.random.default_rng(0)
    dirs = {}
    for split, n in (("train", 32), ("validation", 8)):
        for i in range(n):
            d = root / "png" / split / f"class_{i % 4}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / f"{i}.png")
        dirs[split] = str(root / "png" / split)
    build_image_folder_dataset(dirs, str(root / "tfds"), "tiny_images")
    return str(root / "tfds")


def overrides(data_dir: str, num_steps: int) -> dict:
    return {
        **SMALL_MODEL,
        "data.data_dir": data_dir,
        "train.num_steps": num_steps,
        "train.log_every": 1,
        "train.checkpoint_every": 2,
        "train.eval_every": 0,
        "train.sample_every": 0,
        "train.max_to_keep": 2,
        "train.tensorboard": False,
    }


def train_argv(workdir: pathlib.Path, flags: dict) -> list[str]:
    return [
        sys.executable, "-m", "adm_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
        "--mode=train", "--heartbeat_timeout=20",
        *(f"--config.{k}={v}" for k, v in flags.items()),
    ]  # fmt: skip


def metric_rows(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass  # a line being appended
    return rows


def launch_step(job: Job) -> int:
    """The last step this launch trained (its process 0's log; metrics.jsonl still holds the
    rows of the previous, killed launch until this one drops them)."""
    found = re.findall(r"logging_writer\.py:\d+\] \[(\d+)\] .*train/loss=", job.text(0))
    return int(found[-1]) if found else 0


def checkpoint_dir(workdir: pathlib.Path) -> pathlib.Path:
    return workdir / "checkpoints"


def complete_steps(workdir: pathlib.Path) -> list[int]:
    d = checkpoint_dir(workdir)
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def saving_now(workdir: pathlib.Path) -> bool:
    d = checkpoint_dir(workdir)
    return d.is_dir() and any(".orbax-checkpoint-tmp" in p.name for p in d.iterdir())


def saves_logged(job: Job) -> list[int]:
    """The steps a launch started saving (the loop's log line, not Orbax's own)."""
    return [int(s) for s in re.findall(r"loop\.py:\d+\] Saving checkpoint at step (\d+)",
                                       job.text(0))]  # fmt: skip


def resumed_from(job: Job) -> int:
    found = re.findall(r"Resumed from \S+/checkpoints/(\d+)", job.text(0))
    return int(found[-1]) if found else 0


def wait_until(predicate, job: Job, timeout: float, what: str, poll: float = 0.05) -> bool:
    """Polls ``predicate``; False if the job ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if not job.running():
            return False
        time.sleep(poll)
    job.kill()
    raise SoakFailure(f"{job.name}: {what} did not happen within {timeout} s\n{job.tail()}")


def run_cycle(
    index: int, kind: str, rng: random.Random, workdir, flags, logdir, step_seconds: float
) -> dict:
    """One launch, killed the ``kind`` way at a random moment (up to about 8 steps after its
    first), returns what happened."""
    start_step = max(complete_steps(workdir), default=0)
    job = Job(f"cycle{index:02d}", train_argv(workdir, flags), logdir)
    started = time.time()
    trains = wait_until(lambda: launch_step(job) > start_step, job, LAUNCH_DEADLINE,
                        "a training step")  # fmt: skip
    record = {"cycle": index, "kind": kind, "from_step": start_step, "caught": False}
    if trains:
        if kind == "kill_in_save":
            record["caught"] = wait_until(lambda: saving_now(workdir), job, LAUNCH_DEADLINE,
                                          "a checkpoint save", poll=0.005)  # fmt: skip
        else:
            time.sleep(rng.uniform(0.0, 8 * max(step_seconds, 0.5)))
        record["steps_done"] = launch_step(job)
        if kind == "sigkill_one":
            victim = rng.randrange(NUM_PROCESSES)
            job.procs[victim].send_signal(signal.SIGKILL)
            record["victim"] = victim
        elif kind == "sigterm_all":
            for p in rng.sample(job.procs, len(job.procs)):
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                time.sleep(rng.uniform(0.0, 1.0))
        else:
            for p in job.procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
        record["killed_at"] = time.time() - started
    codes = job.wait(EXIT_BOUND if trains else LAUNCH_DEADLINE)
    record.update(codes=codes, saves=saves_logged(job), end_step=max(complete_steps(workdir),
                  default=0), resumed=resumed_from(job))  # fmt: skip
    if kind == "sigterm_all" and trains and any(c not in (0, -signal.SIGTERM) for c in codes):
        raise SoakFailure(f"{job.name}: SIGTERM exit codes {codes}\n{job.tail()}")
    return record


def export_argv(workdir: pathlib.Path, flags: dict) -> list[str]:
    return [
        sys.executable, "-m", "adm_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
        "--mode=export", *(f"--config.{k}={v}" for k, v in flags.items()),
    ]  # fmt: skip


def _export_phase(out: pathlib.Path) -> str:
    """How far an export into ``out`` got: nothing / orbax_tmp (arrays being written) /
    params_only (arrays complete, model.json not yet written) / complete."""
    if (out / "model.json").exists():
        return "complete"
    if (out / "params").exists():
        return "params_only"
    if out.is_dir() and any(out.iterdir()):
        return "orbax_tmp"
    return "nothing"


def _tree_bytes(folder: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def export_cycle(index: int, rng: random.Random, workdir, flags, logdir) -> dict:
    """``kill_in_export``: an export of the newest step SIGKILLed while it writes, rerun, and
    compared with an export nobody killed (made in this process, into another folder)."""
    import shutil

    import jax
    import numpy as np

    from adm_jax import checkpoints, train
    from configs import tiny

    step = max(complete_steps(workdir))
    out = workdir / "export" / f"step_{step:08d}"
    shutil.rmtree(workdir / "export", ignore_errors=True)  # an earlier cycle's export
    argv = export_argv(workdir, flags)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    record = {"cycle": index, "kind": "kill_in_export", "from_step": step, "caught": False}
    log = logdir / f"cycle{index:02d}.export.log"
    started = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + EXPORT_DEADLINE
        while proc.poll() is None and not out.is_dir() and time.time() < deadline:
            time.sleep(0.002)
        while proc.poll() is None and _export_phase(out) == "nothing" and time.time() < deadline:
            time.sleep(0.002)
        if time.time() >= deadline:
            raise SoakFailure(f"export: did not start writing within {EXPORT_DEADLINE} s")
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        record["killed_at"] = time.time() - started
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    record["codes"] = [proc.returncode]
    # What the kill left; "complete": it came after the last write (then a rerun refuses to
    # overwrite a complete export, and that export is what is compared).
    record["phase_at_kill"] = _export_phase(out)
    record["caught"] = record["phase_at_kill"] != "complete"
    t0 = time.time()
    with open(logdir / f"cycle{index:02d}.export_rerun.log", "w") as f:
        rerun = subprocess.run(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                               timeout=EXPORT_DEADLINE)  # fmt: skip
    record["rerun_seconds"] = time.time() - t0
    if rerun.returncode != (0 if record["caught"] else 2):
        tail = (logdir / f"cycle{index:02d}.export_rerun.log").read_text()[-2000:]
        raise SoakFailure(
            f"cycle {index}: export rerun after a kill left "
            f"{record['phase_at_kill']}: exit code {rerun.returncode}\n{tail}"
        )
    config = tiny.get_config()
    config.update_from_flattened_dict(flags)
    unkilled = train.export(config, str(workdir), str(logdir.parent / "exports" / f"{index:02d}"))
    a = checkpoints.load_inference_checkpoint(out)
    b = checkpoints.load_inference_checkpoint(unkilled)
    meta = lambda c: (c.kind, c.model_kwargs, c.diffusion_kwargs, c.extra)  # noqa: E731
    if meta(a) != meta(b):
        raise SoakFailure(f"cycle {index}: {out}/model.json differs: {meta(a)} != {meta(b)}")
    leaves_a, leaves_b = jax.tree.leaves(jax.device_get(a.params)), jax.tree.leaves(
        jax.device_get(b.params))  # fmt: skip
    if len(leaves_a) != len(leaves_b) or not all(
        np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b, strict=True)
    ):
        raise SoakFailure(f"cycle {index}: {out} params differ from an export nobody killed")
    if sorted(p.name for p in out.iterdir()) != ["model.json", "params"]:
        raise SoakFailure(f"cycle {index}: {out} holds {sorted(p.name for p in out.iterdir())}")
    record.update(end_step=step, saves=[], resumed=step, export_bytes=_tree_bytes(out))
    return record


def restore_state(workdir, flags):
    """The final TrainState of ``workdir``, on this process's devices."""
    import jax

    from adm_jax.checkpoints import training as checkpointing
    from adm_jax.train import state as state_lib
    from configs import tiny

    config = tiny.get_config()
    config.update_from_flattened_dict(flags)
    ckpt = checkpointing.Checkpointer(str(workdir), max_to_keep=None, read_only=True)
    try:
        state, _ = ckpt.restore(state_lib.replicated_abstract_state(config))
    finally:
        ckpt.close()
    return jax.device_get(state)


def soak(
    cycles: int, seed: int, root: pathlib.Path, num_steps: int | None = None, kinds=None
) -> dict:
    """Runs the soak in ``root``; returns the figures; raises SoakFailure on a failed check.
    ``kinds``: the kill of cycle i is ``kinds[i % len(kinds)]`` (default: seeded choice)."""
    import jax
    import numpy as np

    rng = random.Random(seed)
    num_steps = num_steps or 8 * cycles + 8
    data_dir = build_tiny_dataset(root / "data")
    flags = overrides(data_dir, num_steps)
    logdir = root / "logs"
    logdir.mkdir(parents=True, exist_ok=True)

    reference = root / "uninterrupted"
    t0 = time.time()
    job = Job("uninterrupted", train_argv(reference, flags), logdir)
    if job.wait(LAUNCH_DEADLINE + 10 * num_steps) != [0] * NUM_PROCESSES:
        raise SoakFailure(f"uninterrupted run failed\n{job.tail()}")
    reference_seconds = time.time() - t0
    reference_saves = saves_logged(job)
    step_seconds = _step_seconds(reference)

    soaked = root / "soaked"
    records = []
    for index in range(cycles):
        kind = kinds[index % len(kinds)] if kinds else rng.choice(KINDS)
        if kind == "kill_in_export" and not complete_steps(soaked):
            kind = rng.choice(TRAIN_KINDS)  # nothing to export yet
        finished = complete_steps(soaked) and max(complete_steps(soaked)) >= num_steps
        if finished and kind != "kill_in_export":
            break
        if kind == "kill_in_export":
            records.append(export_cycle(index, rng, soaked, flags, logdir))
        else:
            records.append(run_cycle(index, kind, rng, soaked, flags, logdir, step_seconds))
        r = records[-1]
        detail = ""
        if kind == "kill_in_save":
            detail = f", inside a save: {r['caught']}"
        elif kind == "kill_in_export":
            detail = (f", export left {r['phase_at_kill']}, rerun {r['rerun_seconds']:.1f} s, "
                      "equal to an unkilled export")  # fmt: skip
        print(f"cycle {index:2d} {kind:<14} from step {r['from_step']:3d}: killed at "
              f"{r.get('killed_at', float('nan')):5.1f} s, step {r.get('steps_done', '-')}, "
              f"exit codes {r['codes']}, newest checkpoint {r['end_step']}{detail}",
              flush=True)  # fmt: skip
    final = Job("final", train_argv(soaked, flags), logdir)
    if final.wait(LAUNCH_DEADLINE + 10 * num_steps) != [0] * NUM_PROCESSES:
        raise SoakFailure(f"the final launch failed\n{final.tail()}")

    # Every step once in metrics.jsonl.
    steps = [r["step"] for r in metric_rows(soaked) if "train/loss" in r]
    if sorted(steps) != list(range(1, num_steps + 1)):
        missing = sorted(set(range(1, num_steps + 1)) - set(steps))
        twice = sorted({s for s in steps if steps.count(s) > 1})
        raise SoakFailure(f"metrics.jsonl: missing steps {missing}, repeated steps {twice}")
    # No half-written checkpoint left behind.
    from adm_jax.checkpoints import tools as checkpoint_tools

    entries = checkpoint_tools.list_checkpoints(soaked)
    leftovers = [e.name for e in entries if not e.complete]
    if leftovers:
        raise SoakFailure(f"{checkpoint_dir(soaked)}: incomplete entries left: {leftovers}")
    # Bitwise the uninterrupted run's final state (params, EMA, optimizer, step).
    expected, actual = restore_state(reference, flags), restore_state(soaked, flags)
    mismatches = [
        jax.tree_util.keystr(path)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual),
                                jax.tree.leaves(expected), strict=True)
        if not np.array_equal(np.asarray(a), np.asarray(b))
    ]  # fmt: skip
    if mismatches:
        raise SoakFailure(f"final state differs from the uninterrupted run at {mismatches[:5]}")
    # Losses of every step equal too (the rows of the steps trained again included).
    ref_losses = {r["step"]: r["train/loss"] for r in metric_rows(reference) if "train/loss" in r}
    losses = {r["step"]: r["train/loss"] for r in metric_rows(soaked) if "train/loss" in r}
    if losses != ref_losses:
        bad = [s for s in ref_losses if losses.get(s) != ref_losses[s]]
        raise SoakFailure(f"train/loss differs from the uninterrupted run at steps {bad[:10]}")

    kills = [r for r in records if "killed_at" in r]
    train_records = [r for r in records if r["kind"] != "kill_in_export"]
    lost_steps = []
    for r, nxt in zip(train_records, [*train_records[1:], None], strict=False):
        if "killed_at" not in r:
            continue
        restart = resumed_from(final) if nxt is None else nxt["from_step"]
        lost_steps.append(max(r["steps_done"] - restart, 0))
    exports = [r for r in kills if r["kind"] == "kill_in_export"]
    checkpoint_bytes = max((e.size_bytes for e in entries), default=0)
    soak_saves = sum(len(r["saves"]) for r in records) + len(saves_logged(final))
    figures = {
        "cycles": len(records),
        "kills": len(kills),
        "kinds": {k: sum(r["kind"] == k for r in kills) for k in KINDS},
        "kills_inside_a_save": sum(r["caught"] for r in kills if r["kind"] == "kill_in_save"),
        "exports_killed_while_writing": sum(r["caught"] for r in exports),
        "export_phase_at_kill": [r["phase_at_kill"] for r in exports],
        "export_rerun_seconds": [round(r["rerun_seconds"], 1) for r in exports],
        "export_bytes": max((r["export_bytes"] for r in exports), default=0),
        "export_bytes_rewritten": sum(r["export_bytes"] for r in exports if r["caught"]),
        "num_steps": num_steps,
        "seconds_per_step": round(step_seconds, 3),
        "steps_lost_per_kill": lost_steps,
        "mean_seconds_lost_per_kill": round(
            step_seconds * sum(lost_steps) / max(len(lost_steps), 1), 2
        ),
        "checkpoint_bytes": checkpoint_bytes,
        "extra_saves": soak_saves - len(reference_saves),
        "bytes_rewritten_estimate": (soak_saves - len(reference_saves)) * checkpoint_bytes,
        "uninterrupted_seconds": round(reference_seconds, 1),
        "bitwise_equal": True,
    }
    return figures


def _step_seconds(workdir: pathlib.Path) -> float:
    """Median seconds per training step of a run (its perf/step_time rows)."""
    times = sorted(r["perf/step_time"] for r in metric_rows(workdir) if "perf/step_time" in r)
    return times[len(times) // 2] if times else 0.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_steps", type=int, default=None, help="default: 8 * cycles + 8")
    parser.add_argument("--root", default=None, help="working folder (default: a new temp dir)")
    args = parser.parse_args(argv)
    root = pathlib.Path(args.root or tempfile.mkdtemp(prefix="adm_jax_soak_"))
    started = time.time()
    try:
        figures = soak(args.cycles, args.seed, root, args.num_steps)
    except SoakFailure as err:
        print(f"SOAK FAILED: {err}", file=sys.stderr)
        return 1
    figures["wall_seconds"] = round(time.time() - started, 1)
    print("SOAK OK " + json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
