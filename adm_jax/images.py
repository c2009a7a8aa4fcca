"""Image conversion shared by training (sample grids) and sampling: the reference's uint8
rounding and PNG grids. It sits below both packages, so ``adm_jax.train`` never imports
``adm_jax.sampling`` (imports flow train -> sampling, never back)."""

from __future__ import annotations

import io
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from adm_jax import paths


def to_uint8(x: jax.Array) -> jax.Array:
    """[-1, 1] -> uint8 exactly as the reference: ``((x + 1) * 127.5).clamp(0, 255).to(uint8)``."""
    return jnp.clip((x + 1.0) * 127.5, 0.0, 255.0).astype(jnp.uint8)


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tiles NHWC images into one (rows*H, cols*W, C) image with ``pad`` pixels between."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = image
    return grid


def save_png(path, image: np.ndarray) -> str:
    """Saves one uint8 HWC image (C = 1 grey or 3 RGB) as a PNG, atomically."""
    from PIL import Image

    image = np.asarray(image)
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    paths.write_bytes_atomic(path, buffer.getvalue())  # retried: a bucket may refuse a write
    return os.fspath(path)


def save_image_grid(path: str, images: np.ndarray, max_images: int = 64) -> str:
    """Saves the first ``max_images`` uint8 NHWC images as one PNG grid (atomically)."""
    save_png(path, image_grid(np.asarray(images)[:max_images]))
    return path
