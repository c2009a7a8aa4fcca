"""Input pipeline: TFDS ArrayRecord ``data_source`` + grain, producing global ``jax.Array``s.

Reading needs no TensorFlow: ``tfds.data_source`` parses records with numpy, grain does the
shuffling/batching, and images are decoded with PIL inside grain workers. Training batches are
defined globally (one shuffle of the whole split, per-record augmentation seeded by the
record's global position): process ``p`` reads rows ``[p * L, (p + 1) * L)`` of every global
batch (``L = global_batch_size // process_count``) and contributes them with
``jax.make_array_from_process_local_data``, so 1 and N processes train on the same batches.
Evaluation passes shard the split by process (``ShardByJaxProcess``, equal counts).

Checkpointing: the train iterator's ``get_state()`` is a small JSON-able dict (grain's per-worker
read positions plus our skip counters). Save it per process with grain's Orbax handler, as the
item ``DATA_ITER_ITEM`` ("data_iter") of the train ``ocp.CheckpointManager``::

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data_iter=train_iter.save_args()))
    mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data_iter=train_iter.restore_args()))

After restoring, the iterator yields exactly the batch that followed the saved one. The state is
only valid for the same dataset, shard layout (process count), batch size, seed and
``num_workers``.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import jax
import numpy as np
from absl import logging

from adm_jax import paths
from adm_jax.data import builders
from adm_jax.data.preprocessing import ERROR_KEY, FILE_NAME_KEY, VALID_KEY, DecodeAndPreprocess

DATA_ITER_ITEM = "data_iter"
# Below this many records read, a few corrupt images are not yet evidence of a broken dataset.
_MIN_RECORDS_BEFORE_SKIP_CHECK = 100


class DatasetNotPreparedError(FileNotFoundError):
    """The dataset is not in ``data_dir`` as TFDS ArrayRecord; the message says how to build it."""


class TooManyCorruptImagesError(RuntimeError):
    """More than ``max_skipped_fraction`` of the records read could not be decoded; the
    message names the last files skipped."""


class DatasetLabelsError(ValueError):
    """The dataset's labels do not fit the model: more classes than ``model.num_classes``,
    or a label outside ``[0, num_classes)`` (it would index past the class embedding or the
    classifier's logits and train on NaN or garbage)."""


# ----------------------------------------------------------------------------- config


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_bool(v):
    return isinstance(v, (bool, np.bool_))


# field -> (check, requirement text)
_FIELDS = {
    "name": (lambda v: isinstance(v, str) and v != "", "a non-empty TFDS dataset name"),
    "data_dir": (
        lambda v: v is None or isinstance(v, str),
        "a TFDS data_dir path (None or '' for the TFDS default)",
    ),
    "image_size": (lambda v: _is_int(v) and v > 0, "a positive int"),
    "channels": (lambda v: _is_int(v) and v in (1, 3), "1 (grayscale) or 3 (RGB)"),
    "class_cond": (_is_bool, "a bool"),
    "random_flip": (_is_bool, "a bool"),
    "random_crop": (_is_bool, "a bool"),
    "num_workers": (lambda v: _is_int(v) and v >= 0, "an int >= 0 (grain worker processes)"),
    "shuffle_buffer": (
        lambda v: _is_int(v) and v >= 0,
        "an int >= 0 (0: exact global shuffle, >0: window shuffle of that many records)",
    ),
    "split": (lambda v: isinstance(v, str) and v != "", "a non-empty TFDS split name"),
    "max_skipped_fraction": (
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
        "a float in [0, 1)",
    ),
}
DATA_CONFIG_FIELDS = tuple(_FIELDS)
# Optional fields: field -> (check, requirement text, default).
_OPTIONAL_FIELDS = {
    "eval_split": (
        lambda v: isinstance(v, str),
        "a TFDS split name for create_eval_iterator ('' for none)",
        "",
    ),
}


def validate_data_config(data_config) -> dict[str, Any]:
    """Checks ``data_config`` (ConfigDict or mapping); returns it as a plain dict.

    Raises a one-line ValueError naming the first missing, unknown or invalid field.
    """
    cfg = data_config.to_dict() if hasattr(data_config, "to_dict") else dict(data_config)
    for key in cfg:
        if key not in _FIELDS and key not in _OPTIONAL_FIELDS:
            raise ValueError(
                f"unknown data config field {key!r}; expected {DATA_CONFIG_FIELDS} "
                f"(optional: {tuple(_OPTIONAL_FIELDS)})"
            )
    for key, (check, requirement, default) in _OPTIONAL_FIELDS.items():
        cfg.setdefault(key, default)
        if not check(cfg[key]):
            raise ValueError(f"data config field {key!r} must be {requirement}, got {cfg[key]!r}")
    for key, (check, requirement) in _FIELDS.items():
        if key not in cfg:
            raise ValueError(f"data config field {key!r} is missing; it must be {requirement}")
        if not check(cfg[key]):
            raise ValueError(f"data config field {key!r} must be {requirement}, got {cfg[key]!r}")
    cfg["data_dir"] = cfg["data_dir"] or None
    return cfg


# ----------------------------------------------------------------------------- sources


def _prepare_hint(name: str, data_dir: str | None) -> str:
    dd = data_dir or "~/tensorflow_datasets"
    if name.split(":")[0] == "imagenet2012":
        return (
            f"put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in a folder MANUAL_DIR and "
            f"run `tfds build imagenet2012 --file_format=array_record --data_dir={dd} "
            f"--manual_dir=MANUAL_DIR` (needs tensorflow at build time only; see docs/data.md)"
        )
    if name.startswith("lsun"):
        cfg = name.split("/")[1].split(":")[0] if "/" in name else "bedroom"
        return (
            f"run `pip install tensorflow-io` and `tfds build lsun/{cfg} "
            f"--file_format=array_record --data_dir={dd}` (downloads the LMDB from dl.yf.io), "
            f"or export the LMDB to image files with guided-diffusion's datasets/lsun_bedroom.py "
            f"and use adm_jax.data.build_image_folder_dataset(image_dir, {dd!r}, name) "
            f"(see docs/data.md)"
        )
    if name == builders.DEMO_DATASET_NAME:
        return f"run adm_jax.data.prepare_demo_dataset({dd!r})"
    return (
        f"build it with adm_jax.data.build_image_folder_dataset(image_dir, {dd!r}, {name!r}) "
        f"or `tfds build {name} --file_format=array_record --data_dir={dd}` (see docs/data.md)"
    )


def open_data_source(name: str, data_dir: str | None, split: str):
    """Returns ``(source, features)``: a TFDS ArrayRecord random-access source of raw records.

    Images come back as ENCODED bytes (``tfds.features.Image`` is read with ``SkipDecoding``)
    so that decoding happens with PIL in the grain transform, where failures can be skipped.
    """
    import tensorflow_datasets as tfds

    builders.check_local_data_dir(data_dir)
    if data_dir and not paths.path(data_dir).is_dir():
        raise DatasetNotPreparedError(
            f"data.data_dir {data_dir}: no such directory; expected a TFDS data_dir holding "
            f"dataset {name!r}: {_prepare_hint(name, data_dir)}"
        )
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        builder = None
    if builder is None or not builder.is_prepared():
        where = data_dir or "the default TFDS data_dir"
        raise DatasetNotPreparedError(
            f"dataset {name!r} is not prepared in {where}: {_prepare_hint(name, data_dir)}"
        )
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise DatasetNotPreparedError(
            f"dataset {name!r} in {builder.data_dir} is stored as {builder.info.file_format.value}"
            f", not array_record: convert it with `tfds convert_format --dataset_version_dir="
            f"{builder.data_dir} --out_file_format=array_record` or rebuild with "
            f"--file_format=array_record"
        )
    features = builder.info.features
    if "image" not in features:
        raise ValueError(f"dataset {name!r} has no 'image' feature (features: {list(features)})")
    decoders = None
    if isinstance(features["image"], tfds.features.Image):
        decoders = {"image": tfds.decode.SkipDecoding()}
    try:
        source = tfds.data_source(
            name, split=split, data_dir=data_dir, download=False, decoders=decoders
        )
    except (ValueError, KeyError) as e:
        splits = sorted(builder.info.splits.keys())
        raise ValueError(
            f"split {split!r} is not available for dataset {name!r} (splits: {splits}): "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    return source, features


def _num_classes(features) -> int | None:
    if "label" in features and hasattr(features["label"], "num_classes"):
        return int(features["label"].num_classes)
    return None


def _check_labels(cfg, features, for_classifier: bool, num_classes: int | None) -> int | None:
    """Checks that the dataset has the labels the model needs; returns the label range to
    check each record against (None: labels are not used)."""
    if not (cfg["class_cond"] or for_classifier):
        return None
    dataset_classes = _num_classes(features)
    if dataset_classes is None:
        field = "class_cond" if cfg["class_cond"] else "for_classifier"
        raise ValueError(
            f"data config field {field!r} needs class labels but dataset {cfg['name']!r} has no "
            f"'label' ClassLabel feature"
        )
    if num_classes is not None and dataset_classes > num_classes:
        raise DatasetLabelsError(
            f"dataset {cfg['name']!r} has {dataset_classes} classes (labels 0.."
            f"{dataset_classes - 1}) but model.num_classes is {num_classes}: labels >= "
            f"{num_classes} are outside the model; set --config.model.num_classes="
            f"{dataset_classes} or use a dataset with at most {num_classes} classes"
        )
    return num_classes


def _check_label(label, num_classes: int | None, dataset: str, name: str) -> None:
    if num_classes is not None and not 0 <= int(label) < num_classes:
        raise DatasetLabelsError(
            f"dataset {dataset!r}: record {name or '(no file_name)'} has label {int(label)}, "
            f"outside [0, model.num_classes={num_classes})"
        )


def _log_skipped(ex) -> str:
    name = str(ex.get(FILE_NAME_KEY, "")) or "(a record without file_name)"
    logging.warning("data: skipping undecodable image %s (%s)", name, ex.get(ERROR_KEY, ""))
    return name


# ----------------------------------------------------------------------------- skipping


class _SkipAndBatchIterDataset(grain.IterDataset):
    """Batches valid records, dropping corrupt ones and reporting how many were dropped.

    Each batch carries ``_num_read`` / ``_num_skipped`` so the counts survive grain's worker
    processes and reach the main process. Each skipped file is logged by name (a warning, from
    the worker process), and labels are checked against ``num_classes`` (None: not used).
    """

    def __init__(
        self,
        parent,
        batch_size: int,
        drop_remainder: bool,
        max_skipped_fraction,
        *,
        num_classes: int | None = None,
        dataset: str = "",
    ):
        super().__init__(parent)
        self._batch_size = batch_size
        self._drop_remainder = drop_remainder
        self._max_skipped_fraction = max_skipped_fraction
        self._num_classes = num_classes
        self._dataset = dataset

    def __iter__(self):
        return _SkipAndBatchIterator(
            self._parent.__iter__(),
            self._batch_size,
            self._drop_remainder,
            self._max_skipped_fraction,
            num_classes=self._num_classes,
            dataset=self._dataset,
        )

    def __str__(self):
        return f"SkipAndBatchIterDataset(batch_size={self._batch_size})"


class _SkipAndBatchIterator(grain.DatasetIterator):
    def __init__(
        self, parent, batch_size, drop_remainder, max_skipped_fraction, *, num_classes, dataset
    ):
        super().__init__(parent)
        self._batch_size = batch_size
        self._drop_remainder = drop_remainder
        self._max_skipped_fraction = max_skipped_fraction
        self._num_classes = num_classes
        self._dataset = dataset
        self._read = 0  # Since this iterator was created; only feeds the fraction check.
        self._skipped = 0
        self._last_skipped = collections.deque(maxlen=3)  # file names, for the error

    def __next__(self):
        images, labels, read, skipped = [], [], 0, 0
        while len(images) < self._batch_size:
            try:
                ex = next(self._parent)
            except StopIteration:
                if self._drop_remainder or not images:
                    raise
                break
            read += 1
            if not ex[VALID_KEY]:
                skipped += 1
                self._last_skipped.append(_log_skipped(ex))
                self._check(read, skipped)
                continue
            _check_label(ex["label"], self._num_classes, self._dataset, ex.get(FILE_NAME_KEY))
            images.append(ex["image"])
            labels.append(ex["label"])
        self._read += read
        self._skipped += skipped
        return {
            "image": np.stack(images),
            "label": np.asarray(labels, np.int32),
            "_num_read": np.int64(read),
            "_num_skipped": np.int64(skipped),
        }

    def _check(self, read, skipped):
        total_read, total_skipped = self._read + read, self._skipped + skipped
        if (
            total_read >= _MIN_RECORDS_BEFORE_SKIP_CHECK
            and total_skipped > self._max_skipped_fraction * total_read
        ):
            raise TooManyCorruptImagesError(
                f"{total_skipped} of {total_read} records read could not be decoded, more than "
                f"data.max_skipped_fraction={self._max_skipped_fraction}; the dataset looks "
                f"broken (last skipped: {', '.join(self._last_skipped)})"
            )

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


# ----------------------------------------------------------------------------- iterators


def _batch_sharding(sharding):
    """The batch-axis-only sharding, valid for arrays of any rank (images and labels)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = sharding.spec
        return jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(spec[0] if len(spec) else None)
        )
    return sharding


def _local_batch_size(global_batch_size: int) -> int:
    n = jax.process_count()
    if not _is_int(global_batch_size) or global_batch_size <= 0 or global_batch_size % n:
        raise ValueError(
            f"global_batch_size must be a positive multiple of the process count {n}, "
            f"got {global_batch_size!r}"
        )
    return global_batch_size // n


def _shard(ds: grain.MapDataset) -> grain.MapDataset:
    """This process's records: every ``shard_count``-th one, after dropping the last
    ``len % shard_count`` records so every process holds the same number (a process with one
    more evaluation batch than the others would wait forever in the eval step's collectives)."""
    shard = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    if shard.shard_count > 1:
        usable = len(ds) - len(ds) % shard.shard_count
        ds = ds[:usable][shard.shard_index :: shard.shard_count]
    return ds


class _ProcessRowsMapDataset(grain.MapDataset):
    """This process's rows of every global batch.

    Global batch ``g`` is records ``[g * B, (g + 1) * B)`` of the (shuffled, repeated,
    augmented) parent whatever the process count; process ``p`` of ``P`` reads its rows
    ``[p * L, (p + 1) * L)`` (``L = B / P``), which ``make_array_from_process_local_data``
    places on its devices. So a run on 1 and on N processes trains on the same batches, and
    each record is decoded by one process only.
    """

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, global_batch_size: int, index: int, count: int):
        super().__init__(parent)
        self._global = global_batch_size
        self._local = global_batch_size // count
        self._offset = index * self._local
        self._length = len(parent) // global_batch_size * self._local

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, index: int) -> int:
        batch, row = divmod(index, self._local)
        return batch * self._global + self._offset + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(index)]

    def __str__(self) -> str:
        return f"ProcessRowsMapDataset(rows {self._offset}+{self._local} of {self._global})"


