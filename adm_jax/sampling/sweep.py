"""Guidance-scale sweep: the paper's Table 4 / Figure 4 (FID, precision, recall, IS vs scale).

Larger classifier scales trade diversity (recall) for fidelity (precision, IS). The sweep loads
the models once and reuses one compiled sampling scan for every scale (the scale is a traced
argument), samples ``config.sample.num_samples`` images per scale into
``output_dir/scale_{s}/`` (each resumable like any sampling run), evaluates them, and writes
``sweep.json``, ``sweep.md`` and ``sweep.png`` into ``output_dir``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import logging

from adm_jax import paths
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


def parse_scales(spec: Any) -> list[float]:
    """``"0,1,10"``, ``[0, 1, 10]`` or a single number -> list of floats."""
    if isinstance(spec, str):
        return [float(s) for s in spec.split(",") if s.strip()]
    if isinstance(spec, (int, float)):
        return [float(spec)]
    return [float(s) for s in spec]


def inception_metrics_fn(config: Any) -> MetricsFn:
    """The evaluator's metrics against ``config.sample.reference_batch`` (``config.evaluate``
    supplies the Inception weights, batch size, resize path and distance precision)."""
    from adm_jax import evaluation

    ev = sampler_lib._cfg_get(config, "evaluate")
    get = lambda name, default=None: sampler_lib._cfg_get(ev, name) or default
    sha = get("inception_sha256", evaluation.WEIGHTS_SHA256)
    variables = evaluation.load_inception_variables(
        get("inception_weights"), sha256=None if str(sha).lower() == "none" else sha
    )
    reference = config.sample.reference_batch
    kwargs = dict(
        batch_size=int(get("batch_size", 256)),
        resize=get("resize", "tf"),
        distance=get("distance", "float32"),
    )

    def metrics(npz_path: str) -> Mapping[str, float]:
        return evaluation.evaluate_npz(npz_path, reference, inception_params=variables, **kwargs)

    return metrics


def guidance_sweep(
    config: Any,
    workdir: str,
    *,
    metrics_fn: MetricsFn | None = None,
    scales: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """Samples at every ``config.sample.sweep_scales`` and evaluates; returns the table rows.

    ``metrics_fn(npz_path) -> {name: value}`` replaces the Inception metrics (the demo plugs in
    its own feature extractor); without it, ``config.sample.reference_batch`` selects
    ``adm_jax.evaluation.evaluate_npz``, and with neither only samples are written.
    """
    sc = config.sample
    scales = parse_scales(scales if scales is not None else sc.sweep_scales)
    if not scales:
        raise ValueError("sample.sweep_scales: give at least one guidance scale, e.g. '0,1,10'")
    if any(s != 0 for s in scales) and not sampler_lib._cfg_get(sc, "classifier_checkpoint"):
        raise ValueError(
            "sample.sweep_scales: scales other than 0 need sample.classifier_checkpoint"
        )
    if metrics_fn is None and sampler_lib._cfg_get(sc, "reference_batch"):
        metrics_fn = inception_metrics_fn(config)

    job = sampler_lib.build_job(config, workdir)
    num_samples = int(sampler_lib._cfg_get(sc, "num_samples", 0) or 0) or job.default_num_samples
    output_dir = sampler_lib.output_dir_for(config, workdir)
    rows = []
    for scale in scales:
        npz = sampler_lib.run_job(
            job,
            str(paths.path(output_dir) / f"scale_{scale:g}"),
            num_samples=num_samples,
            classifier_scale=scale,
        )
        row = {"scale": scale, "samples": npz}
        if metrics_fn is not None:
            row.update({k: _scalar(v) for k, v in metrics_fn(npz).items()})
        logging.info("guidance sweep: %s", row)
        rows.append(row)
    if job.sampler.trace_count > 1:
        logging.warning("sampling scan traced %d times", job.sampler.trace_count)
    write_sweep_report(rows, output_dir)
    return rows


def _scalar(value: Any) -> Any:
    return None if value is None else (int(value) if isinstance(value, int) else float(value))


def _metric_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    skip = ("scale", "samples", "num_samples", "num_reference")
    names = [k for k in rows[0] if k not in skip]
    known = [k for k in _KNOWN_METRICS if k in names]
    return known + [k for k in names if k not in known]


def write_sweep_report(rows: Sequence[Mapping[str, Any]], output_dir: str) -> dict[str, str]:
    """Writes ``sweep.json``, ``sweep.md`` (Table 4 layout) and ``sweep.png`` (Figure 4).

    Process 0 writes (returns the paths); other processes return ``{}``.
    """
    import jax

    if jax.process_index() != 0:
        return {}
    out = paths.path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {k: str(out / f"sweep.{k}") for k in ("json", "md", "png")}
    paths.write_text_atomic(files["json"], json.dumps(list(rows), indent=2))

    columns = _metric_columns(rows)
    header = ["Scale", *(_KNOWN_METRICS.get(c, (c, None))[0] for c in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row['scale']:g}"]
        cells += [f"{row[c]:.4g}" if row.get(c) is not None else "n/a" for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    paths.write_text_atomic(files["md"], "\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plotted = columns or []
    fig, axes = plt.subplots(
        1, max(len(plotted), 1), figsize=(3.2 * max(len(plotted), 1), 3), squeeze=False
    )
    scales = [row["scale"] for row in rows]
    for ax, column in zip(axes[0], plotted, strict=False):
        values = [row.get(column) for row in rows]
        ax.plot(scales, [float("nan") if v is None else v for v in values], "o-")
        ax.set_xlabel("classifier scale")
        ax.set_title(_KNOWN_METRICS.get(column, (column, None))[0])
        ax.grid(alpha=0.3)
    if not plotted:
        axes[0][0].set_title("no metrics")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    paths.write_bytes_atomic(files["png"], png.getvalue())
    return files
