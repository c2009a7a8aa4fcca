"""Editing an existing image with a diffusion model: the three kinds ``--mode=edit`` runs.

* ``inpaint``: RePaint (Lugmayr et al. 2022) fills the pixels where ``mask`` is 0 and keeps
  those where it is 1, by ancestral steps with resampling jumps (``repaint_sample``);
* ``sdedit``: SDEdit (Meng et al. 2022) noises the image to ``strength`` of the sampler's time
  grid and runs the rest of any sampler from there: a variation that keeps the layout
  (strength near 0) or only the colours (near 1);
* ``class_swap``: DDIM inversion of the image under its own label (deterministic x_T that
  DDIM maps back to the image), then DDIM sampling from that x_T under the target label:
  the pose and stroke of the image, another class.

Each is one traced program; guidance (classifier or classifier-free) steers towards ``y``
in all three.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from adm_jax.diffusion import methods
from adm_jax.diffusion.repaint import get_schedule_jump, repaint_sample
from adm_jax.diffusion.samplers import ddim_invert

EDIT_KINDS = ("inpaint", "sdedit", "class_swap")


@dataclasses.dataclass(frozen=True)
class EditSpec:
    """What to do to each image. ``strength``: sdedit's starting point (0, 1];
    ``jump_length`` / ``jump_n_sample``: RePaint's resampling (jump back ``jump_length``
    steps, ``jump_n_sample`` times in all; 1 = no resampling)."""

    kind: str = "inpaint"
    strength: float = 0.5
    jump_length: int = 10
    jump_n_sample: int = 10

    def __post_init__(self):
        if self.kind not in EDIT_KINDS:
            raise ValueError(f"edit.kind: expected one of {EDIT_KINDS}, got {self.kind!r}")
        if not (isinstance(self.strength, (int, float)) and 0 < self.strength <= 1):
            raise ValueError(f"edit.strength: expected a number in (0, 1], got {self.strength!r}")
        for name in ("jump_length", "jump_n_sample"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"edit.{name}: expected an integer >= 1, got {value!r}")

    @property
    def uses_mask(self) -> bool:
        return self.kind == "inpaint"

    def check_sampler(self, spec: methods.SamplerSpec) -> None:
        """inpaint runs RePaint's ancestral steps and class_swap DDIM both ways; sdedit any."""
        wanted = {"inpaint": ("ddpm",), "class_swap": ("ddim",)}.get(self.kind)
        if wanted and spec.name not in wanted:
            raise ValueError(
                f"sample.sampler: edit.kind={self.kind} runs with {wanted[0]} "
                f"({'RePaint resamples with ancestral steps' if self.kind == 'inpaint' else 'DDIM inversion needs DDIM sampling back'}), "  # noqa: E501
                f"got {spec.name!r}"
            )
        if self.kind == "inpaint" and spec.correction == "threshold":
            raise ValueError(
                "sample.x0_correction: RePaint clips x_0 or leaves it ('clip' or 'none'), "
                "not 'threshold'"
            )
        if self.kind == "class_swap" and spec.eta != 0:
            raise ValueError(
                f"sample.eta: class_swap samples back with deterministic DDIM (eta 0), got "
                f"{spec.eta}"
            )

    def nfe(self, spec: methods.SamplerSpec) -> int:
        """Model evaluations per image (guidance costs on top, as in sampling)."""
        if self.kind == "inpaint":
            return sum(1 for a, b in _pairs(self.times(spec.steps)) if b < a)
        if self.kind == "class_swap":  # the inversion's N - 1 steps, then N back
            return 2 * spec.steps - 1
        return math.ceil(self.strength * spec.steps)

    def times(self, num_timesteps: int) -> tuple[int, ...]:
        """RePaint's jump schedule over a respaced process of ``num_timesteps`` steps."""
        jump_length = min(self.jump_length, max(num_timesteps - 1, 1))
        return tuple(
            get_schedule_jump(
                num_timesteps,
                n_sample=1,
                jump_length=jump_length,
                jump_n_sample=self.jump_n_sample,
            )
        )


def _pairs(times):
    return zip(times[:-1], times[1:], strict=True)


def edit_images(
    edit: EditSpec,
    spec: methods.SamplerSpec,
    diffusion: Any,
    model_fn: Callable[..., jax.Array],
    key: jax.Array,
    x_known: jax.Array,
    *,
    mask: jax.Array | None = None,
    source_model_fn: Callable[..., jax.Array] | None = None,
    classifier_fn: Callable[..., jax.Array] | None = None,
    y: jax.Array | None = None,
    classifier_scale: Any = 0.0,
    unguided_model_fn: Callable[..., jax.Array] | None = None,
) -> jax.Array:
    """The edited images in [-1, 1] (traceable: call it inside your jit).

    ``x_known``: the images to edit, NHWC in [-1, 1]; ``mask`` (inpaint): 1 = keep, 0 =
    fill, broadcastable to ``x_known``; ``model_fn``: the model under the TARGET labels
    (with its guidance); ``source_model_fn`` (class_swap): the unguided model under the
    images' own labels, which the inversion runs. ``diffusion``: the process ``spec`` runs on
    (respaced for ddpm/ddim, the training schedule for the solvers).
    """
    guidance: dict[str, Any] = {}
    if classifier_fn is not None:
        guidance = dict(classifier_fn=classifier_fn, y=y, classifier_scale=classifier_scale)
    if edit.kind == "inpaint":
        if mask is None:
            raise ValueError("mask: inpainting needs a mask (1 = keep, 0 = fill)")
        mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), x_known.shape)
        return repaint_sample(
            diffusion,
            model_fn,
            x_known,
            mask,
            times=edit.times(diffusion.num_timesteps),
            key=key,
            clip_denoised=spec.correction == "clip",
            **guidance,
        )
    common = dict(unguided_model_fn=unguided_model_fn, **guidance)
    if edit.kind == "sdedit":
        return methods.sample_images(
            spec,
            diffusion,
            model_fn,
            key,
            x_known.shape,
            x_init=x_known,
            strength=edit.strength,
            **common,
        )
    x_T = ddim_invert(
        diffusion, source_model_fn or model_fn, x_known, clip_denoised=spec.correction == "clip"
    )
    return methods.sample_images(spec, diffusion, model_fn, key, x_known.shape, x_T=x_T, **common)
