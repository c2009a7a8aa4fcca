"""Cloud TPU slices without a TPU: what a slice name ("v5p-8") means, and its compile-only
devices and mesh (libtpu + ``jax.experimental.topologies``)."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os

from jax.experimental import mesh_utils, topologies

from adm_jax import mesh as mesh_lib


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
    devices = list(topology_devices(tpu_slice))
    ordered = mesh_utils.create_device_mesh((len(devices) // fsdp, fsdp), devices)
    return mesh_lib.create_mesh(fsdp=fsdp, devices=list(ordered.flat))
