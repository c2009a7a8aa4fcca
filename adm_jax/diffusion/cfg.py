"""Classifier-free guidance (Ho & Salimans 2022) as a model wrapper, so every sampler (DDPM,
DDIM, DPM-Solver++) and classifier guidance combine with it unchanged."""

from __future__ import annotations

import jax.numpy as jnp


def classifier_free_model_fn(model_fn, y, null_label, scale):
    """model_fn'(x, t) = eps_u + scale * (eps_c - eps_u) from one batched pass of 2B.

    model_fn(x, t, y) is a class-conditional network trained with label dropout, whose label
    `null_label` means "no class". eps_c uses the labels y, eps_u null_label; both come from one
    call on concat([x, x]) so the network runs once per step. The first C output channels
    (C = channels of x, NHWC) are guided; any further channels (a learned variance) are the
    conditional pass's. scale 1 is the conditional model, 0 the unconditional one (Ho &
    Salimans' w = scale - 1). y and scale may be traced: build the wrapper inside your own jit
    to reuse one compiled sampler across labels and scales.
    """
    y = jnp.asarray(y, jnp.int32)
    if y.ndim != 1:
        raise ValueError(f"y: expected a (B,) array of class labels, got shape {y.shape}")

    def guided_model_fn(x, t):
        batch, channels = x.shape[0], x.shape[-1]
        if y.shape[0] != batch:
            raise ValueError(f"y: expected {batch} labels (the batch of x), got {y.shape[0]}")
        labels = jnp.concatenate([y, jnp.full_like(y, null_label)])
        out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), labels)
        cond, uncond = out[:batch], out[batch:]
        eps_c, eps_u = cond[..., :channels], uncond[..., :channels]
        eps = eps_u + scale * (eps_c - eps_u)
        return jnp.concatenate([eps, cond[..., channels:]], axis=-1)

    return guided_model_fn
