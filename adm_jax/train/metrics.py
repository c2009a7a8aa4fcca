"""Host-side metric aggregation, throughput/MFU, and the metric writers.

Steps return small dicts of device scalars; ``MetricAccumulator`` keeps them unfetched until a
log step (no per-step host sync) and then reduces them the way the reference logger does:
means over the interval, and per-timestep-quartile means (``loss_q0`` .. ``loss_q3``) from the
per-quartile sums and counts.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import numpy as np
from clu import metric_writers, periodic_actions
from etils import epath

# Peak dense bf16 FLOP/s per JAX device, by device_kind prefix (vendor datasheets). TPU v2/v3
# expose one device per core, v4 and later one per chip.
PEAK_FLOPS = {
    "TPU v2": 22.5e12,
    "TPU v3": 61.5e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA V100": 125e12,
    "NVIDIA L4": 121e12,
}


def peak_flops_per_device(device=None) -> float:
    """Peak FLOP/s of one device, NaN when unknown (CPU)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
        if kind.startswith(prefix):
            return PEAK_FLOPS[prefix]
    return float("nan")


def compiled_flops(compiled) -> float:
    """FLOPs of one execution of a compiled (per-device, SPMD-partitioned) program, from XLA's
    cost analysis; NaN if the backend does not report it."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends raise NotImplementedError
        return float("nan")
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops", float("nan"))
    return float(flops) if flops and flops > 0 else float("nan")


def throughput(*, steps: int, seconds: float, batch_size: int, flops_per_device: float) -> dict:
    """img/s, TFLOP/s per device and MFU over ``steps`` steps lasting ``seconds``."""
    if seconds <= 0 or steps <= 0:
        return {}
    step_time = seconds / steps
    tflops = flops_per_device / step_time / 1e12
    return {
        "img_per_sec": batch_size / step_time,
        "step_time": step_time,
        "tflops_per_device": tflops,
        "mfu": flops_per_device / step_time / peak_flops_per_device(),
    }


class MetricAccumulator:
    """Collects per-step metric dicts (device arrays) and reduces them at log time."""

    def __init__(self):
        self._items: list[dict] = []

    def add(self, metrics: dict) -> None:
        self._items.append(metrics)

    def __len__(self):
        return len(self._items)

    def reduce(self, prefix: str = "") -> dict[str, float]:
        if not self._items:
            return {}
        items = jax.device_get(self._items)
        self._items = []
        out = {}
        keys = items[0].keys()
        counts = np.sum([np.asarray(m["q_count"]) for m in items if "q_count" in m], axis=0)
        for key in keys:
            values = [np.asarray(m[key]) for m in items]
            if key == "q_count":
                continue
            if key.startswith("q_sum/"):
                name = key[len("q_sum/") :]
                total = np.sum(values, axis=0)
                for q in range(4):
                    if counts[q] > 0:
                        out[f"{prefix}{name}_q{q}"] = float(total[q] / counts[q])
            elif key in ("skipped",):
                out[prefix + key] = float(values[-1])
            elif key == "nonfinite_streak":
                out[prefix + "max_nonfinite_streak"] = float(np.max(values))
            else:
                out[prefix + key] = float(np.mean(values))
        return out


class JsonlWriter(metric_writers.MetricWriter):
    """Scalars as JSON lines in ``workdir/metrics.jsonl`` (easy to diff and plot without
    TensorBoard; the resume tests read it).

    Local files are appended to. Object stores (gs://, s3://) cannot append, so there the
    rows are kept and the whole file is rewritten (one write, atomic there) at most every
    ``remote_flush_seconds`` and on ``flush``/``close`` (the loop flushes at every checkpoint,
    so the rows up to a checkpoint survive a preemption).

    ``resume_step``: a resumed run drops the rows after the step it resumed from (steps that
    a killed run logged past its last checkpoint, which this run trains again), so the file
    holds every step once.
    """

    def __init__(self, path, *, remote_flush_seconds: float = 30.0, resume_step: int = 0):
        self._path = epath.Path(path)
        self._remote = "://" in os.fspath(self._path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._rows: list[str] = []
        if self._path.exists():
            rows = self._path.read_text().splitlines()
            kept = [r for r in rows if r.strip() and json.loads(r).get("step", 0) <= resume_step]
            if self._remote:
                self._rows = kept
            if len(kept) != len(rows):
                self._path.write_text("".join(r + "\n" for r in kept))
        self._dirty = False
        self._flush_every = remote_flush_seconds
        self._last_flush = time.monotonic()

    def write_scalars(self, step: int, scalars) -> None:
        row = {"step": int(step)}
        for k, v in scalars.items():
            v = float(np.asarray(v))
            row[k] = v if math.isfinite(v) else str(v)
        line = json.dumps(row)
        if not self._remote:
            with self._path.open("a") as f:
                f.write(line + "\n")
            return
        self._rows.append(line)
        self._dirty = True
        if time.monotonic() - self._last_flush >= self._flush_every:
            self.flush()

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams) -> None:
        pass

    def flush(self):
        if self._remote and self._dirty:
            self._path.write_text("".join(r + "\n" for r in self._rows))
            self._dirty = False
            self._last_flush = time.monotonic()

    def close(self):
        self.flush()


def create_writer(workdir, *, tensorboard: bool = True, resume_step: int = 0):
    """TensorBoard (workdir/) + console + metrics.jsonl on process 0; console-only elsewhere.

    ``tensorboard=False`` skips the event files: they go through TensorFlow's own file system
    layer, which reaches real GCS but no emulator (the object-store tests turn it off).
    """
    workdir = os.fspath(workdir)
    console_only = jax.process_index() > 0 or not tensorboard
    writer = metric_writers.create_default_writer(
        workdir, just_logging=console_only, asynchronous=True
    )
    if jax.process_index() > 0:
        return writer
    jsonl = JsonlWriter(epath.Path(workdir) / "metrics.jsonl", resume_step=resume_step)
    return metric_writers.MultiWriter([writer, jsonl])


def progress_hooks(*, num_train_steps: int, every_steps: int, writer, workdir, profile_steps):
    """clu ReportProgress (steps/s, ETA) and, when asked, a Profile of a few steps."""
    hooks = [
        periodic_actions.ReportProgress(
            num_train_steps=num_train_steps, writer=writer, every_steps=every_steps or None
        )
    ]
    if profile_steps:
        hooks.append(
            periodic_actions.Profile(
                num_profile_steps=profile_steps, logdir=workdir, first_profile=10
            )
        )
    return hooks


def read_metrics(workdir: str) -> dict[int, dict[str, Any]]:
    """metrics.jsonl as {step: merged row}; a later row for a step (after a resume) wins."""
    out: dict[int, dict[str, Any]] = {}
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out.setdefault(row["step"], {}).update(row)
    return out
