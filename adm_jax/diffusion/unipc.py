"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling
of Diffusion Models"): multistep, data prediction, predictor UniP + corrector UniC with the
B(h) variants bh1 / bh2, on the discrete-time VP schedule of a `Diffusion`, as the reference
uni_pc.py (wl-zhao/UniPC) runs it with `NoiseScheduleVP('discrete', betas)`,
`algorithm_type="data_prediction"`, `method="multistep"`, `denoise_to_zero=False`.

Unlike DPM-Solver's NoiseScheduleVP, UniPC's keeps every step of the schedule (no clipping of
the low log-SNR end), so N = T and the model times are (t - 1/T) * 1000.

Every update is linear in x and the data predictions m, with coefficients that depend only on
the schedule: they are computed once in float64 numpy (`unipc_plan`) and the solver's single
`lax.scan` over the `steps` model evaluations does float32 arithmetic. Evaluation k (at t_k,
on the PREDICTED x_k) first runs the corrector of update k (t_{k-1} -> t_k, reusing m_k), then
the predictor of update k + 1; the last update is predictor only, so NFE = steps.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from adm_jax.diffusion.guidance import check_interval, check_switches
from adm_jax.diffusion.schedules import Diffusion
from adm_jax.diffusion.solver_common import (
    base_betas,
    check_inputs,
    data_prediction_fn,
    guided_mask,
    model_input_times,
    schedule_at,
    start_point,
    time_steps,
    validate_solver_args,
    vp_log_alpha_table,
)
from adm_jax.diffusion.start import bcast

VARIANTS = ("bh1", "bh2")


def unipc_orders(steps: int, order: int, lower_order_final: bool) -> list[int]:
    """Order of each update j = 1..steps: a warm-up 1, .., order - 1 (the history is short),
    then `order`, or with lower_order_final min(order, steps + 1 - j) (for any number of steps,
    unlike DPM-Solver's `update_orders`)."""
    orders = []
    for j in range(1, steps + 1):
        if j < order:
            orders.append(j)
        elif lower_order_final:
            orders.append(min(order, steps + 1 - j))
        else:
            orders.append(order)
    return orders


def b_of_h(hh: float, variant: str) -> float:
    """UniPC's B(h) (paper sec. 3.3, its two choices), for data prediction at hh = -h:
    hh ("bh1") or e^hh - 1 ("bh2")."""
    if variant == "bh1":
        return hh
    if variant == "bh2":
        return math.expm1(hh)
    raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")


