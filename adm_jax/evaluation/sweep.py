"""Guidance sweep: the paper's Table 4 / Figure 4 (FID, precision, recall, IS vs scale), over a
grid of guidance scale x sampler x NFE.

Larger guidance scales trade diversity (recall) for fidelity (precision, IS). The scale is
the classifier scale when ``sample.classifier_checkpoint`` is set, otherwise the
classifier-free scale (``sample.cfg_scale``'s meaning; the model needs a null label). The
sweep loads the models once; each (sampler, NFE) of ``sample.sweep_samplers`` x
``sample.sweep_steps`` compiles one program that serves all its scales (the scale is a traced
argument). It samples ``config.sample.num_samples`` images per point into
``output_dir/scale_{s}/`` (a grid of several samplers: ``output_dir/{sampler}{nfe}/scale_{s}/``,
e.g. ``dpmpp20``), each resumable like any sampling run, evaluates them, and writes
``sweep.json``, ``sweep.md`` and ``sweep.png`` into ``output_dir``.

``sample.sweep_guidance_intervals`` ("full;0.3,5": ";"-separated, "full" = guidance at every
step, else "lo,hi" as ``sample.guidance_interval``) adds the guidance interval as one more
axis: each interval samples into its own ``interval_{name}/`` below the sampler's folder
(``interval_full``, ``interval_0.3-5``) and the tables get an Interval column. Empty, the
layout is the one above.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from absl import logging

from adm_jax import paths, recipe
from adm_jax.evaluation.run import evaluate_npz, inception_settings
from adm_jax.recipe.sweep import (  # noqa: F401 - the sweep's parsing, re-exported
    FULL_INTERVAL,
    interval_dirname,
    parse_guidance_intervals,
    parse_scales,
    sampler_grid,
)
from adm_jax.sampling import sampler as sampler_lib

# Column order and direction (True: higher is better) of the metrics we know how to plot.
_KNOWN_METRICS = {
    "fid": ("FID", False),
    "sfid": ("sFID", False),
    "precision": ("Precision", True),
    "recall": ("Recall", True),
    "inception_score": ("IS", True),
}
MetricsFn = Callable[[str], Mapping[str, float]]


def inception_metrics_fn(config: Any, reference: str | None = None) -> MetricsFn:
    """The evaluator's metrics against ``reference`` (default ``config.sample.reference_batch``;
    ``config.evaluate`` supplies the Inception weights, batch size, resize path and distance
    precision)."""
    variables, kwargs = inception_settings(recipe.read_evaluate(config))
    if reference is None:
        reference = recipe.config_text(recipe.config_get(config, "sample"), "reference_batch")

    def metrics(npz_path: str) -> Mapping[str, float]:
        return evaluate_npz(npz_path, reference, inception_params=variables, **kwargs)

    return metrics


def guidance_sweep(
    config: Any,
    workdir: str,
    *,
    metrics_fn: MetricsFn | None = None,
    scales: Sequence[float] | None = None,
    samplers: Any = None,
    steps: Any = None,
    intervals: Any = None,
) -> list[dict[str, Any]]:
    """Samples at every scale x sampler x NFE (x guidance interval) and evaluates; returns
    the table rows.

    ``scales``, ``samplers``, ``steps`` and ``intervals`` default to ``sample.sweep_scales``,
    ``sample.sweep_samplers``, ``sample.sweep_steps`` and
    ``sample.sweep_guidance_intervals``. ``metrics_fn(npz_path) -> {name: value}`` replaces
    the Inception metrics (the demo plugs in its own feature extractor); without it,
    ``config.sample.reference_batch`` selects
    ``evaluate_npz``, and with neither only samples are written.
    """
    sweep = recipe.read_sweep(
        config, scales=scales, samplers=samplers, steps=steps, intervals=intervals
    )
    several_samplers = len({(p.get("sampler"), p.get("steps")) for p in sweep.grid}) > 1
    guidance = sweep.guidance
    if metrics_fn is None and sweep.reference_batch:
        metrics_fn = inception_metrics_fn(config, sweep.reference_batch)

    base_job = _build_job(config, workdir, guidance, sweep.scales)
    num_samples = base_job.settings.num_samples or base_job.default_num_samples
    classifier_scale = base_job.classifier_scale
    output_dir = sampler_lib.output_dir_for(config, workdir)
    rows = []
    for point in sweep.grid:
        job = base_job.with_sampler(**point) if point else base_job
        spec = job.sampler.method
        folder = paths.path(output_dir) / spec.tag if several_samplers else paths.path(output_dir)
        interval = None
        if "guidance_interval" in point:
            interval = point["guidance_interval"] or FULL_INTERVAL
            folder = folder / interval_dirname(interval)
        for scale in sweep.scales:
            run = {"classifier_scale": scale if guidance == "classifier" else classifier_scale}
            if guidance == "cfg":
                run["cfg_scale"] = scale
            elif guidance == "none":
                run["classifier_scale"] = 0.0
            npz = sampler_lib.run_job(
                job, str(folder / f"scale_{scale:g}"), num_samples=num_samples, **run
            )
            row = {"sampler": spec.name, "nfe": spec.steps, "guidance": guidance}
            if interval is not None:
                row["guidance_interval"] = interval
            row.update(scale=scale, samples=npz)
            if guidance == "classifier" and job.cfg_scale is not None:
                row["cfg_scale"] = job.cfg_scale
            if metrics_fn is not None:
                row.update({k: _scalar(v) for k, v in metrics_fn(npz).items()})
            logging.info("guidance sweep: %s", row)
            rows.append(row)
        if job.sampler.trace_count > 1:
            logging.warning("%s traced %d times", spec.label, job.sampler.trace_count)
    write_sweep_report(rows, output_dir)
    return rows


def _build_job(config: Any, workdir: str, guidance: str, scales: Sequence[float]):
    """The sweep's first job; a classifier-free sweep turns guidance on at the first scale."""
    if guidance != "cfg":
        return sampler_lib.build_job(config, workdir)
    config = copy.deepcopy(config)
    # A non-zero scale builds the guided program (cfg_scale 0 alone would build the one-pass
    # unconditional sampler, which cannot take the other scales).
    first = next((s for s in scales if s != 0), scales[0])
    with config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext():
        config.sample.cfg_scale = float(first)
    try:
        return sampler_lib.build_job(config, workdir)
    except ValueError as err:
        if not str(err).startswith("sample.cfg_scale:"):
            raise
        raise ValueError(
            "sample.sweep_scales: scales other than 0 need sample.classifier_checkpoint, or a "
            "model trained with model.class_dropout_prob > 0 for classifier-free guidance "
            f"({str(err).split(': ', 1)[1]})"
        ) from None


