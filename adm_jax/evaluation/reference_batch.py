"""Sample/reference ``.npz`` I/O in the reference evaluator's format, without TensorFlow.

A reference batch (the published ``VIRTUAL_*.npz``) holds ``arr_0`` (uint8 NHWC images,
optional), ``mu``/``sigma`` (pool3 statistics) and ``mu_s``/``sigma_s`` (spatial statistics).
A sample batch holds ``arr_0`` (and ``arr_1`` labels for conditional models).

Sample files reach tens of GB, so images are read in batches: an uncompressed npz member is
read in place (one seek to its data, then sequential reads; np.savez stores members
uncompressed), a compressed one is streamed through the zip decompressor, never loading the
whole array. Every path may be local or in a bucket (``gs://``, ``s3://``; ``adm_jax.paths``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from adm_jax import paths

_NPY_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


@dataclasses.dataclass
class NpzArray:
    """One array of an .npz/.npy file, readable in row batches without loading it whole."""

    path: str
    key: str
    shape: tuple
    dtype: np.dtype
    _open: Callable[[], contextlib.AbstractContextManager]  # -> object with read_rows(n)

    def __len__(self):
        return self.shape[0]

    def read_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        with self._open() as reader:
            for start in range(0, self.shape[0], batch_size):
                yield reader(min(batch_size, self.shape[0] - start))

    def read(self) -> np.ndarray:
        return np.concatenate(list(self.read_batches(max(len(self), 1))), axis=0)


def _read_exact(f, size):
    chunks, got = [], 0
    while got < size:
        chunk = f.read(size - got)
        if not chunk:
            raise ValueError(f"unexpected end of array data: expected {size} bytes, got {got}")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _row_reader_from_stream(f, shape, dtype):
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def read_rows(n):
        data = _read_exact(f, n * row_bytes)
        return np.frombuffer(data, dtype=dtype).reshape([n, *shape[1:]])

    return read_rows


def _row_reader_from_array(arr):
    pos = [0]

    def read_rows(n):
        out = np.array(arr[pos[0] : pos[0] + n])
        pos[0] += n
        return out

    return read_rows


def _read_npy_header(f, where):
    version = np.lib.format.read_magic(f)
    if version not in _NPY_READERS:
        raise ValueError(f"{where}: unsupported .npy version {version}")
    return _NPY_READERS[version](f)  # shape, fortran_order, dtype


def open_npz_array(path, key: str = "arr_0") -> NpzArray:
    """Opens ``key`` of an .npz (or a plain .npy) for streaming batch reads."""
    path = paths.path(path)
    name = os.fspath(path)
    member = f"{key}.npy"
    data_offset = None  # where the raw array bytes start in the file, when stored verbatim
    if path.suffix == ".npy":
        with path.open("rb") as f:
            shape, fortran, dtype = _read_npy_header(f, name)
            data_offset = f.tell()
    else:
        with path.open("rb") as raw:
            with zipfile.ZipFile(raw) as zf:
                if member not in zf.namelist():
                    raise KeyError(f"missing {key} in npz file {name} (has {zf.namelist()})")
                info = zf.getinfo(member)
                with zf.open(member) as f:
                    shape, fortran, dtype = _read_npy_header(f, f"{name}:{member}")
                    header_len = f.tell()
            if info.compress_type == zipfile.ZIP_STORED:
                # The member's bytes lie verbatim in the file (the local header has
                # variable-length extras).
                raw.seek(info.header_offset)
                local = raw.read(30)
                name_len = int.from_bytes(local[26:28], "little")
                extra_len = int.from_bytes(local[28:30], "little")
                data_offset = info.header_offset + 30 + name_len + extra_len + header_len
    if fortran or dtype.hasobject or not shape:
        with path.open("rb") as f:
            loaded = np.load(f)
            arr = loaded if path.suffix == ".npy" else loaded[key]

        @contextlib.contextmanager
        def open_loaded():
            yield _row_reader_from_array(arr)

        return NpzArray(name, key, arr.shape, arr.dtype, open_loaded)

    if data_offset is not None:

        @contextlib.contextmanager
        def open_raw():
            with path.open("rb") as f:
                f.seek(data_offset)
                yield _row_reader_from_stream(f, shape, dtype)

        return NpzArray(name, key, shape, dtype, open_raw)

    @contextlib.contextmanager
    def open_stream():
        with path.open("rb") as raw, zipfile.ZipFile(raw) as zf, zf.open(member) as f:
            f.read(header_len)
            yield _row_reader_from_stream(f, shape, dtype)

    return NpzArray(name, key, shape, dtype, open_stream)


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
    """Reads a ``VIRTUAL_*.npz``-style file (statistics eagerly, images lazily)."""
    with paths.path(path).open("rb") as raw, np.load(raw) as f:
        keys = set(f.files)
        stats = {k: f[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys}
        resize = str(f[RESIZE_KEY]) if RESIZE_KEY in keys else "tf"
    images = open_npz_array(path, "arr_0") if "arr_0" in keys else None
    if images is None and "mu" not in stats:
        raise KeyError(f"{path} has neither images (arr_0) nor statistics (mu, sigma)")
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


def write_reference_batch(path, mu, sigma, mu_s=None, sigma_s=None, *, images=None, extra=None):
    """Writes a reference batch in the published format (``images``: an ImageSpool)."""
    arrays = {"mu": mu, "sigma": sigma}
    if mu_s is not None:
        arrays.update(mu_s=mu_s, sigma_s=sigma_s)
    arrays.update(extra or {})
    write_npz(path, arrays, images)


# ----------------------------------------------------------------------------------------------
# Generic image sources (uint8 NHWC batches) for building reference batches.


def _center_crop(pil_image, image_size):
    # ADM's center_crop_arr: BOX-halve while large, BICUBIC to the short side, centre crop.
    from PIL import Image  # noqa: PLC0415

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(
            tuple(x // 2 for x in pil_image.size), resample=Image.Resampling.BOX
        )
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.Resampling.BICUBIC
    )
    arr = np.array(pil_image)
    y, x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[y : y + image_size, x : x + image_size]


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
    """uint8 NHWC batches from an image folder (recursive, sorted, ADM centre crop, RGB)."""
    from PIL import Image  # noqa: PLC0415

    exts = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"}
    folder = paths.path(folder)
    files = [f for f in paths.walk_files(folder) if os.path.splitext(f)[1].lower() in exts]
    files.sort(key=lambda f: f.split("/"))  # pathlib's order: by path component
    if limit is not None:
        files = files[:limit]

    def images():
        for rel in files:
            with (folder / rel).open("rb") as f, Image.open(f) as im:
                im.load()
                yield _center_crop(im.convert("RGB"), image_size)

    return _batched(images(), batch_size)


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

    ds = tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False)
    if limit is not None:
        ds = ds.take(limit)

    def images():
        for ex in tfds.as_numpy(ds):
            img = ex[image_key]
            if img.shape[-1] == 1:
                img = np.repeat(img, 3, axis=-1)
            if img.shape[:2] != (image_size, image_size):
                img = _center_crop(Image.fromarray(img), image_size)
            yield img

    return _batched(images(), batch_size)
