"""XLA:CPU flags that the entry points (``main``, ``bench``, ``demo``) and the tests set before
JAX starts its CPU backend.

jaxlib 0.10's XLA:CPU hands convolutions, dots, elementwise ops and reductions to YNNPACK by
default. On the project's 2-core CPU, YNNPACK's convolutions (above all the weight gradients,
a 16x16 window over the batch) run 2-4x slower than the Eigen kernels XLA uses otherwise, while
its reductions are 3-5x faster than XLA's own loops. Keeping YNNPACK for reductions only takes
the demo UNet's train step from 31 to 55-63 img/s and halves the sampler's time per step
(docs/benchmarks.md, "CPU: where the train step lost to PyTorch"). The flags choose kernels,
not math: results differ by float32 round-off. TPU and GPU backends ignore them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping

import jax
import jaxlib

CPU_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "reduce"}
# The flag names exist from this jaxlib on; XLA aborts the process on an unknown flag.
MIN_JAXLIB = (0, 10)


def _jaxlib_version() -> tuple[int, ...]:
    return tuple(int(p) for p in jaxlib.__version__.split(".")[:2] if p.isdigit())


def _backends_started() -> bool:
    # jax has no public question for this; a jax without the private one gets no warning.
    started = getattr(getattr(jax._src, "xla_bridge", None), "backends_are_initialized", None)
    return bool(started and started())


def set_cpu_flags(environ: MutableMapping[str, str] = os.environ) -> str:
    """Appends ``CPU_FLAGS`` to ``XLA_FLAGS`` (each unless XLA_FLAGS already names it: the
    user's setting wins) and returns the new value. XLA reads XLA_FLAGS when the first backend
    starts, so call this before the first computation; later it has no effect (logged)."""
    current = environ.get("XLA_FLAGS", "")
    if _jaxlib_version() < MIN_JAXLIB:
        return current
    extra = [f"--{name}={value}" for name, value in CPU_FLAGS.items() if name not in current]
    if extra:
        environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
        if _backends_started():
            logging.warning(
                "XLA_FLAGS %s set after JAX started its backends: they take effect in the next "
                "process only",
                " ".join(extra),
            )
    return environ.get("XLA_FLAGS", "")
