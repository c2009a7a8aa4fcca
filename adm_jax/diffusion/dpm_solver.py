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

from adm_jax.diffusion.guidance import check_interval, check_switches
from adm_jax.diffusion.schedules import Diffusion
from adm_jax.diffusion.solver_common import (
    CLIPPED_LAMBDA,
    SKIP_TYPES,
    THRESHOLDING_MAX_VAL,
    THRESHOLDING_RATIO,
    base_betas,
    check_inputs,
    data_prediction_fn,
    dynamic_threshold,
    guided_mask,
    inverse_lambda,
    marginal_lambda,
    marginal_log_alpha,
    model_eps,
    model_input_times,
    schedule_at,
    start_point,
    time_steps,
    validate_solver_args,
    vp_log_alpha_table,
)
from adm_jax.diffusion.start import bcast

# The schedule and model-wrapper helpers live in solver_common (UniPC shares them); these
# names stay importable from here.
__all__ = [
    "CLIPPED_LAMBDA",
    "SKIP_TYPES",
    "THRESHOLDING_MAX_VAL",
    "THRESHOLDING_RATIO",
    "base_betas",
    "dpm_solver_plan",
    "dpm_solver_sample",
    "dynamic_threshold",
    "inverse_lambda",
    "marginal_lambda",
    "marginal_log_alpha",
    "time_steps",
    "update_orders",
    "vp_log_alpha_table",
]
# Earlier private names, kept for callers that imported them from here.
_eps = model_eps
_validate = validate_solver_args


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


def _coefficient_arrays(lambdas, alphas, sigmas, orders):
    """(coef_x (n,), coef_model (n, 3)) of the n = len(orders) updates on the grid."""
    coef_x = np.zeros(len(orders))
    coef_model = np.zeros((len(orders), 3))
    for k, step_order in enumerate(orders):
        coef_x[k], coef_model[k] = _update_coefficients(lambdas, alphas, sigmas, k + 1, step_order)
    return coef_x, coef_model


