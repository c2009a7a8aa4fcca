"""Training-timestep samplers (reference `resample.py`) as pure functions over explicit state.

Importance sampling of t (Improved DDPM sec. 3.3): p_t proportional to sqrt(E[L_t^2]) from
the last `history_per_term` losses of every t, mixed with a little of the uniform
distribution. The state is a pytree of arrays, so it lives in a jitted train step and in a
checkpoint; the update consumes a whole (global) batch in order, as the reference does.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def uniform_sample_timesteps(key, num_timesteps: int, batch_size: int):
    """t ~ U{0, ..., T-1} with unit importance weights. Returns (t int32, weights float32)."""
    t = jax.random.randint(key, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
    return t, jnp.ones((batch_size,), jnp.float32)


def importance_sample_timesteps(key, weights, batch_size: int):
    """t ~ p = w / sum(w) with weights 1 / (T p_t), so the weighted loss stays unbiased.

    Returns (t int32, weights float32), like the reference's `ScheduleSampler.sample`.
    """
    p = weights / jnp.sum(weights)
    t = jax.random.categorical(key, jnp.log(p), shape=(batch_size,)).astype(jnp.int32)
    return t, (1.0 / (p.shape[0] * p[t])).astype(jnp.float32)


class LossSecondMomentState(NamedTuple):
    """history (T, H): the last H losses per timestep, oldest first; counts (T,) <= H."""

    history: jax.Array
    counts: jax.Array


def loss_second_moment_init(
    num_timesteps: int, history_per_term: int = 10, dtype=jnp.float32
) -> LossSecondMomentState:
    """Empty loss history (the reference's LossSecondMomentResampler at construction)."""
    return LossSecondMomentState(
        history=jnp.zeros((num_timesteps, history_per_term), dtype),
        counts=jnp.zeros((num_timesteps,), jnp.int32),
    )


def loss_second_moment_update(state: LossSecondMomentState, t, losses) -> LossSecondMomentState:
    """Appends each (t_i, loss_i) in batch order (`update_with_all_losses`).

    Until a timestep has H losses they fill its history; after that each new loss shifts out
    the oldest (FIFO). Sequential over the batch, so repeated t within a batch are exact.
    """
    hist_len = state.history.shape[1]
    losses = jnp.asarray(losses, state.history.dtype)

    def body(st, tl):
        ti, loss = tl
        row, count = st.history[ti], st.counts[ti]
        shifted = jnp.concatenate([row[1:], loss[None]])
        filled = row.at[jnp.minimum(count, hist_len - 1)].set(loss)
        row = jnp.where(count == hist_len, shifted, filled)
        return LossSecondMomentState(
            st.history.at[ti].set(row), st.counts.at[ti].set(jnp.minimum(count + 1, hist_len))
        ), None

    state, _ = jax.lax.scan(body, state, (jnp.asarray(t, jnp.int32), losses))
    return state


def loss_second_moment_warmed_up(state: LossSecondMomentState):
    """True once every timestep has a full loss history."""
    return jnp.all(state.counts == state.history.shape[1])


def loss_second_moment_weights(state: LossSecondMomentState, uniform_prob: float = 0.001):
    """Sampling weights: all ones before warm-up, then w = sqrt(mean(history^2)), normalised,
    mixed with uniform_prob of the uniform distribution (they sum to 1). (T,)."""
    w = jnp.sqrt(jnp.mean(state.history**2, axis=-1))
    w = w / jnp.sum(w)
    w = w * (1 - uniform_prob) + uniform_prob / w.shape[0]
    return jnp.where(loss_second_moment_warmed_up(state), w, jnp.ones_like(w))
