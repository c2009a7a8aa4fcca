"""Two-stage sampling: base samples (64 or 128) upsampled by a super-resolution model (256, 512).

The reference (``scripts/super_res_sample.py``) feeds the base ``.npz`` images as ``low_res`` in
[-1, 1] (``x / 127.5 - 1``) and, for class-conditional upsamplers, their ``arr_1`` labels as
``y``; the model upsamples ``low_res`` bilinearly itself. ``sampler.sample`` does this whenever
the checkpoint is a ``"superres"`` model, with any sampler (classifier-free guidance runs the
upsampler on a doubled batch, ``low_res`` repeated); this module holds the helper that chains both
stages (the base-sample reader is ``io.load_base_samples``).
"""

from __future__ import annotations

import copy
from typing import Any

from adm_jax import paths
from adm_jax.sampling.io import load_base_samples  # noqa: F401 - the base-sample reader
from adm_jax.sampling.sampler import output_dir_for, sample


def sample_two_stage(base_config: Any, upsampler_config: Any, workdir: str) -> tuple[str, str]:
    """Runs the base model, then the upsampler on its samples; returns both ``.npz`` paths.

    Each config is a complete sampling config (``--mode=sample``) for its own checkpoint, with
    its own ``sample.sampler`` / ``steps`` / ``cfg_scale`` / ``classifier_scale`` (e.g. a
    guided DPM-Solver++ base and an unguided DDPM upsampler); the upsampler's
    ``sample.base_samples`` is set to the base run's output.
    """
    base_config, upsampler_config = copy.deepcopy(base_config), copy.deepcopy(upsampler_config)
    out = output_dir_for(base_config, workdir)
    if out == output_dir_for(upsampler_config, workdir):  # one shard folder each
        base_config.sample.output_dir = str(paths.path(out) / "base")
        upsampler_config.sample.output_dir = str(paths.path(out) / "upsampled")
    base_npz = sample(base_config, workdir)
    upsampler_config.sample.base_samples = base_npz
    return base_npz, sample(upsampler_config, workdir)
