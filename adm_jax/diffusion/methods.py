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
