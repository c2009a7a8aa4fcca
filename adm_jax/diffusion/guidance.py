"""What every sampler shares about guidance and x_0 predictions: the guidance interval
(Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and
Distribution Quality in Diffusion Models") and the x_0 corrections.

The interval is a sigma range, sigma = sqrt((1 - abar) / abar) (the VE noise level of the VP
process, as the k-diffusion samplers see it): guidance is on at a model call exactly when
lo < sigma <= hi. Each sampler maps its own step grid to sigma in float64 numpy
(`interval_mask`) and the scan receives a bool per step; `switch` then runs the guided or the
unguided computation with `lax.cond`, so the skipped one costs nothing.

x_0 corrections (`X0_CORRECTIONS`): "clip" (clip to [-1, 1], the reference's
clip_denoised=True), "threshold" (Imagen's dynamic thresholding, ratio 0.995, max 1,
`dynamic_threshold`) or "none". `denoised_fn(name)` is the function each sampler applies to
every x_0 prediction (its keyword argument `denoised_fn`, named after the reference's
p_mean_variance argument).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

X0_CORRECTIONS = ("clip", "threshold", "none")
THRESHOLDING_RATIO = 0.995
THRESHOLDING_MAX_VAL = 1.0


def dynamic_threshold(x0, ratio=THRESHOLDING_RATIO, max_val=THRESHOLDING_MAX_VAL):
    """Dynamic thresholding (Imagen, Saharia et al. 2022, sec. 2.3): s = max(ratio-quantile of
    |x_0| per example, max_val), x_0 <- clip(x_0, -s, s) / s; keeps guided x_0 in range."""
    flat = jnp.abs(x0).reshape(x0.shape[0], -1)
    s = jnp.maximum(jnp.quantile(flat, ratio, axis=1, method="linear"), max_val)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return jnp.clip(x0, -s, s) / s


def clip_x0(x0):
    """x_0 clipped to [-1, 1] (the reference's clip_denoised)."""
    return jnp.clip(x0, -1.0, 1.0)


def denoised_fn(correction: str | None):
    """The x_0 -> x_0 function of an x_0 correction name; None for "none" (or None)."""
    if correction is None or correction == "none":
        return None
    if correction == "clip":
        return clip_x0
    if correction == "threshold":
        return dynamic_threshold
    raise ValueError(f"x0_correction: expected one of {X0_CORRECTIONS}, got {correction!r}")


def check_interval(guidance_interval) -> tuple[float, float] | None:
    """(sigma_lo, sigma_hi) as floats with lo < hi, or None (guidance everywhere)."""
    if guidance_interval is None:
        return None
    try:
        lo, hi = (float(v) for v in guidance_interval)
    except (TypeError, ValueError):
        raise ValueError(
            f"guidance_interval: expected None or (sigma_lo, sigma_hi), got {guidance_interval!r}"
        ) from None
    if not lo < hi:
        raise ValueError(f"guidance_interval: expected sigma_lo < sigma_hi, got ({lo}, {hi})")
    return lo, hi


def interval_mask(sigmas, guidance_interval) -> np.ndarray:
    """Per model call: whether guidance is on, lo < sigma <= hi (all True without interval)."""
    sigmas = np.asarray(sigmas, np.float64)
    interval = check_interval(guidance_interval)
    if interval is None:
        return np.ones(sigmas.shape, bool)
    return (interval[0] < sigmas) & (sigmas <= interval[1])


def vp_sigmas(alphas_cumprod) -> np.ndarray:
    """sigma = sqrt((1 - abar) / abar) of each entry, float64."""
    abar = np.asarray(alphas_cumprod, np.float64)
    return np.sqrt((1.0 - abar) / abar)


def switch(guided, on, off, *operands):
    """on(*operands) where `guided` (a traced scalar bool, or None = always), else
    off(*operands); `lax.cond`, so only one of them runs."""
    if guided is None:
        return on(*operands)
    return jax.lax.cond(guided, on, off, *operands)


def interval_model_fn(model_fn, unguided_model_fn, guided):
    """model_fn where guided, else unguided_model_fn (e.g. a classifier-free guidance wrapper
    and the conditional model alone), chosen per call by `lax.cond`."""
    if unguided_model_fn is None or guided is None:
        return model_fn
    return lambda x, t: jax.lax.cond(guided, model_fn, unguided_model_fn, x, t)


def check_switches(guidance_interval, classifier_fn, unguided_model_fn):
    """One-line errors for an interval with nothing to switch, or an unguided model without
    an interval."""
    if guidance_interval is not None and classifier_fn is None and unguided_model_fn is None:
        raise ValueError(
            "guidance_interval: switches classifier_fn or unguided_model_fn; pass one of them"
        )
    if unguided_model_fn is not None and guidance_interval is None:
        raise ValueError(
            "unguided_model_fn: only used outside a guidance_interval; pass guidance_interval"
        )
