"""What the device and the compiler report: compiled-program memory, device memory limits,
peak FLOP/s, and the environment a benchmark ran in."""

from __future__ import annotations

import math
import os
import time

import jax

from adm_jax.train import metrics as train_metrics

NA = "n/a"
NOT_AVAILABLE = "not available"


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
