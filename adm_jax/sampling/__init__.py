"""Batch sampling to reference-format ``.npz`` + PNG: sharded, resumable, guided, two-stage.

``sample(config, workdir)`` is ``--mode=sample`` (the guidance sweep, which samples and then
evaluates, is ``adm_jax.evaluation.guidance_sweep``).
``sampler_spec`` / ``sample_images`` pick and run DDPM, DDIM or DPM-Solver++.
"""

import warnings

from adm_jax.checkpoints import check_matches_config, load_checkpoint
from adm_jax.diffusion.methods import SAMPLERS, SamplerSpec, sample_images
from adm_jax.images import to_uint8
from adm_jax.recipe import SampleSettings, parse_class_labels, read_sample, sampler_spec
from adm_jax.sampling.io import (
    image_grid,
    load_samples_npz,
    save_image_grid,
    save_samples_npz,
    write_npz_streaming,
)
from adm_jax.sampling.sampler import (
    BatchSampler,
    SamplingJob,
    assemble,
    build_job,
    make_mesh,
    run_job,
    sample,
    samples_filename,
)
from adm_jax.sampling.two_stage import load_base_samples, sample_two_stage

# ``python -m adm_jax.sampling.io`` (the image conversion CLI) runs a module this package has
# already imported; runpy's warning about that is noise here (io keeps no module state).
warnings.filterwarnings(
    "ignore", r"'adm_jax\.sampling\.io' found in sys\.modules", RuntimeWarning, "runpy"
)

__all__ = [
    "SAMPLERS",
    "BatchSampler",
    "SampleSettings",
    "SamplerSpec",
    "SamplingJob",
    "assemble",
    "build_job",
    "check_matches_config",
    "image_grid",
    "load_base_samples",
    "load_checkpoint",
    "load_samples_npz",
    "make_mesh",
    "parse_class_labels",
    "read_sample",
    "run_job",
    "sample",
    "sample_images",
    "sample_two_stage",
    "sampler_spec",
    "samples_filename",
    "save_image_grid",
    "save_samples_npz",
    "to_uint8",
    "write_npz_streaming",
]
