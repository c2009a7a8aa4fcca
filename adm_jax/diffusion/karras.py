"""The k-diffusion / EDM samplers (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models") on ADM's discrete schedule, as crowsonkb/k-diffusion's
`sample_heun`, `sample_euler_ancestral`, `sample_dpmpp_2m` and `sample_dpmpp_2m_sde`
(midpoint) drive an ADM eps network through its `OpenAIDenoiser(quantize=False)`.

The network is seen as a denoiser in the variance-exploding variables x = x_vp / c_in:
D(x, sigma) = x - sigma * eps(x * c_in, t(sigma)), c_in = 1 / sqrt(1 + sigma^2),
sigma_k = sqrt((1 - abar_k) / abar_k) and t(sigma) the fractional timestep found by linear
interpolation of log sigma in that table.

Everything that depends only on the schedule and the sampler's options (the sigma grid, the
sigma and model time of every denoiser call, c_in, whether guidance is on, every update's
coefficients) is computed once in float64 numpy (`karras_plan`) and enters one `lax.scan` over
the denoiser calls as float32 per-call arrays: the traced arithmetic is float32, the network is
traced once (Heun's two calls per step are two scan iterations), and x64 is never needed.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from adm_jax.diffusion import guidance
from adm_jax.diffusion import start as start_lib
from adm_jax.diffusion.samplers import classifier_guidance_grad
from adm_jax.diffusion.schedules import Diffusion
from adm_jax.diffusion.solver_common import model_eps
from adm_jax.diffusion.start import bcast

SAMPLERS = ("heun", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde")
SIGMA_GRIDS = ("discrete", "karras")
# EDM Algorithm 2: gamma_i is capped at sqrt(2) - 1 (at most doubles the noise variance).
MAX_GAMMA = math.sqrt(2.0) - 1.0


def sigma_table(diffusion: Diffusion) -> np.ndarray:
    """sigma_k = sqrt((1 - abar_k) / abar_k), k = 0..T-1, float64 (increasing): the noise level
    of x_t / sqrt(abar_t) (the VE view of the VP process)."""
    n = diffusion.num_timesteps
    if not np.array_equal(diffusion.timestep_map, np.arange(n)):
        raise ValueError(
            f"diffusion: the Karras samplers need the unrespaced schedule, got one respaced to "
            f"{n} steps (create it with timestep_respacing='')"
        )
    abar = np.asarray(diffusion.alphas_cumprod, np.float64)
    return np.sqrt((1.0 - abar) / abar)


def sigma_to_t(log_sigmas: np.ndarray, sigma) -> np.ndarray:
    """Fractional timestep of sigma (k-diffusion's DiscreteSchedule.sigma_to_t, quantize=False):
    linear interpolation of log sigma between the two table entries around it, clamped to
    [0, T-1] (sigma above sigma_max gives T-1, below sigma_min gives 0)."""
    log_sigma = np.log(np.asarray(sigma, np.float64))
    low = np.searchsorted(log_sigmas, log_sigma, side="right") - 1
    low = np.clip(low, 0, log_sigmas.shape[0] - 2)
    high = low + 1
    lo, hi = log_sigmas[low], log_sigmas[high]
    w = np.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0)
    return (1.0 - w) * low + w * high


def karras_sigmas(diffusion: Diffusion, steps: int, kind: str = "karras", rho: float = 7.0):
    """The steps + 1 sigmas a sampler visits, the last one 0, float64.

    "discrete": the model's own sigmas at t_j = linspace(T-1, 0, steps) (k-diffusion's
    get_sigmas: the times in float32, log sigma interpolated with float32 weights);
    "karras": EDM eq. 5, (sigma_max^(1/rho) + j/(steps-1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho between the table's ends (get_sigmas_karras).
    """
    _check_grid(steps, kind, rho)
    sigmas = sigma_table(diffusion)
    if kind == "discrete":
        log_sigmas = np.log(sigmas)
        t = np.linspace(sigmas.shape[0] - 1, 0, steps, dtype=np.float64).astype(np.float32)
        low, high = np.floor(t).astype(np.int64), np.ceil(t).astype(np.int64)
        w = t - np.floor(t)  # float32, as the reference's t.frac()
        w64, one_minus_w64 = w.astype(np.float64), (np.float32(1.0) - w).astype(np.float64)
        grid = np.exp(one_minus_w64 * log_sigmas[low] + w64 * log_sigmas[high])
    else:
        ramp = np.linspace(0.0, 1.0, steps, dtype=np.float64)
        min_inv_rho, max_inv_rho = sigmas[0] ** (1.0 / rho), sigmas[-1] ** (1.0 / rho)
        grid = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return np.append(grid, 0.0)


def _check_grid(steps, kind, rho):
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    if kind not in SIGMA_GRIDS:
        raise ValueError(f"sigma_grid: expected one of {SIGMA_GRIDS}, got {kind!r}")
    if not rho > 0:
        raise ValueError(f"rho: expected a number > 0, got {rho!r}")


_check_interval = guidance.check_interval


def _heun_calls(sigmas, steps, s_churn, s_tmin, s_tmax, s_noise):
    """Per denoiser call of EDM Algorithm 2 (sample_heun): (sigma, step, second, churn, dt).

    Step i first adds churn noise (x += noise[i] * s_noise * sqrt(sigma_hat^2 - sigma_i^2),
    sigma_hat = sigma_i (1 + gamma_i)), calls D at sigma_hat and takes the Euler step
    x_2 = x + d dt, dt = sigma_{i+1} - sigma_hat; unless sigma_{i+1} = 0 a second call at
    sigma_{i+1} replaces it by the Heun step x + (d + d_2) / 2 dt.
    """
    calls = []
    for i in range(steps):
        sigma = sigmas[i]
        gamma = min(s_churn / steps, MAX_GAMMA) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1.0)
        churn = s_noise * math.sqrt(sigma_hat**2 - sigma**2) if gamma > 0 else 0.0
        dt = sigmas[i + 1] - sigma_hat
        calls.append(dict(sigma=sigma_hat, step=i, second=False, churn=churn, dt=dt))
        if sigmas[i + 1] != 0:
            calls.append(dict(sigma=sigmas[i + 1], step=i, second=True, churn=0.0, dt=dt))
    return calls


def _linear_calls(sampler, sigmas, steps, eta, s_noise):
    """Per denoiser call (one per step) of the one-call samplers, each update written as
    x <- a x + b D + c D_prev + e eps + n noise[i] (D this call's denoised, D_prev the previous
    one, eps = (x - D) / sigma the guided noise prediction)."""
    calls = []
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        a = b = c = e = n = 0.0
        if sampler == "euler_ancestral":
            # get_ancestral_step: sigma_up, sigma_down; x + (x - D) / sigma * (sigma_down - sigma)
            sigma_up = 0.0
            if eta:
                sigma_up = min(
                    sigma_next,
                    eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2),
                )
            sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
            a, e = 1.0, sigma_down - sigma  # (x - D) / sigma is eps
            n = sigma_up * s_noise if sigma_next > 0 else 0.0
        elif sigma_next == 0:
            b = 1.0  # both DPM-Solver++ variants return D on the step to sigma = 0
        elif sampler == "dpmpp_2m":
            # t = -log sigma, h = t_next - t; second order from the previous D (r = h_last / h)
            h = math.log(sigma / sigma_next)
            a, phi = sigma_next / sigma, -math.expm1(-h)
            if i == 0:
                b = phi
            else:
                r = math.log(sigmas[i - 1] / sigma) / h
                b, c = phi * (1.0 + 1.0 / (2.0 * r)), -phi / (2.0 * r)
        else:  # dpmpp_2m_sde, midpoint
            h = math.log(sigma / sigma_next)
            a, phi = sigma_next / sigma * math.exp(-eta * h), -math.expm1(-h - eta * h)
            b = phi
            if i > 0:
                # + 0.5 phi / r (D - D_prev), r = h_last / h
                r = math.log(sigmas[i - 1] / sigma) / h
                b, c = phi + 0.5 * phi / r, -0.5 * phi / r
            if eta:
                n = sigma_next * math.sqrt(-math.expm1(-2.0 * eta * h)) * s_noise
        # b if this step were the first (an SDEdit start: no previous D).
        b_first = b if c == 0 else phi
        calls.append(dict(sigma=sigma, step=i, a=a, b=b, c=c, e=e, n=n, b_first=b_first))
    return calls


def karras_plan(
    diffusion: Diffusion,
    *,
    sampler: str = "heun",
    steps: int = 20,
    sigma_grid: str = "karras",
    rho: float = 7.0,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    eta: float = 1.0,
    guidance_interval=None,
) -> dict[str, np.ndarray]:
    """Everything `karras_sample` needs that does not depend on x, float64 numpy.

    Keys: sigmas (steps + 1, the grid, last 0); per denoiser call (in call order, NFE of
    them): denoiser_sigmas, model_times (the fractional t(sigma) the network receives), c_in,
    guided (bool: guidance on, lo < sigma <= hi or no interval), step (the step whose noise[step]
    the call's update uses) and the update's coefficients: for "heun" second (bool: Heun's
    correction call), churn (the scale of noise[step] added before a first call) and dt; for
    the other samplers a, b, c, e, n with x <- a x + b D + c D_prev + e eps + n noise[step]
    (eps = (x - D) / sigma), and b_first, b when the step is the run's first (an SDEdit start,
    no D_prev). uses_noise: whether any noise enters.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
    interval = _check_interval(guidance_interval)
    sigmas = karras_sigmas(diffusion, steps, sigma_grid, rho)
    if sampler == "heun":
        calls = _heun_calls(
            sigmas, steps, float(s_churn), float(s_tmin), float(s_tmax), float(s_noise)
        )
        fields = ("second", "churn", "dt")
    else:
        calls = _linear_calls(sampler, sigmas, steps, float(eta), float(s_noise))
        fields = ("a", "b", "c", "e", "n", "b_first")
    denoiser_sigmas = np.array([call["sigma"] for call in calls], np.float64)
    guided = guidance.interval_mask(denoiser_sigmas, interval)
    plan = {
        "sigmas": sigmas,
        "denoiser_sigmas": denoiser_sigmas,
        "model_times": sigma_to_t(np.log(sigma_table(diffusion)), denoiser_sigmas),
        "c_in": 1.0 / np.sqrt(1.0 + denoiser_sigmas**2),
        "guided": guided,
        "step": np.array([call["step"] for call in calls], np.int32),
    }
    for name in fields:
        plan[name] = np.array([call[name] for call in calls], bool if name == "second" else None)
    noise_scales = plan["churn"] if sampler == "heun" else plan["n"]
    plan["uses_noise"] = bool(np.any(noise_scales != 0))
    return plan


def karras_noise(key, steps: int, shape, dtype=jnp.float32):
    """The (steps, *shape) noise `karras_sample` draws from key: noise[i] = normal(fold_in(key,
    i)), step i's draw."""
    return jnp.stack(
        [jax.random.normal(jax.random.fold_in(key, i), tuple(shape), dtype) for i in range(steps)]
    )


def _check_noise(plan: dict, sampler: str, steps: int, x_T, noise, key):
    """(noise, key) as the scan receives them: noise of shape (steps, *x_T.shape) or a key
    when the plan draws noise (None, None when it draws none)."""
    if noise is not None and key is not None:
        raise ValueError("noise, key: pass at most one of them")
    if noise is not None:
        noise = jnp.asarray(noise, jnp.float32)
        expected = (steps, *x_T.shape)
        if noise.shape != expected:
            raise ValueError(
                f"noise: expected shape (steps, *x_T.shape) = {expected}, got {noise.shape}"
            )
    elif key is None and plan["uses_noise"]:
        raise ValueError(
            f"noise, key: sampler {sampler!r} with these options draws noise; pass noise of "
            f"shape {(steps, *x_T.shape)} or a PRNG key"
        )
    if not plan["uses_noise"]:
        noise = key = None
    return noise, key


def _scan_inputs(plan: dict, sampler: str) -> dict:
    """The plan's per-step arrays that the scan runs over (traced: no recompilation for new
    values)."""
    float_names = ("denoiser_sigmas", "model_times", "c_in")
    float_names += ("churn", "dt") if sampler == "heun" else ("a", "b", "c", "e", "n", "b_first")
    xs = {name: jnp.asarray(np.asarray(plan[name], np.float32)) for name in float_names}
    # eps' = eps - classifier_scale * sigma c_in g, i.e. D' = D + classifier_scale sigma^2 c_in g
    xs["guide_coef"] = jnp.asarray(np.asarray(plan["denoiser_sigmas"] * plan["c_in"], np.float32))
    xs["guided"] = jnp.asarray(plan["guided"])
    xs["step"] = jnp.asarray(plan["step"])
    if sampler == "heun":
        xs["second"] = jnp.asarray(plan["second"])
    return xs


def _sdedit_start(diffusion: Diffusion, plan: dict, x_T, x_init, strength) -> dict:
    """SDEdit's start: x_init, the traced strength, and the tables that turn it into the first
    sigma kept on the grid."""
    x_init = jnp.asarray(x_init, jnp.float32)
    if x_init.shape != x_T.shape:
        raise ValueError(f"x_init: expected shape {x_T.shape}, got {x_init.shape}")
    return dict(
        x_init=x_init,
        strength=jnp.asarray(strength, jnp.float32),
        log_sigma_table=jnp.asarray(np.log(sigma_table(diffusion)).astype(np.float32)),
        grid=jnp.asarray(plan["sigmas"].astype(np.float32)),
    )


def karras_sample(
    diffusion: Diffusion,
    model_fn,
    x_T,
    *,
    sampler: str = "heun",
    steps: int = 20,
    sigma_grid: str = "karras",
    rho: float = 7.0,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    eta: float = 1.0,
    noise=None,
    key=None,
    classifier_fn=None,
    y=None,
    classifier_scale=0.0,
    guidance_interval=None,
    unguided_model_fn=None,
    denoised_fn=None,
    x_init=None,
    strength=1.0,
):
    """x_0 from standard-normal x_T (NHWC) by a k-diffusion sampler on the unrespaced schedule
    of `diffusion` (see `karras_plan` for the options; x starts at x_T * sigmas[0]).

    model_fn(x, t) -> eps (or eps and a learned variance, 2C channels) and classifier_fn(x, t)
    -> logits receive x * c_in and the fractional float model times t(sigma), shape (B,).
    noise: (steps, *x_T.shape) standard-normal draws, noise[i] step i's only draw; or key
    (drawing `karras_noise(key, steps, x_T.shape)`, one slice per step inside the scan);
    neither is needed by samplers that draw nothing (dpmpp_2m, heun without churn, eta 0).
    Classifier guidance: D' = D + classifier_scale * sigma^2 * c_in * grad_{x_vp} log p(y |
    x_vp, t), x_vp = x * c_in (eps' = eps - classifier_scale * sqrt(1 - abar) * grad, as
    `dpm_solver_sample`), taken with jax.grad inside the scan.

    guidance_interval = (sigma_lo, sigma_hi) (Kynkaanniemi et al. 2024) applies guidance only
    to denoiser calls with sigma_lo < sigma <= sigma_hi: the classifier term, and, when
    `unguided_model_fn` is given, the choice of network: model_fn (e.g. a
    `classifier_free_model_fn` wrapper) inside the interval, unguided_model_fn (e.g. the
    conditional or unconditional model alone, one pass instead of two) outside. Calls outside
    the interval skip the classifier and the guided network entirely (lax.cond).

    denoised_fn (D -> D, e.g. `dynamic_threshold`) is applied to the (guided) denoised D of
    every call; eps is then (x - D') / sigma. x_init, strength: SDEdit, keep the grid's sigmas
    <= sigma(strength), sigma(s) the schedule's sigma at the fractional timestep s * (T - 1),
    and start at x_init + sigma_start * x_T (strength traced, scalar or (B,); 1 = the ordinary
    run from x_T * sigmas[0]); the first step kept runs as a first step (no D_prev).

    model_fn, unguided_model_fn, classifier_fn, denoised_fn and sampler are static; x_T,
    x_init, strength, noise, key, y and classifier_scale are traced, and so are the plan's
    arrays: other steps recompile (new shapes), and so does switching between options that
    draw noise and options that do not; other s_churn, eta, rho, sigma grids or intervals do
    not.
    """
    plan = karras_plan(
        diffusion,
        sampler=sampler,
        steps=steps,
        sigma_grid=sigma_grid,
        rho=rho,
        s_churn=s_churn,
        s_tmin=s_tmin,
        s_tmax=s_tmax,
        s_noise=s_noise,
        eta=eta,
        guidance_interval=guidance_interval,
    )
    if classifier_fn is not None and y is None:
        raise ValueError("y: classifier guidance needs the target labels")
    guidance.check_switches(guidance_interval, classifier_fn, unguided_model_fn)
    x_T = jnp.asarray(x_T, jnp.float32)
    if x_T.ndim < 2:
        raise ValueError(f"x_T: expected a batch of NHWC images, got shape {x_T.shape}")
    noise, key = _check_noise(plan, sampler, steps, x_T, noise, key)
    xs = _scan_inputs(plan, sampler)
    start = None if x_init is None else _sdedit_start(diffusion, plan, x_T, x_init, strength)
    return _karras_sample(
        model_fn,
        x_T,
        jnp.float32(plan["sigmas"][0]),
        xs,
        start=start,
        denoised_fn=denoised_fn,
        noise=noise,
        key=key,
        heun=sampler == "heun",
        classifier_fn=classifier_fn,
        y=None if y is None else jnp.asarray(y, jnp.int32),
        classifier_scale=jnp.asarray(classifier_scale, jnp.float32),
        interval=guidance_interval is not None,
        unguided_model_fn=unguided_model_fn,
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "model_fn",
        "heun",
        "classifier_fn",
        "interval",
        "unguided_model_fn",
        "denoised_fn",
    ),
)
def _karras_sample(
    model_fn,
    x_T,
    sigma_start,
    xs,
    *,
    start,
    denoised_fn,
    noise,
    key,
    heun,
    classifier_fn,
    y,
    classifier_scale,
    interval,
    unguided_model_fn,
):
    batch, channels = x_T.shape[0], x_T.shape[-1]
    if start is None:
        x, first_step = x_T * sigma_start, None
    else:
        x, first_step = _start_point(x_T, sigma_start, **start)

    def guidedmodel_eps(x, s):
        """eps of the denoiser D(x, sigma) = x - sigma eps(x c_in, t(sigma)), guided where on:
        eps - classifier_scale sigma c_in grad log p(y | x c_in, t) (D' = D + classifier_scale
        sigma^2 c_in grad). The samplers' updates use it directly where they can ((x - D) /
        sigma), which avoids forming x - sigma eps in float32 at sigma ~ 1e4 (except with a
        denoised_fn, which needs D)."""
        x_vp = x * s["c_in"]
        t = jnp.full((batch,), s["model_times"], jnp.float32)
        guided = s["guided"] if interval else None
        net = guidance.interval_model_fn(model_fn, unguided_model_fn, guided)
        eps = model_eps(net(x_vp, t), channels)
        if classifier_fn is not None:
            grad = guidance.switch(
                guided,
                lambda: classifier_guidance_grad(classifier_fn, x_vp, t, y, classifier_scale),
                lambda: jnp.zeros_like(x_vp),
            )
            eps = eps - s["guide_coef"] * grad
        if denoised_fn is not None:
            sigma = s["denoiser_sigmas"]
            eps = (x - denoised_fn(x - sigma * eps)) / sigma
        return eps

    def draw(s):
        if noise is not None:
            return jax.lax.dynamic_index_in_dim(noise, s["step"], keepdims=False)
        if key is not None:
            return jax.random.normal(jax.random.fold_in(key, s["step"]), x.shape, jnp.float32)
        return jnp.zeros_like(x)

    def heun_body(carry, s):
        x, x_hat, d = carry
        x_in = jnp.where(s["second"], x, x + s["churn"] * draw(s))
        d_k = guidedmodel_eps(x_in, s)  # (x - D) / sigma
        x_new = jnp.where(s["second"], x_hat + 0.5 * (d + d_k) * s["dt"], x_in + d_k * s["dt"])
        return (x_new, jnp.where(s["second"], x_hat, x_in), jnp.where(s["second"], d, d_k)), None

    def linear_body(carry, s):
        x, denoised_prev = carry
        eps = guidedmodel_eps(x, s)
        denoised = x - s["denoiser_sigmas"] * eps
        b, c = s["b"], s["c"]
        if first_step is not None:
            first = bcast(first_step == s["step"], x)
            b, c = jnp.where(first, s["b_first"], b), jnp.where(first, 0.0, c)
        x = s["a"] * x + b * denoised + c * denoised_prev + s["e"] * eps
        if noise is not None or key is not None:
            x = x + s["n"] * draw(s)
        return (x, denoised), None

    body = heun_body if heun else linear_body
    if first_step is not None:
        inner = body

        def body(carry, s):
            active = bcast(s["step"] >= first_step, x_T)

            def update(*carry):
                new, _ = inner(carry, s)
                return tuple(jnp.where(active, a, b) for a, b in zip(new, carry, strict=True))

            return jax.lax.cond(jnp.any(active), update, lambda *c: c, *carry), None

    if heun:
        (x_0, _, _), _ = jax.lax.scan(body, (x, x, jnp.zeros_like(x)), xs)
    else:
        (x_0, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x)), xs)
    return x_0


def _start_point(x_T, sigma_start, *, x_init, strength, log_sigma_table, grid):
    """SDEdit on a sigma grid: per example the first step i0 = #{grid sigmas > sigma(s)} and
    x = x_init + grid[i0] x_T (x_T sigma_start for s >= 1, the ordinary start)."""
    batch, steps = x_T.shape[0], grid.shape[0] - 1
    strength = start_lib.per_example(strength, batch)
    table_t = jnp.arange(log_sigma_table.shape[0], dtype=jnp.float32)
    sigma_s = jnp.exp(jnp.interp(strength * (table_t[-1]), table_t, log_sigma_table))
    above = grid[None, :steps] > sigma_s[:, None] * (1.0 + 1e-5)
    first_step = jnp.where(strength >= 1.0, 0, jnp.sum(above, axis=1)).astype(jnp.int32)
    noised = x_init + bcast(grid[first_step], x_T) * x_T
    x = jnp.where(bcast(first_step == 0, x_T), x_T * sigma_start, noised)
    return x, first_step
