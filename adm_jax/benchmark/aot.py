"""Compile-only fit on a TPU slice, without a TPU: the train step and the sampling program
compiled for ``topology``'s devices, per-chip HBM use and whether it fits, the largest batch
that fits, FLOPs per chip and XLA's estimated step time with the MFU it implies."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adm_jax import recipe
from adm_jax.benchmark.batch_search import find_max_batch
from adm_jax.benchmark.devices import memory_analysis
from adm_jax.benchmark.flops import cost_analysis, forward_flops_per_image
from adm_jax.benchmark.sampling import batch_sampler, cfg_module, model_evaluations
from adm_jax.benchmark.topology import TpuSlice, parse_tpu_slice, topology_devices, topology_mesh
from adm_jax.benchmark.train_step import lower_train_step, train_setup
from adm_jax.models import abstract_params
from adm_jax.recipe import config as config_lib
from adm_jax.recipe.train import read_train, train_fields

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
    micro = read_train(config).microbatch
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
    accum = setup.train.grad_accum_steps
    # XLA's cost analysis counts a loop body once: with microbatches (a lax.scan), the FLOPs
    # and the estimate cover one microbatch and the update.
    images = batch_per_chip
    out = {
        "batch_per_chip": batch_per_chip,
        "global_batch": setup.global_batch * accum,
        "grad_accum_steps": accum,
        "mesh": dict(mesh.shape),
        "dtype": setup.train.dtype,
        "remat": setup.train.remat,
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
    dtype = dtype or train_fields(config)["dtype"]
    spec = recipe.sampler_spec(config.sample)
    diffusion = config_lib.build_diffusion(config, timestep_respacing=spec.respacing)
    mesh = topology_mesh(tpu_slice, fsdp=1)
    classifier = None
    if classifier_config is not None:
        guidance = "classifier"
        net = config_lib.build_model(config, dtype=config_lib.DTYPES[dtype], remat=False)
        classifier = config_lib.build_model(
            classifier_config, dtype=config_lib.DTYPES[dtype], remat=False
        )
    elif config.sample.get("cfg_scale") is not None and config.model.get("class_cond"):
        guidance = "cfg"
        net = cfg_module(config, dtype)
    else:
        guidance = "none"
        net = config_lib.build_model(config, dtype=config_lib.DTYPES[dtype], remat=False)
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
    nfe = model_evaluations(sampler.method, diffusion)
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
    config_fsdp = int(train_fields(config)["fsdp"])  # as given: train_setup checks it
    results = []
    for tpu_slice in parsed:
        gen = tpu_slice.generation
        devices = topology_devices(tpu_slice)
        fsdp = math.gcd(config_fsdp, tpu_slice.num_chips)
        mesh = topology_mesh(tpu_slice, fsdp)
        entry = {
            "slice": tpu_slice.name,
            "topology": tpu_slice.topology,
            "chips": tpu_slice.num_chips,
            "device_kind": devices[0].device_kind,
            "hbm_bytes_per_chip": gen.hbm_bytes,
            "peak_bf16_flops_per_chip": gen.peak_bf16_flops,
            "config_fsdp": config_fsdp,
        }
        if fsdp != config_fsdp:
            entry["fsdp_note"] = (
                f"train.fsdp {config_fsdp} does not divide {tpu_slice.num_chips} chips: fsdp {fsdp}"
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
