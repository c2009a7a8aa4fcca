"""``python -m adm_jax.data.prepare IMAGE_DIR --data_dir=DATA_DIR --name=NAME
[--labels=subdir|prefix|none] [--validation_dir=DIR] [--version=1.0.0]``: an image folder ->
the TFDS ArrayRecord dataset training reads; prints its size, its classes and the config
overrides that train on it (docs/own_data.md). A module of its own, so that ``python -m``
does not run a module the package has already imported."""

from __future__ import annotations

import os
import types
from collections.abc import Sequence

import tensorflow_datasets as tfds
from absl import app
from absl import flags as absl_flags

from adm_jax import cli_flags, paths
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


USAGE = (
    "python -m adm_jax.data.prepare IMAGE_DIR --data_dir=DATA_DIR --name=NAME "
    "[--labels=subdir|prefix|none] [--validation_dir=DIR] [--version=1.0.0]"
)
DESCRIPTION = (
    "Turn a folder of images (.jpg/.jpeg/.png/.gif, searched recursively) into the TFDS "
    "ArrayRecord dataset DATA_DIR/NAME/VERSION that training reads.\n"
    "IMAGE_DIR: folder of training images (local or gs://)"
)


def _flag_values() -> absl_flags.FlagValues:
    """The command's flags, on a ``FlagValues`` of their own (see ``adm_jax.cli_flags``)."""
    fv = absl_flags.FlagValues()
    absl_flags.DEFINE_string(
        "data_dir", None, "TFDS data_dir to write to (config.data.data_dir)", flag_values=fv
    )
    absl_flags.DEFINE_string(
        "name", None, "snake_case dataset name (config.data.name)", flag_values=fv
    )
    absl_flags.DEFINE_enum(
        "labels",
        "subdir",
        ("subdir", "prefix", "none"),
        "class of an image: subdir (first-level subfolder), prefix (file name up to the "
        "first _), none (unlabeled)",
        flag_values=fv,
    )
    absl_flags.DEFINE_string(
        "validation_dir",
        "",
        "optional folder of held-out images: split 'validation' (validation loss)",
        flag_values=fv,
    )
    absl_flags.DEFINE_string(
        "version",
        "1.0.0",
        "dataset version; an existing version is reused: pass a new one after changing the images",
        flag_values=fv,
    )
    return fv


def main(argv: Sequence[str] | None = None) -> str:
    """``python -m adm_jax.data.prepare`` as a function (``argv`` without the program name;
    None: ``sys.argv[1:]``): an image folder -> a TFDS dataset; prints its size, its classes
    and the config overrides that train on it, and returns the dataset's name. Bad input
    raises a one-line error naming the flag or folder."""
    fv = _flag_values()
    positional = cli_flags.parse(
        fv, argv, usage=USAGE, required=["data_dir", "name"], description=DESCRIPTION
    )
    if len(positional) != 1:
        what = "missing" if not positional else f"one expected, got {positional}"
        raise app.UsageError(f"IMAGE_DIR: {what} (usage: {USAGE})")
    args = types.SimpleNamespace(image_dir=positional[0], **fv.flag_values_dict())

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
    cli_flags.run(main)
