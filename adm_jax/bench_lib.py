"""Benchmarks of the real train step and samplers on fake data: throughput, FLOPs, MFU, memory.

What is measured (``adm_jax.bench`` is the command line; this module is importable so a
notebook or a test calls the same functions):

- ``train_benchmark``: the project's own train state (``adm_jax.train.state``) and jitted,
  sharded, donated train step (``adm_jax.train.steps``, jitted exactly as
  ``adm_jax.train.loop`` does) on a fixed fake batch (no input pipeline, as flax/examples'
  fake_data_benchmark). Compile time, median step time, images/s, XLA's FLOPs of the compiled
  per-device program, MFU against the device's peak bf16 FLOP/s, peak memory.
- ``sample_benchmark``: the program ``--mode=sample`` compiles (``adm_jax.sampling``'s
  ``BatchSampler``: one ``lax.scan``) for DDPM-250, DDIM-25 and DPM-Solver++(2M) at 10 and 20
  NFE, unguided, classifier-guided and with classifier-free guidance: time per image and per
  model evaluation; the guidance overhead is the ratio of guided to unguided time per
  evaluation.
- ``max_batch``: the largest per-device train batch whose compiled program fits in device
  memory according to ``compiled.memory_analysis()``, by doubling then bisection, compiling
  only (nothing is allocated or executed).
- ``flops_report``: compile-only FLOPs per image of a train step (feasible on a CPU for the
  ImageNet configs), next to an analytic count and the reference's published forward FLOPs.

Two FLOP counts appear everywhere:
  * ``xla``: ``compiled.cost_analysis()["flops"]`` of the per-device program, divided by the
    per-device batch. It counts every op (elementwise, normalisation, optimizer, remat
    recomputation) and XLA counts a padded convolution's valid taps only.
  * ``model``: 3 x the analytic forward FLOPs (2 per multiply-accumulate of every convolution
    and matmul in the forward jaxpr, the convention of torch.utils.flop_counter that
    ``published_models.json`` uses): forward + backward, no elementwise ops, no recompute.
``mfu`` uses the first (what XLA executes), ``mfu_model`` the second (the usual MFU).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib.util
import json
import math
import os
import pathlib
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adm_jax import mesh as mesh_lib
from adm_jax.batch_sampler import BatchSampler
from adm_jax.demo import DEMO_SECTIONS
from adm_jax.diffusion import methods
from adm_jax.models import (
    abstract_params,
    example_inputs,
    module_from_kwargs,
    reference_kwargs_from_flags,
)
from adm_jax.train import config_lib, sharding, steps
from adm_jax.train import metrics as train_metrics
from adm_jax.train import state as state_lib

NA = "n/a"
NOT_AVAILABLE = "not available"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The reference's parameter and FLOP counts of the released models (in a clone of the repository).
PUBLISHED_MODELS = REPO_ROOT / "tests" / "golden" / "published_models.json"

# Peak dense bf16 FLOP/s per JAX device keyed on device_kind prefixes. The table itself lives
# in adm_jax.train.metrics (the train loop logs MFU from it); it covers TPU v4, v5e ("TPU v5
# lite"), v5p ("TPU v5"), v6e ("TPU v6 lite"), A100, H100 and H200 (SXM datasheet figures).
PEAK_BF16_FLOPS = train_metrics.PEAK_FLOPS


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of one benchmark run; ``cpu`` fits a 2-core CPU in a few minutes."""

    batch_per_device: int | None = None  # None: config.train.batch_size / devices
    steps: int = 20
    warmup: int = 2
    sample_batch_per_device: int = 8
    sample_repeats: int = 3
    # Sampler tags (adm_jax.diffusion.methods.parse_sampler): DDPM-250, DDIM-25, DPM-Solver++.
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


# --------------------------------------------------------------------------------------------
# Configs.


