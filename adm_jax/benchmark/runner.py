"""One benchmark run: the requested parts (train, sample, maxbatch, flops, aot) at a preset's
sizes, as one JSON-able dict (``adm_jax.bench`` is its command line)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

from adm_jax.benchmark.aot import aot_report
from adm_jax.benchmark.batch_search import max_batch
from adm_jax.benchmark.config_files import make_mesh, split_config
from adm_jax.benchmark.devices import environment
from adm_jax.benchmark.sampling import GUIDANCE_KINDS, sample_benchmark, sampler_specs
from adm_jax.benchmark.timing import train_benchmark
from adm_jax.benchmark.topology import parse_tpu_slice
from adm_jax.benchmark.train_step import flops_report
from adm_jax.recipe import config as config_lib
from adm_jax.recipe.train import train_fields


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of one benchmark run; ``cpu`` fits a 2-core CPU in a few minutes."""

    batch_per_device: int | None = None  # None: train.batch_size / devices
    steps: int = 20
    warmup: int = 2
    sample_batch_per_device: int = 8
    sample_repeats: int = 3
    # Sampler tags (adm_jax.benchmark.sampling.sampler_specs): DDPM-250, DDIM-25, DPM-Solver++.
    samplers: tuple[str, ...] = ("ddpm250", "ddim25", "dpm++10", "dpm++20")
    init: str = "real"  # "real": the project's init; "zeros": skip init (values do not matter)
    max_batch_limit: int = 1024


PRESETS = {
    "": Preset(),
    "cpu": Preset(
        batch_per_device=1,
        steps=3,
        warmup=1,
        sample_batch_per_device=1,
        sample_repeats=1,
        init="zeros",
        max_batch_limit=64,
    ),
}


def run(
    config,
    *,
    what: Sequence[str] = ("train", "sample"),
    preset: str = "",
    batch_per_device: int | None = None,
    num_steps: int | None = None,
    classifier_config=None,
    samplers: Sequence[str] | None = None,
    sample_respacings: Sequence[str] | None = None,
    sample_batch_per_device: int | None = None,
    classifier_scale: float | None = None,
    cfg_scale: float | None = None,
    sample_guidance: Sequence[str] = GUIDANCE_KINDS,
    sample_dtype: str | None = None,
    device_memory_bytes: int | None = None,
    num_devices: int | None = None,
    init: str | None = None,
    topology: Sequence[str] | None = None,
    aot_max_compiles: int = 4,
    aot_sample: bool = True,
    forward: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Runs the requested parts and returns one JSON-able dict. ``sample_respacings`` is the
    old name of ``samplers`` ("250" = "ddpm250"). ``aot`` compiles for the TPU slices of
    ``topology`` (``batch_per_device`` and ``sample_batch_per_device`` are then per chip)."""
    config, embedded_classifier = split_config(config)
    classifier_config = classifier_config or embedded_classifier
    if "aot" in what:
        if not topology:
            raise ValueError("--topology: --what=aot needs TPU slices, e.g. v5p-8")
        for name in topology:  # a bad name fails before any compile
            parse_tpu_slice(name)
    p = PRESETS[preset]
    init = init or p.init
    samplers = tuple(samplers or sample_respacings or p.samplers)
    if "sample" in what and config.model.kind == "unet":  # bad names fail before any compile
        sampler_specs(config.sample, samplers)
    sample_options = dict(
        classifier_config=classifier_config,
        batch_per_device=sample_batch_per_device or p.sample_batch_per_device,
        classifier_scale=classifier_scale,
        cfg_scale=cfg_scale,
        guidance=tuple(sample_guidance),
        dtype=sample_dtype,
        init=init,
    )
    mesh = make_mesh(config, num_devices)
    n = mesh.size
    train = train_fields(config)  # as given: train_setup reads and checks it at its batch
    out = {
        "environment": environment(),
        "preset": preset or "default",
        "model": {
            "kind": config.model.kind,
            "image_size": config_lib.model_image_size(config),
            "train_dtype": train["dtype"],
            "remat": train["remat"],
        },
    }
    if "aot" in what:
        out["aot"] = aot_report(
            config,
            topology,
            classifier_config=classifier_config if aot_sample else None,
            batch_per_chip=batch_per_device,
            sample=aot_sample,
            sample_batch_per_chip=sample_batch_per_device,
            sample_dtype=sample_dtype,
            max_compiles=aot_max_compiles,
            log=log,
        )
    if "maxbatch" in what:
        log("maxbatch: compile-only doubling + bisection")
        out["maxbatch"] = max_batch(
            config, mesh, device_memory_bytes=device_memory_bytes, limit=p.max_batch_limit
        )
    if batch_per_device is None:
        batch_per_device = p.batch_per_device or max(1, int(train["batch_size"]) // n)
        found = out.get("maxbatch", {}).get("max_batch_per_device")
        if isinstance(found, int) and found > 0 and found < batch_per_device:
            # The config's batch does not fit one device: time the largest batch that does.
            log(f"train: per-device batch {batch_per_device} does not fit; using {found}")
            batch_per_device = found
    if "train" in what:
        log(f"train: per-device batch {batch_per_device} on {n} device(s)")
        out["train"] = train_benchmark(
            config,
            mesh,
            batch_per_device=batch_per_device,
            num_steps=num_steps or p.steps,
            warmup=p.warmup,
            init=init,
            forward=forward,
        )
    if "flops" in what:
        log(f"flops: compile-only train step, per-device batch {batch_per_device}")
        out["flops"] = flops_report(config, mesh, batch_per_device=batch_per_device)
    if "sample" in what:
        out["sample"] = _sample_part(config, mesh, p, samplers, log=log, **sample_options)
    out["environment"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def _sample_part(
    config, mesh, preset: Preset, samplers, *, log, classifier_scale, cfg_scale, **options
):
    """``sample_benchmark`` with the config's guidance scales where none is given."""
    if config.model.kind != "unet":
        return {"skipped": f"sampling benchmark needs a unet, got {config.model.kind}"}
    log("sample: " + ", ".join(samplers))
    if classifier_scale is None:
        classifier_scale = float(config.sample.classifier_scale)
    if cfg_scale is None:  # the cost does not depend on it
        cfg_scale = config.sample.get("cfg_scale") or 3.0
    return sample_benchmark(
        config,
        mesh,
        samplers=samplers,
        repeats=preset.sample_repeats,
        classifier_scale=classifier_scale,
        cfg_scale=float(cfg_scale),
        **options,
    )
