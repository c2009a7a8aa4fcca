"""Noisy-image classifier (NHWC), mirroring guided_diffusion/unet.py ``EncoderUNetModel``.

The UNet's input blocks and middle block, then a head chosen by ``pool``:
"attention" (GroupNorm, SiLU, CLIP-style AttentionPool2d; what the released classifiers use),
"adaptive" (GroupNorm, SiLU, global average pool, 1x1 conv), "spatial" / "spatial_v2" (MLP on
the spatial means of every block's output). Logits are float32 whatever the compute dtype.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from adm_jax.models.layers import AttentionPool2d, GroupNorm32, conv1x1, dense
from adm_jax.models.unet import ADMBase

POOLS = ("adaptive", "attention", "spatial", "spatial_v2")


class EncoderUNet(ADMBase):
    """``__call__(x, timesteps, *, train=False) -> (B, out_channels)`` float32 logits."""

    pool: str = "adaptive"

    def validate(self):
        super().validate()
        if self.pool not in POOLS:
            raise ValueError(f"pool: unknown pooling {self.pool!r}; expected one of {POOLS}")
        if self.pool == "attention":
            width = self.level_channels()[-1]
            if self.num_head_channels == -1:
                raise ValueError(
                    "num_head_channels: pool 'attention' needs a per-head width (the reference "
                    "asserts num_head_channels != -1)"
                )
            if width % self.num_head_channels:
                raise ValueError(
                    f"num_head_channels: {self.num_head_channels} does not divide the {width} "
                    "channels of the attention pool"
                )

    def __call__(self, x, timesteps, *, train: bool = False):
        self.check_input(x, self.in_channels)
        if self.pool == "attention" and x.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"x: pool 'attention' has a positional embedding for {self.image_size}x"
                f"{self.image_size} inputs, got {x.shape[1]}x{x.shape[2]}"
            )
        return self.classify(x, timesteps, train)

    @nn.compact
    def classify(self, x, timesteps, train: bool):
        emb = self.embed_timesteps(timesteps)
        h, hs = self.encode(x.astype(self.dtype), emb, train)
        if self.pool.startswith("spatial"):
            means = [f.astype(jnp.float32).mean(axis=(1, 2)) for f in [*hs, h]]
            h = dense(2048, jnp.float32, "out_0")(jnp.concatenate(means, axis=-1))
            if self.pool == "spatial":
                h = nn.relu(h)
                return dense(self.out_channels, jnp.float32, "out_2")(h)
            h = nn.silu(GroupNorm32(name="out_1")(h))
            return dense(self.out_channels, jnp.float32, "out_3")(h)

        h = nn.silu(GroupNorm32(name="out_0")(h.astype(jnp.float32)))
        if self.pool == "adaptive":
            h = h.mean(axis=(1, 2), keepdims=True)
            h = conv1x1(self.out_channels, jnp.float32, "out_3", zero=True)(h)
            return h.reshape(h.shape[0], -1)
        pool = AttentionPool2d(
            self.num_head_channels,
            self.out_channels,
            jnp.float32,
            attention_impl=self.attention_impl,
            name="out_2",
        )
        return pool(h)
