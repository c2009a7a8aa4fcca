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
