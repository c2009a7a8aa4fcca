"""adm_jax.sampling.io: the reference npz layout, streaming assembly, grids."""

import os

import numpy as np
import pytest
from absl import app, flags

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


# ----------------------------------------------------------------------------------------------
# Image conversion CLI (python -m adm_jax.sampling.io), run in-process through main(argv).


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_cli_round_trip_npz_png_npz(tmp_path):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)  # H != W: no transposition
    labels = np.array([207, 3, 3, 999, 0, 12, 207])
    src = io.save_samples_npz(str(tmp_path / "s.npz"), images, labels)
    io.main(["to_png", src, str(tmp_path / "png"), "--quiet"])
    assert sorted(os.listdir(tmp_path / "png")) == [
        f"{i:06d}_{label}.png" for i, label in enumerate(labels)
    ]
    io.main(
        ["from_folder", str(tmp_path / "png"), str(tmp_path / "back.npz"), "--labels", "suffix"]
    )
    with np.load(tmp_path / "back.npz") as back:
        assert sorted(back.files) == ["arr_0", "arr_1"]
        assert back["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(back["arr_0"], images)
        np.testing.assert_array_equal(back["arr_1"], labels)  # numeric class names kept as is

    # Without labels: <index>.png, and back without arr_1.
    io.save_samples_npz(str(tmp_path / "u.npz"), images)
    io.main(["to_png", str(tmp_path / "u.npz"), str(tmp_path / "upng"), "--quiet"])
    assert sorted(os.listdir(tmp_path / "upng")) == [f"{i:06d}.png" for i in range(7)]
    io.main(["from_folder", str(tmp_path / "upng"), str(tmp_path / "u2.npz"), "--quiet"])
    got, got_labels = io.load_samples_npz(str(tmp_path / "u2.npz"))
    np.testing.assert_array_equal(got, images)
    assert got_labels is None


def test_cli_grey_images_keep_one_channel(tmp_path):
    grey = np.random.default_rng(6).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    io.save_samples_npz(str(tmp_path / "g.npz"), grey)
    io.main(["to_png", str(tmp_path / "g.npz"), str(tmp_path / "png"), "--quiet"])
    from PIL import Image

    assert Image.open(tmp_path / "png" / "000000.png").mode == "L"
    io.main(["from_folder", str(tmp_path / "png"), str(tmp_path / "auto.npz"), "--quiet"])
    np.testing.assert_array_equal(io.load_samples_npz(str(tmp_path / "auto.npz"))[0], grey)
    io.main(
        ["from_folder", str(tmp_path / "png"), str(tmp_path / "rgb.npz"), "--channels", "3"]
        + ["--quiet"]
    )
    rgb = io.load_samples_npz(str(tmp_path / "rgb.npz"))[0]
    np.testing.assert_array_equal(rgb, np.repeat(grey, 3, axis=-1))
    # One colour image among grey ones: all become RGB (auto).
    Image.fromarray(np.full((8, 8, 3), [255, 0, 0], np.uint8)).save(tmp_path / "png" / "x.png")
    io.main(["from_folder", str(tmp_path / "png"), str(tmp_path / "mixed.npz"), "--quiet"])
    assert io.load_samples_npz(str(tmp_path / "mixed.npz"))[0].shape == (5, 8, 8, 3)


def test_from_folder_classes_and_reference_crop(tmp_path):
    """Subfolders as classes (sorted names -> indices), ADM centre crop with --size, files in
    any of the formats PIL reads (png, jpeg, webp), the reference's order."""
    from PIL import Image

    from adm_jax.data.preprocessing import center_crop_arr

    rng = np.random.default_rng(7)
    (tmp_path / "flat").mkdir()
    files = {
        "cat/b.png": (40, 30),
        "cat/a.webp": (16, 16),
        "dog/c.jpg": (64, 20),
        "ant/deep/d.png": (33, 47),
    }
    for rel, (h, w) in files.items():
        (tmp_path / "imgs" / rel).parent.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / "imgs" / rel, lossless=True)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    out = tmp_path / "ref.npz"
    io.main(["from_folder", str(tmp_path / "imgs"), str(out), "--size", "16", "--labels", "subdir"])
    order = ["ant/deep/d.png", "cat/a.webp", "cat/b.png", "dog/c.jpg"]
    with np.load(out) as data:
        assert data["arr_0"].shape == (4, 16, 16, 3)
        np.testing.assert_array_equal(data["arr_1"], [0, 1, 1, 2])  # ant, cat, cat, dog
        for i, rel in enumerate(order):
            with Image.open(tmp_path / "imgs" / rel) as im:
                expected = center_crop_arr(im.convert("RGB"), 16)
            np.testing.assert_array_equal(data["arr_0"][i], expected, err_msg=rel)

    # The reference's own rule: the class is the file name up to the first "_".
    for name in ("cat_1.png", "dog_2.png", "cat_3.png"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "flat" / name)
    info = io.from_folder(tmp_path / "flat", tmp_path / "p.npz", labels="prefix", progress=False)
    assert info["classes"] == {"cat": 0, "dog": 1}
    np.testing.assert_array_equal(io.load_samples_npz(str(tmp_path / "p.npz"))[1], [0, 0, 1])


