"""The one device-mesh builder: a ``("data", "fsdp")`` mesh for every job.

Training shards the batch over both axes and large arrays over ``"fsdp"``
(``adm_jax.train.sharding``); sampling, likelihood and evaluation use the same mesh with
``fsdp=1``, the batch over every device. It sits below ``train`` and ``sampling`` so both (and
the benchmark) build meshes the same way without importing each other or TensorFlow.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from absl import logging

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # a batch is split over both axes


def create_mesh(data: int = -1, fsdp: int = 1, *, devices=None) -> jax.sharding.Mesh:
    """Mesh of shape (data, fsdp) over ``devices`` (default: all); data=-1 takes the rest."""
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"fsdp: {fsdp} does not divide the device count {n}")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh: data {data} x fsdp {fsdp} != {n} devices")
    axis_types = (jax.sharding.AxisType.Auto,) * 2
    if devices == jax.devices():
        return jax.make_mesh((data, fsdp), AXES, axis_types=axis_types)
    return jax.sharding.Mesh(np.asarray(devices).reshape(data, fsdp), AXES, axis_types=axis_types)


def batch_mesh(batch_size: int | None = None, *, field: str = "sample.batch_size"):
    """The inference mesh (fsdp 1): all devices of all processes, unless a single-process run's
    ``batch_size`` does not divide the device count; then the largest device subset that it
    divides (batch 4 on 8 devices uses 4), so small configs still run. ``field`` names the
    config field in the multi-process error."""
    n = jax.device_count()
    if batch_size is None or batch_size % n == 0:
        return create_mesh()
    if jax.process_count() > 1:
        raise ValueError(
            f"{field}: the global batch ({batch_size}) must be a multiple of the {n} devices "
            "of a multi-process run"
        )
    used = math.gcd(batch_size, n)
    logging.warning("%s %d: running on %d of %d devices", field, batch_size, used, n)
    return create_mesh(devices=jax.devices()[:used])


def batch_axes(mesh) -> tuple[str, ...]:
    """The batch axes a mesh has (a 1-D ``("data",)`` mesh from a caller has only "data")."""
    return tuple(a for a in BATCH_AXES if a in mesh.shape)
