"""Input pipeline over tiny TFDS ArrayRecord datasets built in the test, on 8 CPU devices."""

import io
import os
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

import adm_jax.data as data

NUM_GOOD = 40  # 20 per class, plus one corrupt file.
IMAGE_SIZE = 16
GLOBAL_BATCH = 16


@pytest.fixture(scope="module")
def folder_ds(tmp_path_factory):
    """An image folder (two class subfolders, one corrupt file) turned into a TFDS dataset."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(NUM_GOOD):
        cls = ("cat", "dog")[i % 2]
        os.makedirs(root / cls, exist_ok=True)
        h, w = rng.integers(16, 48, size=2)
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ext = "png" if i % 3 else "jpg"
        Image.fromarray(arr).save(root / cls / f"{cls}_{i:03d}.{ext}")
    (root / "dog" / "dog_broken.png").write_bytes(b"\x89PNG garbage, not an image")
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    name = data.build_image_folder_dataset(str(root), data_dir, "tiny_folder")
    return data_dir, name


def make_config(data_dir, name, **overrides):
    cfg = dict(
        name=name,
        data_dir=data_dir,
        image_size=IMAGE_SIZE,
        channels=3,
        class_cond=True,
        random_flip=True,
        random_crop=False,
        num_workers=0,
        shuffle_buffer=0,
        split="train",
        max_skipped_fraction=0.5,
    )
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def sharding():
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def _train_iter(folder_ds, sharding, seed=0, **overrides):
    return data.create_train_iterator(
        make_config(*folder_ds, **overrides),
        global_batch_size=GLOBAL_BATCH,
        sharding=sharding,
        seed=seed,
    )


def _np(batch):
    return {k: np.asarray(v) for k, v in batch.items()}


def test_batches_shapes_dtypes_range_sharding(folder_ds, sharding):
    it = _train_iter(folder_ds, sharding)
    batch = next(it)
    image, label = batch["image"], batch["label"]
    assert set(batch) == {"image", "label"}
    assert image.shape == (GLOBAL_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.float32
    assert label.shape == (GLOBAL_BATCH,) and label.dtype == np.int32
    assert image.sharding.is_equivalent_to(sharding, image.ndim)
    assert label.sharding.is_equivalent_to(sharding, label.ndim)
    assert len(image.addressable_shards) == 8
    assert image.addressable_shards[0].data.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    img = np.asarray(image)
    assert -1.0 <= img.min() < -0.5 and 0.5 < img.max() <= 1.0
    assert set(np.asarray(label).tolist()) <= {0, 1}


def test_deterministic_for_seed(folder_ds, sharding):
    a = [_np(next(it)) for it in [_train_iter(folder_ds, sharding, seed=3)] for _ in range(3)]
    it_b = _train_iter(folder_ds, sharding, seed=3)
    b = [_np(next(it_b)) for _ in range(3)]
    it_c = _train_iter(folder_ds, sharding, seed=4)
    c = [_np(next(it_c)) for _ in range(3)]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not all(np.array_equal(x["image"], z["image"]) for x, z in zip(a, c, strict=True))


def test_classifier_crops_follow_random_crop(folder_ds, sharding):
    """Classifier batches are random-cropped exactly when ``random_crop`` says so (the
    classifier configs set it, as the reference's classifier_train.py crops)."""

    def first_batch(for_classifier, random_crop):
        it = data.create_train_iterator(
            make_config(*folder_ds, random_flip=False, random_crop=random_crop),
            global_batch_size=GLOBAL_BATCH,
            sharding=sharding,
            seed=5,
            for_classifier=for_classifier,
        )
        return _np(next(it))

    centred = first_batch(False, False)
    np.testing.assert_array_equal(first_batch(True, False)["image"], centred["image"])
    cropped = first_batch(True, True)
    np.testing.assert_array_equal(cropped["label"], centred["label"])
    assert not np.array_equal(cropped["image"], centred["image"])


def test_exact_resume_through_orbax(folder_ds, sharding, tmp_path):
    it = _train_iter(folder_ds, sharding, seed=1)
    for _ in range(3):  # N batches (crosses no epoch yet), ...
        next(it)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("state", data.DATA_ITER_ITEM))
    state = {"step": np.zeros((), np.int32)}
    mngr.save(
        3,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), **{data.DATA_ITER_ITEM: it.save_args()}
        ),
    )
    mngr.wait_until_finished()
    expected = [_np(next(it)) for _ in range(4)]  # ... M more, crossing an epoch boundary.
    skipped = it.num_skipped

    fresh = _train_iter(folder_ds, sharding, seed=1)
    mngr2 = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("state", data.DATA_ITER_ITEM))
    mngr2.restore(
        3,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state), **{data.DATA_ITER_ITEM: fresh.restore_args()}
        ),
    )
    for want in expected:
        got = _np(next(fresh))
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])
    assert fresh.num_skipped == skipped  # Counters travel with the state.

    # Plain get_state / set_state as well.
    again = _train_iter(folder_ds, sharding, seed=1)
    again.set_state(it.get_state())
    np.testing.assert_array_equal(_np(next(again))["image"], _np(next(it))["image"])