def unipc_coefficients(lambdas, alphas, sigmas, j: int, step_order: int, variant: str):
    """Update j (t_{j-1} -> t_j) of order K as linear combinations, float64.

    Returns (c_x, pred, corr): the predictor x_j = c_x x + sum_i pred[i] m_{j-1-i}
    (i = 0..K-1) and the corrector x_j^c = c_x x + sum_i corr[i] m_{j-i} (i = 0..K; corr[0]
    weighs m_j, the model's x_0 at the predicted x_j), x being the (corrected) x at t_{j-1}.

    With h = lambda_j - lambda_{j-1}, hh = -h, r_k = (lambda_{j-1-k} - lambda_{j-1}) / h and
    D_k = (m_{j-1-k} - m_{j-1}) / r_k (UniPC Alg. 2 / the reference's
    multistep_uni_pc_bh_update): x~ = (sigma_j / sigma_{j-1}) x - alpha_j (e^hh - 1) m_{j-1};
    predictor x_j = x~ - alpha_j B(h) sum_k rhos_p[k] D_k; corrector
    x_j^c = x~ - alpha_j B(h) (sum_k rhos_c[k] D_k + rhos_c[-1] (m_j - m_{j-1})). rhos solve
    R rho = b with R[i][k] = r_k^i (r = 1 appended for the corrector) and
    b_i = i! hh phi_{i+1}(hh) / B(h); order 2's predictor and order 1's corrector use 0.5.
    """
    lam_t, lam_0 = lambdas[j], lambdas[j - 1]
    h = lam_t - lam_0
    hh = -h
    a_t = alphas[j]
    c_x = sigmas[j] / sigmas[j - 1]
    b_h = b_of_h(hh, variant)
    h_phi_1 = np.expm1(hh)
    rks = [(lambdas[j - 1 - k] - lam_0) / h for k in range(1, step_order)] + [1.0]
    # b_i = i! * hh * phi_{i+1}(hh) / B(h), phi_1(z) = expm1(z)/z, phi_{k+1} = (phi_k - 1/k!)/z,
    # by the reference's recurrence on h_phi_k = hh * phi_{k+1}(hh).
    b = []
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1
    for i in range(1, step_order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    b = np.asarray(b, np.float64)
    big_r = np.stack([np.power(np.asarray(rks, np.float64), i) for i in range(step_order)])

    if step_order == 1:
        rhos_p = np.zeros(0)
    elif step_order == 2:
        rhos_p = np.array([0.5])
    else:
        rhos_p = np.linalg.solve(big_r[:-1, :-1], b[:-1])
    rhos_c = np.array([0.5]) if step_order == 1 else np.linalg.solve(big_r, b)

    pred = np.zeros(step_order)
    pred[0] = -a_t * h_phi_1
    for k, rho in enumerate(rhos_p, start=1):
        w = -a_t * b_h * rho / rks[k - 1]
        pred[k] += w
        pred[0] -= w
    corr = np.zeros(step_order + 1)
    corr[1] = -a_t * h_phi_1
    for k, rho in enumerate(rhos_c[:-1], start=1):
        w = -a_t * b_h * rho / rks[k - 1]
        corr[1 + k] += w
        corr[1] -= w
    w = -a_t * b_h * rhos_c[-1]
    corr[0] += w
    corr[1] -= w
    return c_x, pred, corr


def _validate(steps, order, variant, skip_type):
    validate_solver_args(steps, order, skip_type)
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")


def _coefficient_arrays(lambdas, alphas, sigmas, orders, order, variant):
    """(pred_x, pred_model, corr_x, corr_model) of the n = len(orders) updates on the grid;
    the first evaluation's corrector is the identity."""
    steps = len(orders)
    pred_x, corr_x = np.zeros(steps), np.zeros(steps)
    pred_model, corr_model = np.zeros((steps, order)), np.zeros((steps, order + 1))
    corr_x[0] = 1.0
    for k, step_order in enumerate(orders):
        c_x, pred, corr = unipc_coefficients(lambdas, alphas, sigmas, k + 1, step_order, variant)
        pred_x[k], pred_model[k, :step_order] = c_x, pred
        if k + 1 < steps:  # the last update has no corrector
            corr_x[k + 1], corr_model[k + 1, : step_order + 1] = c_x, corr
    return pred_x, pred_model, corr_x, corr_model


def start_tables(plan, order: int, variant: str, lower_order_final: bool):
    """For SDEdit starts: pred_x, pred_model, corr_x, corr_model with a leading axis j0
    (steps, steps, ...): row j0 the coefficients of the run that starts at grid point j0 (the
    grid's last steps - j0 updates with their own warm-up orders; its first evaluation's
    corrector the identity), zeros before j0."""
    steps = len(plan["alpha"])
    lambdas, alphas, sigmas = plan["lambda"], plan["grid_alpha"], plan["grid_sigma"]
    tables = (
        np.zeros((steps, steps)),
        np.zeros((steps, steps, order)),
        np.zeros((steps, steps)),
        np.zeros((steps, steps, order + 1)),
    )
    for j0 in range(steps):
        orders = unipc_orders(steps - j0, order, lower_order_final)
        arrays = _coefficient_arrays(lambdas[j0:], alphas[j0:], sigmas[j0:], orders, order, variant)
        for table, array in zip(tables, arrays, strict=True):
            table[j0, j0:] = array
    return tables


def unipc_plan(
    diffusion: Diffusion,
    *,
    steps: int = 10,
    order: int = 2,
    variant: str = "bh2",
    skip_type: str = "time_uniform",
    lower_order_final: bool = True,
) -> dict[str, np.ndarray]:
    """Everything the solver needs that does not depend on x, float64 numpy.

    Model evaluation k (k = 0..steps-1) happens at t_continuous[k] (model time model_times[k],
    alpha[k], sigma[k]) on the predicted x_k; it is followed by the corrector of update k,
    x_k^c = corr_x[k] x_{k-1}^c + corr_model[k] . (m_k, m_{k-1}, .., m_{k-order}) (for k = 0
    the identity: x_0^c = x_T), then the predictor of update k + 1,
    x_{k+1} = pred_x[k] x_k^c + pred_model[k] . (m_k, .., m_{k-order+1}). orders[k] is the order
    of update k + 1. Keys: t_continuous, lambda, grid_alpha, grid_sigma (steps + 1,);
    model_times, alpha, sigma, orders, pred_x, corr_x (steps,); pred_model (steps, order);
    corr_model (steps, order + 1); total_n (the schedule length, never clipped).
    """
    _validate(steps, order, variant, skip_type)
    table = vp_log_alpha_table(base_betas(diffusion, "UniPC"), clip_low_lambda=False)
    total_n = table[0].shape[0]
    ts = time_steps(table, steps, skip_type)
    alphas, sigmas, lambdas = schedule_at(table, ts)
    orders = unipc_orders(steps, order, lower_order_final)
    pred_x, pred_model, corr_x, corr_model = _coefficient_arrays(
        lambdas, alphas, sigmas, orders, order, variant
    )
    return {
        "t_continuous": ts,
        "lambda": lambdas,
        "model_times": model_input_times(ts[:-1], total_n),
        "alpha": alphas[:-1],
        "sigma": sigmas[:-1],
        "grid_alpha": alphas,
        "grid_sigma": sigmas,
        "orders": np.asarray(orders, np.int32),
        "pred_x": pred_x,
        "pred_model": pred_model,
        "corr_x": corr_x,
        "corr_model": corr_model,
        "total_n": total_n,
    }


def unipc_sample(
    diffusion: Diffusion,
    model_fn,
    x_T,
    *,
    steps: int = 10,
    order: int = 2,
    variant: str = "bh2",
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
    """x_0 from x_T (NHWC) by multistep UniPC (predictor + corrector) in `steps` model
    evaluations.

    order 1, 2 or 3 (the update order after the warm-up); variant "bh1" (B(h) = -h) or "bh2"
    (B(h) = e^-h - 1); skip_type "time_uniform" | "logSNR" | "time_quadratic". model_fn(x, t)
    -> eps (or eps and learned variance, 2C channels) and classifier_fn(x, t) -> logits receive
    the float model times t = (t_continuous - 1/T) * 1000, shape (B,), of the unrespaced
    schedule of `diffusion`. With classifier_fn, eps' = eps - sigma_t * classifier_scale *
    grad_x log p(y | x_t, t) per example. denoised_fn, thresholding, guidance_interval,
    unguided_model_fn, x_init and strength as `dpm_solver_sample`'s. diffusion, model_fn,
    classifier_fn and the solver options are static; x_T, x_init, strength, y and
    classifier_scale are traced.
    """
    _validate(steps, order, variant, skip_type)
    base_betas(diffusion, "UniPC")
    x_T = check_inputs(x_T, classifier_fn, y)
    check_switches(guidance_interval, classifier_fn, unguided_model_fn)
    return _unipc_sample(
        diffusion,
        model_fn,
        x_T,
        steps=steps,
        order=order,
        variant=variant,
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
        "variant",
        "skip_type",
        "thresholding",
        "classifier_fn",
        "lower_order_final",
        "denoised_fn",
        "guidance_interval",
        "unguided_model_fn",
    ),
)
def _unipc_sample(
    diffusion,
    model_fn,
    x_T,
    *,
    steps,
    order,
    variant,
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
    plan = unipc_plan(
        diffusion,
        steps=steps,
        order=order,
        variant=variant,
        skip_type=skip_type,
        lower_order_final=lower_order_final,
    )
    xs = {
        name: jnp.asarray(np.asarray(plan[name], np.float32))
        for name in (
            "model_times",
            "alpha",
            "sigma",
            "pred_x",
            "pred_model",
            "corr_x",
            "corr_model",
        )
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
        x, x_prev, history = carry  # predicted x_k, corrected x_{k-1}, (m_{k-1}, .., m_{k-order})
        m = data_prediction(x, s["model_times"], s["alpha"], s["sigma"], s["guided"])
        models = (m, *history)
        x_corrected = s["corr_x"] * x_prev + sum(
            s["corr_model"][i] * models[i] for i in range(order + 1)
        )
        x_next = s["pred_x"] * x_corrected + sum(
            s["pred_model"][i] * models[i] for i in range(order)
        )
        return (x_next, x_corrected, models[:order]), None

    if start is not None:
        tables = tuple(
            jnp.asarray(a.astype(np.float32))
            for a in start_tables(plan, order, variant, lower_order_final)
        )

        def started_body(carry, s):
            active = s["k"] >= start

            def update(x, x_prev, history):
                on = bcast(active, x)
                pred_x, pred_model, corr_x, corr_model = (t[start, s["k"]] for t in tables)
                m = data_prediction(x, s["model_times"], s["alpha"], s["sigma"], s["guided"])
                models = (jnp.where(on, m, 0.0), *history)
                x_corrected = bcast(corr_x, x) * x_prev + sum(
                    bcast(corr_model[:, i], x) * models[i] for i in range(order + 1)
                )
                x_next = bcast(pred_x, x) * x_corrected + sum(
                    bcast(pred_model[:, i], x) * models[i] for i in range(order)
                )
                return (
                    jnp.where(on, x_next, x),
                    jnp.where(on, x_corrected, x_prev),
                    models[:order],
                )

            return jax.lax.cond(jnp.any(active), update, lambda *c: c, *carry), None

        body = started_body

    history = tuple(jnp.zeros_like(x_T) for _ in range(order))
    (x_0, _, _), _ = jax.lax.scan(body, (x_start, x_start, history), xs)
    return x_0