def test_from_folder_one_line_errors(tmp_path):
    from PIL import Image

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError) as err:
        io.main(["from_folder", str(tmp_path / "empty"), str(tmp_path / "o.npz")])
    assert "no images found" in _one_line(err) and str(tmp_path / "empty") in str(err.value)
    with pytest.raises(ValueError, match="no such folder"):
        io.main(["from_folder", str(tmp_path / "missing"), str(tmp_path / "o.npz")])

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(mixed / "a.png")
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(mixed / "b.png")
    with pytest.raises(ValueError) as err:
        io.main(["from_folder", str(mixed), str(tmp_path / "o.npz"), "--quiet"])
    message = _one_line(err)
    assert "differ in size" in message and "--size" in message and "b.png is 12x8" in message

    (mixed / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(ValueError) as err:
        io.main(["from_folder", str(mixed), str(tmp_path / "o.npz"), "--size", "8", "--quiet"])
    message = _one_line(err)
    assert str(mixed / "c.png") in message and "unreadable image" in message
    with pytest.raises(ValueError, match="--size"):
        io.from_folder(mixed, tmp_path / "o.npz", size=0)
    assert not (tmp_path / "o.npz").exists()

    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(flat / "a.png")
    with pytest.raises(ValueError) as err:
        io.main(["from_folder", str(flat), str(tmp_path / "o.npz"), "--labels", "subdir"])
    assert "class subfolder" in _one_line(err) and "a.png" in str(err.value)


@pytest.mark.parametrize(
    "case, arrays, expected",
    [
        ("no arr_0", {"images": np.zeros((2, 4, 4, 3), np.uint8)}, "no 'arr_0'"),
        ("float", {"arr_0": np.random.default_rng(0).random((2, 4, 4, 3))}, "uint8 0..255 NHWC"),
        ("nchw", {"arr_0": np.zeros((2, 3, 8, 8), np.uint8)}, "NHWC expected"),
        ("3-d", {"arr_0": np.zeros((2, 8, 8), np.uint8)}, "channel axis"),
    ],
)
def test_sample_file_errors_name_the_file(tmp_path, case, arrays, expected):
    path = tmp_path / f"{case}.npz"
    np.savez(path, **arrays)
    for read in (io.load_samples_npz, io.open_images, lambda p: io.to_png(p, tmp_path / "o")):
        with pytest.raises(ValueError) as err:
            read(str(path))
        message = _one_line(err)
        assert str(path) in message and expected in message, message
    if case == "no arr_0":
        assert "['images']" in message  # the keys it has
    if case == "nchw":
        assert "(2, 3, 8, 8)" in message


def test_not_an_npz_and_channel_counts(tmp_path):
    path = tmp_path / "samples.npz"
    path.write_text("image bytes? no: a text file")
    for read in (io.load_samples_npz, io.open_images):
        with pytest.raises(ValueError) as err:
            read(str(path))
        assert str(path) in _one_line(err) and "not an .npz" in str(err.value)
    np.savez(tmp_path / "rgba.npz", np.zeros((2, 4, 4, 4), np.uint8))
    with pytest.raises(ValueError) as err:
        io.open_images(str(tmp_path / "rgba.npz"))
    assert "4 channels" in _one_line(err) and "rgba.npz" in str(err.value)
    # The sampler's own files may hold any channel count (a model's output).
    assert io.load_samples_npz(str(tmp_path / "rgba.npz"))[0].shape == (2, 4, 4, 4)
    np.savez(tmp_path / "grey.npz", np.zeros((2, 4, 4, 1), np.uint8))
    assert io.open_images(str(tmp_path / "grey.npz")).shape == (2, 4, 4, 1)
    with pytest.raises(FileNotFoundError):
        io.load_samples_npz(str(tmp_path / "absent.npz"))


def test_cli_through_gcs(gcs_bucket, tmp_path):
    images = np.random.default_rng(8).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    io.save_samples_npz(f"{gcs_bucket}/cli/s.npz", images, np.array([1, 2, 3]))
    io.main(["to_png", f"{gcs_bucket}/cli/s.npz", f"{gcs_bucket}/cli/png", "--quiet"])
    out = io.main(
        ["from_folder", f"{gcs_bucket}/cli/png", f"{gcs_bucket}/cli/back.npz", "--labels"]
        + ["suffix", "--quiet"]
    )
    got, labels = io.load_samples_npz(out)
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(labels, [1, 2, 3])


def test_cli_flags_bad_usage_is_one_line_naming_the_flag(tmp_path):
    """absl flags: --flag=value and --flag value both work (the round trip above); a misused
    command, flag or value is a one-line error naming it, raised before anything is read."""
    cases = [
        (["topng", "a.npz", "b"], app.UsageError, "command: expected to_png or from_folder"),
        (["to_png", "a.npz"], app.UsageError, "to_png: expected SAMPLES.npz OUT_DIR"),
        (["to_png", "a.npz", "b", "--size=8"], app.UsageError, "--size: a from_folder flag"),
        (["from_folder", "a", "b", "--labels=name"], flags.Error, "--labels=name"),
        (["from_folder", "a", "b", "--size", "big"], flags.Error, "--size=big"),
        (["from_folder", "a", "b", "--colour=3"], flags.Error, "colour"),
    ]
    for argv, error, expected in cases:
        with pytest.raises(error) as err:
            io.main(argv)
        assert expected in str(err.value) and "\n" not in str(err.value), (argv, err.value)


def test_cli_entry_point_prints_one_line(tmp_path):
    """The real ``python -m`` entry point: exit status 2 and one ``error:`` line, no runpy
    warning about the module being imported by its package."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "adm_jax.sampling.io", "from_folder", str(tmp_path / "empty")]
        + [str(tmp_path / "o.npz")],
        cwd=REPO_ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'empty'}: no images found (looked recursively for "
        f"{', '.join(io.IMAGE_EXTENSIONS)})"
    ]
