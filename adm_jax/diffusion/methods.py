"""Which reverse process samples: DDPM (ancestral), DDIM, or DPM-Solver++(2M), as one spec.

``sampler_spec`` turns the ``sample.*`` fields (``sampler``, ``steps``, ``timestep_respacing``,
``use_ddim``, ``eta``, ``thresholding``) into a ``SamplerSpec``; ``sample_images`` runs it.
``adm_jax.batch_sampler.BatchSampler`` runs every sampler through these two, for
``--mode=sample``, the guidance sweep, the training loop's sample grid and the benchmark, so a
sampler behaves the same everywhere.

NFE (model evaluations per sample) is the number of reverse steps: a respaced DDPM/DDIM
process of N steps, or N DPM-Solver++ steps. Classifier-free guidance runs each evaluation on
a doubled batch; classifier guidance adds a classifier forward and backward per evaluation.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from adm_jax.diffusion.dpm_solver import dpm_solver_sample
from adm_jax.diffusion.samplers import sample

SAMPLERS = ("ddpm", "ddim", "dpm++")
DPM_DEFAULT_STEPS = 20
DPM_ORDER = 2  # DPM-Solver++(2M), the guided-sampling default of Lu et al. 2022


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """A reverse process. ``respacing``: the timestep_respacing ddpm/ddim run on ("" for dpm++,
    which solves on the training schedule); ``steps``: NFE (0 until the respaced process is
    built, see ``with_nfe``)."""

    name: str = "ddpm"
    respacing: str = ""
    steps: int = 0
    eta: float = 0.0
    thresholding: bool = False

    @property
    def label(self) -> str:
        """Human-readable: "DDPM-250", "DDIM-25", "DPM-Solver++(2M)-20"."""
        names = {"ddpm": "DDPM", "ddim": "DDIM", "dpm++": f"DPM-Solver++({self.order}M)"}
        return f"{names[self.name]}-{self.steps}"

    @property
    def tag(self) -> str:
        """File-name safe: "ddpm250", "ddim25", "dpmpp20"."""
        return f"{self.name.replace('++', 'pp')}{self.steps}"

    @property
    def order(self) -> int:
        return min(DPM_ORDER, max(self.steps, 1))

    def with_nfe(self, diffusion) -> SamplerSpec:
        """ddpm/ddim: NFE is the respaced process's length (known once it is built)."""
        if self.name == "dpm++":
            return self
        return dataclasses.replace(self, steps=int(diffusion.num_timesteps))


def config_get(section: Any, name: str, default: Any = None) -> Any:
    """``section.name`` of a ConfigDict, dict or plain object, else ``default`` (also for a
    missing ``section``): sampling and evaluation read configs built by hand as well."""
    if section is None:
        return default
    if hasattr(section, "get"):
        return section.get(name, default)
    return getattr(section, name, default)


