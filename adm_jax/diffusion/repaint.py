"""RePaint (Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion Probabilistic
Models"): inpainting with an unconditional (or classifier-guided) ADM model by ancestral
sampling in which, before every reverse step, the known pixels are replaced by the known image
noised to the current step, and with "resampling" jumps back up the chain (x_t from x_{t-1}
by the forward process) so the generated region harmonises with the known one.

As the reference RePaint code (andreas128/RePaint, guided_diffusion/) runs it with
inpa_inj_sched_prev=True, inpa_inj_sched_prev_cumnoise=False, inpa_inj_time_shift=1: the
jump schedule (`get_schedule_jump`) is a static list of respaced indices; its transitions are
one `lax.scan` (a `lax.cond` picks the reverse or the forward step), the model traced once.
The reverse step is `samplers.p_sample` (network at the ORIGINAL timestep, classifier
guidance on the mean as `sample_loop`'s ancestral steps).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from adm_jax.diffusion import gaussian
from adm_jax.diffusion.samplers import classifier_guidance_grad, p_sample
from adm_jax.diffusion.schedules import Diffusion

# Kinds of standard-normal draws, in the numbering of repaint_draw_order.
DRAW_X_T, DRAW_REVERSE, DRAW_KNOWN, DRAW_UNDO = 0, 1, 2, 3
DEFAULT_JUMPS = dict(n_sample=1, jump_length=10, jump_n_sample=10)


def get_schedule_jump(
    t_T: int,
    n_sample: int,
    jump_length: int,
    jump_n_sample: int,
    jump2_length: int = 1,
    jump2_n_sample: int = 1,
    jump3_length: int = 1,
    jump3_n_sample: int = 1,
    start_resampling: int = 100000000,
) -> list[int]:
    """RePaint's resampling schedule (paper sec. 4.2, "jump length" j and "resampling" r):
    respaced indices from t_T - 1 down to -1 in steps of +-1.

    Going down one step at a time, at every multiple t of jump_length (below t_T -
    jump_length, t <= start_resampling - jump_length) the chain jumps back up jump_length
    steps, jump_n_sample - 1 times in all per such t; jump2_* and jump3_* nest shorter jumps
    the same way (their counters restart after each jump of the level above), and n_sample > 1
    repeats every single step down (t -> t + 1 -> t) n_sample - 1 times. A down step is a
    reverse (denoising) transition, an up step a forward one.
    """
    args = dict(
        t_T=t_T,
        n_sample=n_sample,
        jump_length=jump_length,
        jump_n_sample=jump_n_sample,
        jump2_length=jump2_length,
        jump2_n_sample=jump2_n_sample,
        jump3_length=jump3_length,
        jump3_n_sample=jump3_n_sample,
    )
    for name, value in args.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    # Innermost level first: a jump of a level resets the counters of the levels inside it.
    levels = [
        (jump3_length, jump3_n_sample),
        (jump2_length, jump2_n_sample),
        (jump_length, jump_n_sample),
    ]

    def fresh_counters(length, n):
        return {j: n - 1 for j in range(0, t_T - length, length)}

    remaining = [fresh_counters(*level) for level in levels]
    t, times = t_T, []
    while t >= 1:
        t -= 1
        times.append(t)
        if t + 1 < t_T - 1 and t <= start_resampling:
            for _ in range(n_sample - 1):
                times += [t + 1, t]
        for i, (length, _) in enumerate(levels):
            if remaining[i].get(t, 0) > 0 and t <= start_resampling - length:
                remaining[i][t] -= 1
                times += list(range(t + 1, t + length + 1))
                t += length
                for inner in range(i):
                    remaining[inner] = fresh_counters(*levels[inner])
    times.append(-1)
    return times


def _check_times(times, num_timesteps: int) -> tuple[int, ...]:
    times = tuple(int(t) for t in times)
    steps_ok = all(abs(a - b) == 1 for a, b in zip(times[:-1], times[1:], strict=True))
    if (
        len(times) < 2
        or not steps_ok
        or times[0] < times[1]
        or times[-1] != -1
        or max(times) > num_timesteps - 1
        or min(times) < -1
    ):
        shown = list(times) if len(times) <= 12 else [*times[:6], "...", *times[-3:]]
        raise ValueError(
            f"times: expected a jump schedule (get_schedule_jump) starting with a step down, "
            f"moving by +-1, within [-1, {num_timesteps - 1}] and ending at -1, got {shown}"
        )
    return times


def repaint_draw_order(times) -> tuple[np.ndarray, np.ndarray]:
    """The standard-normal draws of a RePaint run, in the order the reference draws them:
    (kind, transition), int32 arrays of length n_draws.

    kind 0 is x_T (transition -1); then transition by transition: a reverse step draws its
    sampling noise (kind 1) and then, except on the first transition, the noise of the known
    region (kind 2); a forward (undo) step draws its forward noise (kind 3).
    """
    times = [int(t) for t in times]
    kinds, transitions = [DRAW_X_T], [-1]
    for i, (t_last, t_cur) in enumerate(zip(times[:-1], times[1:], strict=True)):
        if t_cur < t_last:
            step = [DRAW_REVERSE] if i == 0 else [DRAW_REVERSE, DRAW_KNOWN]
        else:
            step = [DRAW_UNDO]
        kinds += step
        transitions += [i] * len(step)
    return np.asarray(kinds, np.int32), np.asarray(transitions, np.int32)


def repaint_noise(key, times, shape, dtype=jnp.float32):
    """The (n_draws, *shape) noise `repaint_sample(..., key=key)` uses: draw i (in
    `repaint_draw_order`) is normal(fold_in(key, i))."""
    n = len(repaint_draw_order(times)[0])
    return jnp.stack(
        [jax.random.normal(jax.random.fold_in(key, i), tuple(shape), dtype) for i in range(n)]
    )


def q_sample_step(diffusion: Diffusion, x, t, noise):
    """x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z, a sample of q(x_t | x_{t-1}) (DDPM
    eq. 2) with the (respaced) betas: RePaint's jump back up from step t - 1 to step t."""
    return (
        gaussian.extract(np.sqrt(1.0 - diffusion.betas), t, x) * x
        + gaussian.extract(np.sqrt(diffusion.betas), t, x) * noise
    )