def test_corrupt_image_skipped_and_counted(folder_ds, sharding):
    it = _train_iter(folder_ds, sharding)
    num_batches = 6  # 96 good records: more than two epochs of 41 records.
    for _ in range(num_batches):
        next(it)
    assert it.num_skipped >= 2
    assert it.num_read == num_batches * GLOBAL_BATCH + it.num_skipped

    cfg = make_config(*folder_ds)
    images = list(data.iterate_images(cfg, batch_size=12))
    assert sum(len(b) for b in images) == NUM_GOOD
    assert images[0].dtype == np.uint8 and images[0].shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3)
    first = list(data.iterate_images(cfg, batch_size=12, num_images=5, with_labels=True))
    assert len(first) == 1 and first[0][0].shape[0] == 5 and first[0][1].dtype == np.int32

    eval_iter = data.create_eval_iterator(cfg, global_batch_size=GLOBAL_BATCH, sharding=sharding)
    batches = list(eval_iter)
    assert len(batches) == 3  # 41 records -> 16 + 16 + 9 (padded).
    masks = np.concatenate([np.asarray(b["mask"]) for b in batches])
    assert masks.sum() == NUM_GOOD and masks.dtype == bool
    assert batches[-1]["image"].shape == (GLOBAL_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert data.dataset_info(cfg) == {"num_examples": NUM_GOOD + 1, "num_classes": 2}


def test_too_many_corrupt_images_raise(tmp_path, sharding):
    root = tmp_path / "bad"
    root.mkdir()
    for i in range(4):
        (root / f"x_{i}.jpg").write_bytes(b"garbage %d" % i)
    name = data.build_image_folder_dataset(str(root), str(tmp_path), "all_bad", label_from=None)
    cfg = make_config(str(tmp_path), name, class_cond=False)
    it = data.create_train_iterator(cfg, global_batch_size=8, sharding=sharding, seed=0)
    with pytest.raises(data.TooManyCorruptImagesError, match="max_skipped_fraction") as e:
        next(it)
    assert "(last skipped: x_" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="'class_cond' needs class labels"):
        data.create_train_iterator(
            make_config(str(tmp_path), name), global_batch_size=8, sharding=sharding, seed=0
        )


def test_labels_checked_against_the_model(folder_ds, sharding, tmp_path):
    """More dataset classes than the model has fail when the dataset is opened; a label out of
    range inside a dataset (TFDS's -1, "no label") when its record is read."""
    kwargs = dict(global_batch_size=GLOBAL_BATCH, sharding=sharding, num_classes=1)
    with pytest.raises(data.DatasetLabelsError) as e:
        data.create_train_iterator(make_config(*folder_ds), seed=0, **kwargs)
    assert str(e.value).startswith(
        "dataset 'tiny_folder' has 2 classes (labels 0..1) but model.num_classes is 1"
    )
    with pytest.raises(data.DatasetLabelsError, match="has 2 classes"):
        data.create_eval_iterator(make_config(*folder_ds), **kwargs)
    next(data.create_train_iterator(make_config(*folder_ds, class_cond=False), seed=0, **kwargs))

    from adm_jax.data import builders

    png = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(png, format="PNG")

    def generate():
        return {
            "train": (
                (i, {"image": png.getvalue(), "file_name": f"x_{i}.png".encode(),
                     "label": -1 if i == 2 else i % 2})
                for i in range(4)
            )
        }  # fmt: skip

    builders._make_builder_cls(
        "minus_one", "1.0.0", generate, builders._features(["a", "b"]), "a record labelled -1"
    )(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = make_config(str(tmp_path), "minus_one")
    it = data.create_train_iterator(cfg, seed=0, **{**kwargs, "num_classes": 2})
    with pytest.raises(data.DatasetLabelsError) as e:
        next(it)
    assert str(e.value) == (
        "dataset 'minus_one': record x_2.png has label -1, outside [0, model.num_classes=2)"
    )


@pytest.mark.parametrize(
    "name, needles",
    [
        (
            "imagenet2012",
            [
                "ILSVRC2012_img_train.tar",
                "ILSVRC2012_img_val.tar",
                "tfds build imagenet2012 --file_format=array_record",
                "--manual_dir=",
            ],
        ),
        ("lsun/bedroom", ["tfds build lsun/bedroom --file_format=array_record"]),
        ("my_faces", ["build_image_folder_dataset"]),
        ("mnist_demo", ["prepare_demo_dataset"]),
    ],
)
def test_missing_dataset_error_says_how_to_prepare(tmp_path, sharding, name, needles):
    cfg = make_config(str(tmp_path), name)
    with pytest.raises(data.DatasetNotPreparedError) as e:
        data.create_train_iterator(cfg, global_batch_size=8, sharding=sharding, seed=0)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg
    for needle in needles:
        assert needle in msg


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda c: c.pop("channels"), "channels"),
        (lambda c: c.update(channels=4), "channels"),
        (lambda c: c.update(image_size=0), "image_size"),
        (lambda c: c.update(max_skipped_fraction=1.0), "max_skipped_fraction"),
        (lambda c: c.update(num_workers=-1), "num_workers"),
        (lambda c: c.update(random_flip="yes"), "random_flip"),
        (lambda c: c.update(batch_size=3), "batch_size"),
        (lambda c: c.update(eval_split=None), "eval_split"),
    ],
)
def test_config_validation(change, field):
    import ml_collections

    cfg = make_config("/nonexistent", "x")
    change(cfg)
    with pytest.raises(ValueError, match=f"'{field}'") as e:
        data.validate_data_config(ml_collections.ConfigDict(cfg))
    assert "\n" not in str(e.value)