def sampler_spec(sample_config: Any, **overrides) -> SamplerSpec:
    """The ``SamplerSpec`` of ``config.sample`` (a ConfigDict or mapping; ``overrides`` replace
    its fields, e.g. ``sampler="dpm++", steps=10`` for a sweep). One-line ValueErrors name
    the field.

    Backward compatible: ``use_ddim=True`` is the old spelling of ``sampler="ddim"``;
    ``steps=0`` keeps ``timestep_respacing`` as it is for ddpm/ddim ("250", "ddim25",
    "10,15,20"), ``steps=N > 0`` replaces it by "N" (ddpm) or "ddimN" (ddim). dpm++ ignores
    timestep_respacing and runs ``steps`` (default 20) solver steps.
    """
    get = lambda name, default=None: overrides.get(name, config_get(sample_config, name, default))
    name = str(get("sampler", "ddpm") or "ddpm").strip().lower()
    if name not in SAMPLERS:
        raise ValueError(f"sample.sampler: expected one of {SAMPLERS}, got {name!r}")
    try:
        steps = int(get("steps", 0) or 0)
    except (TypeError, ValueError):
        raise ValueError(f"sample.steps: expected an int, got {get('steps')!r}") from None
    if steps < 0:
        raise ValueError(f"sample.steps: must be >= 0 (0 = the sampler's default), got {steps}")
    thresholding = bool(get("thresholding", False))
    if bool(get("use_ddim", False)):
        if name == "dpm++":
            raise ValueError(
                "sample.use_ddim: True contradicts sample.sampler='dpm++' (use_ddim is the old "
                "spelling of sampler='ddim'; set it False)"
            )
        name = "ddim"
    if name == "dpm++":
        return SamplerSpec("dpm++", "", steps or DPM_DEFAULT_STEPS, 0.0, thresholding)
    if thresholding:
        raise ValueError(
            f"sample.thresholding: dynamic thresholding is a dpm++ option; {name} clips x_0 "
            "with sample.clip_denoised"
        )
    respacing = str(get("timestep_respacing", "") or "")
    if steps:
        respacing = f"ddim{steps}" if name == "ddim" else str(steps)
    return SamplerSpec(name, respacing, 0, float(get("eta", 0.0) or 0.0), False)


_TAG = re.compile(r"^(ddpm|ddim|dpm\+\+|dpmpp)?(\d+)$")


def parse_sampler(text: str, field: str = "samplers") -> SamplerSpec:
    """Sampler tags: "ddpm250", "ddim25", "dpm++20" (or "dpmpp20"); a bare number or
    "ddimN" is a timestep_respacing as before ("250" = DDPM-250)."""
    match = _TAG.match(str(text).strip().lower())
    if not match:
        raise ValueError(f"{field}: expected e.g. ddpm250, ddim25 or dpm++20, got {text!r}")
    name = {"dpmpp": "dpm++", None: "ddpm"}.get(match.group(1), match.group(1))
    return sampler_spec({"sampler": name, "steps": int(match.group(2))})


def check_scale(field: str, value: Any) -> float:
    """A guidance scale as a float; non-finite or negative values are refused."""
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field}: expected a number, got {value!r}") from None
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"{field}: must be a finite number >= 0, got {value!r}")
    return scale


def cfg_scale_of(sample_config: Any) -> float | None:
    """``sample.cfg_scale``: None (or "") means classifier-free guidance is off; otherwise a
    finite scale >= 0 (1 = the conditional model, 0 = the unconditional one)."""
    value = config_get(sample_config, "cfg_scale", None)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return check_scale("sample.cfg_scale", value)


def sample_images(
    spec: SamplerSpec,
    diffusion: Any,
    model_fn: Callable[..., jax.Array],
    key: jax.Array,
    shape: tuple[int, ...],
    *,
    clip_denoised: bool = True,
    classifier_fn: Callable[..., jax.Array] | None = None,
    y: jax.Array | None = None,
    classifier_scale: Any = 0.0,
) -> jax.Array:
    """x_0 in [-1, 1] by ``spec`` (traceable: call it inside your jit).

    ddpm/ddim: ``adm_jax.diffusion.sample`` on the respaced ``diffusion``; dpm++:
    ``adm_jax.diffusion.dpm_solver_sample`` on the unrespaced one, from the same x_T
    (``normal(fold_in(key, 0))``), so the samplers start from the same noise for one key.
    """
    guidance: Mapping[str, Any] = {}
    if classifier_fn is not None:
        guidance = dict(classifier_fn=classifier_fn, y=y, classifier_scale=classifier_scale)
    if spec.name == "dpm++":
        x_T = jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)
        return dpm_solver_sample(
            diffusion,
            model_fn,
            x_T,
            steps=spec.steps,
            order=spec.order,
            thresholding=spec.thresholding,
            **guidance,
        )
    return sample(
        diffusion,
        model_fn,
        key,
        shape,
        use_ddim=spec.name == "ddim",
        eta=spec.eta,
        clip_denoised=clip_denoised,
        **guidance,
    )