def _transition_table(times: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Per transition: t (the step it leaves), reverse, merge (not the first), and the index
    of its draws in repaint_draw_order: a (sampling or forward noise) and b (known region)."""
    table = {name: [] for name in ("t", "reverse", "merge", "a", "b")}
    draw = 1
    for i, (t_last, t_cur) in enumerate(zip(times[:-1], times[1:], strict=True)):
        reverse, merge = t_cur < t_last, t_cur < t_last and i > 0
        table["t"].append(t_last)
        table["reverse"].append(reverse)
        table["merge"].append(merge)
        table["a"].append(draw)
        table["b"].append(draw + 1 if merge else 0)
        draw += 2 if merge else 1
    return {
        "t": np.asarray(table["t"], np.int32),
        "reverse": np.asarray(table["reverse"], bool),
        "merge": np.asarray(table["merge"], bool),
        "a": np.asarray(table["a"], np.int32),
        "b": np.asarray(table["b"], np.int32),
    }


def _check_mask(mask, x_known):
    mask_shape = jnp.shape(mask)
    try:
        ok = np.broadcast_shapes(mask_shape, x_known.shape) == x_known.shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"mask: expected a shape broadcastable to x_known's {x_known.shape} "
            f"(1 = known, 0 = to inpaint), got {mask_shape}"
        )
    try:
        values = np.unique(np.asarray(mask))
    except jax.errors.TracerArrayConversionError:  # traced in the caller's jit: not checkable
        return jnp.asarray(mask, jnp.float32)
    bad = values[(values != 0) & (values != 1)]
    if bad.size:
        raise ValueError(f"mask: expected only 0 (to inpaint) and 1 (known), got {float(bad[0])}")
    return jnp.asarray(mask, jnp.float32)


def repaint_sample(
    diffusion: Diffusion,
    model_fn,
    x_known,
    mask,
    *,
    times=None,
    noise=None,
    key=None,
    clip_denoised: bool = True,
    classifier_fn=None,
    y=None,
    classifier_scale=0.0,
    return_pred_xstart: bool = False,
):
    """Inpaints x_known (NHWC, [-1, 1]) where mask is 0, keeping it where mask is 1.

    diffusion: the (respaced) process; times: its jump schedule (default
    get_schedule_jump(num_timesteps, n_sample=1, jump_length=10, jump_n_sample=10)). For each
    transition (t_last, t_cur) of times: t_cur < t_last is a reverse step at t_last: (except on
    the first transition) x <- mask * q_sample(x_known, t_last, z_known) + (1 - mask) * x,
    then `p_sample` (model_fn(x, t) with ORIGINAL integer timesteps, clip_denoised, and with
    classifier_fn the mean shifted by Sigma * classifier_scale * grad_x log p(y | x, t) at the
    merged x); t_cur > t_last is a forward step `q_sample_step` to t_cur. noise:
    (n_draws, *x_known.shape) standard-normal draws in `repaint_draw_order(times)` (x_T
    first), or key: draw i = normal(fold_in(key, i)) (= `repaint_noise`), drawn inside the
    scan. Returns the final transition's sample (its posterior mean, not re-merged with the
    known region, as the reference), and with return_pred_xstart also its x_0 prediction.
    diffusion, model_fn, classifier_fn, times and clip_denoised are static; x_known, mask,
    noise, key, y and classifier_scale are traced.
    """
    x_known = jnp.asarray(x_known, jnp.float32)
    if x_known.ndim < 2:
        raise ValueError(f"x_known: expected a batch of NHWC images, got shape {x_known.shape}")
    mask = _check_mask(mask, x_known)
    if times is None:
        times = get_schedule_jump(diffusion.num_timesteps, **DEFAULT_JUMPS)
    times = _check_times(times, diffusion.num_timesteps)
    if (noise is None) == (key is None):
        raise ValueError(
            "noise, key: pass exactly one (noise: the (n_draws, *x_known.shape) draws, "
            "key: a PRNG key to draw them from)"
        )
    if noise is not None:
        noise = jnp.asarray(noise, jnp.float32)
        expected = (len(repaint_draw_order(times)[0]), *x_known.shape)
        if noise.shape != expected:
            raise ValueError(
                f"noise: expected shape {expected} (n_draws of repaint_draw_order(times), "
                f"*x_known.shape), got {noise.shape}"
            )
    if classifier_fn is not None and y is None:
        raise ValueError("y: classifier guidance needs the target labels")
    sample, pred_xstart = _repaint_sample(
        diffusion,
        model_fn,
        x_known,
        mask,
        noise,
        key,
        times=times,
        clip_denoised=bool(clip_denoised),
        classifier_fn=classifier_fn,
        y=None if y is None else jnp.asarray(y, jnp.int32),
        classifier_scale=jnp.asarray(classifier_scale, jnp.float32),
    )
    return (sample, pred_xstart) if return_pred_xstart else sample


@functools.partial(
    jax.jit,
    static_argnames=("diffusion", "model_fn", "times", "clip_denoised", "classifier_fn"),
)
def _repaint_sample(
    diffusion,
    model_fn,
    x_known,
    mask,
    noise,
    key,
    *,
    times,
    clip_denoised,
    classifier_fn,
    y,
    classifier_scale,
):
    shape, batch = x_known.shape, x_known.shape[0]

    def draw(i):
        if noise is not None:
            return noise[i]
        return jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)

    cond_fn = None
    if classifier_fn is not None:

        def cond_fn(x, t):
            return classifier_guidance_grad(classifier_fn, x, t, y, classifier_scale)

    def reverse(x, pred_xstart, s, z, z_known):
        t = jnp.full((batch,), s["t"], jnp.int32)
        known = gaussian.q_sample(diffusion, x_known, t, z_known)
        x = jnp.where(s["merge"], mask * known + (1 - mask) * x, x)
        out = p_sample(diffusion, model_fn, x, t, z, clip_denoised=clip_denoised, cond_fn=cond_fn)
        return out["sample"], out["pred_xstart"]

    def undo(x, pred_xstart, s, z, z_known):
        t = jnp.full((batch,), s["t"] + 1, jnp.int32)
        return q_sample_step(diffusion, x, t, z), pred_xstart

    def body(carry, s):
        # Both draws outside the cond: one random-number site each in the program.
        z, z_known = draw(s["a"]), draw(s["b"])
        return jax.lax.cond(s["reverse"], reverse, undo, *carry, s, z, z_known), None

    xs = {name: jnp.asarray(v) for name, v in _transition_table(times).items()}
    x_T = draw(0)
    (sample, pred_xstart), _ = jax.lax.scan(body, (x_T, jnp.zeros_like(x_T)), xs)
    return sample, pred_xstart
