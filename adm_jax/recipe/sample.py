"""``config.sample`` read and checked once, into ``SampleSettings``.

Every sampling run (``--mode=sample``, the guidance sweep, ``--mode=edit``, the training
loop's sample grid, the benchmark) receives a ``SampleSettings``; nothing above this module
reads ``config.sample`` again. A field is read and checked here, under the name it has in the
config, and keeps that name down to the sampler: ``sample.classifier_scale`` is
``SampleSettings.classifier_scale`` is ``BatchSampler``'s ``classifier_scale`` is the
``classifier_scale`` of ``adm_jax.diffusion.sample_loop``. Bad values are one-line
``ValueError``s naming the field, raised before anything is loaded or compiled.

``sampler_spec`` turns the sampler fields (``sampler``, ``steps``, ``timestep_respacing``,
``use_ddim``, ``eta``, ``x0_correction`` and its old spellings ``thresholding`` and
``clip_denoised``, ``sigma_grid``, ``s_churn``, ``unipc_variant``, ``guidance_interval``) into
the ``adm_jax.diffusion.methods.SamplerSpec`` that ``sample_images`` runs.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from adm_jax.diffusion import karras, unipc
from adm_jax.diffusion.methods import (
    DPM_DEFAULT_STEPS,
    KARRAS_DEFAULT_ETA,
    SAMPLERS,
    SOLVERS,
    X0_CORRECTIONS,
    SamplerSpec,
    default_x0_correction,
)
from adm_jax.recipe.reader import config_get, config_text, to_dict


def _guidance_interval(value: Any) -> tuple[float, float] | None:
    """``sample.guidance_interval``: "lo,hi" (sigmas) or "" for guidance everywhere."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        lo, hi = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(
            f"sample.guidance_interval: expected 'lo,hi' (sigmas, e.g. '0.3,5'), got {value!r}"
        ) from None
    if not 0 <= lo < hi:
        raise ValueError(f"sample.guidance_interval: needs 0 <= lo < hi, got {value!r}")
    return lo, hi


def sampler_spec(sample_config: Any, **overrides) -> SamplerSpec:
    """The ``SamplerSpec`` of ``config.sample`` (a ConfigDict or mapping; ``overrides`` replace
    its fields, e.g. ``sampler="dpm++", steps=10`` for a sweep). One-line ValueErrors name
    the field.

    Backward compatible: ``use_ddim=True`` is the old spelling of ``sampler="ddim"``;
    ``steps=0`` keeps ``timestep_respacing`` as it is for ddpm/ddim ("250", "ddim25",
    "10,15,20"), ``steps=N > 0`` replaces it by "N" (ddpm) or "ddimN" (ddim). The solvers
    (dpm++, unipc, heun, euler_ancestral, dpmpp_2m, dpmpp_2m_sde) ignore timestep_respacing
    and run ``steps`` (default 20) solver steps on the training schedule.
    """
    get = {**to_dict(sample_config), **overrides}.get
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
        if name != "ddpm" and name != "ddim":
            raise ValueError(
                f"sample.use_ddim: True contradicts sample.sampler={name!r} (use_ddim is the "
                "old spelling of sampler='ddim'; set it False)"
            )
        name = "ddim"
    eta = get("eta", None)
    try:
        eta = None if eta is None or eta == "" else float(eta)
    except (TypeError, ValueError):
        raise ValueError(f"sample.eta: expected a number, got {eta!r}") from None
    if eta is not None and not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"sample.eta: must be a finite number >= 0, got {eta!r}")
    interval = _guidance_interval(get("guidance_interval", ""))
    correction = _x0_correction(name, get("x0_correction", ""), thresholding, get)
    thresholding = correction == "threshold"
    if name in SOLVERS:
        sigma_grid = str(get("sigma_grid", "karras") or "karras")
        if sigma_grid not in karras.SIGMA_GRIDS:
            raise ValueError(
                f"sample.sigma_grid: expected one of {karras.SIGMA_GRIDS}, got {sigma_grid!r}"
            )
        variant = str(get("unipc_variant", "bh2") or "bh2")
        if variant not in unipc.VARIANTS:
            raise ValueError(
                f"sample.unipc_variant: expected one of {unipc.VARIANTS}, got {variant!r}"
            )
        s_churn = float(get("s_churn", 0.0) or 0.0)
        if not (math.isfinite(s_churn) and s_churn >= 0):
            raise ValueError(f"sample.s_churn: must be a finite number >= 0, got {s_churn}")
        return SamplerSpec(
            name,
            "",
            steps or DPM_DEFAULT_STEPS,
            KARRAS_DEFAULT_ETA if eta is None else eta,
            thresholding,
            sigma_grid=sigma_grid,
            s_churn=s_churn,
            variant=variant,
            guidance_interval=interval,
            x0_correction=correction,
        )
    respacing = str(get("timestep_respacing", "") or "")
    if steps:
        respacing = f"ddim{steps}" if name == "ddim" else str(steps)
    return SamplerSpec(
        name,
        respacing,
        0,
        eta or 0.0,
        thresholding,
        guidance_interval=interval,
        x0_correction=correction,
    )


