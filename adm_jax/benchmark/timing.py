"""Timed runs of the compiled train step and of the inference forward on a fake batch: step
time, images/s, TFLOP/s and MFU, peak memory."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from adm_jax.benchmark.devices import (
    NA,
    NOT_AVAILABLE,
    device_memory_stats,
    memory_analysis,
    peak_flops,
)
from adm_jax.benchmark.train_step import (
    TrainSetup,
    compile_train_step,
    fake_batch,
    flops_fields,
    initial_state,
    train_setup,
)
from adm_jax.models import example_inputs
from adm_jax.recipe.train import train_fields


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
        "config_batch_size": int(train_fields(config)["batch_size"]),
        "batch_per_device": batch_per_device,
        "global_batch": setup.global_batch,
        "grad_accum_steps": setup.train.grad_accum_steps,
        "dtype": setup.train.dtype,
        "remat": setup.train.remat,
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
    result.update(flops_fields(setup, compiled, lowered))
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
