"""``config.evaluate`` and ``config.nll`` read and checked once, into ``EvaluateSettings``
and ``NllSettings`` (see configs/default.py for the fields' meanings)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from adm_jax.recipe.reader import config_get, config_text

RESIZES = ("tf", "torch")
DISTANCES = ("float32", "float64")


@dataclasses.dataclass(frozen=True)
class EvaluateSettings:
    """``config.evaluate``. ``inception_weights`` "" = the default locations;
    ``inception_sha256`` None = no check ("none"), "" = the official weights' hash."""

    sample_npz: str = ""
    reference_batch: str = ""
    inception_weights: str = ""
    inception_sha256: str | None = ""
    batch_size: int = 256
    resize: str = "tf"
    distance: str = "float32"

    def metric_options(self) -> dict[str, Any]:
        """``evaluate_npz``'s keyword arguments besides the Inception weights."""
        return dict(batch_size=self.batch_size, resize=self.resize, distance=self.distance)


def read_evaluate(config: Any) -> EvaluateSettings:
    """``config.evaluate`` (empty or missing fields: the defaults); one-line ValueErrors."""
    ev = config_get(config, "evaluate")
    sha = config_text(ev, "inception_sha256")
    batch_size = config_get(ev, "batch_size", None) or 256
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"evaluate.batch_size: expected a positive integer, got {batch_size!r}")
    resize = config_text(ev, "resize") or "tf"
    if resize not in RESIZES:
        raise ValueError(f"evaluate.resize: expected one of {RESIZES}, got {resize!r}")
    distance = config_text(ev, "distance") or "float32"
    if distance not in DISTANCES:
        raise ValueError(f"evaluate.distance: expected one of {DISTANCES}, got {distance!r}")
    return EvaluateSettings(
        sample_npz=config_text(ev, "sample_npz"),
        reference_batch=config_text(ev, "reference_batch"),
        inception_weights=config_text(ev, "inception_weights"),
        inception_sha256=None if sha.lower() == "none" else sha,
        batch_size=int(batch_size),
        resize=resize,
        distance=distance,
    )


@dataclasses.dataclass(frozen=True)
class NllSettings:
    """``config.nll``, checked (see configs/default.py for the meanings)."""

    checkpoint: str
    split: str
    num_samples: int
    batch_size: int
    clip_denoised: bool
    timestep_respacing: str
    seed: int


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


_CHECKS = {
    "checkpoint": (lambda v: isinstance(v, str), "a path string ('' = sample.checkpoint)"),
    "split": (lambda v: isinstance(v, str), "a TFDS split name ('' = data.eval_split)"),
    "num_samples": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = the whole split)"),
    "batch_size": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "clip_denoised": (lambda v: isinstance(v, bool), "True or False"),
    "timestep_respacing": (lambda v: isinstance(v, str), "a respacing string ('' = all steps)"),
    "seed": (_is_int, "an integer"),
}


def read_nll(config: Any) -> NllSettings:
    """``config.nll`` as ``NllSettings``; a one-line ``ValueError`` names a bad field."""
    section = config_get(config, "nll")
    if section is None:
        raise ValueError("nll: missing config section (configs/default.py defines it)")
    for name in section:
        if name not in _CHECKS:
            raise ValueError(f"nll.{name}: unknown field; expected one of {sorted(_CHECKS)}")
    values = {}
    for name, (ok, expected) in _CHECKS.items():
        if name not in section:
            raise ValueError(f"nll.{name}: missing field ({expected})")
        value = section[name]
        if not ok(value):
            raise ValueError(f"nll.{name}: expected {expected}, got {value!r}")
        values[name] = value
    n, pc, dc = values["batch_size"], jax.process_count(), jax.device_count()
    if pc > 1 and n % dc:
        raise ValueError(
            f"nll.batch_size: the global batch ({n}) must be a multiple of the {dc} devices of "
            "a multi-process run"
        )
    return NllSettings(**values)
