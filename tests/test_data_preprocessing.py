"""ADM preprocessing against a verbatim copy of guided_diffusion/image_datasets.py."""

import io
import math

import numpy as np
import pytest
from PIL import Image

from adm_jax.data import preprocessing as pp


# --- Reference (guided_diffusion/image_datasets.py), with `random` made injectable. ---------
def ref_center_crop_arr(pil_image, image_size):
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def ref_random_crop_arr(pil_image, image_size, randrange, min_crop_frac=0.8, max_crop_frac=1.0):
    min_smaller_dim_size = math.ceil(image_size / max_crop_frac)
    max_smaller_dim_size = math.ceil(image_size / min_crop_frac)
    smaller_dim_size = randrange(min_smaller_dim_size, max_smaller_dim_size + 1)
    while min(*pil_image.size) >= 2 * smaller_dim_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = smaller_dim_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )
    arr = np.array(pil_image)
    crop_y = randrange(arr.shape[0] - image_size + 1)
    crop_x = randrange(arr.shape[1] - image_size + 1)
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def _randrange_from(gen):
    """random.randrange semantics drawing from a numpy Generator (same draws as ours)."""
    return lambda a, b=None: int(gen.integers(a) if b is None else gen.integers(a, b))


def _random_image(rng, w, h, mode="RGB"):
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


SIZES = [(300, 200), (200, 300), (64, 65), (17, 40), (128, 128), (33, 31)]


@pytest.mark.parametrize("wh", SIZES)
@pytest.mark.parametrize("image_size", [16, 32])
def test_center_crop_matches_reference(wh, image_size):
    img = _random_image(np.random.default_rng(0), *wh)
    ours = pp.center_crop_arr(img, image_size)
    np.testing.assert_array_equal(ours, ref_center_crop_arr(img, image_size))
    assert ours.shape == (image_size, image_size, 3) and ours.dtype == np.uint8


@pytest.mark.parametrize("wh", SIZES)
def test_random_crop_matches_reference(wh):
    img = _random_image(np.random.default_rng(1), *wh, mode="L")
    crops = set()
    for seed in range(8):
        ours = pp.random_crop_arr(img, 32, rng=np.random.default_rng(seed))
        ref = ref_random_crop_arr(img, 32, _randrange_from(np.random.default_rng(seed)))
        np.testing.assert_array_equal(ours, ref)
        assert ours.shape == (32, 32)
        crops.add(ours.tobytes())
    assert len(crops) > 1  # Actually random.


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_transform_flip_scale_and_determinism():
    arr = np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    record = {"image": _png(arr), "label": np.int64(7)}
    center = pp.center_crop_arr(Image.fromarray(arr), 24)
    t = pp.DecodeAndPreprocess(image_size=24, channels=3, random_flip=True)
    flipped = 0
    for seed in range(16):
        out = t.random_map(record, np.random.default_rng(seed))
        # Same draw as the reference's `random.random() < 0.5`.
        flip = np.random.default_rng(seed).random() < 0.5
        expected = center[:, ::-1] if flip else center
        np.testing.assert_array_equal(out["image"], expected.astype(np.float32) / 127.5 - 1)
        assert out["image"].dtype == np.float32 and out["label"] == 7 and out[pp.VALID_KEY]
        flipped += flip
        again = t.random_map(record, np.random.default_rng(seed))
        np.testing.assert_array_equal(out["image"], again["image"])
    assert 0 < flipped < 16
    no_flip = pp.DecodeAndPreprocess(image_size=24, channels=3, as_float=False)
    out = no_flip.random_map(record, np.random.default_rng(0))
    np.testing.assert_array_equal(out["image"], center)


def test_transform_grayscale_and_corrupt():
    arr = np.random.default_rng(3).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    t = pp.DecodeAndPreprocess(image_size=16, channels=1)
    out = t.random_map({"image": _png(arr)}, np.random.default_rng(0))
    assert out["image"].shape == (16, 16, 1) and out["label"] == 0
    expected = pp.center_crop_arr(Image.fromarray(arr).convert("L"), 16)
    np.testing.assert_array_equal(out["image"][..., 0], expected.astype(np.float32) / 127.5 - 1)
    bad = t.random_map({"image": b"not an image"}, np.random.default_rng(0))
    assert not bad[pp.VALID_KEY] and bad["image"].shape == (16, 16, 1)
    truncated = t.random_map({"image": _png(arr)[:60]}, np.random.default_rng(0))
    assert not truncated[pp.VALID_KEY]
