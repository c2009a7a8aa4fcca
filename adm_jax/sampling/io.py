"""Sample files: the reference ``.npz`` layout, checks, streaming reads and writes, PNGs.

The reference scripts (``image_sample.py``, ``classifier_sample.py``) save
``np.savez(path, images, labels)``: ``arr_0`` uint8 NHWC images, ``arr_1`` int labels when
class-conditional or guided. The evaluator and ``super_res_sample.py`` read exactly that, so we
write the same thing. Every path may be local or in a bucket (``gs://``, ``s3://``; see
``adm_jax.paths``); files are written atomically (a temporary name and a rename locally, one
upload remotely), so a reader (or a resumed run) never sees half a file.

Sample files reach tens of GB, so ``open_npz_array`` reads an array in row batches: an
uncompressed member (what ``np.savez`` writes) in place, a compressed one through the zip
decompressor, never the whole array at once.

Image conversion CLI (docs/sampling.md, "Image files")::

    python -m adm_jax.sampling.io to_png SAMPLES.npz OUT_DIR
    python -m adm_jax.sampling.io from_folder IMAGE_DIR OUT.npz [--size N] [--labels subdir]
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import types
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from absl import app, flags
from tqdm.auto import tqdm

from adm_jax import cli_flags, paths
from adm_jax.images import image_grid, save_image_grid, save_png  # noqa: F401 - re-exported

IMAGES_KEY = "arr_0"
LABELS_KEY = "arr_1"
# What ``from_folder`` reads (PIL decodes all of them); the reference's own list is
# jpg/jpeg/png/gif (guided_diffusion/image_datasets.py).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# PIL modes that hold one grey level per pixel (an alpha channel, if any, is dropped).
GREY_MODES = frozenset({"1", "L", "LA", "La"})
LABEL_SOURCES = ("none", "subdir", "prefix", "suffix")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive
_NPY_MAGIC = b"\x93NUMPY"
_NPY_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


class NpzKeyError(KeyError, ValueError):
    """An ``.npz`` lacks the requested array; the message names the file and its keys.

    A KeyError for ``except KeyError`` callers, a ValueError so that entry points print the
    one line instead of a traceback.
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# ----------------------------------------------------------------------------------------------
# Checks.


def check_images(where: str, shape: Sequence[int], dtype, *, channels=(1, 3)) -> None:
    """Raises a one-line ValueError unless ``(shape, dtype)`` are uint8 NHWC images.

    The evaluator scores 0..255 pixels: a float array (e.g. images in [0, 1)) or a
    channels-first one would be scored silently wrong, so both are refused rather than
    guessed at. ``channels``: the allowed C (None: any). ``where`` names the file and key.
    """
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    expected = "expected uint8 0..255 NHWC images (N, H, W, C)"
    if dtype != np.uint8:
        hint = ""
        if dtype.kind == "f":
            hint = "; for floats in [0, 1] use np.clip(np.round(x * 255), 0, 255).astype(np.uint8)"
        raise ValueError(f"{where}: dtype {dtype} with shape {shape}: {expected}{hint}")
    if len(shape) != 4:
        hint = (
            "; give grey (N, H, W) images a channel axis: x[..., None]" if len(shape) == 3 else ""
        )
        raise ValueError(f"{where}: shape {shape}: {expected}{hint}")
    if shape[1] in (1, 3) and shape[-1] not in (1, 3):
        raise ValueError(
            f"{where}: shape {shape} is channels-first (NCHW); NHWC expected: "
            "np.transpose(x, (0, 2, 3, 1))"
        )
    if channels is not None and shape[-1] not in channels:
        allowed = " or ".join(str(c) for c in channels)
        raise ValueError(
            f"{where}: {shape[-1]} channels in shape {shape}; expected {allowed} in the last "
            "axis (3 = RGB, 1 = grey)"
        )


def _file_kind(f, name: str) -> str:
    """ "npz" or "npy" from the first bytes of an open file (rewound); else a ValueError."""
    head = f.read(6)
    f.seek(0)
    if head[:4] in _ZIP_MAGIC:
        return "npz"
    if head == _NPY_MAGIC:
        return "npy"
    raise ValueError(
        f"{name}: not an .npz file (no zip archive); expected np.savez(path, images[, labels]) "
        "with uint8 NHWC images in arr_0"
    )


