"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models"): multistep, data prediction, on the discrete-time VP schedule of a
`Diffusion`, as the reference `dpm_solver_pytorch.py` (LuChengTHU/dpm-solver) runs it with
`NoiseScheduleVP('discrete', betas)`, `algorithm_type="dpmsolver++"`, `method="multistep"`.

Everything that depends only on the schedule (the time grid, alpha_t, sigma_t, lambda_t and
every update's coefficients) is computed once in float64 numpy (`dpm_solver_plan`) and enters
the solver's single `lax.scan` as float32 per-step arrays, so the traced arithmetic is float32
and x64 is never needed; the float64 schedule avoids the ~1e-3 loss of sigma_t near t = 0
that a float32 `1 - exp(2 log alpha)` suffers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from adm_jax.diffusion.samplers import classifier_guidance_grad
from adm_jax.diffusion.schedules import Diffusion

SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")
# NoiseScheduleVP.numerical_clip_alpha: trailing steps whose half-log-SNR is below this go.
CLIPPED_LAMBDA = -5.1
THRESHOLDING_RATIO = 0.995
THRESHOLDING_MAX_VAL = 1.0


def vp_log_alpha_table(betas) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints (t_n, log alpha_n) of the discrete VP schedule, t_n = n / N, n = 1..N.

    log alpha_n = 0.5 * cumsum(log(1 - beta)), alpha being DPM-Solver's alpha (= sqrt(abar)).
    The trailing entries with lambda < -5.1 are dropped (the reference's numerical_clip_alpha:
    cosine schedules lose a few), which changes N and so every model time.
    """
    log_alphas = 0.5 * np.cumsum(np.log(1.0 - np.asarray(betas, np.float64)))
    lambdas = log_alphas - 0.5 * np.log(-np.expm1(2.0 * log_alphas))
    num_clipped = int(np.searchsorted(lambdas[::-1], CLIPPED_LAMBDA, side="left"))
    if num_clipped:
        log_alphas = log_alphas[:-num_clipped]
    total_n = log_alphas.shape[0]
    t_array = np.linspace(0.0, 1.0, total_n + 1, dtype=np.float64)[1:]
    return t_array, log_alphas


def _interpolate(x, xp, yp):
    """Piecewise-linear y(x) through (xp, yp), xp increasing, extrapolated linearly past both
    ends with the outermost segments (the reference's interpolate_fn)."""
    x = np.asarray(x, np.float64)
    idx = np.clip(np.searchsorted(xp, x, side="right") - 1, 0, len(xp) - 2)
    x0, x1, y0, y1 = xp[idx], xp[idx + 1], yp[idx], yp[idx + 1]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


def marginal_log_alpha(table, t):
    """log alpha(t), piecewise linear in t between the schedule's keypoints."""
    t_array, log_alphas = table
    return _interpolate(t, t_array, log_alphas)


def marginal_lambda(table, t):
    """Half-log-SNR lambda(t) = log alpha(t) - log sigma(t), sigma(t) = sqrt(1 - alpha(t)^2)."""
    log_alpha = marginal_log_alpha(table, t)
    return log_alpha - 0.5 * np.log(-np.expm1(2.0 * log_alpha))


def inverse_lambda(table, lamb):
    """t(lambda): log alpha = -0.5 log(1 + exp(-2 lambda)), then the schedule read backwards."""
    t_array, log_alphas = table
    log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * np.asarray(lamb, np.float64))
    return _interpolate(log_alpha, log_alphas[::-1], t_array[::-1])


def time_steps(table, steps: int, skip_type: str) -> np.ndarray:
    """The steps + 1 solver times from t_T = 1 down to t_0 = 1/N (reference get_time_steps):
    uniform in t, uniform in lambda ("logSNR") or uniform in sqrt(t) ("time_quadratic")."""
    t_T, t_0 = 1.0, 1.0 / table[0].shape[0]
    if skip_type == "time_uniform":
        return np.linspace(t_T, t_0, steps + 1, dtype=np.float64)
    if skip_type == "time_quadratic":
        return np.linspace(np.sqrt(t_T), np.sqrt(t_0), steps + 1, dtype=np.float64) ** 2
    if skip_type == "logSNR":
        lambda_T, lambda_0 = marginal_lambda(table, t_T), marginal_lambda(table, t_0)
        return inverse_lambda(table, np.linspace(lambda_T, lambda_0, steps + 1))
    raise ValueError(f"skip_type: expected one of {SKIP_TYPES}, got {skip_type!r}")


def update_orders(steps: int, order: int, lower_order_final: bool) -> list[int]:
    """Order of each of the `steps` multistep updates: a warm-up 1, 2, .. up to `order` (the
    history is short), then `order`; with lower_order_final and fewer than 10 steps the last
    updates drop to min(order, steps + 1 - j) (the reference's stabilising trick)."""
    orders = []
    for j in range(1, steps + 1):
        if j < order:
            orders.append(j)
        elif lower_order_final and steps < 10:
            orders.append(min(order, steps + 1 - j))
        else:
            orders.append(order)
    return orders


def _update_coefficients(lambdas, alphas, sigmas, j, step_order):
    """(c_x, [c_0, c_1, c_2]) with x_{t_j} = c_x x + sum_i c_i m_{j-1-i}, m the data
    predictions at t_{j-1}, t_{j-2}, t_{j-3}.

    Order 1 is DPM-Solver++(1) (= DDIM), 2 the multistep DPM-Solver++(2M) (Lu et al. 2022
    Alg. 2), 3 the multistep third-order update, all with the reference's "dpmsolver" solver
    type, expanded from its divided differences D1, D2 into one linear combination.
    """
    lam_t, lam_0 = lambdas[j], lambdas[j - 1]
    h = lam_t - lam_0
    a_t = alphas[j]
    phi_1 = np.expm1(-h)
    c_x = sigmas[j] / sigmas[j - 1]
    c = np.zeros(3)
    c[0] = -a_t * phi_1
    if step_order == 2:
        r0 = (lam_0 - lambdas[j - 2]) / h
        # - 0.5 a_t phi_1 D1_0, D1_0 = (m_0 - m_1) / r0
        d = -0.5 * a_t * phi_1 / r0
        c[0] += d
        c[1] -= d
    elif step_order == 3:
        r0 = (lam_0 - lambdas[j - 2]) / h
        r1 = (lambdas[j - 2] - lambdas[j - 3]) / h
        phi_2 = phi_1 / h + 1.0
        phi_3 = phi_2 / h - 0.5
        # + a_t phi_2 D1 - a_t phi_3 D2 with D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),
        # D2 = (D1_0 - D1_1) / (r0 + r1), D1_0 = (m_0 - m_1) / r0, D1_1 = (m_1 - m_2) / r1.
        w = 1.0 / (r0 + r1)
        d10 = a_t * (phi_2 * (1.0 + r0 * w) - phi_3 * w)
        d11 = a_t * (-phi_2 * r0 * w + phi_3 * w)
        c[0] += d10 / r0
        c[1] += -d10 / r0 + d11 / r1
        c[2] += -d11 / r1
    elif step_order != 1:
        raise ValueError(f"order: expected 1, 2 or 3, got {step_order}")
    return c_x, c


def base_betas(diffusion: Diffusion) -> np.ndarray:
    """The training schedule's betas; DPM-Solver discretises its own time grid over them, so a
    respaced process (which keeps only abar on a subset) cannot serve."""
    n = diffusion.num_timesteps
    if not np.array_equal(diffusion.timestep_map, np.arange(n)):
        raise ValueError(
            f"diffusion: DPM-Solver needs the unrespaced schedule, got one respaced to {n} steps "
            f"(create it with timestep_respacing='')"
        )
    return np.asarray(diffusion.betas, np.float64)


def _validate(steps, order, skip_type):
    if order not in (1, 2, 3):
        raise ValueError(f"order: expected 1, 2 or 3, got {order!r}")
    if not isinstance(steps, int) or steps < order:
        raise ValueError(f"steps: expected an int >= order ({order}), got {steps!r}")
    if skip_type not in SKIP_TYPES:
        raise ValueError(f"skip_type: expected one of {SKIP_TYPES}, got {skip_type!r}")


def dpm_solver_plan(
    diffusion: Diffusion,
    *,
    steps: int = 20,
    order: int = 2,
    skip_type: str = "time_uniform",
    lower_order_final: bool = True,
) -> dict[str, np.ndarray]:
    """Everything the solver needs that does not depend on x, float64 numpy.

    Model evaluation k (k = 0..steps-1) happens at t_continuous[k], with model time
    model_times[k] = (t_continuous[k] - 1/N) * 1000, alpha[k], sigma[k]; it is followed by the
    update t_k -> t_{k+1}: x <- coef_x[k] x + coef_model[k] . (m_k, m_{k-1}, m_{k-2}) of
    order orders[k]. Keys: t_continuous and lambda (steps + 1,); model_times, alpha, sigma,
    orders, coef_x (steps,); coef_model (steps, 3); total_n (the clipped schedule length).
    """
    _validate(steps, order, skip_type)
    table = vp_log_alpha_table(base_betas(diffusion))
    total_n = table[0].shape[0]
    ts = time_steps(table, steps, skip_type)
    log_alphas = marginal_log_alpha(table, ts)
    alphas = np.exp(log_alphas)
    sigmas = np.sqrt(-np.expm1(2.0 * log_alphas))
    lambdas = log_alphas - np.log(sigmas)
    orders = update_orders(steps, order, lower_order_final)
    coef_x = np.zeros(steps)
    coef_model = np.zeros((steps, 3))
    for k, step_order in enumerate(orders):
        coef_x[k], coef_model[k] = _update_coefficients(lambdas, alphas, sigmas, k + 1, step_order)
    return {
        "t_continuous": ts,
        "lambda": lambdas,
        "model_times": (ts[:-1] - 1.0 / total_n) * 1000.0,
        "alpha": alphas[:-1],
        "sigma": sigmas[:-1],
        "orders": np.asarray(orders, np.int32),
        "coef_x": coef_x,
        "coef_model": coef_model,
        "total_n": total_n,
    }


def dynamic_threshold(x0, ratio=THRESHOLDING_RATIO, max_val=THRESHOLDING_MAX_VAL):
    """Dynamic thresholding (Imagen, Saharia et al. 2022, sec. 2.3): s = max(ratio-quantile of
    |x_0| per example, max_val), x_0 <- clip(x_0, -s, s) / s; keeps guided x_0 in range."""
    flat = jnp.abs(x0).reshape(x0.shape[0], -1)
    s = jnp.maximum(jnp.quantile(flat, ratio, axis=1, method="linear"), max_val)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return jnp.clip(x0, -s, s) / s


def _eps(output, channels):
    """The eps part of a model output: all of it, or the first C of 2C channels (the rest is
    the learned variance, which an ODE solver does not use)."""
    if output.shape[-1] not in (channels, 2 * channels):
        raise ValueError(
            f"model_fn output: expected {channels} or {2 * channels} channels (NHWC), "
            f"got shape {output.shape}"
        )
    return output[..., :channels].astype(jnp.float32)


def dpm_solver_sample(
    diffusion: Diffusion,
    model_fn,
    x_T,
    *,
    steps: int = 20,
    order: int = 2,
    skip_type: str = "time_uniform",
    thresholding: bool = False,
    classifier_fn=None,
    y=None,
    classifier_scale=0.0,
    lower_order_final: bool = True,
):
    """x_0 from x_T (NHWC) by multistep DPM-Solver++ in `steps` model evaluations.

    model_fn(x, t) -> eps (or eps and learned variance, 2C channels) and classifier_fn(x, t)
    -> logits receive the float model times t = (t_continuous - 1/N) * 1000, shape (B,), of
    the unrespaced schedule of `diffusion`. With classifier_fn, eps' = eps - sigma_t *
    classifier_scale * grad_x log p(y | x_t, t) (ADM's classifier guidance on the score).
    thresholding applies `dynamic_threshold` to every x_0 prediction. diffusion, model_fn,
    classifier_fn and the solver options are static; x_T, y and classifier_scale are traced.
    """
    _validate(steps, order, skip_type)
    base_betas(diffusion)
    if classifier_fn is not None and y is None:
        raise ValueError("y: classifier guidance needs the target labels")
    x_T = jnp.asarray(x_T, jnp.float32)
    if x_T.ndim < 2:
        raise ValueError(f"x_T: expected a batch of NHWC images, got shape {x_T.shape}")
    return _dpm_solver_sample(
        diffusion,
        model_fn,
        x_T,
        steps=steps,
        order=order,
        skip_type=skip_type,
        thresholding=bool(thresholding),
        classifier_fn=classifier_fn,
        y=None if y is None else jnp.asarray(y, jnp.int32),
        classifier_scale=jnp.asarray(classifier_scale, jnp.float32),
        lower_order_final=bool(lower_order_final),
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "diffusion",
        "model_fn",
        "steps",
        "order",
        "skip_type",
        "thresholding",
        "classifier_fn",
        "lower_order_final",
    ),
)
def _dpm_solver_sample(
    diffusion,
    model_fn,
    x_T,
    *,
    steps,
    order,
    skip_type,
    thresholding,
    classifier_fn,
    y,
    classifier_scale,
    lower_order_final,
):
    plan = dpm_solver_plan(
        diffusion,
        steps=steps,
        order=order,
        skip_type=skip_type,
        lower_order_final=lower_order_final,
    )
    batch, channels = x_T.shape[0], x_T.shape[-1]
    xs = {
        name: jnp.asarray(np.asarray(plan[name], np.float32))
        for name in ("model_times", "alpha", "sigma", "coef_x", "coef_model")
    }

    def data_prediction(x, s):
        """x_0 = (x_t - sigma_t eps) / alpha_t, eps classifier-guided, optionally thresholded."""
        t = jnp.full((batch,), s["model_times"], jnp.float32)
        eps = _eps(model_fn(x, t), channels)
        if classifier_fn is not None:
            eps = eps - s["sigma"] * classifier_guidance_grad(
                classifier_fn, x, t, y, classifier_scale
            )
        x0 = (x - s["sigma"] * eps) / s["alpha"]
        return dynamic_threshold(x0) if thresholding else x0

    def body(carry, s):
        x, history = carry
        m = data_prediction(x, s)
        models = (m, *history)
        x = s["coef_x"] * x + sum(s["coef_model"][i] * models[i] for i in range(len(models)))
        return (x, models[: order - 1]), None

    history = tuple(jnp.zeros_like(x_T) for _ in range(order - 1))
    (x_0, _), _ = jax.lax.scan(body, (x_T, history), xs)
    return x_0
