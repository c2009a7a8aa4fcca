"""Batch sampling to reference-format ``.npz`` + PNG: sharded, resumable, guided, two-stage.

``sample(config, workdir)`` is ``--mode=sample``; ``guidance_sweep(config, workdir)`` samples
and evaluates a range of classifier scales (the paper's Table 4 / Figure 4).
"""

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
    check_matches_config,
    load_checkpoint,
    make_mesh,
    parse_class_labels,
    run_job,
    sample,
    samples_filename,
    to_uint8,
)
from adm_jax.sampling.sweep import guidance_sweep, write_sweep_report
from adm_jax.sampling.two_stage import load_base_samples, sample_two_stage

__all__ = [
    "BatchSampler",
    "SamplingJob",
    "assemble",
    "build_job",
    "check_matches_config",
    "guidance_sweep",
    "image_grid",
    "load_base_samples",
    "load_checkpoint",
    "load_samples_npz",
    "make_mesh",
    "parse_class_labels",
    "run_job",
    "sample",
    "sample_two_stage",
    "samples_filename",
    "save_image_grid",
    "save_samples_npz",
    "to_uint8",
    "write_npz_streaming",
    "write_sweep_report",
]