def _x0_correction(name: str, value: Any, thresholding: bool, get) -> str:
    """``sample.x0_correction`` with its old spellings (``thresholding=True`` is "threshold";
    ddpm/ddim's ``clip_denoised=False`` is "none"), "" when it is the sampler's default."""
    correction = str(value or "").strip().lower()
    if correction and correction not in X0_CORRECTIONS:
        raise ValueError(
            f"sample.x0_correction: expected one of {('', *X0_CORRECTIONS)}, got {value!r}"
        )
    if thresholding:
        if correction not in ("", "threshold"):
            raise ValueError(
                f"sample.thresholding: True contradicts sample.x0_correction={correction!r} "
                "(thresholding=True is the old spelling of x0_correction='threshold')"
            )
        correction = "threshold"
    clip_denoised = get("clip_denoised", True)
    if name in ("ddpm", "ddim") and clip_denoised is not None and not bool(clip_denoised):
        if correction == "clip":
            raise ValueError(
                "sample.clip_denoised: False contradicts sample.x0_correction='clip' "
                "(clip_denoised=False is the old spelling of x0_correction='none')"
            )
        correction = correction or "none"
    return "" if correction == default_x0_correction(name) else correction


_TAG = re.compile(
    r"^(ddpm|ddim|dpm\+\+|unipc|heun|euler_ancestral|dpmpp_2m_sde|dpmpp_2m|dpmpp)?(\d+)$"
)


def parse_sampler(text: str, field: str = "samplers") -> SamplerSpec:
    """Sampler tags: "ddpm250", "ddim25", "dpm++20" (or "dpmpp20"), "unipc10", "heun10",
    "dpmpp_2m_sde20", ...; a bare number or "ddimN" is a timestep_respacing as before
    ("250" = DDPM-250)."""
    match = _TAG.match(str(text).strip().lower())
    if not match:
        raise ValueError(
            f"{field}: expected a sampler name from {SAMPLERS} and a step count, e.g. ddpm250, "
            f"ddim25, dpm++20 or heun10, got {text!r}"
        )
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
    value = to_dict(sample_config).get("cfg_scale")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return check_scale("sample.cfg_scale", value)


