"""adm_jax.sampling.io: the reference npz layout, streaming assembly, grids."""

import os

import numpy as np
import pytest

from adm_jax.sampling import io


def test_save_load_reference_layout(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    labels = np.arange(5)
    path = io.save_samples_npz(str(tmp_path / "s.npz"), images, labels)
    with np.load(path) as data:  # exactly what the reference's np.savez(path, arr, labels) makes
        assert sorted(data.files) == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["arr_1"], labels)
    assert os.listdir(tmp_path) == ["s.npz"]  # no temporary left behind
    got, got_labels = io.load_samples_npz(path)
    np.testing.assert_array_equal(got, images)
    io.save_samples_npz(path, images)
    assert io.load_samples_npz(path)[1] is None
    with pytest.raises(ValueError, match="uint8 NHWC"):
        io.save_samples_npz(path, images.astype(np.float32))


def test_streaming_npz_equals_savez(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 3, 3, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 7)
    path = str(tmp_path / "stream.npz")
    io.write_npz_streaming(
        path,
        {
            "arr_0": (images.shape, np.uint8, [images[:3], images[3:6], images[6:]]),
            "arr_1": (labels.shape, labels.dtype, [labels[:4], labels[4:]]),
        },
    )
    got, got_labels = io.load_samples_npz(path)
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(got_labels, labels)
    with pytest.raises(ValueError, match="rows"):
        io.write_npz_streaming(path, {"arr_0": (images.shape, np.uint8, [images[:3]])})


def test_image_grid(tmp_path):
    images = np.full((5, 4, 4, 1), 255, np.uint8)
    grid = io.image_grid(images, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 1)  # 2 rows x 3 columns for 5 images
    assert grid.sum() == 5 * 16 * 255
    path = io.save_image_grid(str(tmp_path / "g.png"), images)
    from PIL import Image

    assert Image.open(path).size == (3 * 6 + 2, 2 * 6 + 2)  # (width, height), pad 2


def test_npz_grid_and_text_round_trip_through_gcs(gcs_bucket):
    from etils import epath

    from adm_jax import paths

    root = epath.Path(gcs_bucket) / "io"
    images = np.random.default_rng(4).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    io.save_samples_npz(root / "s.npz", images, np.arange(5))
    got, labels = io.load_samples_npz(f"{gcs_bucket}/io/s.npz")
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(labels, np.arange(5))
    io.write_npz_streaming(
        root / "stream.npz", {"arr_0": (images.shape, np.uint8, [images[:2], images[2:]])}
    )
    np.testing.assert_array_equal(io.load_samples_npz(root / "stream.npz")[0], images)
    io.save_image_grid(root / "g.png", images)
    paths.write_text_atomic(root / "a.json", "{}")
    assert sorted(p.name for p in root.iterdir()) == ["a.json", "g.png", "s.npz", "stream.npz"]
    # A failed write leaves nothing behind (no rename on object stores: the upload is undone).
    with pytest.raises(RuntimeError), paths.open_atomic(root / "broken.npz") as f:
        f.write(b"half a file")
        raise RuntimeError("interrupted")
    assert not (root / "broken.npz").exists()
    assert paths.absolute(root / "s.npz") == f"{gcs_bucket}/io/s.npz"
    paths.write_bytes_atomic(root / "tree" / "sub" / "x.png", b"")
    assert sorted(paths.walk_files(root / "tree")) == ["sub/x.png"]


def test_paths_local_relative_and_atomic(tmp_path, monkeypatch):
    from adm_jax import paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d" / "sub").mkdir(parents=True)
    paths.write_text_atomic("d/a.txt", "x")  # relative paths stay relative to the cwd
    paths.write_bytes_atomic(paths.path("d") / "sub" / "b.bin", b"y")
    assert (tmp_path / "d/a.txt").read_text() == "x"
    assert sorted(paths.walk_files("d")) == ["a.txt", "sub/b.bin"]
    assert paths.absolute("d/a.txt") == str(tmp_path / "d/a.txt")
    assert not paths.is_remote("d") and paths.is_remote("gs://b/d")
    with pytest.raises(RuntimeError), paths.open_atomic("d/a.txt") as f:
        f.write(b"partial")
        raise RuntimeError("interrupted")
    assert (tmp_path / "d/a.txt").read_text() == "x"  # the old file is untouched
    assert sorted(os.listdir(tmp_path / "d")) == ["a.txt", "sub"]  # no temporary left
