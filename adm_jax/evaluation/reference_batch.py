"""Sample/reference ``.npz`` I/O in the reference evaluator's format, without TensorFlow.

A reference batch (the published ``VIRTUAL_*.npz``) holds ``arr_0`` (uint8 NHWC images,
optional), ``mu``/``sigma`` (pool3 statistics) and ``mu_s``/``sigma_s`` (spatial statistics).
A sample batch holds ``arr_0`` (and ``arr_1`` labels for conditional models).

Sample files reach tens of GB, so images are read in batches (``open_npz_array``, shared with
``adm_jax.sampling.io``, which the sampler writes with) and checked to be uint8 NHWC with 1 or
3 channels before any feature is computed. Every path may be local or in a bucket (``gs://``,
``s3://``; ``adm_jax.paths``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Iterator

import numpy as np

from adm_jax import paths
from adm_jax.sampling.io import (
    NpzArray,
    NpzKeyError,
    check_images,
    list_image_files,
    open_images,
    open_npz_array,
    read_image,
)

__all__ = [  # the readers live in sampling.io; evaluation code imports them from here too
    "ImageSpool",
    "NpzArray",
    "NpzKeyError",
    "ReferenceBatch",
    "check_images",
    "iterate_image_folder",
    "iterate_npz_images",
    "iterate_tfds_images",
    "load_reference_batch",
    "open_images",
    "open_npz_array",
    "write_npz",
    "write_reference_batch",
]


def iterate_npz_images(path, batch_size: int, key: str = "arr_0") -> Iterator[np.ndarray]:
    """Batches of ``key`` (uint8 NHWC images) of a sample/reference .npz, streamed."""
    return open_npz_array(path, key).read_batches(batch_size)


# ----------------------------------------------------------------------------------------------
# Reference batches.


# Extra key recording which Inception input path produced the statistics; absent in the
# published batches, whose statistics come from the evaluator's TF graph ("tf").
RESIZE_KEY = "inception_resize"


@dataclasses.dataclass
class ReferenceBatch:
    """A reference batch: statistics (if stored) plus a lazy handle on its images (if stored)."""

    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    images: NpzArray | None = None  # arr_0
    resize: str = "tf"  # input path the statistics were computed with

    @property
    def has_stats(self) -> bool:
        return self.mu is not None and self.sigma is not None


def load_reference_batch(path) -> ReferenceBatch:
    """Reads a ``VIRTUAL_*.npz``-style file (statistics eagerly, images lazily).

    One-line errors name the file: not an npz, neither images nor statistics (with the keys it
    has), images that are not uint8 NHWC with 1 or 3 channels.
    """
    name = os.fspath(path)
    with paths.path(path).open("rb") as raw:
        if raw.read(4) != b"PK\x03\x04":
            raise ValueError(
                f"{name}: not an .npz file (no zip archive); expected a reference batch "
                "(arr_0 uint8 NHWC images and/or mu, sigma statistics)"
            )
        raw.seek(0)
        try:
            f = np.load(raw)
        except zipfile.BadZipFile as err:
            raise ValueError(f"{name}: damaged .npz file ({err})") from None
        with f:
            keys = set(f.files)
            stats = {k: f[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys}
            resize = str(f[RESIZE_KEY]) if RESIZE_KEY in keys else "tf"
    images = open_images(path) if "arr_0" in keys else None
    if images is None and "mu" not in stats:
        raise NpzKeyError(
            f"{name}: neither images (arr_0) nor statistics (mu, sigma) in this reference batch "
            f"(it holds {sorted(keys)})"
        )
    return ReferenceBatch(images=images, resize=resize, **stats)


class ImageSpool:
    """Collects image batches in a temporary file: their count is only known at the end.

    ``tee(batches)`` passes batches through (e.g. to a FeatureExtractor) while spooling them,
    so a reference batch's images and statistics come from one pass over the source.
    """

    def __init__(self, dir=None):
        self._file = tempfile.TemporaryFile(dir=dir)
        self.count, self.tail, self.dtype = 0, None, None

    def add(self, batch):
        batch = np.ascontiguousarray(batch)
        if self.tail is None:
            self.tail, self.dtype = batch.shape[1:], batch.dtype
        elif batch.shape[1:] != self.tail or batch.dtype != self.dtype:
            raise ValueError(
                f"image batches differ: {batch.shape[1:]} {batch.dtype} after {self.tail} "
                f"{self.dtype}"
            )
        self._file.write(batch.tobytes())
        self.count += len(batch)

    def tee(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for batch in batches:
            self.add(batch)
            yield batch

    def write_npy(self, f):
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(self.dtype or np.uint8)),
            "fortran_order": False,
            "shape": (self.count, *(self.tail or ())),
        }
        np.lib.format.write_array_header_2_0(f, header)
        self._file.seek(0)
        shutil.copyfileobj(self._file, f, 1 << 24)

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_npz(path, arrays: dict, images: ImageSpool | None = None):
    """Writes an uncompressed .npz (``arr_0`` from ``images`` first, then ``arrays``).

    Written atomically (``paths.open_atomic``), so a crash never leaves a truncated batch.
    """
    path = paths.path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write():  # repeatable: the spool is read from its start each time
        with (
            paths.open_atomic(path) as raw,
            zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as zf,
        ):
            if images is not None:
                with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                    images.write_npy(f)
            for key, value in arrays.items():
                with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)

    paths.with_retries("write", path, write)


def write_reference_batch(path, mu, sigma, mu_s=None, sigma_s=None, *, images=None, extra=None):
    """Writes a reference batch in the published format (``images``: an ImageSpool)."""
    arrays = {"mu": mu, "sigma": sigma}
    if mu_s is not None:
        arrays.update(mu_s=mu_s, sigma_s=sigma_s)
    arrays.update(extra or {})
    write_npz(path, arrays, images)


# ----------------------------------------------------------------------------------------------
# Generic image sources (uint8 NHWC batches) for building reference batches.


def _batched(items: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    buf = []
    for item in items:
        buf.append(item)
        if len(buf) == batch_size:
            yield np.stack(buf)
            buf = []
    if buf:
        yield np.stack(buf)


def iterate_image_folder(
    folder, image_size: int, batch_size: int = 256, *, limit: int | None = None
) -> Iterator[np.ndarray]:
    """uint8 NHWC RGB batches from an image folder (recursive, the reference's order, ADM
    centre crop; ``adm_jax.sampling.io.read_image``). One-line errors name the folder or
    file: no such folder, no images, an unreadable image."""
    folder = paths.path(folder)
    files = list_image_files(folder)
    if limit is not None:
        files = files[:limit]
    images = (read_image(folder / rel, size=image_size, channels=3) for rel in files)
    return _batched(images, batch_size)


def iterate_tfds_images(
    name: str,
    image_size: int,
    batch_size: int = 256,
    *,
    split: str = "train",
    data_dir=None,
    limit: int | None = None,
    image_key: str = "image",
) -> Iterator[np.ndarray]:
    """uint8 NHWC batches from a TFDS dataset (imports tensorflow_datasets only when called)."""
    import tensorflow_datasets as tfds  # noqa: PLC0415  (keeps TF off the import path)
    from PIL import Image  # noqa: PLC0415

    from adm_jax.data.preprocessing import center_crop_arr  # imports TFDS as well

    ds = tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False)
    if limit is not None:
        ds = ds.take(limit)

    def images():
        for ex in tfds.as_numpy(ds):
            img = ex[image_key]
            if img.shape[-1] == 1:
                img = np.repeat(img, 3, axis=-1)
            if img.shape[:2] != (image_size, image_size):
                img = center_crop_arr(Image.fromarray(img), image_size)
            yield img

    return _batched(images(), batch_size)