def load_config(spec: str):
    """``path/to/config.py[:arg]`` -> ``get_config(arg)`` (ml_collections config_file style)."""
    path, _, arg = spec.partition(":")
    root = str(pathlib.Path(path).resolve().parents[1])
    if pathlib.Path(path).resolve().parent.name == "configs" and root not in sys.path:
        sys.path.insert(0, root)  # config files import their siblings as `configs.default`
    module_spec = importlib.util.spec_from_file_location(f"bench_cfg_{abs(hash(spec))}", path)
    if module_spec is None:
        raise FileNotFoundError(f"config file not found: {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def default_classifier_spec(config_spec: str) -> str | None:
    """The noisy classifier paired with a diffusion config: configs/imagenetN.py ->
    configs/classifierN.py, configs/tiny.py -> configs/tiny.py:classifier; None otherwise."""
    path = pathlib.Path(config_spec.partition(":")[0])
    stem = path.stem
    if stem == "tiny":
        return f"{path}:classifier"
    if stem.startswith("imagenet") and stem[len("imagenet") :].isdigit():
        candidate = path.with_name(f"classifier{stem[len('imagenet') :]}.py")
        return str(candidate) if candidate.exists() else None
    return None


def split_config(config):
    """(run config, embedded classifier config or None): configs/demo.py carries its
    classifier run as ``config.classifier`` and extra sections the train checks reject."""
    config = copy.deepcopy(config)
    classifier = None
    with config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext():
        if "classifier" in config:
            classifier = config.classifier
        for name in DEMO_SECTIONS:
            if name in config:
                del config[name]
    return config, classifier


def _with_batch(config, global_batch: int):
    config = copy.deepcopy(config)
    config.train.batch_size = int(global_batch) * int(config.train.grad_accum_steps)
    return config


def _fit_fsdp(config, mesh):
    """config.train.fsdp follows the mesh actually used (see ``make_mesh``)."""
    config = copy.deepcopy(config)
    config.train.fsdp = int(mesh.shape["fsdp"])
    return config


def make_mesh(config, num_devices: int | None = None):
    """The train loop's ("data", "fsdp") mesh over the first ``num_devices`` devices;
    config.train.fsdp when it divides the device count, else 1."""
    devices = jax.devices()[: num_devices or len(jax.devices())]
    fsdp = int(config.train.fsdp) if len(devices) % int(config.train.fsdp) == 0 else 1
    return mesh_lib.create_mesh(fsdp=fsdp, devices=devices)


# --------------------------------------------------------------------------------------------
# FLOPs and memory.


def _sub_jaxprs(value):
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def jaxpr_flops(jaxpr) -> float:
    """2 x multiply-accumulates of every convolution and dot_general in a jaxpr (scan bodies
    times their length, the costlier branch of a cond), as torch.utils.flop_counter counts."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            rhs = eqn.invars[1].aval
            out = eqn.outvars[0].aval
            rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (O, I, spatial...)
            taps = math.prod(rhs.shape[d] for d in rhs_spec[2:]) * rhs.shape[rhs_spec[1]]
            total += 2.0 * math.prod(out.shape) * taps
        elif name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            out = eqn.outvars[0].aval
            total += 2.0 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract)
        else:
            subs = [j for v in eqn.params.values() for j in _sub_jaxprs(v)]
            if not subs:
                continue
            if name == "cond":
                total += max(jaxpr_flops(j) for j in subs)
            else:
                mult = eqn.params.get("length", 1) if name == "scan" else 1
                total += mult * sum(jaxpr_flops(j) for j in subs)
    return total


def analytic_flops(fn: Callable, *args, **kwargs) -> float:
    """Convolution + matmul FLOPs of ``fn(*args)`` from its jaxpr (args may be abstract)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def forward_flops_per_image(module) -> float:
    """Analytic FLOPs of one forward pass of ``module`` at batch 1 (abstract params: nothing
    is allocated). Comparable with published_models.json's ``flops_forward_batch1``."""
    params = abstract_params(module)
    (x, t), kwargs = example_inputs(module, 1)

    def fwd(p, x, t, kw):
        return module.apply({"params": p}, x, t, **kw)

    return analytic_flops(fwd, params, x, t, kwargs)


def xla_flops(compiled_or_lowered) -> float | None:
    """``cost_analysis()["flops"]`` of a Compiled or Lowered program; None if unavailable."""
    flops = train_metrics.compiled_flops(compiled_or_lowered)
    return None if math.isnan(flops) else flops


def published_entry(config) -> dict | None:
    """The published_models.json entry whose constructor args match config.model."""
    if not PUBLISHED_MODELS.exists():
        return None
    ours = config_lib.model_kwargs(config)
    kind = {"unet": "diffusion", "superres": "super_resolution", "classifier": "classifier"}
    keys = (
        "image_size", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions",
        "channel_mult", "num_classes", "num_head_channels",
    )  # fmt: skip
    with open(PUBLISHED_MODELS) as f:
        models = json.load(f)["models"]
    for entry in models:
        if entry["kind"] != kind[config.model.kind]:
            continue
        ref = dict(entry.get("unet_constructor_args") or entry.get("encoder_constructor_args"))
        ref.setdefault("image_size", entry["resolved_args"].get("image_size"))
        same = True
        for k in keys:
            if k in ref and k in ours:
                a, b = ref[k], ours[k]
                a = tuple(a) if isinstance(a, list) else a
                b = tuple(b) if isinstance(b, list) else b
                if k == "attention_resolutions":
                    a, b = tuple(sorted(a)), tuple(sorted(b))
                same &= a == b
        if same:
            return entry
    return None


def memory_analysis(compiled) -> dict | None:
    """Bytes of a compiled program per device from ``compiled.memory_analysis()``:
    arguments + outputs - aliased (donated) + temporaries + generated code; None if the backend
    does not report it."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - NotImplementedError / XlaRuntimeError by backend
        return None
    if ma is None:
        return None
    out = {
        "argument_bytes": int(ma.argument_size_in_bytes),
        "output_bytes": int(ma.output_size_in_bytes),
        "alias_bytes": int(ma.alias_size_in_bytes),
        "temp_bytes": int(ma.temp_size_in_bytes),
        "generated_code_bytes": int(ma.generated_code_size_in_bytes),
    }
    out["total_bytes"] = (
        out["argument_bytes"]
        + out["output_bytes"]
        - out["alias_bytes"]
        + out["temp_bytes"]
        + out["generated_code_bytes"]
    )
    return out


def device_memory_stats(device=None) -> dict | None:
    try:
        stats = (device or jax.local_devices()[0]).memory_stats()
    except Exception:  # noqa: BLE001
        return None
    return dict(stats) if stats else None


def device_memory_limit(device=None) -> int | None:
    stats = device_memory_stats(device)
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def peak_flops(device=None) -> float | None:
    value = train_metrics.peak_flops_per_device(device)
    return None if math.isnan(value) else value


def environment() -> dict:
    dev = jax.devices()[0]
    return {
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "num_devices": jax.device_count(),
        "peak_bf16_flops_per_device": peak_flops(dev) or NA,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# --------------------------------------------------------------------------------------------
# Train step.


@dataclasses.dataclass
class TrainSetup:
    """Everything a compiled train step needs, built from a config (nothing allocated)."""

    config: Any
    mesh: Any
    module: Any
    diffusion: Any
    tx: Any
    abstract_state: Any
    state_shardings: Any
    batch_sharding: Any
    jitted: Any
    classifier: bool

    @property
    def global_batch(self) -> int:
        return int(self.config.train.batch_size) // int(self.config.train.grad_accum_steps)


def train_setup(config, mesh, batch_per_device: int) -> TrainSetup:
    """The project's train state and step for a per-device batch, jitted as the train loop
    jits it (state and batch shardings, donated state, replicated metrics)."""
    classifier = config.model.kind == "classifier"
    config = _with_batch(_fit_fsdp(config, mesh), batch_per_device * mesh.size)
    mode = "train_classifier" if classifier else "train"
    config_lib.validate_config(config, num_devices=mesh.size, mode=mode)
    module = config_lib.build_model(config)
    diffusion = config_lib.build_diffusion(config)
    tx = state_lib.make_optimizer(config.train)
    abstract, shardings = state_lib.abstract_train_state(module, config, tx, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    jitted = steps.jit_train_step(
        module, diffusion, tx, config, shardings, mesh, classifier=classifier
    )
    return TrainSetup(
        config, mesh, module, diffusion, tx, abstract, shardings, batch_sh, jitted, classifier
    )


def abstract_batch(setup: TrainSetup) -> dict:
    size = config_lib.model_image_size(setup.config)
    n, c = setup.config.train.batch_size, int(setup.config.data.channels)
    sh = setup.batch_sharding
    return {
        "image": jax.ShapeDtypeStruct((n, size, size, c), jnp.float32, sharding=sh),
        "label": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sh),
    }


def fake_batch(setup: TrainSetup, seed: int = 0) -> dict:
    """A fixed random batch in [-1, 1] with random labels, generated in its shards."""
    spec = abstract_batch(setup)
    num_classes = getattr(setup.module, "num_classes", None) or 1000

    def make(key):
        k1, k2 = jax.random.split(key)
        image = jax.random.uniform(k1, spec["image"].shape, jnp.float32, -1.0, 1.0)
        label = jax.random.randint(k2, spec["label"].shape, 0, num_classes, jnp.int32)
        return {"image": image, "label": label}

    out_sh = {"image": setup.batch_sharding, "label": setup.batch_sharding}
    return jax.jit(make, out_shardings=out_sh)(jax.random.PRNGKey(seed))


def _zeros_like_tree(abstract, shardings):
    return jax.jit(
        lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract),
        out_shardings=shardings,
    )()


def initial_state(setup: TrainSetup, init: str = "real"):
    """``real``: the project's ``create_train_state`` (jitted init in its shards); ``zeros``:
    the same pytree filled with zeros (timing does not depend on values; skips compiling
    ``module.init``, which dominates small CPU runs)."""
    if init == "zeros":
        return _zeros_like_tree(setup.abstract_state, setup.state_shardings)
    state, _ = state_lib.create_train_state(setup.module, setup.config, setup.tx, setup.mesh)
    return state


def lower_train_step(setup: TrainSetup):
    """(lowered, lower_s) from abstract inputs only."""
    with jax.set_mesh(setup.mesh):
        t0 = time.perf_counter()
        lowered = setup.jitted.lower(setup.abstract_state, abstract_batch(setup))
    return lowered, time.perf_counter() - t0


def compile_train_step(setup: TrainSetup):
    """(lowered, compiled, lower_s, compile_s) from abstract inputs only."""
    lowered, lower_s = lower_train_step(setup)
    with jax.set_mesh(setup.mesh):
        t0 = time.perf_counter()
        compiled = lowered.compile()
    return lowered, compiled, lower_s, time.perf_counter() - t0


def _flops_fields(setup: TrainSetup, compiled, lowered=None) -> dict:
    per_device_batch = setup.global_batch // setup.mesh.size
    flops_dev = xla_flops(compiled)
    fwd = forward_flops_per_image(setup.module)
    entry = published_entry(setup.config)
    out = {
        "flops_per_device_step_xla": flops_dev,
        "flops_per_image_xla": flops_dev / per_device_batch if flops_dev else None,
        "forward_flops_per_image_analytic": fwd,
        "model_flops_per_image": 3.0 * fwd,
        "reference_model": entry["name"] if entry else None,
        "reference_forward_flops_per_image": entry["flops_forward_batch1"] if entry else None,
    }
    if lowered is not None:
        lowered_flops = xla_flops(lowered)
        out["flops_per_image_xla_lowered"] = (
            lowered_flops / per_device_batch if lowered_flops else None
        )
    if entry:
        out["analytic_vs_reference_forward"] = fwd / entry["flops_forward_batch1"]
        if out["flops_per_image_xla"]:
            out["xla_step_vs_3x_reference_forward"] = out["flops_per_image_xla"] / (
                3.0 * entry["flops_forward_batch1"]
            )
    return out


def timed_calls(
    call: Callable[[], Any], *, repeats: int, warmup: int = 0
) -> tuple[list[float], Any]:
    """Wall seconds of each of ``repeats`` calls of ``call()`` after ``warmup`` untimed ones,
    and the last call's result. Each result is waited for: with asynchronous dispatch a bare
    call times only the launch."""
    times, result = [], None
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        result = jax.block_until_ready(call())
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, result


def train_benchmark(
    config,
    mesh,
    *,
    batch_per_device: int,
    num_steps: int = 20,
    warmup: int = 2,
    init="real",
    forward: bool = True,
) -> dict:
    """Times the compiled train step on a fake batch, and (``forward``) the inference forward
    at the same batch (one more compile); see the module docstring."""
    setup = train_setup(config, mesh, batch_per_device)
    lowered, compiled, lower_s, compile_s = compile_train_step(setup)
    batch = fake_batch(setup)
    carry = [initial_state(setup, init)]

    def step():  # each step takes the state the previous one returned (the old one is donated)
        carry[0], metrics = compiled(carry[0], batch)
        return carry[0], metrics

    with jax.set_mesh(mesh):
        times, (state, metrics) = timed_calls(step, repeats=num_steps, warmup=warmup)
    step_time = statistics.median(times)
    n = mesh.size
    forward_time = (
        forward_benchmark(setup, state.params, num_steps=num_steps, warmup=warmup)
        if forward
        else None
    )
    result = {
        "config_batch_size": int(config.train.batch_size),
        "batch_per_device": batch_per_device,
        "global_batch": setup.global_batch,
        "grad_accum_steps": int(setup.config.train.grad_accum_steps),
        "dtype": setup.config.train.dtype,
        "remat": setup.config.train.remat,
        "mesh": dict(mesh.shape),
        "init": init,
        "steps_timed": num_steps,
        "warmup_steps": warmup,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "step_time_s": step_time,
        "step_time_mean_s": statistics.fmean(times),
        "step_times_s": times,
        "images_per_s": setup.global_batch / step_time,
        "images_per_s_per_device": setup.global_batch / step_time / n,
        "forward_time_s": forward_time or NA,
        "forward_images_per_s": setup.global_batch / forward_time if forward_time else NA,
        "loss_finite": bool(np.isfinite(np.asarray(metrics["loss"]))),
    }
    result.update(_flops_fields(setup, compiled, lowered))
    peak = peak_flops()
    flops_dev = result["flops_per_device_step_xla"]
    model_dev = result["model_flops_per_image"] * batch_per_device
    result["tflops_per_device_xla"] = flops_dev / step_time / 1e12 if flops_dev else None
    result["tflops_per_device_model"] = model_dev / step_time / 1e12
    result["peak_flops_per_device"] = peak or NA
    result["mfu"] = flops_dev / step_time / peak if (peak and flops_dev) else NA
    result["mfu_model"] = model_dev / step_time / peak if peak else NA
    stats = device_memory_stats()
    mem = {"compiled": memory_analysis(compiled)}
    if stats and "peak_bytes_in_use" in stats:
        mem["peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
        mem["source"] = "device.memory_stats()"
    elif mem["compiled"]:
        mem["peak_bytes_in_use"] = mem["compiled"]["total_bytes"]
        mem["source"] = "compiled.memory_analysis()"
    else:
        mem["peak_bytes_in_use"] = NOT_AVAILABLE
        mem["source"] = NOT_AVAILABLE
    result["memory"] = mem
    return result


def forward_benchmark(setup: TrainSetup, params, *, num_steps: int, warmup: int = 2) -> float:
    """Median seconds of one inference forward pass of the network at the step's batch and
    sharding (no loss, no gradient: what ``ref_bench.py`` times as its forward)."""
    (x, t), kwargs = example_inputs(setup.module, setup.global_batch)
    x, t, kwargs = jax.device_put((x, t, kwargs), setup.batch_sharding)
    forward = jax.jit(lambda p, x, t, kw: setup.module.apply({"params": p}, x, t, **kw))
    with jax.set_mesh(setup.mesh):
        jax.block_until_ready(forward(params, x, t, kwargs))  # compiles
        call = functools.partial(forward, params, x, t, kwargs)
        times, _ = timed_calls(call, repeats=num_steps, warmup=warmup)
    return statistics.median(times)


def flops_report(config, mesh, *, batch_per_device: int = 1, compile: bool = True) -> dict:
    """Compile-only (nothing allocated or run) FLOPs per image of the train step."""
    setup = train_setup(config, mesh, batch_per_device)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        lowered = setup.jitted.lower(setup.abstract_state, abstract_batch(setup))
        lower_s = time.perf_counter() - t0
        compiled, compile_s = None, None
        if compile:
            t0 = time.perf_counter()
            compiled = lowered.compile()
            compile_s = time.perf_counter() - t0
    per_device_batch = setup.global_batch // mesh.size
    out = {
        "batch_per_device": per_device_batch,
        "dtype": setup.config.train.dtype,
        "mesh": dict(mesh.shape),
        "lower_s": lower_s,
        "compile_s": compile_s,
    }
    if compiled is not None:
        out.update(_flops_fields(setup, compiled, lowered))
        out["memory"] = memory_analysis(compiled)
    else:
        lowered_flops = xla_flops(lowered)
        fwd = forward_flops_per_image(setup.module)
        entry = published_entry(setup.config)
        out.update(
            flops_per_image_xla_lowered=lowered_flops / per_device_batch if lowered_flops else None,
            forward_flops_per_image_analytic=fwd,
            model_flops_per_image=3.0 * fwd,
            reference_model=entry["name"] if entry else None,
            reference_forward_flops_per_image=entry["flops_forward_batch1"] if entry else None,
        )
    return out


# --------------------------------------------------------------------------------------------
# Largest batch.


def find_max_batch(
    fits: Callable[[int], bool],
    *,
    start: int = 1,
    limit: int = 1024,
    resolution: float = 0.0,
    max_probes: int | None = None,
) -> dict:
    """Largest b in [1, limit] with fits(b), assuming fits is monotone: from ``start``,
    doubling while it fits (halving while it does not), then bisection until the bracket is
    within max(1, resolution * lo). At most ``max_probes`` calls (each may be a compile of
    minutes): then the bracket reached so far comes back with "exact" False. Returns
    {"max_batch", "first_failing", "probes": [(b, fits)], "exact"}; max_batch 0 if even 1 fails
    (or nothing that fits was found within the probes)."""
    probes = []

    def probe(b):
        ok = bool(fits(b))
        probes.append((b, ok))
        return ok

    def budget():
        return max_probes is None or len(probes) < max_probes

    def close(lo, hi):
        return lo > 0 and hi - lo <= max(1, int(resolution * lo))

    lo, hi = 0, None  # largest known to fit (0: none), smallest known to fail (None: none)
    if probe(min(max(1, start), limit)):
        lo = probes[-1][0]
    else:
        hi = probes[-1][0]
    while budget() and (hi is None or lo == 0):
        if hi is None:  # everything so far fits: double up to the limit
            nxt = min(lo * 2, limit)
            if nxt == lo:
                break
        elif hi == 1:  # nothing fits
            break
        else:  # nothing fits yet: halve down
            nxt = hi // 2
        if probe(nxt):
            lo = nxt
        else:
            hi = nxt
    while budget() and hi is not None and lo > 0 and not close(lo, hi):
        mid = (lo + hi) // 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    exact = (
        (hi is None and lo == limit) or (hi == 1 and lo == 0) or (hi is not None and close(lo, hi))
    )
    return {"max_batch": lo, "first_failing": hi, "probes": probes, "exact": bool(exact)}


def max_batch(
    config,
    mesh,
    *,
    device_memory_bytes: int | None = None,
    limit: int = 1024,
    resolution: float = 1 / 16,
) -> dict:
    """Largest per-device train batch whose compiled step fits ``device_memory_bytes``
    (default: the device's ``bytes_limit``), from ``compiled.memory_analysis()`` only."""
    memory = device_memory_bytes or device_memory_limit()
    if memory is None:
        return {
            "max_batch_per_device": NOT_AVAILABLE,
            "reason": "the backend reports no device memory limit (pass --device_memory_gb)",
        }
    sizes = {}

    def fits(b):
        setup = train_setup(config, mesh, b)
        _, compiled, _, compile_s = compile_train_step(setup)
        mem = memory_analysis(compiled)
        if mem is None:
            raise NotImplementedError("compiled.memory_analysis() is not available")
        sizes[b] = {"total_bytes": mem["total_bytes"], "compile_s": compile_s}
        return mem["total_bytes"] <= memory

    try:
        found = find_max_batch(fits, limit=limit, resolution=resolution)
    except NotImplementedError as err:
        return {"max_batch_per_device": NOT_AVAILABLE, "reason": str(err)}
    return {
        "max_batch_per_device": found["max_batch"],
        "first_failing_batch_per_device": found["first_failing"],
        "device_memory_bytes": memory,
        "search_limit": limit,
        "bytes_by_batch": {str(b): v for b, v in sorted(sizes.items())},
        "probes": found["probes"],
    }


# --------------------------------------------------------------------------------------------
# Sampling.


def _params(module, init: str, mesh):
    rep = NamedSharding(mesh, P())
    if init == "zeros":
        abstract = abstract_params(module)
        return _zeros_like_tree(abstract, jax.tree.map(lambda _: rep, abstract))

    def init_fn(key):
        args, kwargs = example_inputs(module)
        return module.init(key, *args, **kwargs)["params"]

    return jax.jit(init_fn, out_shardings=rep)(jax.random.PRNGKey(0))


def build_module(config, **overrides):
    """``config_lib.build_model``; for a classifier config with an explicit channel_mult at a
    size the reference table lacks (configs/tiny.py:classifier), builds the same module
    directly, because reference_kwargs_from_flags rejects the size before config_lib applies
    its channel_mult extension."""
    try:
        return config_lib.build_model(config, **overrides)
    except ValueError:
        m = config.model
        if m.kind != "classifier" or not m.get("channel_mult"):
            raise
    size = int(m.image_size)
    kwargs = reference_kwargs_from_flags(
        "classifier", {**config_lib.model_flags(config), "image_size": 64}
    )
    kwargs.update(
        image_size=size,
        channel_mult=tuple(int(c) for c in str(m.channel_mult).split(",")),
        attention_resolutions=tuple(
            size // int(r) for r in str(m.classifier_attention_resolutions).split(",")
        ),
    )
    options = dict(dtype=config_lib.DTYPES[config.train.dtype], remat=config.train.remat)
    options.update(overrides)
    return module_from_kwargs("classifier", kwargs, **options)


GUIDANCE_KINDS = ("none", "classifier", "cfg")


def _cfg_module(config, dtype):
    """The config's class-conditional UNet with the null-label row classifier-free guidance
    needs (built as label-dropout training builds it)."""
    config = copy.deepcopy(config)
    if config_lib.class_dropout_prob(config) == 0:
        config.model.class_dropout_prob = 0.1
    return build_module(config, dtype=config_lib.DTYPES[dtype], remat=False)


def batch_sampler(config, diffusion, net, spec, *, mesh, batch: int, guidance: str, classifier):
    """``--mode=sample``'s ``BatchSampler`` (one compiled ``lax.scan`` over the sampler's steps)
    for ``net``; ``guidance``: "none", "classifier" (guided by ``classifier``) or "cfg"
    (``net`` carries the null label)."""
    size = config_lib.model_image_size(config)
    guided = guidance == "classifier"
    return BatchSampler(
        diffusion,
        lambda p, x, t, y=None: net.apply({"params": p}, x, t, y=y),
        image_shape=(size, size, int(config.data.channels)),
        batch_size=batch,
        mesh=mesh,
        classifier_apply=(
            (lambda p, x, t: classifier.apply({"params": p}, x, t)) if guided else None
        ),
        class_cond=getattr(net, "num_classes", None) is not None,
        method=spec,
        null_label=net.null_label if guidance == "cfg" else None,
    )


def sample_benchmark(
    config,
    mesh,
    *,
    classifier_config=None,
    batch_per_device: int = 8,
    samplers: Sequence[str] = ("ddpm250", "ddim25", "dpm++20"),
    repeats: int = 3,
    classifier_scale: float = 1.0,
    cfg_scale: float = 3.0,
    guidance: Sequence[str] = GUIDANCE_KINDS,
    dtype: str | None = None,
    init: str = "real",
) -> dict:
    """Time per image and per model evaluation of each sampler ("ddpm250", "ddim25",
    "dpm++20", ...), unguided, classifier-guided (with ``classifier_config``) and with
    classifier-free guidance (class-conditional models), through ``BatchSampler``: the
    program ``--mode=sample`` compiles. Guidance overhead = guided / unguided time per
    evaluation."""
    dtype = dtype or config.train.dtype
    unknown = sorted(set(guidance) - set(GUIDANCE_KINDS))
    if unknown:
        raise ValueError(f"sample_guidance: unknown {unknown}; expected {GUIDANCE_KINDS}")
    specs = [methods.parse_sampler(s) for s in samplers]
    model = build_module(config, dtype=config_lib.DTYPES[dtype], remat=False)
    params = _params(model, init, mesh)
    class_cond = getattr(model, "num_classes", None) is not None
    classifier = cls_params = None
    if classifier_config is not None and "classifier" in guidance:
        classifier = build_module(classifier_config, dtype=config_lib.DTYPES[dtype], remat=False)
        cls_params = _params(classifier, init, mesh)
    cfg_model = cfg_params = None
    if class_cond and "cfg" in guidance:
        cfg_model = _cfg_module(config, dtype)
        cfg_params = _params(cfg_model, init, mesh)
    batch = batch_per_device * mesh.size
    num_classes = getattr(model, "num_classes", None) or getattr(classifier, "out_channels", 1000)
    labels = np.random.default_rng(0).integers(0, num_classes, batch).astype(np.int32)
    fwd = forward_flops_per_image(model)
    cls_fwd = forward_flops_per_image(classifier) if classifier is not None else None
    variants = [
        (kind, net, net_params)
        for kind, net, net_params in (
            ("none", model, params),
            ("classifier", model if classifier is not None else None, params),
            ("cfg", cfg_model, cfg_params),
        )
        if kind in guidance and net is not None
    ]
    runs = []
    for spec in specs:
        diffusion = config_lib.build_diffusion(config, timestep_respacing=spec.respacing)
        for kind, net, net_params in variants:
            guided = kind == "classifier"
            sampler = batch_sampler(
                config, diffusion, net, spec, mesh=mesh, batch=batch, guidance=kind,
                classifier=classifier,
            )  # fmt: skip
            args = sampler.arguments(
                net_params,
                seed=1,
                batch_index=0,
                labels=labels if sampler.needs_labels else None,
                classifier_params=cls_params if guided else None,
                scale=classifier_scale if guided else 0.0,
                cfg_scale=cfg_scale if kind == "cfg" else None,
            )
            with jax.set_mesh(mesh):
                t0 = time.perf_counter()
                compiled = sampler.program.lower(*args).compile()
                compile_s = time.perf_counter() - t0
                call = functools.partial(compiled, *args)
                times, out = timed_calls(call, repeats=repeats, warmup=1)
            total = statistics.median(times)
            nfe = sampler.method.steps
            runs.append(
                {
                    "sampler": sampler.method.label,
                    "tag": sampler.method.tag,
                    "method": sampler.method.name,
                    "nfe": nfe,
                    "num_steps": nfe,
                    "guidance": kind,
                    "guided": kind != "none",
                    "batch": batch,
                    "compile_s": compile_s,
                    "time_s": total,
                    "times_s": times,
                    # One batched model evaluation (with its guidance work) per step.
                    "per_step_s": total / nfe,
                    "per_image_s": total / batch,
                    "per_eval_per_image_s": total / nfe / batch,
                    "images_per_s": batch / total,
                    "images_per_s_per_device": batch / total / mesh.size,
                    "images_nonconstant": bool(np.ptp(np.asarray(out)) > 0),
                }
            )
    overhead = {}
    for tag in dict.fromkeys(r["tag"] for r in runs):
        by = {r["guidance"]: r for r in runs if r["tag"] == tag}
        if "none" in by and len(by) > 1:
            base = by["none"]["per_step_s"]
            overhead[tag] = {k: r["per_step_s"] / base for k, r in by.items() if k != "none"}
    # Convolution/matmul FLOPs of a guided evaluation over an unguided one: the classifier's
    # forward plus its input gradient (about one more forward) on top of the UNet forward;
    # classifier-free guidance runs the UNet on a doubled batch.
    expected = {}
    if cls_fwd:
        expected["classifier"] = (fwd + 2.0 * cls_fwd) / fwd
    if cfg_model is not None:
        expected["cfg"] = 2.0
    return {
        "dtype": dtype,
        "init": init,
        "batch_per_device": batch_per_device,
        "classifier_scale": classifier_scale,
        "cfg_scale": cfg_scale,
        "guided": classifier is not None,
        "guidance_kinds": [kind for kind, _, _ in variants],
        "runs": runs,
        "guidance_overhead": overhead if overhead else NA,
        "guidance_overhead_flops_estimate": expected or NA,
        "model_forward_flops_per_image": fwd,
        "classifier_forward_flops_per_image": cls_fwd or NA,
    }


# --------------------------------------------------------------------------------------------
# Compile-only fit on a TPU slice, without a TPU (libtpu + jax.experimental.topologies).


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """One Cloud TPU generation: what a slice name means and what one chip holds."""

    name: str  # slice-name and topology prefix: v4, v5e, v5p, v6e
    hbm_bytes: int  # per chip
    peak_bf16_flops: float  # per chip, dense
    torus_dims: int  # 3 (v4, v5p) or 2 (v5e, v6e)
    cores_in_name: int  # "v4-8" / "v5p-8" count TensorCores (2 per chip); v5e / v6e count chips
    chip_config: str  # "megacore": one JAX device per chip (both TensorCores), as JAX runs v4/v5p


# HBM per chip and peak dense bf16 FLOP/s per chip, from the Cloud TPU system-architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): v4 32 GiB / 275 TFLOP/s, v5e 16 GiB / 197,
# v5p 95 GiB / 459, v6e 32 GiB / 918 (the same peaks as adm_jax.train.metrics.PEAK_FLOPS).
# Nominal capacities: the runtime keeps a little of each chip's HBM for itself.
TPU_GENERATIONS = {
    "v4": TpuGeneration("v4", 32 * 2**30, 275e12, 3, 2, "megacore"),
    "v5e": TpuGeneration("v5e", 16 * 2**30, 197e12, 2, 1, "default"),
    "v5p": TpuGeneration("v5p", 95 * 2**30, 459e12, 3, 2, "megacore"),
    "v6e": TpuGeneration("v6e", 32 * 2**30, 918e12, 2, 1, "default"),
}
TPU_ALIASES = {"v5litepod": "v5e"}  # Cloud TPU's accelerator type for v5e slices


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """A single TPU slice by its Cloud TPU name ("v5p-8") and chip torus ``shape``."""

    name: str
    generation: TpuGeneration
    shape: tuple[int, ...]

    @property
    def num_chips(self) -> int:
        return math.prod(self.shape)

    @property
    def topology(self) -> str:
        """The name ``jax.experimental.topologies.get_topology_desc`` takes ("v5p:2x2x1")."""
        return f"{self.generation.name}:" + "x".join(str(d) for d in self.shape)

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        """Torus wrap-around links: full 4x4x4 cubes and up (v4, v5p), 16-chip rows (v5e, v6e)."""
        if len(self.shape) == 3:
            return (self.num_chips >= 64,) * 3
        return (self.shape[0] == 16, self.shape[1] == 16, False)

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        return (min(2, self.shape[0]), min(2, self.shape[1]), 1)


def parse_tpu_slice(name: str) -> TpuSlice:
    """A Cloud TPU accelerator type ("v4-8", "v5e-8" or "v5litepod-8", "v5p-8", "v6e-8"; any
    power-of-two size) -> the slice's chips and torus shape (v4-8 = v5p-8 = 2x2x1, 4 chips;
    v5e-8 = v6e-8 = 2x4, 8 chips)."""
    expected = "a slice name like v4-8, v5e-8 (v5litepod-8), v5p-8 or v6e-8"
    prefix, sep, count = str(name).strip().lower().partition("-")
    generation = TPU_GENERATIONS.get(TPU_ALIASES.get(prefix, prefix))
    if generation is None or not sep or not count.isdigit():
        raise ValueError(f"--topology: expected {expected}, got {name!r}")
    chips, rem = divmod(int(count), generation.cores_in_name)
    if rem or chips < 1 or chips & (chips - 1):
        raise ValueError(f"--topology: {name!r} is not a power-of-two slice ({expected})")
    if generation.torus_dims == 3:
        if chips < 4:
            raise ValueError(
                f"--topology: the smallest {generation.name} slice is {generation.name}-8 "
                f"(4 chips), got {name!r}"
            )
        shape = [2, 2, 1]
    else:
        if chips > 256:
            raise ValueError(f"--topology: {generation.name} slices have at most 256 chips")
        shape = [1, 1]
    while math.prod(shape) < chips:  # double the last of the smallest dimensions
        i = max(j for j, d in enumerate(shape) if d == min(shape))
        shape[i] *= 2
    return TpuSlice(f"{generation.name}-{count}", generation, tuple(shape))


def libtpu_available() -> bool:
    """Whether the TPU compiler (the ``libtpu`` package) is installed: compile-only runs for
    a TPU slice need it, a TPU does not."""
    return importlib.util.find_spec("libtpu") is not None


@functools.cache
def topology_devices(tpu_slice: TpuSlice) -> tuple:
    """Compile-only devices of ``tpu_slice`` (``jax.experimental.topologies``): enough for
    ``jit(...).lower(...).compile()`` with shardings on them, nothing runs."""
    from jax.experimental import topologies

    # Compile-only: no TPU is opened, so a second process that loaded libtpu (a training run,
    # or any JAX process on a machine with libtpu installed) is no reason to refuse.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        devices = topologies.get_topology_desc(
            tpu_slice.topology,
            platform="tpu",
            chip_config_name=tpu_slice.generation.chip_config,
            chips_per_host_bounds=tpu_slice.chips_per_host_bounds,
            num_slices=1,
            wrap=tpu_slice.wrap,
        ).devices
    except Exception as err:  # noqa: BLE001 - JaxRuntimeError / RuntimeError by jax version
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        hint = "" if libtpu_available() else "; install libtpu (the version jax[tpu] pins)"
        raise RuntimeError(
            f"--topology: cannot describe {tpu_slice.name} ({tpu_slice.topology}): {reason}{hint}"
        ) from err
    if len(devices) != tpu_slice.num_chips:
        raise RuntimeError(
            f"--topology: {tpu_slice.topology} gave {len(devices)} devices, expected "
            f"{tpu_slice.num_chips} (one per chip)"
        )
    return tuple(devices)


def topology_mesh(tpu_slice: TpuSlice, fsdp: int):
    """The train loop's ("data", "fsdp") mesh (``adm_jax.mesh.create_mesh``) over the slice's chips,
    in the torus order ``jax.make_mesh`` gives real devices."""
    from jax.experimental import mesh_utils

    devices = list(topology_devices(tpu_slice))
    ordered = mesh_utils.create_device_mesh((len(devices) // fsdp, fsdp), devices)
    return mesh_lib.create_mesh(fsdp=fsdp, devices=list(ordered.flat))


def cost_analysis(compiled) -> dict:
    """XLA's cost analysis of a compiled per-device program: "flops", "bytes accessed" and, for
    TPU, "optimal_seconds" (the compiler's cost-model estimate of its run time)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - NotImplementedError on some backends
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    keys = ("flops", "bytes accessed", "optimal_seconds", "transcendentals")
    return {k: float(v) for k, v in (cost or {}).items() if k in keys}


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = r"([\d.]+)([KMGT]?)B?"
# Two wordings of the TPU compiler's out-of-HBM refusal (libtpu versions differ):
# "Ran out of memory in memory space hbm. Used 40.1G of 30.75G hbm. ..."
# "Ran out of memory on HBM, the total memory required for HLO temporaries (171.69G) exceeds
# available HBM (95.74G)."
_HBM_OOM = (
    re.compile(rf"Used {_SIZE} of {_SIZE} hbm"),
    re.compile(rf"HLO temporaries \({_SIZE}\) exceeds available HBM \({_SIZE}\)"),
)
_HBM_TOTAL = re.compile(rf"Total hbm usage >= {_SIZE}")


def hbm_oom(err: Exception) -> dict | None:
    """The TPU compiler's refusal of a program that does not fit one chip's HBM, as bytes:
    what it needs at least (``hbm_required_bytes``) and the capacity the compiler allows
    (the chip's HBM less the runtime's reserve); None for any other error."""
    text = str(err)
    match = next((m for p in _HBM_OOM if (m := p.search(text))), None)
    if "RESOURCE_EXHAUSTED" not in text or match is None:
        return None
    size = lambda m, i: int(float(m.group(i)) * _UNITS[m.group(i + 1)])  # noqa: E731
    total = _HBM_TOTAL.search(text)
    return {
        "compile_error": text.strip().splitlines()[0][:300],
        "hbm_required_bytes": size(total, 1) if total else size(match, 1),
        "compiler_hbm_capacity_bytes": size(match, 3),
    }


def _compile_or_oom(lowered, mesh):
    """(compiled or None, hbm_oom(...) or None, compile_s): the compiler's out-of-HBM refusal
    is a result (the program does not fit), any other error propagates."""
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = lowered.compile()
    except Exception as err:  # noqa: BLE001 - XlaRuntimeError / JaxRuntimeError by version
        oom = hbm_oom(err)
        if oom is None:
            raise
        return None, oom, time.perf_counter() - t0
    return compiled, None, time.perf_counter() - t0


def _fit_fields(compiled, tpu_slice: TpuSlice, oom: dict | None = None) -> dict:
    hbm = tpu_slice.generation.hbm_bytes
    if compiled is None:  # refused by the compiler: it does not fit
        return {
            "memory": None,
            "hbm_bytes": hbm,
            "hbm_used_fraction": oom["hbm_required_bytes"] / hbm,
            "fits": False,
            **oom,
            "flops_per_chip": None,
            "bytes_accessed_per_chip": None,
            "xla_estimated_seconds": None,
        }
    mem = memory_analysis(compiled)
    if mem is None:
        raise RuntimeError("compiled.memory_analysis() reports nothing for this TPU program")
    cost = cost_analysis(compiled)
    flops = cost.get("flops")
    return {
        "memory": mem,
        "hbm_bytes": hbm,
        "hbm_used_fraction": mem["total_bytes"] / hbm,
        "fits": mem["total_bytes"] <= hbm,
        "flops_per_chip": flops,
        "bytes_accessed_per_chip": cost.get("bytes accessed"),
        **_checked_estimate(cost.get("optimal_seconds"), flops, tpu_slice),
    }


def _checked_estimate(seconds, flops, tpu_slice: TpuSlice) -> dict:
    """XLA's TPU cost model, not a measurement: what the compiler expects one run to take.
    Kept only when it is a time the chip could achieve; libtpu 0.0.42.1 was seen to return
    -284 s (ImageNet-128 on v4-8) and, for FSDP meshes, less than the program's FLOPs need at
    the chip's peak. A rejected value is reported with the reason, never used for MFU."""
    floor = flops / tpu_slice.generation.peak_bf16_flops if flops else 0.0
    if seconds is None or (seconds > 0 and seconds >= floor):
        return {"xla_estimated_seconds": seconds}
    why = "not a duration" if seconds <= 0 else f"below the {floor:.4g} s its FLOPs need at peak"
    return {
        "xla_estimated_seconds": None,
        "xla_estimate_rejected": f"XLA's cost model returned {seconds:.4g} s: {why}",
    }


def _config_batch_per_chip(config, num_chips: int, what: str) -> int:
    micro = int(config.train.batch_size) // int(config.train.grad_accum_steps)
    if micro % num_chips:
        raise ValueError(
            f"train.batch_size: {what} batch {micro} is not a multiple of the {num_chips} chips; "
            "pass --batch (per chip)"
        )
    return micro // num_chips


def aot_train(config, tpu_slice: TpuSlice, mesh, batch_per_chip: int) -> dict:
    """Compiles the project's train step (``train_setup``: the train loop's jitted, sharded,
    donated step) for ``tpu_slice`` from abstract inputs: per-chip HBM, FLOPs, and XLA's
    estimate of the step time with the MFU it implies."""
    setup = train_setup(config, mesh, batch_per_chip)
    lowered, lower_s = lower_train_step(setup)
    compiled, oom, compile_s = _compile_or_oom(lowered, mesh)
    accum = int(setup.config.train.grad_accum_steps)
    # XLA's cost analysis counts a loop body once: with microbatches (a lax.scan), the FLOPs
    # and the estimate cover one microbatch and the update.
    images = batch_per_chip
    out = {
        "batch_per_chip": batch_per_chip,
        "global_batch": setup.global_batch * accum,
        "grad_accum_steps": accum,
        "mesh": dict(mesh.shape),
        "dtype": setup.config.train.dtype,
        "remat": setup.config.train.remat,
        "lower_s": lower_s,
        "compile_s": compile_s,
    }
    out.update(_fit_fields(compiled, tpu_slice, oom))
    fwd = forward_flops_per_image(setup.module)
    out["model_flops_per_image"] = 3.0 * fwd
    flops, est = out["flops_per_chip"], out["xla_estimated_seconds"]
    out["flops_per_image_xla"] = flops / images if flops else None
    peak = tpu_slice.generation.peak_bf16_flops
    out["xla_estimated_images_per_s_per_chip"] = images / est if est else None
    out["xla_estimated_mfu"] = flops / est / peak if (est and flops) else None
    out["xla_estimated_mfu_model"] = 3.0 * fwd * images / est / peak if est else None
    return out


def aot_max_batch(
    config,
    tpu_slice: TpuSlice,
    mesh,
    *,
    known: dict[int, dict],
    max_compiles: int = 4,
    resolution: float = 1 / 8,
    limit: int = 4096,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Largest per-chip train batch whose compiled step fits one chip's HBM: doubling or halving
    from the batch already compiled (``known``: per-chip batch -> {"total_bytes", "fits"}),
    then bisection, with at most ``max_compiles`` more compiles."""
    hbm = tpu_slice.generation.hbm_bytes
    sizes = {b: dict(v, compile_s=None) for b, v in known.items()}

    def fits(b):
        if b not in sizes:
            n = sum(1 for v in sizes.values() if v["compile_s"] is not None) + 1
            log(f"  {tpu_slice.name} max batch: compiling batch {b}/chip ({n}/{max_compiles})")
            lowered, _ = lower_train_step(train_setup(config, mesh, b))
            compiled, oom, compile_s = _compile_or_oom(lowered, mesh)
            if compiled is None:
                total, ok = oom["hbm_required_bytes"], False
            else:
                total = memory_analysis(compiled)["total_bytes"]
                ok = total <= hbm
            sizes[b] = {"total_bytes": total, "fits": ok, "compile_s": compile_s}
            log(
                f"  {tpu_slice.name} batch {b}/chip: {total / 2**30:.2f} GiB of "
                f"{hbm / 2**30:.0f} GiB{'' if ok else ' (does not fit)'}, compiled in "
                f"{compile_s:.0f} s"
            )
        return sizes[b]["fits"]

    start = max(known) if known else 1
    found = find_max_batch(
        fits, start=start, limit=limit, resolution=resolution, max_probes=max_compiles + len(known)
    )
    return {
        "max_batch_per_chip": found["max_batch"],
        "first_failing_batch_per_chip": found["first_failing"],
        "exact": found["exact"],
        "resolution": resolution,
        "max_compiles": max_compiles,
        "compiles": sum(1 for v in sizes.values() if v["compile_s"] is not None),
        "bytes_by_batch": {str(b): v for b, v in sorted(sizes.items())},
        "probes": found["probes"],
    }


def _abstract_replicated(module, mesh):
    rep = NamedSharding(mesh, P())
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), abstract_params(module)
    )


def aot_sample(
    config,
    tpu_slice: TpuSlice,
    *,
    classifier_config=None,
    batch_per_chip: int,
    dtype: str | None = None,
) -> dict:
    """Compiles ``--mode=sample``'s program (``BatchSampler``: the config's sampler as one
    ``lax.scan``, classifier-guided when ``classifier_config`` is given, else classifier-free
    guided when config.sample.cfg_scale is set) for ``tpu_slice`` on sampling's (chips, 1)
    mesh, from abstract parameters."""
    if config.model.kind != "unet":
        return {"skipped": f"the sampling fit needs a unet, got {config.model.kind}"}
    dtype = dtype or config.train.dtype
    spec = methods.sampler_spec(config.sample)
    diffusion = config_lib.build_diffusion(config, timestep_respacing=spec.respacing)
    mesh = topology_mesh(tpu_slice, fsdp=1)
    classifier = None
    if classifier_config is not None:
        guidance = "classifier"
        net = build_module(config, dtype=config_lib.DTYPES[dtype], remat=False)
        classifier = build_module(classifier_config, dtype=config_lib.DTYPES[dtype], remat=False)
    elif config.sample.get("cfg_scale") is not None and config.model.get("class_cond"):
        guidance = "cfg"
        net = _cfg_module(config, dtype)
    else:
        guidance = "none"
        net = build_module(config, dtype=config_lib.DTYPES[dtype], remat=False)
    batch = batch_per_chip * mesh.size
    sampler = batch_sampler(
        config, diffusion, net, spec, mesh=mesh, batch=batch, guidance=guidance,
        classifier=classifier,
    )  # fmt: skip
    scalar = lambda dt: jax.ShapeDtypeStruct((), dt)  # noqa: E731
    labels = None
    if sampler.needs_labels:
        labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sampler.batch_sharding)
    args = (
        _abstract_replicated(net, mesh),
        _abstract_replicated(classifier, mesh) if classifier is not None else None,
        scalar(jnp.uint32),  # seed
        scalar(jnp.int32),  # batch index
        labels,
        scalar(jnp.float32),  # classifier scale (traced)
        scalar(jnp.float32),  # classifier-free scale (traced)
        None,  # low_res (upsamplers only)
    )
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        lowered = sampler.program.lower(*args)
        lower_s = time.perf_counter() - t0
    compiled, oom, compile_s = _compile_or_oom(lowered, mesh)
    nfe = sampler.method.steps
    out = {
        "sampler": sampler.method.label,
        "nfe": nfe,
        "guidance": guidance,
        "batch_per_chip": batch_per_chip,
        "global_batch": batch,
        "mesh": dict(mesh.shape),
        "dtype": dtype,
        "lower_s": lower_s,
        "compile_s": compile_s,
    }
    # The sampler is one lax.scan over its steps and XLA's cost analysis counts a loop body
    # once: the FLOPs and the estimated time are those of one step (one guided evaluation).
    out.update(_fit_fields(compiled, tpu_slice, oom))
    fwd = forward_flops_per_image(net)
    cls_fwd = forward_flops_per_image(classifier) if classifier is not None else 0.0
    # Convolution + matmul FLOPs of one guided evaluation: the UNet forward (twice for
    # classifier-free guidance), the classifier's forward and its input gradient (~2 forwards).
    per_eval = fwd * (2.0 if guidance == "cfg" else 1.0) + 2.0 * cls_fwd
    out["model_flops_per_image_per_eval"] = per_eval
    out["model_flops_per_chip_per_eval"] = per_eval * batch_per_chip
    return out


def _total_bytes(part: dict) -> int:
    """Per-chip bytes of a compiled program, or what the compiler said a refused one needs."""
    return part["memory"]["total_bytes"] if part["memory"] else part["hbm_required_bytes"]


def aot_report(
    config,
    slices: Sequence[str],
    *,
    classifier_config=None,
    batch_per_chip: int | None = None,
    sample: bool = True,
    sample_batch_per_chip: int | None = None,
    sample_dtype: str | None = None,
    max_compiles: int = 4,
    resolution: float = 1 / 8,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """For each TPU slice: the train step compiled at the config's batch (or ``batch_per_chip``)
    on the config's mesh, its per-chip HBM use and whether it fits, the largest per-chip batch
    that fits (``max_compiles`` more compiles at most; 0 skips the search), FLOPs per chip and
    XLA's estimated step time with the MFU it implies; then the guided sampling program at
    config.sample.batch_size. Nothing is allocated: parameters are ``jax.eval_shape``'d."""
    parsed = [parse_tpu_slice(s) for s in slices]
    results = []
    for tpu_slice in parsed:
        gen = tpu_slice.generation
        devices = topology_devices(tpu_slice)
        fsdp = math.gcd(int(config.train.fsdp), tpu_slice.num_chips)
        mesh = topology_mesh(tpu_slice, fsdp)
        entry = {
            "slice": tpu_slice.name,
            "topology": tpu_slice.topology,
            "chips": tpu_slice.num_chips,
            "device_kind": devices[0].device_kind,
            "hbm_bytes_per_chip": gen.hbm_bytes,
            "peak_bf16_flops_per_chip": gen.peak_bf16_flops,
            "config_fsdp": int(config.train.fsdp),
        }
        if fsdp != int(config.train.fsdp):
            entry["fsdp_note"] = (
                f"train.fsdp {int(config.train.fsdp)} does not divide {tpu_slice.num_chips} "
                f"chips: fsdp {fsdp}"
            )
        b = batch_per_chip or _config_batch_per_chip(config, tpu_slice.num_chips, "the config's")
        log(f"{tpu_slice.name} ({tpu_slice.topology}): train step, batch {b}/chip, mesh "
            f"{dict(mesh.shape)}: compiling")  # fmt: skip
        train = aot_train(config, tpu_slice, mesh, b)
        log(
            f"{tpu_slice.name}: train step {_total_bytes(train) / 2**30:.2f} GiB of "
            f"{gen.hbm_bytes / 2**30:.0f} GiB ({'fits' if train['fits'] else 'does not fit'}), "
            f"compiled in {train['compile_s']:.0f} s"
        )
        entry["train"] = train
        if max_compiles > 0:
            entry["max_batch"] = aot_max_batch(
                config,
                tpu_slice,
                mesh,
                known={b: {"total_bytes": _total_bytes(train), "fits": train["fits"]}},
                max_compiles=max_compiles,
                resolution=resolution,
                log=log,
            )
        if sample and config.model.kind == "unet":
            sb = sample_batch_per_chip or max(
                1, -(-int(config.sample.batch_size) // tpu_slice.num_chips)
            )
            log(f"{tpu_slice.name}: sampling program, batch {sb}/chip: compiling")
            entry["sample"] = aot_sample(
                config,
                tpu_slice,
                classifier_config=classifier_config,
                batch_per_chip=sb,
                dtype=sample_dtype,
            )
            s = entry["sample"]
            log(
                f"{tpu_slice.name}: sampling {_total_bytes(s) / 2**30:.2f} GiB, "
                f"compiled in {s['compile_s']:.0f} s"
            )
        results.append(entry)
    return {"slices": results, "note": AOT_NOTE}


AOT_NOTE = (
    "compile-only (no TPU): memory from compiled.memory_analysis(); FLOPs from XLA's cost "
    "analysis; step time is XLA's TPU cost-model estimate (optimal_seconds), not a measurement"
)


# --------------------------------------------------------------------------------------------
# Everything.


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
    mesh = make_mesh(config, num_devices)
    n = mesh.size
    init = init or p.init
    out = {
        "environment": environment(),
        "preset": preset or "default",
        "model": {
            "kind": config.model.kind,
            "image_size": config_lib.model_image_size(config),
            "train_dtype": config.train.dtype,
            "remat": config.train.remat,
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
        batch_per_device = p.batch_per_device or max(1, int(config.train.batch_size) // n)
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
        if config.model.kind != "unet":
            out["sample"] = {"skipped": f"sampling benchmark needs a unet, got {config.model.kind}"}
        else:
            samplers = tuple(samplers or sample_respacings or p.samplers)
            log("sample: " + ", ".join(samplers))
            if classifier_scale is None:
                classifier_scale = float(config.sample.classifier_scale)
            if cfg_scale is None:  # the cost does not depend on it
                cfg_scale = config.sample.get("cfg_scale") or 3.0
            out["sample"] = sample_benchmark(
                config,
                mesh,
                classifier_config=classifier_config,
                batch_per_device=sample_batch_per_device or p.sample_batch_per_device,
                samplers=samplers,
                repeats=p.sample_repeats,
                classifier_scale=classifier_scale,
                cfg_scale=float(cfg_scale),
                guidance=tuple(sample_guidance),
                dtype=sample_dtype,
                init=init,
            )
    out["environment"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


# --------------------------------------------------------------------------------------------
# Report.


def _fmt(v, unit: str = "", scale: float = 1.0, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v / scale:.{digits}g}{unit}"


def _gib(v) -> str:
    return "-" if v is None else f"{v / 2**30:.2f}"


def _max_batch_cell(m: dict | None) -> str:
    """ "37" when the search closed, "32-47" (fits, first failing - 1) or "<16" otherwise."""
    if not m:
        return "-"
    lo, hi = m["max_batch_per_chip"], m["first_failing_batch_per_chip"]
    if m["exact"] or hi is None:
        return str(lo)
    return f"<{hi}" if lo == 0 else f"{lo}-{hi - 1}"


def _mem_cells(part: dict, hbm: int) -> str:
    mem = part["memory"]
    if mem is None:  # the compiler refused it: what it said the program needs
        return f"- | - | >{_gib(part['hbm_required_bytes'])} / {hbm / 2**30:.0f} (compiler: OOM)"
    return (
        f"{_gib(mem['argument_bytes'])} | {_gib(mem['temp_bytes'])} "
        f"| {_gib(mem['total_bytes'])} / {hbm / 2**30:.0f}"
    )


def _estimate_cell(part: dict, digits: int) -> str:
    """XLA's estimate in ms; "rejected" when ``_checked_estimate`` refused the compiler's
    value (the reason is in the JSON)."""
    if part.get("xla_estimate_rejected"):
        return "rejected"
    est = part.get("xla_estimated_seconds")
    return _fmt(est * 1e3 if est else None, "", 1, digits)


def format_aot(aot: dict, label: str = "") -> str:
    """Markdown tables (train step, sampling) of ``aot_report``'s result; ``label`` names the
    model in a first column (several reports then concatenate into one table)."""
    first = "| model " if label else ""
    cell = f"| {label} " if label else ""
    train = [
        f"{first}| slice | chips | batch/chip | args GiB | temp GiB | total GiB / HBM | fits "
        "| max batch/chip | GFLOP/chip/step | XLA est. step ms | est. MFU | compile s |",
        ("|---" * (12 + bool(label))) + "|",
    ]
    sample = [
        f"{first}| slice | sampler | guidance | batch/chip | args GiB | temp GiB "
        "| total GiB / HBM | fits | GFLOP/chip/step | XLA est. ms/step | compile s |",
        ("|---" * (11 + bool(label))) + "|",
    ]
    for e in aot["slices"]:
        t, hbm = e["train"], e["hbm_bytes_per_chip"]
        train.append(
            f"{cell}| {e['slice']} | {e['chips']} | {t['batch_per_chip']} "
            f"| {_mem_cells(t, hbm)} | {'yes' if t['fits'] else 'NO'} "
            f"| {_max_batch_cell(e.get('max_batch'))} "
            f"| {_fmt(t.get('flops_per_chip'), '', 1e9, 4)} "
            f"| {_estimate_cell(t, 4)} "
            f"| {_fmt(t.get('xla_estimated_mfu_model'), '', 1, 2)} | {t['compile_s']:.0f} |"
        )
        s = e.get("sample")
        if s and "fits" in s:
            sample.append(
                f"{cell}| {e['slice']} | {s['sampler']} | {s['guidance']} | {s['batch_per_chip']} "
                f"| {_mem_cells(s, hbm)} | {'yes' if s['fits'] else 'NO'} "
                f"| {_fmt(s.get('flops_per_chip'), '', 1e9, 4)} "
                f"| {_estimate_cell(s, 3)} | {s['compile_s']:.0f} |"
            )
    lines = train
    if len(sample) > 2:
        lines += [""] + sample
    return "\n".join(lines)


def format_table(result: dict) -> str:
    """A readable summary of ``run``'s result."""
    env = result["environment"]
    lines = [
        f"device {env['device_kind']} x{env['num_devices']} ({env['backend']}), jax "
        f"{env['jax_version']}, load {env['load_average']} -> {env.get('load_average_end')}",
    ]
    if "train" in result:
        t = result["train"]
        mem = t["memory"]["peak_bytes_in_use"]
        lines += [
            "",
            f"train step  ({t['dtype']}, batch {t['batch_per_device']}/device, "
            f"global {t['global_batch']}, mesh {t['mesh']})",
            f"  compile            {_fmt(t['compile_s'], ' s')}",
            f"  step time (median) {_fmt(t['step_time_s'] * 1e3, ' ms')}",
            f"  images/s/device    {_fmt(t['images_per_s_per_device'])}",
            f"  forward (median)   {_fmt(t['forward_time_s'], ' ms', 1e-3)}, "
            f"{_fmt(t['forward_images_per_s'])} images/s (inference, same batch)",
            f"  GFLOPs/image       xla {_fmt(t['flops_per_image_xla'], '', 1e9)}, "
            f"model (3x fwd) {_fmt(t['model_flops_per_image'], '', 1e9)}, "
            f"reference fwd {_fmt(t['reference_forward_flops_per_image'], '', 1e9)}",
            f"  TFLOP/s/device     xla {_fmt(t['tflops_per_device_xla'])}, "
            f"model {_fmt(t['tflops_per_device_model'])}",
            f"  MFU                xla {_fmt(t['mfu'])}, model {_fmt(t['mfu_model'])}",
            f"  peak memory        {_fmt(mem, ' MiB', 2**20)} ({t['memory']['source']})",
        ]
    if "flops" in result:
        f = result["flops"]
        lines += [
            "",
            f"train step FLOPs, compile-only ({f['dtype']}, batch {f['batch_per_device']}/device)",
            f"  lower {_fmt(f['lower_s'], ' s')}, compile {_fmt(f['compile_s'], ' s')}",
            f"  GFLOPs/image  xla compiled {_fmt(f.get('flops_per_image_xla'), '', 1e9)}, "
            f"xla lowered {_fmt(f.get('flops_per_image_xla_lowered'), '', 1e9)}, "
            f"model (3x fwd) {_fmt(f['model_flops_per_image'], '', 1e9)}",
            "  forward GFLOPs/image  analytic "
            f"{_fmt(f['forward_flops_per_image_analytic'], '', 1e9)}, "
            f"reference {f['reference_model']}: "
            f"{_fmt(f['reference_forward_flops_per_image'], '', 1e9)}",
        ]
    if "sample" in result and "runs" in result["sample"]:
        s = result["sample"]
        lines += [
            "",
            f"sampling ({s['dtype']}, classifier scale {s['classifier_scale']}, "
            f"cfg scale {s['cfg_scale']})",
            f"  {'sampler':<22} {'guidance':<10} {'NFE':>4} {'batch':>5} {'compile s':>9} "
            f"{'s/eval':>9} {'s/image':>9} {'img/s/dev':>9}",
        ]
        for r in s["runs"]:
            lines.append(
                f"  {r['sampler']:<22} {r['guidance']:<10} {r['nfe']:>4} {r['batch']:>5} "
                f"{r['compile_s']:>9.3g} {r['per_step_s']:>9.3g} {r['per_image_s']:>9.3g} "
                f"{r['images_per_s_per_device']:>9.3g}"
            )
        ov = s["guidance_overhead"]
        if isinstance(ov, dict):
            flops = s["guidance_overhead_flops_estimate"]
            flops = flops if isinstance(flops, dict) else {}
            lines.append("  guidance overhead (guided / unguided time per evaluation):")
            for tag, ratios in ov.items():
                lines.append(
                    f"    {tag}: "
                    + ", ".join(
                        f"{k} {v:.3g}x (FLOPs {_fmt(flops.get(k))}x)" for k, v in ratios.items()
                    )
                )
    if "aot" in result:
        lines += [
            "",
            f"TPU slices, compile-only ({result['aot']['note']}); MFU = 3 x analytic forward "
            "FLOPs / XLA's estimated step time / peak bf16",
            "",
            format_aot(result["aot"]),
        ]
    if "maxbatch" in result:
        m = result["maxbatch"]
        lines += ["", f"max batch per device: {m['max_batch_per_device']}"]
        if "reason" in m:
            lines.append(f"  ({m['reason']})")
        else:
            lines.append(
                f"  device memory {_fmt(m['device_memory_bytes'], ' GiB', 2**30)}; first failing "
                f"{m['first_failing_batch_per_device']}; probes {m['probes']}"
            )
    return "\n".join(lines)


def to_json(result: dict) -> str:
    def default(o):
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        return str(o)

    return json.dumps(result, indent=2, default=default)


__all__ = [
    "NA",
    "PEAK_BF16_FLOPS",
    "PRESETS",
    "TPU_GENERATIONS",
    "analytic_flops",
    "aot_max_batch",
    "aot_report",
    "aot_sample",
    "aot_train",
    "default_classifier_spec",
    "find_max_batch",
    "flops_report",
    "format_aot",
    "format_table",
    "forward_flops_per_image",
    "libtpu_available",
    "load_config",
    "max_batch",
    "parse_tpu_slice",
    "published_entry",
    "run",
    "sample_benchmark",
    "topology_devices",
    "topology_mesh",
    "train_benchmark",
]
