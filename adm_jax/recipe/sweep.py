"""``sample.sweep_*`` read and checked once, into ``SweepSettings``: the guidance sweep's
scales and its (sampler, NFE, guidance interval) grid, each point a set of ``sampler_spec``
overrides."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from adm_jax.recipe.reader import config_get, config_text
from adm_jax.recipe.sample import cfg_scale_of, check_scale, sampler_spec

FULL_INTERVAL = "full"  # a sweep's guidance interval "full": guidance at every step


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    """``scales``: what each point samples at; ``guidance``: what they scale ("classifier",
    "cfg" or "none"); ``grid``: ``sampler_spec`` overrides per point ([{}]: the sample.*
    sampler alone); ``reference_batch``: the Inception reference ("" = no metrics)."""

    scales: tuple[float, ...]
    guidance: str
    grid: tuple[dict[str, Any], ...]
    reference_batch: str = ""


def read_sweep(
    config: Any,
    *,
    scales: Any = None,
    samplers: Any = None,
    steps: Any = None,
    intervals: Any = None,
) -> SweepSettings:
    """The sweep of ``config.sample``; the keyword arguments replace ``sample.sweep_scales``,
    ``sweep_samplers``, ``sweep_steps`` and ``sweep_guidance_intervals``."""
    sc = config_get(config, "sample")
    values = parse_scales(scales if scales is not None else config_get(sc, "sweep_scales", ""))
    if not values:
        raise ValueError("sample.sweep_scales: give at least one guidance scale, e.g. '0,1,10'")
    return SweepSettings(
        scales=tuple(values),
        guidance=guidance_kind(sc, values),
        grid=tuple(sampler_grid(sc, samplers, steps, intervals)),
        reference_batch=config_text(sc, "reference_batch"),
    )


def parse_scales(spec: Any) -> list[float]:
    """``"0,1,10"``, ``[0, 1, 10]`` or a single number -> list of finite floats >= 0."""
    if isinstance(spec, str):
        values = [s for s in spec.split(",") if s.strip()]
    elif isinstance(spec, (int, float)):
        values = [spec]
    else:
        values = list(spec)
    return [check_scale("sample.sweep_scales", v) for v in values]


def _parse_list(spec: Any) -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, str):
        return [s.strip() for s in spec.split(",") if s.strip()]
    if isinstance(spec, (int, float)):
        return [str(spec)]
    return [str(s).strip() for s in spec]


def parse_guidance_intervals(spec: Any) -> list[str]:
    """``"full;0.3,5"`` (or a list) -> ["full", "0.3,5"]: the sweep's guidance intervals,
    each "full" or "lo,hi"; "" -> [] (no interval axis)."""
    if spec is None:
        return []
    items = spec.split(";") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        text = str(item).strip().lower().replace(" ", "")
        if not text:
            continue
        if text != FULL_INTERVAL:
            try:
                sampler_spec({"sampler": "ddpm"}, guidance_interval=text)
            except ValueError as err:
                raise ValueError(
                    f"sample.sweep_guidance_intervals: expected ';'-separated 'full' or 'lo,hi' "
                    f"sigma ranges, e.g. 'full;0.3,5', got {item!r} ({err})"
                ) from None
        out.append(text)
    return out


def interval_dirname(interval: str) -> str:
    """The output subdirectory of one swept interval: interval_full, interval_0.3-5."""
    return "interval_" + interval.replace(",", "-")


def sampler_grid(
    sample_config: Any, samplers: Any = None, steps: Any = None, intervals: Any = None
) -> list[dict]:
    """The (sampler, NFE[, guidance interval]) points of a sweep as ``sampler_spec``
    overrides: the product of ``samplers`` (default ``sample.sweep_samplers``), ``steps``
    (``sample.sweep_steps``) and ``intervals`` (``sample.sweep_guidance_intervals``; a point
    then holds guidance_interval, "" for "full"); an empty list keeps ``sample.sampler`` /
    ``sample.steps`` / ``sample.guidance_interval``."""
    get = lambda name: config_get(sample_config, name, "")
    names = _parse_list(get("sweep_samplers") if samplers is None else samplers)
    counts = _parse_list(get("sweep_steps") if steps is None else steps)
    try:
        counts = [int(c) for c in counts]
    except ValueError:
        raise ValueError(
            f"sample.sweep_steps: expected comma-separated ints, got {counts}"
        ) from None
    # An explicit sampler replaces use_ddim (the old spelling of "ddim") too.
    by_name = [{"sampler": n, "use_ddim": False} for n in names] or [{}]
    by_steps = [{"steps": c} for c in counts] or [{}]
    spans = parse_guidance_intervals(
        get("sweep_guidance_intervals") if intervals is None else intervals
    )
    by_interval = [{"guidance_interval": "" if i == FULL_INTERVAL else i} for i in spans] or [{}]
    grid = [{**a, **b, **c} for a in by_name for b in by_steps for c in by_interval]
    for point in grid:
        sampler_spec(sample_config, **point)  # field errors before anything runs
    return grid


def guidance_kind(sample_config: Any, scales: Sequence[float]) -> str:
    """What the scales scale: "classifier" (a classifier is given), "cfg" (classifier-free:
    sample.cfg_scale set, or scales other than 0 without a classifier), or "none"."""
    if config_get(sample_config, "classifier_checkpoint"):
        return "classifier"
    if cfg_scale_of(sample_config) is not None or any(s != 0 for s in scales):
        return "cfg"
    return "none"
