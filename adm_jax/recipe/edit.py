"""``config.edit`` read and checked once, into ``EditSettings`` (``--mode=edit``:
``adm_jax.sampling.edit``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from adm_jax import paths
from adm_jax.diffusion.editing import EDIT_KINDS, EditSpec
from adm_jax.recipe.reader import config_get

MASK_KINDS = ("half", "thick", "thin", "every_second_line", "super_resolve")


@dataclasses.dataclass(frozen=True)
class EditSettings:
    """``config.edit``, read and checked once."""

    spec: EditSpec
    images: str
    labels: str
    target_labels: str
    masks: str
    num_images: int
    output_dir: str


def read_edit(config: Any, workdir: str) -> EditSettings:
    """One-line ValueErrors naming the ``edit.*`` field."""
    ec = config_get(config, "edit")
    if ec is None:
        raise ValueError("edit: the config has no edit section (see configs/default.py)")
    kind = str(config_get(ec, "kind", "") or "").strip().lower()
    if kind not in EDIT_KINDS:
        raise ValueError(f"edit.kind: expected one of {EDIT_KINDS}, got {kind!r}")
    spec = EditSpec(
        kind,
        strength=config_get(ec, "strength", 0.5),
        jump_length=config_get(ec, "jump_length", 10),
        jump_n_sample=config_get(ec, "jump_n_sample", 10),
    )
    images = str(config_get(ec, "images", "") or "")
    if not images:
        raise ValueError("edit.images: give a folder of images or a .npz of them (arr_0)")
    num_images = config_get(ec, "num_images", 0)
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
        raise ValueError(f"edit.num_images: expected an integer >= 0 (0 = all), got {num_images!r}")
    masks = str(config_get(ec, "masks", "") or "")
    if spec.uses_mask and not masks:
        raise ValueError(f"edit.masks: inpainting needs {MASK_KINDS} or a folder of mask PNGs")
    if masks and not spec.uses_mask:
        raise ValueError(f"edit.masks: masks belong to edit.kind=inpaint, not {kind}; set it ''")
    output_dir = str(config_get(ec, "output_dir", "") or "")
    output_dir = output_dir or str(paths.path(workdir or ".") / "edits" / kind)
    return EditSettings(
        spec,
        images=images,
        labels=str(config_get(ec, "labels", "") or "").strip(),
        target_labels=str(config_get(ec, "target_labels", "") or "").strip(),
        masks=masks,
        num_images=num_images,
        output_dir=output_dir,
    )
