"""Editing existing images: ``python -m adm_jax.main --mode=edit``.

``edit.kind`` picks inpainting (RePaint), SDEdit or a class swap (DDIM inversion, then DDIM
under another label); see ``adm_jax.diffusion.editing``. The images come from ``edit.images``
(a folder, read with ADM's centre crop to the model's size, or a reference-format ``.npz``),
their own labels from ``edit.labels`` and the labels to steer towards from
``edit.target_labels``; inpainting masks from ``edit.masks`` (a standard kind or a folder of
mask PNGs, white = keep). The model, classifier, sampler, guidance scales, batch size and seed
are the ``sample.*`` fields, as in ``--mode=sample``.

The run is a sampling run (``adm_jax.sampling.sampler.run_job``): the same compiled program
per batch, shards written by every process and resumed after a kill, then
``OUTPUT_DIR/samples_{N}x{H}x{W}x{C}.npz`` (``arr_0`` the edited images, ``arr_1`` the target
labels) and ``OUTPUT_DIR/edits.png``: rows of input | mask | result (input | result without
a mask). Image ``i`` of batch ``b`` is input row ``(b * batch_size + i) % N`` and its noise
depends only on the seed and ``b``, so any number of processes writes the same images.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from absl import logging

from adm_jax import paths
from adm_jax.images import image_grid, save_png
from adm_jax.recipe.edit import MASK_KINDS, EditSettings, read_edit
from adm_jax.sampling import io
from adm_jax.sampling import sampler as sampler_lib

# Brush strokes of the free-form masks (as LaMa's / RePaint's "wide" and "narrow" masks):
# (strokes, width as a fraction of the image size).
_STROKES = {"thick": ((2, 4), (0.12, 0.25)), "thin": ((4, 8), (0.03, 0.07))}
GRID_ROWS = 16


# --------------------------------------------------------------------------------------------
# Inputs: images, labels, masks.


def _int_list(field: str, text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"{field}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{field}: expected comma-separated integers, got {text!r}")
    return values


def load_images(
    settings: EditSettings, image_shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 NHWC images of the model's size and their own labels (or None).

    A folder is read like ``python -m adm_jax.sampling.io from_folder --size``: ADM's centre
    crop, labels from the names when ``edit.labels`` is subdir / prefix / suffix.
    """
    size, _, channels = image_shape
    source = settings.images
    from_names = settings.labels if settings.labels in io.LABEL_SOURCES else "none"
    if paths.path(source).is_dir():
        files = io.list_image_files(source)
        images = np.stack(
            [io.read_image(paths.path(source) / f, size=size, channels=channels) for f in files]
        )
        names = io.class_names(files, from_names, source)
        labels = io.labels_from_names(names)[0] if names else None
    else:
        if from_names != "none":
            raise ValueError(
                f"edit.labels: {from_names!r} reads labels from file names, but edit.images "
                f"{source} is not a folder (a .npz brings its labels as arr_1)"
            )
        images, labels = io.load_samples_npz(source)
        if images.shape[1:] != image_shape:
            h, w, c = images.shape[1:]
            raise ValueError(
                f"edit.images: {source} holds {h}x{w}x{c} images, the model takes "
                f"{size}x{size}x{channels}"
            )
    if settings.num_images:
        if settings.num_images > len(images):
            raise ValueError(
                f"edit.num_images: {settings.num_images} exceeds the {len(images)} images of "
                f"{source}"
            )
        images = images[: settings.num_images]
        labels = None if labels is None else labels[: settings.num_images]
    if settings.labels and settings.labels not in io.LABEL_SOURCES:
        labels = np.resize(np.asarray(_int_list("edit.labels", settings.labels)), len(images))
    elif settings.labels == "none":
        labels = None
    return images, None if labels is None else np.asarray(labels, np.int64)