def _process_rows(ds: grain.MapDataset, global_batch_size: int) -> grain.MapDataset:
    if jax.process_count() == 1:
        return ds
    return _ProcessRowsMapDataset(ds, global_batch_size, jax.process_index(), jax.process_count())


def _mp_prefetch(it: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    if num_workers == 0:
        return it
    from absl import flags

    # Grain workers read absl flags; outside an absl app (notebooks, pytest) use their defaults.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))


def _read_options(num_workers: int) -> grain.ReadOptions:
    # Threads per process (or per worker): PIL decoding releases the GIL for much of its work.
    return grain.ReadOptions(num_threads=16 if num_workers else 4, prefetch_buffer_size=128)


class _StateAdapter:
    """What grain's Orbax ``CheckpointHandler`` expects of a DataLoader-style iterator.

    Save snapshots the state when the args are built, so an async checkpoint can't pick up
    batches consumed after ``mngr.save`` returned.
    """

    def __init__(self, iterator: TrainIterator, state: dict | None = None):
        self._iterator = iterator
        self._state = state

    def get_state(self) -> bytes:
        return json.dumps(self._state).encode()

    def set_state(self, state: bytes) -> None:
        self._iterator.set_state(json.loads(state.decode()))

    def start_prefetch(self) -> None:
        pass


class TrainIterator(Iterator[dict[str, jax.Array]]):
    """Infinite iterator of global batches ``{"image": f32 NHWC in [-1, 1], "label": int32}``.

    ``num_skipped`` / ``num_read`` count this process's corrupt and total records since the
    start of training (carried through checkpoints); log them from the train loop.
    """

    def __init__(self, dataset: grain.IterDataset, sharding, local_batch_size: int):
        self._dataset = dataset
        self._iter = iter(dataset)
        self._sharding = _batch_sharding(sharding)
        self.local_batch_size = local_batch_size
        self.num_skipped = 0
        self.num_read = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        batch = next(self._iter)
        self.num_read += int(batch.pop("_num_read"))
        self.num_skipped += int(batch.pop("_num_skipped"))
        return {
            k: jax.make_array_from_process_local_data(self._sharding, v) for k, v in batch.items()
        }

    def get_state(self) -> dict[str, Any]:
        """JSON-able state of this process's pipeline position and counters."""
        return {
            "grain": self._iter.get_state(),
            "num_skipped": self.num_skipped,
            "num_read": self.num_read,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._iter.set_state(state["grain"])
        self.num_skipped = int(state["num_skipped"])
        self.num_read = int(state["num_read"])

    def save_args(self):
        """Orbax save args for the ``DATA_ITER_ITEM`` item (one JSON file per process)."""
        return grain.checkpoint.CheckpointSave(item=_StateAdapter(self, self.get_state()))

    def restore_args(self):
        """Orbax restore args; restoring sets this iterator's state in place."""
        return grain.checkpoint.CheckpointRestore(item=_StateAdapter(self))


def create_train_iterator(
    data_config,
    *,
    global_batch_size: int,
    sharding: jax.sharding.Sharding,
    seed: int,
    split: str | None = None,
    for_classifier: bool = False,
    num_classes: int | None = None,
) -> TrainIterator:
    """Infinite, shuffled (per epoch, by ``seed``), augmented training batches.

    Args:
      data_config: fields ``DATA_CONFIG_FIELDS`` (see docs/data.md).
      global_batch_size: examples per global batch, a multiple of ``jax.process_count()``.
      sharding: where batches live; its first PartitionSpec entry shards the batch axis,
        e.g. ``NamedSharding(mesh, P(("data", "fsdp")))``.
      seed: shuffling and augmentation seed (same seed, same batches).
      split: TFDS split; defaults to ``data_config.split``.
      for_classifier: classifier training: labels are required. (The reference's
        ``classifier_train.py`` always random-crops; the classifier configs say so with
        ``data.random_crop=True``, which a data set of centred digits may turn off.)
      num_classes: the model's label range (``model.num_classes``) when labels are used:
        a dataset with more classes fails here (DatasetLabelsError), and each record's label
        is checked as it is read.
    """
    cfg = validate_data_config(data_config)
    local_bs = _local_batch_size(global_batch_size)
    source, features = open_data_source(cfg["name"], cfg["data_dir"], split or cfg["split"])
    label_range = _check_labels(cfg, features, for_classifier, num_classes)

    ds = grain.MapDataset.source(source)
    if len(ds) == 0:
        raise ValueError(f"dataset {cfg['name']!r} split {split or cfg['split']!r} is empty")
    seed = int(seed) % 2**32
    if cfg["shuffle_buffer"] > 0:
        ds = grain.experimental.WindowShuffleMapDataset(
            ds, window_size=cfg["shuffle_buffer"], seed=seed
        )
    else:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(None)  # Reseeds shuffle and augmentation every epoch.
    transform = DecodeAndPreprocess(
        image_size=cfg["image_size"],
        channels=cfg["channels"],
        random_crop=cfg["random_crop"],
        random_flip=cfg["random_flip"],
    )
    ds = ds.random_map(transform, seed=seed)  # per-record randomness from the global index
    ds = _process_rows(ds, global_batch_size)
    it = ds.to_iter_dataset(_read_options(cfg["num_workers"]))
    it = _SkipAndBatchIterDataset(
        it, local_bs, True, cfg["max_skipped_fraction"], num_classes=label_range,
        dataset=cfg["name"],
    )  # fmt: skip
    it = _mp_prefetch(it, cfg["num_workers"])
    return TrainIterator(it, sharding, local_bs)


def _finite_dataset(cfg, split, *, shard: bool, as_float: bool, num_examples=None):
    source, features = open_data_source(cfg["name"], cfg["data_dir"], split)
    ds = grain.MapDataset.source(source)
    if num_examples is not None:
        ds = ds[:num_examples]
    if shard:
        ds = _shard(ds)
    transform = DecodeAndPreprocess(
        image_size=cfg["image_size"], channels=cfg["channels"], as_float=as_float
    )
    ds = ds.random_map(transform, seed=0)  # No randomness used: center crop, no flip.
    return ds, features


def create_eval_iterator(
    data_config,
    *,
    global_batch_size: int,
    sharding: jax.sharding.Sharding,
    split: str | None = None,
    num_examples: int | None = None,
    num_classes: int | None = None,
    for_classifier: bool = False,
) -> Iterator[dict[str, jax.Array]]:
    """One ordered pass (center crop, no flip) for validation losses.

    ``split`` defaults to ``data_config.eval_split``, else ``data_config.split``.

    Yields global ``{"image", "label", "mask"}``; ``mask`` (bool) is False for padding in the
    last batch and for corrupt records (kept as zero images rather than dropped so that every
    process yields the same number of batches). Each process reads
    ``len(split) // process_count`` records; the last ``len(split) % process_count`` records
    of the split are dropped, so every process runs the same number of eval steps.
    ``num_classes`` / ``for_classifier``: labels are checked as in ``create_train_iterator``.
    """
    cfg = validate_data_config(data_config)
    local_bs = _local_batch_size(global_batch_size)
    split = split or cfg["eval_split"] or cfg["split"]
    ds, features = _finite_dataset(cfg, split, shard=True, as_float=True, num_examples=num_examples)
    label_range = _check_labels(cfg, features, for_classifier, num_classes)
    it = ds.to_iter_dataset(_read_options(cfg["num_workers"])).batch(local_bs)
    it = _mp_prefetch(it, cfg["num_workers"])
    batch_sharding = _batch_sharding(sharding)

    def gen():
        for batch in it:
            n = len(batch["label"])
            for i in range(n):
                if not batch[VALID_KEY][i]:
                    _log_skipped({k: batch[k][i] for k in (FILE_NAME_KEY, ERROR_KEY)})
                else:
                    _check_label(
                        batch["label"][i], label_range, cfg["name"], batch[FILE_NAME_KEY][i]
                    )
            pad = local_bs - n
            out = {
                "image": np.pad(batch["image"], [(0, pad)] + [(0, 0)] * 3),
                "label": np.pad(batch["label"].astype(np.int32), (0, pad)),
                "mask": np.pad(batch[VALID_KEY], (0, pad)),
            }
            yield {
                k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in out.items()
            }

    return gen()


def iterate_images(
    data_config,
    split: str | None = None,
    *,
    batch_size: int = 256,
    num_images: int | None = None,
    with_labels: bool = False,
):
    """Yields uint8 NHWC numpy batches (center crop, no flip) of this process's whole split.

    For FID reference batches: not sharded across processes (call it on one process), corrupt
    images are skipped. ``num_images`` limits the count (the first records in TFDS order). With
    ``with_labels`` yields ``(images, labels)`` tuples.
    """
    cfg = validate_data_config(data_config)
    ds, _ = _finite_dataset(cfg, split or cfg["split"], shard=False, as_float=False)
    it = ds.to_iter_dataset(_read_options(cfg["num_workers"]))
    it = _SkipAndBatchIterDataset(it, batch_size, False, cfg["max_skipped_fraction"])
    it = _mp_prefetch(it, cfg["num_workers"])
    remaining = num_images
    for batch in it:
        images, labels = batch["image"], batch["label"]
        if remaining is not None:
            images, labels = images[:remaining], labels[:remaining]
            remaining -= len(images)
        if len(images):
            yield (images, labels) if with_labels else images
        if remaining is not None and remaining <= 0:
            return


def dataset_info(data_config, split: str | None = None) -> dict[str, Any]:
    """``{"num_examples", "num_classes"}`` of a prepared split (num_classes None if unlabeled)."""
    cfg = validate_data_config(data_config)
    source, features = open_data_source(cfg["name"], cfg["data_dir"], split or cfg["split"])
    return {"num_examples": len(source), "num_classes": _num_classes(features)}