def test_config_optional_fields_and_default_data_dir():
    cfg = data.validate_data_config(make_config("", "x"))
    assert cfg["data_dir"] is None and cfg["eval_split"] == ""
    assert data.validate_data_config(make_config("/d", "x", eval_split="test"))["eval_split"]


def test_reading_does_not_import_tensorflow(folder_ds):
    data_dir, name = folder_ds
    code = textwrap.dedent(
        f"""
        import sys
        import jax
        import adm_jax.data as data
        cfg = dict(name={name!r}, data_dir={data_dir!r}, image_size=8, channels=3,
                   class_cond=True, random_flip=True, random_crop=True, num_workers=0,
                   shuffle_buffer=4, split="train", max_skipped_fraction=0.5)
        mesh = jax.make_mesh((1,), ("data",))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        it = data.create_train_iterator(cfg, global_batch_size=4, sharding=sharding, seed=0)
        assert next(it)["image"].shape == (4, 8, 8, 3)
        next(data.iterate_images(cfg, batch_size=4))
        assert "tensorflow" not in sys.modules, "reading imported tensorflow"
        print("OK")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_demo_dataset(tmp_path, sharding):
    name = data.prepare_demo_dataset(str(tmp_path))
    t0 = time.time()
    assert data.prepare_demo_dataset(str(tmp_path)) == name == data.DEMO_DATASET_NAME
    assert time.time() - t0 < 2.0  # Reused, not rebuilt.
    cfg = make_config(str(tmp_path), name, image_size=32, channels=1)
    assert data.dataset_info(cfg) == {"num_examples": 4500, "num_classes": 10}
    assert data.dataset_info(cfg, "test")["num_examples"] == 500
    batch = next(data.create_train_iterator(cfg, global_batch_size=8, sharding=sharding, seed=0))
    image = np.asarray(batch["image"])
    assert image.shape == (8, 32, 32, 1)
    # Zero padding of the 28x28 digits survives (black border at -1).
    np.testing.assert_array_equal(image[:, :2], -1.0)
    assert image.max() > 0.9


def test_image_folder_in_gcs(tmp_path, gcs_bucket):  # noqa: F811
    """An image folder in a bucket: listed recursively, classes from subfolders, built."""
    from etils import epath

    from adm_jax.data import builders

    rng = np.random.default_rng(5)
    for rel in ("cat/cat_0.png", "cat/sub/cat_1.png", "dog/dog_0.png", "dog/notes.txt"):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
        epath.Path(f"{gcs_bucket}/imgs/{rel}").write_bytes(buf.getvalue())
    folder = f"{gcs_bucket}/imgs"
    assert builders._list_image_files(folder) == [
        "cat/cat_0.png",
        "cat/sub/cat_1.png",
        "dog/dog_0.png",
    ]
    name = data.build_image_folder_dataset(folder, str(tmp_path), "gcs_folder")
    cfg = make_config(str(tmp_path), name, image_size=8)
    assert data.dataset_info(cfg) == {"num_examples": 3, "num_classes": 2}
