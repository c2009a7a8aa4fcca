"""ADM image preprocessing, identical to guided_diffusion/image_datasets.py.

The reference resizes with PIL (BOX halvings, then one BICUBIC resize) and crops in numpy. We
keep PIL so that training images match the reference pixel for pixel; only the source of
randomness differs (a per-record ``np.random.Generator`` instead of the global ``random``), so
results are deterministic for a seed. The same draws are made in the same order as the
reference's ``random.randrange`` / ``random.random`` calls.
"""

from __future__ import annotations

import dataclasses
import io
import math

import grain
import numpy as np
from PIL import Image

# Records whose image cannot be decoded carry this flag set to False; the pipeline drops them.
VALID_KEY = "_valid"
# The record's file name (TFDS "file_name" feature, "" without one) and, for a record that
# could not be decoded, the decoder's error ("" otherwise): the pipeline logs skipped files.
FILE_NAME_KEY = "_file_name"
ERROR_KEY = "_error"


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """Reference ``center_crop_arr``: BOX halvings, BICUBIC to min side == size, center crop."""
    # BOX downsampling by powers of two first, as the reference does by hand for quality.
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


def random_crop_arr(
    pil_image: Image.Image,
    image_size: int,
    min_crop_frac: float = 0.8,
    max_crop_frac: float = 1.0,
    *,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Reference ``random_crop_arr`` (used for classifier training).

    Resizes so the smaller side is uniform in [ceil(size / max_frac), ceil(size / min_frac)],
    then takes a uniformly random ``image_size`` square. ``rng`` replaces the reference's
    global ``random`` module (draws: smaller side, crop_y, crop_x).
    """
    rng = np.random.default_rng() if rng is None else rng
    min_smaller_dim_size = math.ceil(image_size / max_crop_frac)
    max_smaller_dim_size = math.ceil(image_size / min_crop_frac)
    smaller_dim_size = int(rng.integers(min_smaller_dim_size, max_smaller_dim_size + 1))

    while min(*pil_image.size) >= 2 * smaller_dim_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)

    scale = smaller_dim_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )

    arr = np.array(pil_image)
    crop_y = int(rng.integers(arr.shape[0] - image_size + 1))
    crop_x = int(rng.integers(arr.shape[1] - image_size + 1))
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def decode_image(data: bytes | np.ndarray, channels: int) -> Image.Image:
    """Decodes encoded image bytes with PIL into RGB (channels=3) or L (channels=1).

    Raises whatever PIL raises for undecodable data; callers decide whether to skip.
    """
    if isinstance(data, np.ndarray):
        data = data.item() if data.dtype == object else data.tobytes()
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB" if channels == 3 else "L")


def file_name(element) -> str:
    """The record's ``file_name`` feature as text ("" when the dataset has none)."""
    name = element.get("file_name", "") if hasattr(element, "get") else ""
    if isinstance(name, np.ndarray):
        name = name.item() if name.size == 1 else ""
    if isinstance(name, bytes):
        name = name.decode("utf-8", errors="replace")
    return str(name)


def to_float(arr: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1], as the reference (``x / 127.5 - 1``)."""
    return arr.astype(np.float32) / 127.5 - 1


@dataclasses.dataclass(frozen=True)
class DecodeAndPreprocess(grain.transforms.RandomMap):
    """Grain transform: TFDS record -> {"image", "label", VALID_KEY}.

    Runs in grain workers, so decoding stays out of TensorFlow. Undecodable images yield a zero
    image with ``VALID_KEY`` False instead of raising, so one bad file never kills a pod run;
    ``FILE_NAME_KEY`` and ``ERROR_KEY`` say which file and why, for the pipeline's warning.
    The image is HWC (C = ``channels``), uint8 or, with ``as_float``, float32 in [-1, 1].
    """

    image_size: int
    channels: int
    random_crop: bool = False
    random_flip: bool = False
    as_float: bool = True

    def random_map(self, element, rng: np.random.Generator):
        label = np.int32(element.get("label", 0))
        error = ""
        try:
            pil_image = decode_image(element["image"], self.channels)
        except Exception as err:  # noqa: BLE001 - any decoder failure means "corrupt record".
            arr = np.zeros((self.image_size, self.image_size, self.channels), np.uint8)
            valid = False
            error = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
        else:
            if self.random_crop:
                arr = random_crop_arr(pil_image, self.image_size, rng=rng)
            else:
                arr = center_crop_arr(pil_image, self.image_size)
            if self.random_flip and rng.random() < 0.5:
                arr = arr[:, ::-1]
            if arr.ndim == 2:
                arr = arr[:, :, None]
            arr = np.ascontiguousarray(arr)
            valid = True
        image = to_float(arr) if self.as_float else arr
        return {
            "image": image,
            "label": label,
            VALID_KEY: np.bool_(valid),
            FILE_NAME_KEY: file_name(element),
            ERROR_KEY: error,
        }
