"""Evaluation as in the paper: FID Inception (Flax), FID/sFID/IS/precision/recall, bits/dim
on a data split (``nll``, the reference's image_nll.py), and the guidance sweep
(``guidance_sweep``: Table 4 / Figure 4, sampling and evaluating a grid of scales x samplers x
NFE).

Numbers follow openai/guided-diffusion ``evaluations/evaluator.py``; see docs/evaluation.md.
No TensorFlow on the import path (TFDS is imported only by ``iterate_tfds_images``).
"""

from adm_jax.evaluation.bpd import BpdProgram, nll
from adm_jax.evaluation.features import EVAL_OUTPUTS, FeatureExtractor, inception_fn
from adm_jax.evaluation.inception import (
    WEIGHTS_SHA256,
    WEIGHTS_URL,
    FIDInceptionV3,
    apply_inception,
    inception_features,
    load_inception_variables,
    preprocess,
    resize_bilinear_tf,
    resize_bilinear_torch,
    variables_from_state_dict,
)
from adm_jax.evaluation.metrics import (
    compute_statistics,
    frechet_distance,
    inception_score,
    manifold_radii,
    metrics_from_features,
    precision_recall,
    softmax_from_pool,
)
from adm_jax.evaluation.reference_batch import (
    ImageSpool,
    NpzArray,
    ReferenceBatch,
    iterate_image_folder,
    iterate_npz_images,
    iterate_tfds_images,
    load_reference_batch,
    open_npz_array,
    write_npz,
    write_reference_batch,
)
from adm_jax.evaluation.run import create_reference_batch, evaluate, evaluate_npz, format_table
from adm_jax.evaluation.sweep import (
    guidance_sweep,
    inception_metrics_fn,
    parse_scales,
    sampler_grid,
    write_sweep_report,
)
from adm_jax.recipe import NllSettings
from adm_jax.recipe import read_nll as nll_settings

__all__ = [
    "BpdProgram",
    "EVAL_OUTPUTS",
    "FIDInceptionV3",
    "FeatureExtractor",
    "ImageSpool",
    "NllSettings",
    "NpzArray",
    "ReferenceBatch",
    "WEIGHTS_SHA256",
    "WEIGHTS_URL",
    "apply_inception",
    "compute_statistics",
    "create_reference_batch",
    "evaluate",
    "evaluate_npz",
    "format_table",
    "frechet_distance",
    "guidance_sweep",
    "inception_features",
    "inception_fn",
    "inception_metrics_fn",
    "inception_score",
    "iterate_image_folder",
    "iterate_npz_images",
    "iterate_tfds_images",
    "load_inception_variables",
    "load_reference_batch",
    "manifold_radii",
    "metrics_from_features",
    "nll",
    "nll_settings",
    "open_npz_array",
    "parse_scales",
    "precision_recall",
    "preprocess",
    "resize_bilinear_tf",
    "resize_bilinear_torch",
    "sampler_grid",
    "softmax_from_pool",
    "variables_from_state_dict",
    "write_npz",
    "write_reference_batch",
    "write_sweep_report",
]