def standard_masks(kind: str, n: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, size, size, 1) float32 masks, 1 = keep: RePaint's test masks.

    half: the left half kept; every_second_line: even rows kept; super_resolve: one pixel of
    each 2x2 block kept (2x super-resolution); thick / thin: free-form brush strokes (wide /
    narrow), different for every image (``default_rng([seed, i])``).
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"edit.masks: expected one of {MASK_KINDS} or a folder, got {kind!r}")
    rows, cols = np.mgrid[:size, :size]
    if kind == "half":
        one = cols < size // 2
    elif kind == "every_second_line":
        one = rows % 2 == 0
    elif kind == "super_resolve":
        one = (rows % 2 == 0) & (cols % 2 == 0)
    else:
        return np.stack([_stroke_mask(kind, size, seed, i) for i in range(n)])[..., None]
    return np.broadcast_to(one.astype(np.float32)[None, ..., None], (n, size, size, 1)).copy()


def _stroke_mask(kind: str, size: int, seed: int, index: int) -> np.ndarray:
    rng = np.random.default_rng([seed, index, MASK_KINDS.index(kind)])
    (lo, hi), (w_lo, w_hi) = _STROKES[kind]
    rows, cols = np.mgrid[:size, :size].astype(np.float32) + 0.5
    hole = np.zeros((size, size), bool)
    for _ in range(rng.integers(lo, hi + 1)):
        radius = max(0.5, rng.uniform(w_lo, w_hi) * size / 2)
        y, x = rng.uniform(0, size, 2)
        for _ in range(rng.integers(1, 4)):  # a stroke of up to three segments
            angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.5) * size
            y2 = float(np.clip(y + length * np.sin(angle), 0, size))
            x2 = float(np.clip(x + length * np.cos(angle), 0, size))
            for s in np.linspace(0, 1, max(2, int(length * 2))):
                cy, cx = y + s * (y2 - y), x + s * (x2 - x)
                hole |= (rows - cy) ** 2 + (cols - cx) ** 2 <= radius**2
            y, x = y2, x2
    return (~hole).astype(np.float32)