def start_tables(plan, order: int, lower_order_final: bool):
    """For SDEdit starts: coef_x (steps, steps) and coef_model (steps, steps, 3), row j0 the
    coefficients of the run that starts at grid point j0 (update k for k >= j0; the last
    steps - j0 updates of the grid, with their own warm-up orders, as the reference run with
    t_T = t_continuous[j0] and steps - j0 steps), zeros before j0."""
    steps = len(plan["alpha"])
    lambdas, alphas, sigmas = plan["lambda"], plan["grid_alpha"], plan["grid_sigma"]
    coef_x, coef_model = np.zeros((steps, steps)), np.zeros((steps, steps, 3))
    for j0 in range(steps):
        orders = update_orders(steps - j0, order, lower_order_final)
        coef_x[j0, j0:], coef_model[j0, j0:] = _coefficient_arrays(
            lambdas[j0:], alphas[j0:], sigmas[j0:], orders
        )
    return coef_x, coef_model


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
    order orders[k]. Keys: t_continuous, lambda, grid_alpha, grid_sigma (steps + 1,);
    model_times, alpha, sigma, orders, coef_x (steps,); coef_model (steps, 3); total_n (the
    clipped schedule length).
    """
    validate_solver_args(steps, order, skip_type)
    table = vp_log_alpha_table(base_betas(diffusion), clip_low_lambda=True)
    total_n = table[0].shape[0]
    ts = time_steps(table, steps, skip_type)
    alphas, sigmas, lambdas = schedule_at(table, ts)
    orders = update_orders(steps, order, lower_order_final)
    coef_x, coef_model = _coefficient_arrays(lambdas, alphas, sigmas, orders)
    return {
        "t_continuous": ts,
        "lambda": lambdas,
        "model_times": model_input_times(ts[:-1], total_n),
        "alpha": alphas[:-1],
        "sigma": sigmas[:-1],
        "grid_alpha": alphas,
        "grid_sigma": sigmas,
        "orders": np.asarray(orders, np.int32),
        "coef_x": coef_x,
        "coef_model": coef_model,
        "total_n": total_n,
    }


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
    denoised_fn=None,
    guidance_interval=None,
    unguided_model_fn=None,
    x_init=None,
    strength=1.0,
):
    """x_0 from x_T (NHWC) by multistep DPM-Solver++ in `steps` model evaluations.

    model_fn(x, t) -> eps (or eps and learned variance, 2C channels) and classifier_fn(x, t)
    -> logits receive the float model times t = (t_continuous - 1/N) * 1000, shape (B,), of
    the unrespaced schedule of `diffusion`. With classifier_fn, eps' = eps - sigma_t *
    classifier_scale * grad_x log p(y | x_t, t) (ADM's classifier guidance on the score).
    denoised_fn (x_0 -> x_0) is applied to every x_0 prediction; thresholding=True is
    denoised_fn=`dynamic_threshold`. guidance_interval=(sigma_lo, sigma_hi): guidance only at
    steps with lo < sigma_t / alpha_t <= hi (sqrt((1 - abar) / abar) of the solver's own
    schedule); outside it the classifier is skipped and the model is unguided_model_fn when
    given (`lax.cond`). x_init, strength: SDEdit, start from x_init (x_0 images) noised with
    x_T to grid point j0 = steps - ceil(strength * steps) and run the grid's last
    ceil(strength * steps) steps (strength traced, scalar or (B,); 1 = the ordinary run).
    diffusion, model_fn, classifier_fn and the solver options are static; x_T, x_init,
    strength, y and classifier_scale are traced.
    """
    validate_solver_args(steps, order, skip_type)
    base_betas(diffusion)
    x_T = check_inputs(x_T, classifier_fn, y)
    check_switches(guidance_interval, classifier_fn, unguided_model_fn)
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
        denoised_fn=denoised_fn,
        guidance_interval=check_interval(guidance_interval),
        unguided_model_fn=unguided_model_fn,
        x_init=x_init,
        strength=jnp.asarray(strength, jnp.float32),
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
        "denoised_fn",
        "guidance_interval",
        "unguided_model_fn",
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
    denoised_fn,
    guidance_interval,
    unguided_model_fn,
    x_init,
    strength,
):
    plan = dpm_solver_plan(
        diffusion,
        steps=steps,
        order=order,
        skip_type=skip_type,
        lower_order_final=lower_order_final,
    )
    xs = {
        name: jnp.asarray(np.asarray(plan[name], np.float32))
        for name in ("model_times", "alpha", "sigma", "coef_x", "coef_model")
    }
    xs["k"] = jnp.arange(steps, dtype=jnp.int32)
    xs["guided"] = guided_mask(plan, guidance_interval)
    data_prediction = data_prediction_fn(
        model_fn,
        batch=x_T.shape[0],
        channels=x_T.shape[-1],
        classifier_fn=classifier_fn,
        y=y,
        classifier_scale=classifier_scale,
        thresholding=thresholding,
        denoised_fn=denoised_fn,
        unguided_model_fn=unguided_model_fn,
    )
    x_start, start = start_point(plan, x_T, x_init, strength, steps)

    def body(carry, s):
        x, history = carry
        m = data_prediction(x, s["model_times"], s["alpha"], s["sigma"], s["guided"])
        models = (m, *history)
        x = s["coef_x"] * x + sum(s["coef_model"][i] * models[i] for i in range(len(models)))
        return (x, models[: order - 1]), None

    if start is not None:
        tab_x, tab_model = (
            jnp.asarray(a.astype(np.float32)) for a in start_tables(plan, order, lower_order_final)
        )

        def started_body(carry, s):
            active = s["k"] >= start

            def update(x, history):
                m = data_prediction(x, s["model_times"], s["alpha"], s["sigma"], s["guided"])
                m = jnp.where(bcast(active, x), m, 0.0)
                models = (m, *history)
                coef_model = tab_model[start, s["k"]]
                x_new = bcast(tab_x[start, s["k"]], x) * x + sum(
                    bcast(coef_model[:, i], x) * models[i] for i in range(len(models))
                )
                return jnp.where(bcast(active, x), x_new, x), models[: order - 1]

            return jax.lax.cond(jnp.any(active), update, lambda *c: c, *carry), None

        body = started_body

    history = tuple(jnp.zeros_like(x_T) for _ in range(order - 1))
    (x_0, _), _ = jax.lax.scan(body, (x_start, history), xs)
    return x_0
