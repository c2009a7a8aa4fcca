"""Noise schedules, timestep respacing and the `Diffusion` constants object.

All schedule arithmetic is float64 numpy, exactly as the reference (openai/guided-diffusion
`gaussian_diffusion.py`, `respace.py`, `script_util.py`) does it; JAX code gathers float32
copies of these arrays (the reference's `_extract_into_tensor` casts after the gather), so
the x64 flag is never needed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from adm_jax.reference_defaults import DIFFUSION_DEFAULTS, SCRIPT_FLAGS

MEAN_TYPES = ("epsilon", "start_x", "previous_x")
VAR_TYPES = ("learned", "learned_range", "fixed_small", "fixed_large")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")

# Derived coefficient arrays, in the reference's attribute order.
COEFFICIENT_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "alphas_cumprod_next",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Betas discretising a continuous abar(t), t in [0, 1] (Improved DDPM eq. 17), capped."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """ "linear" (DDPM, rescaled by 1000/T) or "cosine" (Improved DDPM eq. 17) betas, float64."""
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise NotImplementedError(f"unknown beta schedule: {schedule_name}")


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """Timesteps kept when respacing (Improved DDPM sec. 4): "ddimN" (an integer stride that
    gives exactly N steps), or section counts ("250", "10,20,30", or a list) spread evenly
    over equal-length sections of the original process."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim") :])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError(f"cannot create exactly {desired_count} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


def respace_betas(betas: np.ndarray, use_timesteps) -> tuple[np.ndarray, np.ndarray]:
    """Betas of the process restricted to `use_timesteps`: 1 - abar_s / abar_prev(s).

    Returns (new_betas, timestep_map) where timestep_map[i] is the original index of step i.
    """
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    use_timesteps = set(int(s) for s in use_timesteps)
    last_alpha_cumprod = 1.0
    new_betas, timestep_map = [], []
    for i, alpha_cumprod in enumerate(alphas_cumprod):
        if i in use_timesteps:
            new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
            last_alpha_cumprod = alpha_cumprod
            timestep_map.append(i)
    return np.array(new_betas, dtype=np.float64), np.array(timestep_map, dtype=np.int32)


def _coefficients(betas: np.ndarray) -> dict[str, np.ndarray]:
    """Every constant of the forward process and the posterior (DDPM eqs. 4, 6, 7), float64."""
    betas = np.asarray(betas, dtype=np.float64)
    assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all()
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    return dict(
        betas=betas,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        alphas_cumprod_next=np.append(ac[1:], 0.0),
        sqrt_alphas_cumprod=np.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
        log_one_minus_alphas_cumprod=np.log(1.0 - ac),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
        posterior_variance=posterior_variance,
        # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value.
        posterior_log_variance_clipped=np.log(
            np.append(posterior_variance[1], posterior_variance[1:])
        ),
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class Diffusion:
    """Constants of one (possibly respaced) Gaussian diffusion process.

    Plain float64 numpy arrays (the reference's values), hashable and comparable by value, so
    it can be closed over or passed as a static argument under `jax.jit`. `timestep_map[i]`
    is the original training timestep of step i; networks always receive it.
    """

    model_mean_type: str
    model_var_type: str
    loss_type: str
    timestep_map: np.ndarray
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    alphas_cumprod_next: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    log_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def learns_sigma(self) -> bool:
        return self.model_var_type in ("learned", "learned_range")

    def _key(self):
        return (
            self.model_mean_type,
            self.model_var_type,
            self.loss_type,
            self.betas.tobytes(),
            self.timestep_map.tobytes(),
        )

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, Diffusion) and self._key() == other._key()

    def __repr__(self):
        return (
            f"Diffusion(num_timesteps={self.num_timesteps}, "
            f"model_mean_type={self.model_mean_type!r}, model_var_type={self.model_var_type!r}, "
            f"loss_type={self.loss_type!r})"
        )


def make_diffusion(
    betas,
    *,
    model_mean_type: str = "epsilon",
    model_var_type: str = "learned_range",
    loss_type: str = "mse",
    use_timesteps=None,
) -> Diffusion:
    """The reference's GaussianDiffusion (use_timesteps None) or SpacedDiffusion from betas."""
    if model_mean_type not in MEAN_TYPES:
        raise ValueError(f"model_mean_type must be one of {MEAN_TYPES}, got {model_mean_type!r}")
    if model_var_type not in VAR_TYPES:
        raise ValueError(f"model_var_type must be one of {VAR_TYPES}, got {model_var_type!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    betas = np.asarray(betas, dtype=np.float64)
    if use_timesteps is None:
        timestep_map = np.arange(len(betas), dtype=np.int32)
    else:
        betas, timestep_map = respace_betas(betas, use_timesteps)
    arrays = _coefficients(betas)
    for a in (*arrays.values(), timestep_map):
        a.setflags(write=False)
    return Diffusion(
        model_mean_type=model_mean_type,
        model_var_type=model_var_type,
        loss_type=loss_type,
        timestep_map=timestep_map,
        **arrays,
    )


def create_diffusion(
    *,
    steps: int = 1000,
    noise_schedule: str = "linear",
    learn_sigma: bool = False,
    sigma_small: bool = False,
    use_kl: bool = False,
    predict_xstart: bool = False,
    rescale_learned_sigmas: bool = False,
    timestep_respacing="",
) -> Diffusion:
    """The reference's `script_util.create_gaussian_diffusion` (rescale_timesteps=False).

    Like the reference, the result is always a spaced process: with no respacing every step
    is kept and the betas are recomputed from alphas_cumprod (equal to float64 round-off).
    """
    betas = get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = "rescaled_kl"
    elif rescale_learned_sigmas:
        loss_type = "rescaled_mse"
    else:
        loss_type = "mse"
    if learn_sigma:
        var_type = "learned_range"
    else:
        var_type = "fixed_small" if sigma_small else "fixed_large"
    if not timestep_respacing:
        timestep_respacing = [steps]
    return make_diffusion(
        betas,
        model_mean_type="start_x" if predict_xstart else "epsilon",
        model_var_type=var_type,
        loss_type=loss_type,
        use_timesteps=space_timesteps(steps, timestep_respacing),
    )


# diffusion_defaults() and create_gaussian_diffusion's sigma_small (adm_jax.reference_defaults).
_FLAG_DEFAULTS = {**DIFFUSION_DEFAULTS, "sigma_small": SCRIPT_FLAGS["sigma_small"]}


def _get(flags: Any, name: str):
    if isinstance(flags, Mapping):
        return flags.get(name, _FLAG_DEFAULTS[name])
    return getattr(flags, name, _FLAG_DEFAULTS[name])


def _bool(v) -> bool:
    if isinstance(v, str):
        if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"not a boolean flag value: {v!r}")
        return v.lower() in ("true", "1", "yes")
    return bool(v)


def diffusion_kwargs_from_flags(flags) -> dict:
    """`create_diffusion` kwargs from README flags (a dict, ConfigDict or namespace).

    Missing flags take the reference's `diffusion_defaults()` values.
    """
    respacing = _get(flags, "timestep_respacing")
    if respacing is None:
        respacing = ""
    if isinstance(respacing, Sequence) and not isinstance(respacing, str):
        respacing = ",".join(str(int(c)) for c in respacing)
    return dict(
        steps=int(_get(flags, "diffusion_steps")),
        noise_schedule=str(_get(flags, "noise_schedule")),
        learn_sigma=_bool(_get(flags, "learn_sigma")),
        sigma_small=_bool(_get(flags, "sigma_small")),
        use_kl=_bool(_get(flags, "use_kl")),
        predict_xstart=_bool(_get(flags, "predict_xstart")),
        rescale_learned_sigmas=_bool(_get(flags, "rescale_learned_sigmas")),
        timestep_respacing=str(respacing),
    )
