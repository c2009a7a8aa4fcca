"""Sample files: the reference ``.npz`` layout, atomic writes, streaming assembly, PNG grids.

The reference scripts (``image_sample.py``, ``classifier_sample.py``) save
``np.savez(path, images, labels)``: ``arr_0`` uint8 NHWC images, ``arr_1`` int labels when
class-conditional or guided. The evaluator and ``super_res_sample.py`` read exactly that, so we
write the same thing. Every path may be local or in a bucket (``gs://``, ``s3://``; see
``adm_jax.paths``); files are written atomically (a temporary name and a rename locally, one
upload remotely), so a reader (or a resumed run) never sees half a file.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterable, Sequence

import numpy as np

from adm_jax import paths

IMAGES_KEY = "arr_0"
LABELS_KEY = "arr_1"


def save_samples_npz(path: str, images: np.ndarray, labels: np.ndarray | None = None) -> str:
    """Writes ``arr_0`` (uint8 NHWC) and optional ``arr_1`` (labels) atomically."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images: expected uint8 NHWC, got {images.dtype} {images.shape}")
    arrays = {IMAGES_KEY: images}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels: expected shape {images.shape[:1]}, got {labels.shape}")
        arrays[LABELS_KEY] = labels
    with paths.open_atomic(path) as f:  # a file object keeps np.savez from appending ".npz"
        np.savez(f, **arrays)
    return path


def load_samples_npz(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Returns ``(images, labels or None)`` from a reference-format sample file."""
    with paths.path(path).open("rb") as f, np.load(f) as data:
        if IMAGES_KEY not in data:
            raise ValueError(f"{path}: not a sample file (no {IMAGES_KEY!r}; keys {data.files})")
        images = data[IMAGES_KEY]
        labels = data[LABELS_KEY] if LABELS_KEY in data else None
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"{path}: arr_0 must be uint8 NHWC, got {images.dtype} {images.shape}")
    return images, labels


def write_npz_streaming(
    path: str,
    arrays: dict[str, tuple[Sequence[int], np.dtype, Iterable[np.ndarray]]],
) -> str:
    """Writes an ``.npz`` whose arrays arrive in chunks along axis 0.

    ``arrays`` maps a key to ``(shape, dtype, chunks)``; the chunks must fill ``shape`` exactly.
    Assembling 50k ImageNet-256 samples (~10 GB) this way never holds them all in memory. The
    file is an ordinary uncompressed (zip64) npz that ``np.load`` reads.
    """
    with (
        paths.open_atomic(path) as raw,
        zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as zf,
    ):
        for key, (shape, dtype, chunks) in arrays.items():
            shape, dtype = tuple(int(s) for s in shape), np.dtype(dtype)
            header = {
                "descr": np.lib.format.dtype_to_descr(dtype),
                "fortran_order": False,
                "shape": shape,
            }
            rows = 0
            with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, header)
                for chunk in chunks:
                    chunk = np.ascontiguousarray(chunk, dtype=dtype)
                    if chunk.shape[1:] != shape[1:]:
                        raise ValueError(f"{key}: chunk {chunk.shape} does not fit {shape}")
                    rows += chunk.shape[0]
                    f.write(chunk.tobytes())
            if rows != shape[0]:
                raise ValueError(f"{key}: chunks hold {rows} rows, expected {shape[0]}")
    return path


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tiles NHWC images into one (rows*H, cols*W, C) image with ``pad`` pixels between."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = image
    return grid


def save_image_grid(path: str, images: np.ndarray, max_images: int = 64) -> str:
    """Saves the first ``max_images`` uint8 NHWC images as one PNG grid (atomically)."""
    from PIL import Image

    grid = image_grid(np.asarray(images)[:max_images])
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    with paths.open_atomic(path) as f:
        Image.fromarray(grid).save(f, format="PNG")
    return path