def _scalar(value: Any) -> Any:
    return None if value is None else (int(value) if isinstance(value, int) else float(value))


_ROW_KEYS = ("sampler", "nfe", "guidance", "guidance_interval", "cfg_scale", "scale", "samples")


def _metric_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    skip = (*_ROW_KEYS, "num_samples", "num_reference")
    names = [k for k in rows[0] if k not in skip]
    known = [k for k in _KNOWN_METRICS if k in names]
    return known + [k for k in names if k not in known]


def _curve(row: Mapping[str, Any]) -> tuple:
    return row.get("sampler"), row.get("nfe"), row.get("guidance_interval")


def write_sweep_report(rows: Sequence[Mapping[str, Any]], output_dir: str) -> dict[str, str]:
    """Writes ``sweep.json``, ``sweep.md`` (Table 4 layout; Sampler and NFE columns when the
    rows hold several samplers, an Interval column when they hold guidance intervals) and
    ``sweep.png`` (Figure 4: each metric against the scale, one line per sampler, NFE and
    interval).

    Process 0 writes (returns the paths); other processes return ``{}``.
    """
    if jax.process_index() != 0:
        return {}
    out = paths.path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {k: str(out / f"sweep.{k}") for k in ("json", "md", "png")}
    paths.write_text_atomic(files["json"], json.dumps(list(rows), indent=2))

    columns = _metric_columns(rows)
    curves = list(dict.fromkeys(_curve(row) for row in rows))
    several = len({curve[:2] for curve in curves}) > 1
    with_interval = any("guidance_interval" in row for row in rows)
    header = ["Scale", *(_KNOWN_METRICS.get(c, (c, None))[0] for c in columns)]
    if with_interval:
        header = ["Interval", *header]
    if several:
        header = ["Sampler", "NFE", *header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row['scale']:g}"]
        cells += [f"{row[c]:.4g}" if row.get(c) is not None else "n/a" for c in columns]
        if with_interval:
            cells = [str(row.get("guidance_interval")), *cells]
        if several:
            cells = [str(row.get("sampler")), str(row.get("nfe")), *cells]
        lines.append("| " + " | ".join(cells) + " |")
    paths.write_text_atomic(files["md"], "\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plotted = columns or []
    fig, axes = plt.subplots(
        1, max(len(plotted), 1), figsize=(3.2 * max(len(plotted), 1), 3), squeeze=False
    )
    xlabel = {"cfg": "classifier-free scale"}.get(rows[0].get("guidance"), "classifier scale")
    for ax, column in zip(axes[0], plotted, strict=False):
        for curve in curves:
            points = [row for row in rows if _curve(row) == curve]
            values = [row.get(column) for row in points]
            ax.plot(
                [row["scale"] for row in points],
                [float("nan") if v is None else v for v in values],
                "o-",
                label=_curve_label(curve, several, with_interval),
            )
        ax.set_xlabel(xlabel)
        ax.set_title(_KNOWN_METRICS.get(column, (column, None))[0])
        ax.grid(alpha=0.3)
        if several or with_interval:
            ax.legend(fontsize="small")
    if not plotted:
        axes[0][0].set_title("no metrics")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    paths.write_bytes_atomic(files["png"], png.getvalue())
    return files


def _curve_label(curve: tuple, several: bool, with_interval: bool) -> str | None:
    parts = [f"{curve[0]} {curve[1]}"] if several else []
    if with_interval:
        parts.append(f"interval {curve[2]}")
    return " ".join(parts) or None
