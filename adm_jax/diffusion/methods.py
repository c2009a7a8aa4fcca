"""Which reverse process samples, as one spec: DDPM (ancestral), DDIM, DPM-Solver++(2M),
UniPC, or one of k-diffusion's samplers (EDM Heun, Euler ancestral, DPM-Solver++(2M) and its
SDE variant) on ADM's schedule.

``sampler_spec`` turns the ``sample.*`` fields (``sampler``, ``steps``, ``timestep_respacing``,
``use_ddim``, ``eta``, ``x0_correction`` (and its old spellings ``thresholding``,
``clip_denoised``), ``sigma_grid``, ``s_churn``, ``unipc_variant``, ``guidance_interval``)
into a ``SamplerSpec``; ``sample_images`` runs it, from noise or (for editing) from given
images (``x_init``, ``strength``: SDEdit) or a given x_T (``x_T``, e.g. ``ddim_invert``'s).
``adm_jax.batch_sampler.BatchSampler`` runs every sampler through these two, for
``--mode=sample``, the guidance sweep, the training loop's sample grid and the benchmark, so a
sampler behaves the same everywhere.

NFE (model evaluations per sample) is the number of reverse steps: a respaced DDPM/DDIM
process of N steps, or N solver steps (EDM Heun: 2N - 1). Classifier-free guidance runs each
evaluation on a doubled batch; classifier guidance adds a classifier forward and backward per
evaluation.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adm_jax.diffusion import guidance, karras, unipc
from adm_jax.diffusion.dpm_solver import dpm_solver_sample
from adm_jax.diffusion.samplers import sample

KARRAS_SAMPLERS = karras.SAMPLERS  # heun, euler_ancestral, dpmpp_2m, dpmpp_2m_sde
# Solvers on the training schedule (no timestep_respacing): sample.steps solver steps.
SOLVERS = ("dpm++", "unipc", *KARRAS_SAMPLERS)
SAMPLERS = ("ddpm", "ddim", *SOLVERS)
DPM_DEFAULT_STEPS = 20
DPM_ORDER = 2  # DPM-Solver++(2M), the guided-sampling default of Lu et al. 2022
# k-diffusion's eta for euler_ancestral and dpmpp_2m_sde (full ancestral noise); DDIM's is 0.
KARRAS_DEFAULT_ETA = 1.0
X0_CORRECTIONS = guidance.X0_CORRECTIONS  # "clip", "threshold", "none"; "" = the default


def default_x0_correction(name: str) -> str:
    """The x_0 correction a sampler applies unless told otherwise (the golden cases' and the
    references'): ddpm/ddim clip (guided-diffusion's clip_denoised=True), the solvers none."""
    return "clip" if name in ("ddpm", "ddim") else "none"


_LABELS = {
    "ddpm": "DDPM",
    "ddim": "DDIM",
    "unipc": "UniPC",
    "heun": "Heun",
    "euler_ancestral": "Euler-a",
    "dpmpp_2m": "DPM++(2M)",
    "dpmpp_2m_sde": "DPM++(2M)-SDE",
}


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
    sigma_grid: str = "karras"  # k-diffusion samplers: "karras" (rho 7) or "discrete"
    s_churn: float = 0.0  # heun: EDM's stochastic churn
    variant: str = "bh2"  # unipc: B(h) variant
    # (sigma_lo, sigma_hi): guidance only where lo < sigma <= hi, sigma = sqrt((1 - abar) /
    # abar) at each model call (every sampler).
    guidance_interval: tuple[float, float] | None = None
    # "clip" | "threshold" | "none" applied to every x_0 prediction; "" = the sampler's
    # default (`default_x0_correction`; sampler_spec stores the default as "").
    x0_correction: str = ""

    @property
    def correction(self) -> str:
        """The x_0 correction this sampler applies (its default when x0_correction is "")."""
        return self.x0_correction or default_x0_correction(self.name)

    @property
    def label(self) -> str:
        """Human-readable: "DDPM-250", "DDIM-25", "DPM-Solver++(2M)-20", "Heun-10"."""
        names = {**_LABELS, "dpm++": f"DPM-Solver++({self.order}M)"}
        return f"{names[self.name]}-{self.steps}"

    @property
    def tag(self) -> str:
        """File-name safe: "ddpm250", "ddim25", "dpmpp20", "dpmpp_2m_sde10"."""
        return f"{self.name.replace('++', 'pp')}{self.steps}"

    @property
    def order(self) -> int:
        return min(DPM_ORDER, max(self.steps, 1))

    @property
    def on_training_schedule(self) -> bool:
        """Solvers discretise the unrespaced training schedule themselves."""
        return self.name in SOLVERS

    def options(self) -> dict[str, Any]:
        """The fields besides name, steps, eta and thresholding that shape this sampler's
        images (recorded with a sampling run, so a resume with other values is refused).

        Values at their defaults add no key, so the records of earlier runs stay valid:
        guidance_interval (ddpm/ddim/dpm++/unipc; the k-diffusion samplers always record it)
        and x0_correction are recorded only when set. "threshold" is already recorded as
        thresholding=True, and ddpm/ddim's "none" as clip_denoised=False (the key of the old
        spelling, which this entry overrides in the record)."""
        options: dict[str, Any] = {}
        interval = None if self.guidance_interval is None else list(self.guidance_interval)
        if self.name == "unipc":
            options["unipc_variant"] = self.variant
        if self.name in KARRAS_SAMPLERS:
            options.update(sigma_grid=self.sigma_grid, guidance_interval=interval)
            if self.name == "heun":
                options["s_churn"] = self.s_churn
        elif interval is not None:
            options["guidance_interval"] = interval
        if self.x0_correction not in ("", "threshold"):
            if self.name in ("ddpm", "ddim") and self.x0_correction == "none":
                options["clip_denoised"] = False
            else:
                options["x0_correction"] = self.x0_correction
        return options

    def with_nfe(self, diffusion) -> SamplerSpec:
        """ddpm/ddim: NFE is the respaced process's length (known once it is built)."""
        if self.on_training_schedule:
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
    unguided_model_fn: Callable[..., jax.Array] | None = None,
    x_init: jax.Array | None = None,
    strength: Any = 1.0,
    x_T: jax.Array | None = None,
) -> jax.Array:
    """x_0 in [-1, 1] by ``spec`` (traceable: call it inside your jit).

    ddpm/ddim: ``adm_jax.diffusion.sample`` on the respaced ``diffusion``; the solvers
    (``dpm_solver_sample``, ``unipc_sample``, ``karras_sample``) on the unrespaced one, from
    the same x_T (``normal(fold_in(key, 0))``), so the samplers start from the same noise for
    one key. ``unguided_model_fn``: the model outside ``spec.guidance_interval`` (e.g. the
    conditional model when ``model_fn`` is a classifier-free guidance wrapper).

    x_0 correction: ``spec.correction`` on every x_0 prediction; with ``spec.x0_correction``
    "" ddpm/ddim follow ``clip_denoised`` (False = "none"), the solvers none.

    Starting points (traced, so one program serves every batch):

    - ``x_T`` (``shape``, standard normal): replaces the draw ``normal(fold_in(key, 0))``
      (scaled as that draw would be: by sigma_max for the k-diffusion samplers). DDIM with
      eta 0, dpm++, unipc and dpmpp_2m are then deterministic functions of x_T.
    - ``x_init`` (x_0 images in [-1, 1], ``shape``) with ``strength`` s in (0, 1] (a scalar
      or one per example): SDEdit. ddpm/ddim run the last n = ceil(s * N) of the N respaced
      steps from ``q_sample(x_init, n - 1, x_T)``; dpm++/unipc the last ceil(s * steps)
      steps of their own time grid (the proportional share: the reference run with
      t_T = t_grid[steps - n] and n steps) from alpha_t x_init + sigma_t x_T; the k-diffusion
      samplers the grid's sigmas <= sigma(s) (the schedule's sigma at timestep s * (T - 1))
      from x_init + sigma_start x_T. s = 1 is the ordinary sample (x_init unused); x_T is
      the draw above (or the given x_T), and later noise comes from ``key`` as always.
    """
    guidance_kwargs: Mapping[str, Any] = {}
    if classifier_fn is not None:
        guidance_kwargs = dict(classifier_fn=classifier_fn, y=y, classifier_scale=classifier_scale)
    interval: dict[str, Any] = {}
    if spec.guidance_interval is not None and (
        classifier_fn is not None or unguided_model_fn is not None
    ):  # else nothing to switch: no guidance at all
        interval = dict(guidance_interval=spec.guidance_interval)
        if unguided_model_fn is not None:
            interval["unguided_model_fn"] = unguided_model_fn
    start: dict[str, Any] = {}
    if x_init is not None:
        if not isinstance(strength, jax.core.Tracer):
            values = np.asarray(strength, np.float64)
            if not np.all((values > 0) & (values <= 1)):
                raise ValueError(f"strength: expected values in (0, 1], got {strength!r}")
        start = dict(x_init=x_init, strength=strength)
    if x_T is None:
        x_T = jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)
    else:
        x_T = jnp.asarray(x_T, jnp.float32)
        if x_T.shape != tuple(shape):
            raise ValueError(f"x_T: expected shape {tuple(shape)}, got {x_T.shape}")
    correction = spec.x0_correction
    if not correction and spec.name in ("ddpm", "ddim") and not clip_denoised:
        correction = "none"
    correction = correction or default_x0_correction(spec.name)
    denoised_fn = guidance.denoised_fn(correction)
    if spec.name in ("dpm++", "unipc"):
        solver = dpm_solver_sample if spec.name == "dpm++" else unipc.unipc_sample
        options = dict(variant=spec.variant) if spec.name == "unipc" else {}
        return solver(
            diffusion,
            model_fn,
            x_T,
            steps=spec.steps,
            order=spec.order,
            denoised_fn=denoised_fn,
            **options,
            **guidance_kwargs,
            **interval,
            **start,
        )
    if spec.name in KARRAS_SAMPLERS:
        x = karras.karras_sample(
            diffusion,
            model_fn,
            x_T,
            sampler=spec.name,
            steps=spec.steps,
            sigma_grid=spec.sigma_grid,
            s_churn=spec.s_churn,
            eta=spec.eta,
            key=jax.random.fold_in(key, 1),
            denoised_fn=denoised_fn,
            **guidance_kwargs,
            **interval,
            **start,
        )
        # The k-diffusion samplers do not clip; the images are clipped when quantised.
        return jnp.clip(x, -1.0, 1.0) if clip_denoised else x
    return sample(
        diffusion,
        model_fn,
        key,
        shape,
        use_ddim=spec.name == "ddim",
        eta=spec.eta,
        clip_denoised=False,  # the clip, if any, is denoised_fn (the same jnp.clip)
        denoised_fn=denoised_fn,
        x_T=x_T,
        **guidance_kwargs,
        **interval,
        **start,
    )
