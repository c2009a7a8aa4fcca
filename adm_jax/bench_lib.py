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
import importlib.util
import json
import math
import os
import pathlib
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

from adm_jax.train import config_lib, sharding, steps
from adm_jax.train import metrics as train_metrics
from adm_jax.train import state as state_lib

NA = "n/a"
NOT_AVAILABLE = "not available"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PUBLISHED_MODELS = pathlib.Path(
    os.environ.get("ADM_JAX_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden")
) / ("published_models.json")

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
    # Sampler tags (adm_jax.sampling.methods.parse_sampler): DDPM-250, DDIM-25, DPM-Solver++.
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
    from adm_jax.demo import DEMO_SECTIONS

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
    return sharding.create_mesh(fsdp=fsdp, devices=devices)


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
    from adm_jax.models import abstract_params, example_inputs

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


def compile_train_step(setup: TrainSetup):
    """(lowered, compiled, lower_s, compile_s) from abstract inputs only."""
    with jax.set_mesh(setup.mesh):
        t0 = time.perf_counter()
        lowered = setup.jitted.lower(setup.abstract_state, abstract_batch(setup))
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    return lowered, compiled, t1 - t0, t2 - t1


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


def train_benchmark(
    config, mesh, *, batch_per_device: int, num_steps: int = 20, warmup: int = 2, init="real"
) -> dict:
    """Times the compiled train step on a fake batch; see the module docstring."""
    setup = train_setup(config, mesh, batch_per_device)
    lowered, compiled, lower_s, compile_s = compile_train_step(setup)
    state = initial_state(setup, init)
    batch = fake_batch(setup)
    times = []
    with jax.set_mesh(mesh):
        for i in range(warmup + num_steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    step_time = statistics.median(times)
    n = mesh.size
    result = {
        "config_batch_size": int(config.train.batch_size),
        "batch_per_device": batch_per_device,
        "global_batch": setup.global_batch,
        "grad_accum_steps": int(setup.config.train.grad_accum_steps),
        "dtype": setup.config.train.dtype,
        "remat": bool(setup.config.train.remat),
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
    fits: Callable[[int], bool], *, start: int = 1, limit: int = 1024, resolution: float = 0.0
) -> dict:
    """Largest b in [start, limit] with fits(b), assuming fits is monotone: doubling, then
    bisection until the bracket is within max(1, resolution * lo). Returns {"max_batch",
    "first_failing", "probes": [(b, fits)]}; max_batch 0 if even ``start`` fails."""
    probes = []

    def probe(b):
        ok = bool(fits(b))
        probes.append((b, ok))
        return ok

    if not probe(start):
        return {"max_batch": 0, "first_failing": start, "probes": probes}
    lo, hi = start, None
    while hi is None:
        nxt = min(lo * 2, limit)
        if nxt == lo:
            return {"max_batch": lo, "first_failing": None, "probes": probes}
        if probe(nxt):
            lo = nxt
        else:
            hi = nxt
    while hi - lo > max(1, int(resolution * lo)):
        mid = (lo + hi) // 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return {"max_batch": lo, "first_failing": hi, "probes": probes}


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
    from adm_jax.models import abstract_params, example_inputs

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
    from adm_jax.models import module_from_kwargs, reference_kwargs_from_flags

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
    options = dict(dtype=config_lib.DTYPES[config.train.dtype], remat=bool(config.train.remat))
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
    from adm_jax.sampling import BatchSampler, methods

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
    size = config_lib.model_image_size(config)
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
            sampler = BatchSampler(
                diffusion,
                lambda p, x, t, y=None, net=net: net.apply({"params": p}, x, t, y=y),
                image_shape=(size, size, int(config.data.channels)),
                batch_size=batch,
                mesh=mesh,
                classifier_apply=(
                    (lambda p, x, t: classifier.apply({"params": p}, x, t)) if guided else None
                ),
                class_cond=class_cond,
                method=spec,
                null_label=net.null_label if kind == "cfg" else None,
            )
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
                jax.block_until_ready(compiled(*args))  # warm-up
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    out = compiled(*args)
                    jax.block_until_ready(out)
                    times.append(time.perf_counter() - t0)
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
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Runs the requested parts and returns one JSON-able dict. ``sample_respacings`` is the
    old name of ``samplers`` ("250" = "ddpm250")."""
    config, embedded_classifier = split_config(config)
    classifier_config = classifier_config or embedded_classifier
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
        },
    }
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
    "analytic_flops",
    "default_classifier_spec",
    "find_max_batch",
    "flops_report",
    "format_table",
    "forward_flops_per_image",
    "load_config",
    "max_batch",
    "published_entry",
    "run",
    "sample_benchmark",
    "train_benchmark",
]
