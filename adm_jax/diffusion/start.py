"""Starting points besides pure noise, for editing (SDEdit, Meng et al. 2022, "SDEdit: Guided
Image Synthesis and Editing with Stochastic Differential Equations").

With ``x_init`` (x_0 images in [-1, 1]) and a strength s in (0, 1], every sampler runs only
the last n = ceil(s * N) of the N steps of its own grid (N: the respaced process's length for
ddpm/ddim, the solver steps for dpm++/unipc; the k-diffusion samplers instead keep the grid's
sigmas <= sigma(s), see `karras`), starting from x_init noised to the first of them with the
draw that would otherwise be x_T. s = 1 is the ordinary sample (x_init unused). s may differ
per example and is traced: examples whose start lies ahead keep their start point until their
first step, and steps before every example's start are skipped (`lax.cond`).
"""

from __future__ import annotations

import jax.numpy as jnp

# ceil(s * N) to within this fraction of a step, so float32 s * N = 3.0000002 runs 3 steps.
_CEIL_SLACK = 1e-3


def per_example(strength, batch: int) -> jnp.ndarray:
    """strength as a (batch,) float32 array (a scalar applies to every example)."""
    return jnp.broadcast_to(jnp.asarray(strength, jnp.float32), (batch,))


def steps_to_run(strength, num_steps: int) -> jnp.ndarray:
    """n = ceil(s * N) per example, clipped to [1, N] (int32, traced)."""
    n = jnp.ceil(jnp.asarray(strength, jnp.float32) * num_steps - _CEIL_SLACK)
    return jnp.clip(n, 1, num_steps).astype(jnp.int32)


def bcast(values, x) -> jnp.ndarray:
    """A (B,) array shaped (B, 1, ..., 1) to broadcast against x."""
    return jnp.reshape(values, values.shape + (1,) * (x.ndim - values.ndim))
