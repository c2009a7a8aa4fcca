"""End-to-end evaluation: sample .npz + reference batch -> FID, sFID, IS, precision, recall.

``evaluate(config, workdir)`` serves ``python -m adm_jax.main --mode=evaluate``;
``evaluate_npz`` is the same without a config; ``create_reference_batch`` writes new
reference batches in the published ``VIRTUAL_*.npz`` format.

Paths may be local or ``gs://``/``s3://``. In a multi-process run every process calls these
functions (feature extraction spans all devices) and gets the same numbers; process 0 writes
the files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import jax
import numpy as np

from adm_jax import paths, recipe
from adm_jax.evaluation import inception, metrics
from adm_jax.evaluation import reference_batch as rb
from adm_jax.evaluation.features import FeatureExtractor

METRIC_NAMES = ("fid", "sfid", "inception_score", "precision", "recall")


def _stats(features):
    return metrics.compute_statistics(features)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def create_reference_batch(
    path,
    image_batches: Iterable[np.ndarray],
    *,
    inception_params,
    resize: str = "tf",
    batch_size: int = 256,
    store_images: bool = True,
    total: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> rb.ReferenceBatch:
    """Computes Inception statistics of uint8 NHWC image batches and writes a reference batch.

    Keys: ``arr_0`` (the images, if store_images: needed for precision/recall), ``mu``,
    ``sigma`` (pool3), ``mu_s``, ``sigma_s`` (sFID spatial features), as the published files,
    plus ``inception_resize`` (which input path made the statistics; the reference evaluator
    ignores it). Images are spooled to local disk (next to ``path`` when that is local), never
    held in memory. Every process of a multi-process run calls this with the same batches;
    process 0 writes the file.
    """
    extractor = FeatureExtractor(inception_params, resize=resize, batch_size=batch_size, mesh=mesh)
    write = jax.process_index() == 0
    spool_dir = None
    if not paths.is_remote(path):
        spool_dir = paths.path(path).parent
        spool_dir.mkdir(parents=True, exist_ok=True)
    with rb.ImageSpool(dir=spool_dir) as spool:
        source = spool.tee(image_batches) if store_images and write else image_batches
        feats = extractor(source, total=total, desc="reference features")
        if not feats:
            raise ValueError("no images to build a reference batch from")
        mu, sigma = _stats(feats["pool3"])
        mu_s, sigma_s = _stats(feats["spatial_features_2023"])
        if write:
            rb.write_reference_batch(
                path,
                mu,
                sigma,
                mu_s,
                sigma_s,
                images=spool if store_images else None,
                extra={rb.RESIZE_KEY: np.array(resize)},
            )
    _sync("adm_jax.evaluation.reference_batch_written")
    paths.refresh(path)
    return rb.load_reference_batch(path)


def evaluate_npz(
    sample_npz,
    reference_npz,
    *,
    inception_params,
    batch_size: int = 256,
    resize: str = "tf",
    distance: str = "float32",
    split_size: int = metrics.SPLIT_SIZE,
    mesh: jax.sharding.Mesh | None = None,
) -> dict:
    """The reference evaluator's numbers for a sample batch against a reference batch.

    Uses the reference batch's stored statistics when they were made with the same ``resize``
    path (the published ones: "tf"), else recomputes them from its images. Precision/recall
    need the reference images (``arr_0``); without them they are None. Grey images
    (N, H, W, 1) are scored as the same grey image on three channels (the network takes RGB).
    Returns ``{fid, sfid, inception_score, precision, recall, num_samples, num_reference}``.
    """
    # Both files are checked (uint8 NHWC, 1 or 3 channels) before any feature is computed.
    samples = rb.open_images(sample_npz)
    ref = rb.load_reference_batch(reference_npz)
    extractor = FeatureExtractor(inception_params, resize=resize, batch_size=batch_size, mesh=mesh)
    ref_feats = None
    if ref.images is not None:
        ref_feats = extractor(
            ref.images.read_batches(extractor.batch_size),
            total=len(ref.images),
            desc="reference features",
        )
    if ref.has_stats and ref.resize == resize:
        ref_stats = (ref.mu, ref.sigma)
        ref_spatial_stats = (ref.mu_s, ref.sigma_s) if ref.mu_s is not None else None
    elif ref_feats is not None:
        ref_stats = _stats(ref_feats["pool3"])
        ref_spatial_stats = _stats(ref_feats["spatial_features_2023"])
    else:
        raise ValueError(
            f"{reference_npz}: statistics were computed with resize={ref.resize!r}, not "
            f"{resize!r}, and there are no images (arr_0) to recompute them"
        )
    sample_feats = extractor(
        samples.read_batches(extractor.batch_size), total=len(samples), desc="sample features"
    )
    if not sample_feats:
        raise ValueError(f"{sample_npz}: no samples in arr_0")
    out = metrics.metrics_from_features(
        None if ref_feats is None else ref_feats["pool3"],
        sample_feats["pool3"],
        sample_spatial=sample_feats["spatial_features_2023"],
        sample_probs=sample_feats["softmax_nobias"],
        ref_stats=ref_stats,
        ref_spatial_stats=ref_spatial_stats,
        split_size=split_size,
        distance=distance,
        mesh=extractor.mesh,
    )
    out["num_samples"] = len(samples)
    out["num_reference"] = None if ref.images is None else len(ref.images)
    return out


def format_table(results: dict) -> str:
    rows = [(k, results.get(k)) for k in METRIC_NAMES]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ----------"]
    for k, v in rows:
        lines.append(f"{k:<{width}}  {'n/a' if v is None else f'{v:.4f}'}")
    return "\n".join(lines)


def inception_settings(settings: recipe.EvaluateSettings) -> tuple[dict, dict]:
    """(Inception variables, ``evaluate_npz`` keyword arguments) of ``settings``."""
    variables = inception.load_inception_variables(
        settings.inception_weights or None,
        sha256=(settings.inception_sha256 or inception.WEIGHTS_SHA256)
        if settings.inception_sha256 is not None
        else None,
    )
    return variables, settings.metric_options()


def evaluate(config, workdir) -> dict:
    """``--mode=evaluate``: reads ``config.evaluate`` and writes ``<workdir>/evaluation/*.json``.

    Fields: sample_npz, reference_batch, inception_weights (path; empty = default locations,
    see docs/evaluation.md), batch_size, resize ("tf" | "torch"), and optionally
    inception_sha256 (expected SHA-256 of the source .pth; "none" skips the check) and
    distance ("float32" | "float64"). Every process of a multi-process run computes the same
    record; process 0 writes the JSON and prints the table.
    """
    settings = recipe.read_evaluate(config)
    sample_npz, reference = settings.sample_npz, settings.reference_batch
    if not sample_npz or not reference:
        raise ValueError(
            "config.evaluate.sample_npz and config.evaluate.reference_batch are required"
        )
    for field, value in (("sample_npz", sample_npz), ("reference_batch", reference)):
        if not paths.path(value).exists():
            raise ValueError(f"evaluate.{field}: {value}: no such file")
    variables, kwargs = inception_settings(settings)
    resize = settings.resize
    results = evaluate_npz(sample_npz, reference, inception_params=variables, **kwargs)
    record = {
        **results,
        "sample_npz": os.fspath(sample_npz),
        "reference_batch": os.fspath(reference),
        "resize": resize,
    }
    if jax.process_index() == 0:
        out_dir = paths.path(workdir) / "evaluation"
        out_dir.mkdir(parents=True, exist_ok=True)
        out_path = out_dir / f"{paths.path(sample_npz).stem}.json"
        paths.write_text_atomic(out_path, json.dumps(record, indent=2) + "\n")
        print(f"{sample_npz} vs {reference} (resize={resize}):")
        print(format_table(results))
        print(f"wrote {out_path}")
    _sync("adm_jax.evaluation.done")
    return record
