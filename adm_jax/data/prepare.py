"""``python -m adm_jax.data.prepare IMAGE_DIR --data_dir=DATA_DIR --name=NAME
[--labels=subdir|prefix|none] [--validation_dir=DIR] [--version=1.0.0]``: an image folder ->
the TFDS ArrayRecord dataset training reads; prints its size, its classes and the config
overrides that train on it (docs/own_data.md). A module of its own, so that ``python -m``
does not run a module the package has already imported."""

from __future__ import annotations

import argparse
import os
import sys

import tensorflow_datasets as tfds

from adm_jax import paths
from adm_jax.data.builders import _is_prepared, build_image_folder_dataset


def describe_dataset(data_dir: str, name: str, version: str = "1.0.0") -> dict:
    """``{"splits": {split: num_examples}, "classes": [names] or None}`` of a built dataset,
    read from its ``dataset_info.json`` (what the training config must agree with)."""
    builder = tfds.builder_from_directory(os.fspath(paths.path(data_dir) / name / version))
    splits = {split: info.num_examples for split, info in builder.info.splits.items()}
    features = builder.info.features
    label = features["label"] if "label" in features.keys() else None
    return {"splits": splits, "classes": list(label.names) if label is not None else None}


def training_overrides(data_dir: str, name: str, classes: list[str] | None) -> list[str]:
    """The ``--config.*`` overrides that point configs/image_folder.py at this dataset."""
    flags = [f"--config.data.name={name}", f"--config.data.data_dir={data_dir}"]
    if classes:
        flags += ["--config.model.class_cond=True", f"--config.model.num_classes={len(classes)}"]
    return flags


def main(argv: list[str] | None = None) -> str:
    """``python -m adm_jax.data.prepare``: an image folder -> a TFDS dataset; prints its
    size, its classes and the config overrides that train on it."""
    parser = argparse.ArgumentParser(
        prog="python -m adm_jax.data.prepare",
        description="Turn a folder of images (.jpg/.jpeg/.png/.gif, searched recursively) into "
        "the TFDS ArrayRecord dataset DATA_DIR/NAME/VERSION that training reads.",
    )
    parser.add_argument("image_dir", help="folder of training images (local or gs://)")
    parser.add_argument(
        "--data_dir", required=True, help="TFDS data_dir to write to (config.data.data_dir)"
    )
    parser.add_argument("--name", required=True, help="snake_case dataset name (config.data.name)")
    parser.add_argument(
        "--labels",
        choices=("subdir", "prefix", "none"),
        default="subdir",
        help="class of an image: subdir (first-level subfolder), prefix (file name up to the "
        "first _), none (unlabeled)",
    )
    parser.add_argument(
        "--validation_dir",
        default="",
        help="optional folder of held-out images: split 'validation' (validation loss)",
    )
    parser.add_argument(
        "--version",
        default="1.0.0",
        help="dataset version; an existing version is reused: pass a new one after changing "
        "the images",
    )
    args = parser.parse_args(argv)

    label_from = None if args.labels == "none" else args.labels
    image_dir = args.image_dir
    if args.validation_dir:
        image_dir = {"train": args.image_dir, "validation": args.validation_dir}
    prepared = _is_prepared(args.data_dir, args.name, args.version)
    build_image_folder_dataset(
        image_dir, args.data_dir, args.name, label_from=label_from, version=args.version
    )
    info = describe_dataset(args.data_dir, args.name, args.version)
    where = paths.path(args.data_dir) / args.name / args.version
    state = "exists already (reused; pass a new --version to rebuild)" if prepared else "built"
    counts = ", ".join(f"{split} {n} images" for split, n in sorted(info["splits"].items()))
    print(f"[build] {where} {state}: {counts}", flush=True)
    classes = info["classes"]
    if classes:
        shown = ", ".join(f"{i}={c}" for i, c in enumerate(classes[:10]))
        more = f", ... {len(classes) - 10} more" if len(classes) > 10 else ""
        print(f"[build] {len(classes)} classes: {shown}{more}", flush=True)
    else:
        print("[build] unlabeled (class_cond=False)", flush=True)
    overrides = " ".join(training_overrides(args.data_dir, args.name, classes))
    print(f"[build] train with: {overrides}", flush=True)
    return args.name


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