def load_masks(settings: EditSettings, n: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size, 1) float32, 1 = keep: a standard kind or a folder of mask PNGs (one for
    every image, in file-name order, or one for all; white (>= 128) = keep)."""
    if settings.masks in MASK_KINDS:
        return standard_masks(settings.masks, n, size, seed)
    folder = paths.path(settings.masks)
    if not folder.is_dir():
        raise ValueError(
            f"edit.masks: expected one of {MASK_KINDS} or a folder of mask PNGs, got "
            f"{settings.masks!r} (no such folder)"
        )
    files = io.list_image_files(folder)
    if len(files) not in (1, n):
        raise ValueError(
            f"edit.masks: {folder} holds {len(files)} masks for {n} images; give one mask per "
            "image (in file-name order) or a single mask for all"
        )
    masks = []
    for name in files:
        grey = io.read_image(folder / name, channels=1)
        if grey.shape[:2] != (size, size):
            raise ValueError(
                f"edit.masks: {folder / name} is {grey.shape[1]}x{grey.shape[0]}, the images "
                f"are {size}x{size}"
            )
        mask = (grey >= 128).astype(np.float32)
        if mask.all():
            raise ValueError(
                f"edit.masks: {folder / name} keeps every pixel (all white): nothing to inpaint"
            )
        masks.append(mask)
    return np.resize(np.stack(masks), (n, size, size, 1))


def _target_labels(settings: EditSettings, source: np.ndarray | None, n: int, job) -> Any:
    text = settings.target_labels
    if not job.sampler.needs_labels:
        if text:
            raise ValueError(
                "edit.target_labels: the model is unconditional and no classifier guides it; "
                "leave it '' (or add sample.classifier_checkpoint)"
            )
        return None
    if text.lower() == "random":
        rng = np.random.default_rng([job.seed, n])
        return rng.integers(0, job.num_classes, n).astype(np.int32)
    if text:
        target = np.resize(np.asarray(_int_list("edit.target_labels", text)), n)
    elif source is not None:
        target = source
    else:
        raise ValueError(
            "edit.target_labels: the model takes labels and the images have none; give "
            "target labels (comma-separated ints, cycled) or 'random'"
        )
    bad = sorted({int(y) for y in target if not 0 <= y < job.num_classes})
    if bad:
        raise ValueError(f"edit.target_labels: {bad} outside [0, {job.num_classes})")
    return np.asarray(target, np.int32)


# --------------------------------------------------------------------------------------------
# The job.


@dataclasses.dataclass
class EditJob(sampler_lib.SamplingJob):
    """A sampling job whose batch ``b`` edits input rows ``b * B ..`` (cycled)."""

    images: np.ndarray | None = None  # uint8 NHWC
    masks: np.ndarray | None = None  # float32 (N, H, W, 1), 1 = keep
    source_labels: np.ndarray | None = None
    target_labels: np.ndarray | None = None

    def rows(self, batch_index: int) -> np.ndarray:
        return (batch_index * self.batch_size + np.arange(self.batch_size)) % len(self.images)

    def labels_for(self, batch_index: int) -> np.ndarray | None:
        if self.target_labels is None:
            return None
        return self.target_labels[self.rows(batch_index)]

    def batch_inputs(self, batch_index: int) -> dict[str, Any]:
        rows = self.rows(batch_index)
        inputs = {"x_known": self.images[rows]}
        if self.masks is not None:
            inputs["mask"] = self.masks[rows]
        if self.sampler.needs_source_labels:
            inputs["source_labels"] = self.source_labels[rows].astype(np.int32)
        return inputs


def build_edit_job(config: Any, workdir: str, settings: EditSettings) -> EditJob:
    job = sampler_lib.build_job(config, workdir, edit=settings.spec)
    if job.base_images is not None:
        raise ValueError("sample.checkpoint: editing takes a base model, not an upsampler")
    images, source = load_images(settings, job.sampler.image_shape)
    n = len(images)
    if job.sampler.needs_source_labels and source is None:
        raise ValueError(
            "edit.labels: class_swap inverts each image under its own label; give the labels "
            "(an .npz with arr_1, subdir / prefix / suffix for a folder, or comma-separated ints)"
        )
    if source is not None and job.num_classes is not None:
        bad = sorted({int(y) for y in source if not 0 <= y < job.num_classes})
        if bad:
            raise ValueError(f"edit.labels: {bad} outside [0, {job.num_classes})")
    masks = None
    if settings.spec.uses_mask:
        masks = load_masks(settings, n, job.sampler.image_shape[0], job.seed)
    provenance = dict(
        job.provenance,
        edit=dataclasses.asdict(settings.spec),
        edit_images=paths.absolute(settings.images),
        edit_inputs_shape=list(images.shape),
        edit_masks=settings.masks,
        edit_labels=settings.labels,
        edit_target_labels=settings.target_labels,
    )
    fields = {f.name: getattr(job, f.name) for f in dataclasses.fields(sampler_lib.SamplingJob)}
    fields.update(provenance=provenance, default_num_samples=n)
    return EditJob(
        **fields,
        images=images,
        masks=masks,
        source_labels=source,
        target_labels=_target_labels(settings, source, n, job),
    )


def edit_grid(job: EditJob, results: np.ndarray) -> np.ndarray:
    """Rows of input | mask | result (input | result without masks), two triples per row."""
    n = min(len(results), GRID_ROWS * 2)
    columns = [job.images[:n]]
    if job.masks is not None:
        mask = np.round(job.masks[:n] * 255).astype(np.uint8)
        columns.append(np.broadcast_to(mask, job.images[:n].shape))
    columns.append(results[:n])
    tiles = np.stack(columns, axis=1).reshape(-1, *results.shape[1:])
    return image_grid(tiles, ncols=len(columns) * min(2, n))


def edit(config: Any, workdir: str, *, max_batches: int | None = None) -> str | None:
    """``--mode=edit``: edits ``edit.images``; returns the ``.npz`` of the results."""
    settings = read_edit(config, workdir)
    job = build_edit_job(config, workdir, settings)
    n = job.default_num_samples
    logging.info(
        "Editing %d images (%s, %d model evaluations each) into %s",
        n,
        settings.spec.kind,
        settings.spec.nfe(job.sampler.method),
        settings.output_dir,
    )
    final = sampler_lib.run_job(
        job,
        settings.output_dir,
        num_samples=n,
        max_batches=max_batches,
    )
    if final is not None and jax.process_index() == 0:
        results, _ = io.load_samples_npz(final)
        grid_path = paths.path(settings.output_dir) / "edits.png"
        save_png(grid_path, edit_grid(job, results))
        logging.info("Wrote %s", grid_path)
    return final