def _zip_members(raw, name: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(raw)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{name}: damaged .npz file ({_one_line(err)})") from None


def _missing(name: str, key: str, members: Iterable[str]) -> NpzKeyError:
    keys = [m[: -len(".npy")] if m.endswith(".npy") else m for m in members]
    return NpzKeyError(f"{name}: no {key!r} in this .npz (it holds {keys})")


# ----------------------------------------------------------------------------------------------
# Whole sample files.


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

    def write():
        with paths.open_atomic(path) as f:  # a file object keeps np.savez from appending ".npz"
            np.savez(f, **arrays)

    paths.with_retries("write", path, write)
    return path


def load_samples_npz(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Returns ``(images, labels or None)`` from a reference-format sample file.

    One-line errors name the file: not an npz, no ``arr_0`` (with the keys it has), a
    float or channels-first ``arr_0``. Any channel count passes (the sampler's shards hold
    whatever the model makes); a missing file raises FileNotFoundError.
    """
    name = os.fspath(path)
    with paths.path(path).open("rb") as f:
        if _file_kind(f, name) == "npy":  # images only
            images, labels = np.load(f), None
        else:
            try:
                data = np.load(f)
            except zipfile.BadZipFile as err:
                raise ValueError(f"{name}: damaged .npz file ({_one_line(err)})") from None
            with data:
                if IMAGES_KEY not in data.files:
                    raise _missing(name, IMAGES_KEY, data.files)
                images = data[IMAGES_KEY]
                labels = data[LABELS_KEY] if LABELS_KEY in data.files else None
    check_images(f"{name}: {IMAGES_KEY}", images.shape, images.dtype, channels=None)
    return images, labels


# ----------------------------------------------------------------------------------------------
# Streaming reads.


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


def _read_exact(f, size, where):
    chunks, got = [], 0
    while got < size:
        chunk = f.read(size - got)
        if not chunk:
            raise ValueError(f"{where}: file ends early: expected {size} bytes, got {got}")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _row_reader_from_stream(f, shape, dtype, where):
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def read_rows(n):
        data = _read_exact(f, n * row_bytes, where)
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
    try:
        version = np.lib.format.read_magic(f)
        if version not in _NPY_READERS:
            raise ValueError(f"unsupported .npy version {version}")
        return _NPY_READERS[version](f)  # shape, fortran_order, dtype
    except ValueError as err:
        raise ValueError(f"{where}: {_one_line(err)}") from None


def open_npz_array(path, key: str = IMAGES_KEY) -> NpzArray:
    """Opens ``key`` of an .npz (or the array of a plain .npy) for streaming batch reads.

    One-line errors name the file: not an npz/npy, a damaged archive, no ``key`` (an
    NpzKeyError listing the keys it has).
    """
    path = paths.path(path)
    name = os.fspath(path)
    member = f"{key}.npy"
    data_offset = None  # where the raw array bytes start in the file, when stored verbatim
    with path.open("rb") as raw:
        kind = _file_kind(raw, name)
        if kind == "npy":
            shape, fortran, dtype = _read_npy_header(raw, name)
            data_offset = raw.tell()
        else:
            with _zip_members(raw, name) as zf:
                if member not in zf.namelist():
                    raise _missing(name, key, zf.namelist())
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
    where = f"{name}: {key}"
    if fortran or dtype.hasobject or not shape:
        with path.open("rb") as f:
            loaded = np.load(f)
            arr = loaded if kind == "npy" else loaded[key]

        @contextlib.contextmanager
        def open_loaded():
            yield _row_reader_from_array(arr)

        return NpzArray(name, key, arr.shape, arr.dtype, open_loaded)

    if data_offset is not None:

        @contextlib.contextmanager
        def open_raw():
            with path.open("rb") as f:
                f.seek(data_offset)
                yield _row_reader_from_stream(f, shape, dtype, where)

        return NpzArray(name, key, shape, dtype, open_raw)

    @contextlib.contextmanager
    def open_stream():
        with path.open("rb") as raw, zipfile.ZipFile(raw) as zf, zf.open(member) as f:
            f.read(header_len)
            yield _row_reader_from_stream(f, shape, dtype, where)

    return NpzArray(name, key, shape, dtype, open_stream)


def open_images(path, *, channels=(1, 3)) -> NpzArray:
    """``arr_0`` of a sample or reference file, checked to be uint8 NHWC (see check_images)."""
    images = open_npz_array(path, IMAGES_KEY)
    check_images(f"{images.path}: {IMAGES_KEY}", images.shape, images.dtype, channels=channels)
    return images


# ----------------------------------------------------------------------------------------------
# Writes.


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


# ----------------------------------------------------------------------------------------------
# Image folders <-> sample files.


def _is_image_name(rel: str) -> bool:
    return os.path.splitext(rel)[1].lower() in IMAGE_EXTENSIONS


def list_image_files(folder) -> list[str]:
    """Relative paths (``"sub/x.png"``) of the images below ``folder``, recursively, in the
    reference's order (sorted per folder level). One-line errors: no such folder, no images."""
    root = paths.path(folder)
    if not root.exists():
        raise ValueError(f"{folder}: no such folder")
    if not root.is_dir():
        raise ValueError(f"{folder}: not a folder")
    files = [f for f in paths.walk_files(root) if _is_image_name(f)]
    if not files:
        raise ValueError(
            f"{folder}: no images found (looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return sorted(files, key=lambda f: f.split("/"))


def _open_image(path, mode: str):
    """The decoded image at ``path`` converted to PIL ``mode``; one-line errors naming it."""
    from PIL import Image

    try:
        with paths.path(path).open("rb") as f, Image.open(f) as im:
            im.load()
            return im.convert(mode)  # a new image, independent of the file
    except (OSError, ValueError, SyntaxError) as err:  # PIL's decoders raise all three
        raise ValueError(f"{path}: unreadable image ({_one_line(err)})") from None


def _image_header(path) -> tuple[tuple[int, int], str]:
    """``((width, height), PIL mode)`` without decoding the pixels."""
    from PIL import Image

    try:
        with paths.path(path).open("rb") as f, Image.open(f) as im:
            return im.size, im.mode
    except (OSError, ValueError, SyntaxError) as err:
        raise ValueError(f"{path}: unreadable image ({_one_line(err)})") from None


def read_image(path, *, size: int | None = None, channels: int = 3) -> np.ndarray:
    """uint8 (H, W, channels) pixels of an image file: RGB (alpha dropped) or grey.

    With ``size``, ADM's centre crop to size x size (``adm_jax.data.preprocessing
    .center_crop_arr``: BOX halvings, one BICUBIC resize, centre crop), as the reference
    prepares training images and reference batches.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels: expected 1 (grey) or 3 (RGB), got {channels!r}")
    image = _open_image(path, "L" if channels == 1 else "RGB")
    if size is not None:
        # Imported here: adm_jax.data imports tensorflow_datasets and grain, which nothing
        # else in sampling needs.
        from adm_jax.data.preprocessing import center_crop_arr

        arr = center_crop_arr(image, size)
    else:
        arr = np.asarray(image)
    return np.ascontiguousarray(arr.reshape(*arr.shape[:2], channels))


def class_names(files: Sequence[str], source: str, folder) -> list[str] | None:
    """Class names of ``files`` (relative to ``folder``) by ``source``: one of ``LABEL_SOURCES``
    ("none" gives None)."""
    if source == "none":
        return None
    names = []
    for rel in files:
        base = os.path.splitext(rel.rsplit("/", 1)[-1])[0]
        if source == "subdir":
            if "/" not in rel:
                raise ValueError(
                    f"{paths.path(folder) / rel}: --labels subdir needs every image inside a "
                    "class subfolder; this one is at the top level"
                )
            names.append(rel.split("/", 1)[0])
        elif source == "prefix":  # image_datasets.py: basename (with extension) up to the first "_"
            names.append(rel.rsplit("/", 1)[-1].split("_", 1)[0])
        elif source == "suffix":  # what to_png writes: <index>_<label>.png
            if "_" not in base:
                raise ValueError(
                    f"{paths.path(folder) / rel}: --labels suffix needs names like "
                    "<index>_<label>.png (as to_png writes)"
                )
            names.append(base.rsplit("_", 1)[1])
        else:
            raise ValueError(f"--labels: expected one of {LABEL_SOURCES}, got {source!r}")
    return names


def labels_from_names(names: Sequence[str]) -> tuple[np.ndarray, dict[str, int]]:
    """Integer labels for class names: the names themselves when all are decimal integers
    (e.g. ImageNet indices as to_png writes them), else indices into the sorted set of names
    (the reference's rule)."""
    unique = sorted(set(names))
    if all(n.isdecimal() for n in unique):
        mapping = {n: int(n) for n in unique}
    else:
        mapping = {n: i for i, n in enumerate(unique)}
    return np.array([mapping[n] for n in names], np.int32), mapping


def to_png(npz_path, out_dir, *, batch_size: int = 256, progress: bool = True) -> list[str]:
    """Writes every image of a sample file as ``OUT_DIR/<index>.png``, or
    ``<index>_<label>.png`` when the file has labels (``arr_1``); returns the file names.

    Indices are zero-padded to at least 6 digits, so a sorted listing is the file's order and
    ``from_folder`` (with ``labels="suffix"``) rebuilds the same ``.npz``.
    """
    images = open_images(npz_path)
    try:
        labels = open_npz_array(npz_path, LABELS_KEY).read()
    except NpzKeyError:
        labels = None
    n = len(images)
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"{images.path}: {LABELS_KEY} has shape {labels.shape}, expected ({n},)")
    out = paths.path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(max(n - 1, 0))))
    names = []
    with tqdm(total=n, desc=f"to_png {out}", unit="img", disable=not progress) as bar:
        index = 0
        for batch in images.read_batches(batch_size):
            for image in batch:
                name = f"{index:0{width}d}"
                if labels is not None:
                    name += f"_{labels[index]}"
                save_png(out / f"{name}.png", image)
                names.append(f"{name}.png")
                index += 1
            bar.update(len(batch))
    return names


def from_folder(
    image_dir,
    out_path,
    *,
    size: int | None = None,
    labels: str = "none",
    channels: str | int = "auto",
    batch_size: int = 256,
    progress: bool = True,
) -> dict:
    """Turns a folder of images (recursively) into a reference-format ``.npz``.

    ``arr_0``: uint8 (N, H, W, C), files in the reference's order. ``size``: ADM's centre crop
    to size x size (``read_image``); without it every image must have the same size.
    ``channels``: "auto" keeps 1 channel when every image is grey (PIL mode 1/L/LA) and
    converts to RGB otherwise; 1 or 3 forces it. ``labels``: "none", "subdir" (first-level
    subfolder = class), "prefix" (file name up to the first "_", the reference's rule) or
    "suffix" (after the last "_", what ``to_png`` writes) adds ``arr_1`` (see
    ``labels_from_names``). Two passes: headers first (sizes, modes; errors before anything is
    written), then pixels, streamed into the file. Returns a summary dict.
    """
    if size is not None and int(size) <= 0:
        raise ValueError(f"--size: expected a positive integer, got {size}")
    if str(channels) not in ("auto", "1", "3"):
        raise ValueError(f"--channels: expected auto, 1 or 3, got {channels!r}")
    root = paths.path(image_dir)
    files = list_image_files(image_dir)
    names = class_names(files, labels, image_dir)
    label_array, mapping = labels_from_names(names) if names else (None, {})

    headers = {}
    for rel in tqdm(files, desc=f"scanning {root}", unit="img", disable=not progress):
        headers[rel] = _image_header(root / rel)
    if channels == "auto":
        c = 1 if all(mode in GREY_MODES for _, mode in headers.values()) else 3
    else:
        c = int(channels)
    if size is None:
        sizes = {}
        for rel, (wh, _) in headers.items():
            sizes.setdefault(wh, rel)
        if len(sizes) > 1:
            (wh_a, a), (wh_b, b) = list(sizes.items())[:2]
            raise ValueError(
                f"{image_dir}: images differ in size ({a} is {wh_a[0]}x{wh_a[1]}, {b} is "
                f"{wh_b[0]}x{wh_b[1]}); pass --size N to centre-crop and resize all to N x N"
            )
        w, h = next(iter(sizes))
    else:
        w = h = int(size)
    shape = (len(files), h, w, c)

    def chunks():
        bar = tqdm(total=len(files), desc=f"reading {root}", unit="img", disable=not progress)
        with bar:
            for start in range(0, len(files), batch_size):
                batch = [
                    read_image(root / rel, size=size, channels=c)
                    for rel in files[start : start + batch_size]
                ]
                yield np.stack(batch)
                bar.update(len(batch))

    arrays = {IMAGES_KEY: (shape, np.uint8, chunks())}
    if label_array is not None:
        arrays[LABELS_KEY] = (label_array.shape, np.int32, [label_array])
    paths.path(out_path).parent.mkdir(parents=True, exist_ok=True)
    write_npz_streaming(out_path, arrays)
    return {"path": os.fspath(out_path), "shape": shape, "classes": mapping}


def load_base_samples(
    path: str, *, large_size: int, channels: int, class_cond: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Reads base samples for an upsampler of output size ``large_size``; checks shapes."""
    try:
        images, labels = load_samples_npz(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"sample.base_samples: {path} does not exist") from None
    _, h, w, c = images.shape
    if h != w or c != channels or h > large_size:
        raise ValueError(
            f"sample.base_samples: images of shape {h}x{w}x{c} cannot feed an upsampler to "
            f"{large_size}x{large_size}x{channels}"
        )
    if class_cond and labels is None:
        raise ValueError(
            f"sample.base_samples: {path} has no arr_1 labels, but the upsampler is "
            "class-conditional (sample the base model with class labels)"
        )
    return images, (labels if class_cond else None)


USAGE = """python -m adm_jax.sampling.io to_png SAMPLES.npz OUT_DIR [--quiet]
       python -m adm_jax.sampling.io from_folder IMAGE_DIR OUT.npz [--size N] \\
           [--labels none|subdir|prefix|suffix] [--channels auto|1|3] [--quiet]

Convert between reference-format sample files (.npz: arr_0 uint8 NHWC, arr_1 labels) and
folders of image files (local or gs://): to_png writes one PNG per image,
<index>[_<label>].png; from_folder reads a folder recursively into a reference-format .npz."""
COMMANDS = {"to_png": ("SAMPLES.npz", "OUT_DIR"), "from_folder": ("IMAGE_DIR", "OUT.npz")}
FROM_FOLDER_FLAGS = ("size", "labels", "channels")


def _flag_values() -> flags.FlagValues:
    """The command's flags, on a ``FlagValues`` of their own (see ``adm_jax.cli_flags``)."""
    fv = flags.FlagValues()
    flags.DEFINE_integer(
        "size",
        None,
        "from_folder: ADM centre crop to N x N (needed for mixed sizes)",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "labels",
        "none",
        LABEL_SOURCES,
        "from_folder: arr_1 from subdir (class subfolders), prefix (name up to the first _), "
        "suffix (name after the last _, as to_png writes)",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "channels",
        "auto",
        ("auto", "1", "3"),
        "from_folder: auto: 1 if every image is grey, else 3 (RGB)",
        flag_values=fv,
    )
    flags.DEFINE_bool("quiet", False, "no progress bars", flag_values=fv)
    return fv


def main(argv: Sequence[str] | None = None) -> str:
    """``python -m adm_jax.sampling.io COMMAND IN OUT [flags]`` as a function (``argv``
    without the program name; None: ``sys.argv[1:]``); returns the written folder or file.
    Bad input raises a one-line error naming the argument, flag or file."""
    fv = _flag_values()
    positional = cli_flags.parse(fv, argv, usage=USAGE)
    command = positional[0] if positional else ""
    if command not in COMMANDS:
        raise app.UsageError(
            f"command: expected {' or '.join(COMMANDS)}, got {command or 'nothing'!r}"
        )
    if len(positional) != 3:
        raise app.UsageError(
            f"{command}: expected {' '.join(COMMANDS[command])}, got {positional[1:]}"
        )
    misplaced = [name for name in FROM_FOLDER_FLAGS if fv[name].present]
    if command == "to_png" and misplaced:
        raise app.UsageError(f"--{misplaced[0]}: a from_folder flag; to_png takes only --quiet")
    args = types.SimpleNamespace(command=command, **fv.flag_values_dict())
    if command == "to_png":
        args.npz, args.out_dir = positional[1:]
    else:
        args.image_dir, args.out = positional[1:]

    if args.command == "to_png":
        names = to_png(args.npz, args.out_dir, progress=not args.quiet)
        print(f"[to_png] wrote {len(names)} PNGs to {args.out_dir}", flush=True)
        return os.fspath(args.out_dir)
    info = from_folder(
        args.image_dir,
        args.out,
        size=args.size,
        labels=args.labels,
        channels=args.channels,
        progress=not args.quiet,
    )
    n, h, w, c = info["shape"]
    line = f"[from_folder] wrote {info['path']}: {n} images {h}x{w}x{c}"
    if info["classes"]:
        shown = ", ".join(f"{k}={v}" for k, v in list(info["classes"].items())[:10])
        more = len(info["classes"]) - 10
        shown += f", ... {more} more" if more > 0 else ""
        line += f", {len(info['classes'])} classes ({shown})"
    print(line, flush=True)
    return info["path"]


if __name__ == "__main__":
    cli_flags.run(main)