def parse_class_labels(spec: Any) -> list[int] | None:
    """``"random"``/``""``/None -> None (random); ``"1,2"``, ``[1, 2]``, ``3`` -> list."""
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = spec.strip()
        if spec.lower() in ("", "random"):
            return None
        try:
            return [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise ValueError(
                f"sample.class_labels: expected 'random' or comma-separated ints, got {spec!r}"
            ) from None
    if isinstance(spec, (int, np.integer)):
        return [int(spec)]
    return [int(s) for s in spec]


def _count(fields: Mapping[str, Any], field: str, minimum: int) -> int:
    value = fields.get(field, minimum)
    value = minimum if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        hint = " (0 = every base sample, only with sample.base_samples)" if minimum == 0 else ""
        raise ValueError(f"sample.{field}: expected an integer >= {minimum}, got {value!r}{hint}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """The ``sample`` section, checked. ``checkpoint`` "" means the workdir; ``cfg_scale``
    None means classifier-free guidance is off; ``class_labels`` None means random labels;
    ``num_classes`` 0 means the networks' label range; ``dtype`` "" means float32."""

    sampler: SamplerSpec
    classifier_scale: float = 0.0
    cfg_scale: float | None = None
    checkpoint: str = ""
    classifier_checkpoint: str = ""
    batch_size: int = 16
    num_samples: int = 0
    seed: int = 0
    class_labels: tuple[int, ...] | None = None
    num_classes: int = 0
    base_samples: str = ""
    clip_denoised: bool = True
    dtype: str = ""
    attention_impl: str = ""  # config.train.attention_impl: the kernel the model was built for
    output_dir: str = ""
    # The sampler fields as given, so that ``with_sampler`` re-reads them with overrides.
    sampler_fields: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def with_sampler(self, **overrides) -> SampleSettings:
        """These settings with other sampler fields (``sampler="dpm++", steps=10``)."""
        fields = {**self.sampler_fields, **overrides}
        return dataclasses.replace(self, sampler=sampler_spec(fields), sampler_fields=fields)

    def module_overrides(self) -> dict[str, Any]:
        """Keyword arguments for building the networks: the compute dtype (float32 unless
        ``sample.dtype`` says otherwise: FID is measured at full precision) and the attention
        kernel of ``train.attention_impl``."""
        overrides: dict[str, Any] = {"dtype": jnp.dtype(self.dtype)} if self.dtype else {}
        if self.attention_impl:
            overrides["attention_impl"] = self.attention_impl
        return overrides


def read_sample(config: Any, **sampler_overrides) -> SampleSettings:
    """``config.sample`` (and ``config.train.attention_impl``) as ``SampleSettings``; every
    problem is a one-line ValueError naming the field."""
    fields = to_dict(config_get(config, "sample"))
    text = lambda name: "" if fields.get(name) is None else str(fields[name])
    batch_size = _count(fields, "batch_size", 1)
    num_samples = _count(fields, "num_samples", 0)
    base_samples = text("base_samples")
    if not num_samples and not base_samples:
        raise ValueError(
            "sample.num_samples: 0 samples every base sample once, which needs "
            "sample.base_samples (an upsampler's input); give a positive count"
        )
    classifier_scale = check_scale(
        "sample.classifier_scale", fields.get("classifier_scale", 0.0) or 0.0
    )
    classifier_checkpoint = text("classifier_checkpoint")
    if classifier_scale != 0.0 and not classifier_checkpoint:
        raise ValueError(
            f"sample.classifier_scale={classifier_scale:g} needs sample.classifier_checkpoint "
            "(a noisy-image classifier); set the scale to 0 to sample without guidance"
        )
    num_classes = fields.get("num_classes", 0) or 0
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, (int, np.integer))
        or (num_classes < 0)
    ):
        raise ValueError(f"sample.num_classes: expected an integer >= 0, got {num_classes!r}")
    labels = parse_class_labels(fields.get("class_labels", "random"))
    fields.update(sampler_overrides)
    return SampleSettings(
        sampler=sampler_spec(fields),
        classifier_scale=classifier_scale,
        cfg_scale=cfg_scale_of(fields),
        checkpoint=text("checkpoint"),
        classifier_checkpoint=classifier_checkpoint,
        batch_size=batch_size,
        num_samples=num_samples,
        seed=int(fields.get("seed", 0) or 0),
        class_labels=None if labels is None else tuple(labels),
        num_classes=int(num_classes),
        base_samples=base_samples,
        clip_denoised=bool(fields.get("clip_denoised", True)),
        dtype=text("dtype"),
        attention_impl=config_text(config_get(config, "train"), "attention_impl"),
        output_dir=text("output_dir"),
        sampler_fields=fields,
    )
