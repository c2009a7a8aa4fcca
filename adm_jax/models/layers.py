"""Building blocks of the ADM networks (NHWC), mirroring guided_diffusion/unet.py and nn.py.

Reference classes: ``GroupNorm32`` and ``timestep_embedding`` (nn.py), ``ResBlock``,
``AttentionBlock``, ``QKVAttentionLegacy``, ``QKVAttention``, ``Upsample``, ``Downsample`` and
``AttentionPool2d`` (unet.py).

Submodule names follow the reference's torch module paths with ``.`` before a Sequential index
written as ``_`` (``in_layers.2`` -> ``in_layers_2``), so that ``adm_jax.convert`` can map
state_dict keys to parameters by a purely mechanical rule.

Precision policy (as the reference's fp16 mode, with bfloat16 in mind): parameters are float32;
convolutions and matmuls run in the module's compute ``dtype``; GroupNorm statistics and the
attention softmax are always float32.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

GROUPS = 32
GROUP_NORM_EPS = 1e-5

# torch's default Conv/Linear init draws U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance
# 1/(3 fan_in); keeping it makes from-scratch training behave like the reference.
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros_init = nn.initializers.zeros_init()


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]`` (cos first), float32, as the reference."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None]
    embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        embedding = jnp.concatenate([embedding, jnp.zeros_like(embedding[:, :1])], axis=-1)
    return embedding


def _group_mean(v: jax.Array, num_groups: int) -> jax.Array:
    """[B, ..., C] -> [B, C]: each channel gets the mean of its group over the spatial axes.

    A per-channel spatial sum first, then a sum over each group's few channels: on XLA:CPU a
    fast reduction, where reducing the 5-D ``[B, H, W, G, C/G]`` view at once is 3-6x slower;
    on accelerators it is the same work."""
    sums = jnp.sum(v, axis=tuple(range(1, v.ndim - 1)))
    return _group_sum_of_channels(sums, num_groups) / _group_size(v.shape, num_groups)


def _group_size(shape: tuple, num_groups: int) -> int:
    """Elements per (batch, group) of a [B, ..., C] array: the group statistics' count."""
    return (shape[-1] // num_groups) * math.prod(shape[1:-1])


def _group_sum_of_channels(per_channel: jax.Array, num_groups: int) -> jax.Array:
    """[B, C] -> [B, C]: each channel gets the sum over its group's channels."""
    b, c = per_channel.shape
    sums = per_channel.reshape(b, num_groups, c // num_groups).sum(-1)
    return jnp.repeat(sums, c // num_groups, axis=-1)


def _per_channel(v: jax.Array, ndim: int) -> jax.Array:
    """[B, C] -> [B, 1, ..., 1, C] with ``ndim`` axes, to broadcast over the spatial axes."""
    return v.reshape(v.shape[0], *([1] * (ndim - 2)), v.shape[-1])


def _group_norm_forward(x, scale, bias, num_groups, eps):
    """Statistics and normalisation in float32; the residuals keep ``x`` in its own dtype (a
    bfloat16 activation is not saved a second time in float32)."""
    h = x.astype(jnp.float32)
    mean = _group_mean(h, num_groups)
    centred = h - _per_channel(mean, h.ndim)
    rstd = jax.lax.rsqrt(_group_mean(jnp.square(centred), num_groups) + eps)
    out = centred * _per_channel(rstd * scale, h.ndim) + bias
    return out.astype(x.dtype), (x, mean, rstd, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _group_norm(x, scale, bias, num_groups, eps):
    return _group_norm_forward(x, scale, bias, num_groups, eps)[0]


def _group_norm_backward(num_groups, eps, residuals, dy):
    """The textbook GroupNorm gradient: two per-(batch, channel) sums of the output gradient
    and one elementwise pass for the input gradient."""
    del eps
    x, mean, rstd, scale = residuals
    h, dy = x.astype(jnp.float32), dy.astype(jnp.float32)
    xhat = (h - _per_channel(mean, h.ndim)) * _per_channel(rstd, h.ndim)
    spatial = tuple(range(1, h.ndim - 1))
    sum_dy = jnp.sum(dy, axis=spatial)  # [B, C]
    sum_dy_xhat = jnp.sum(dy * xhat, axis=spatial)
    count = _group_size(h.shape, num_groups)
    mean_g = _group_sum_of_channels(sum_dy * scale, num_groups) / count
    mean_g_xhat = _group_sum_of_channels(sum_dy_xhat * scale, num_groups) / count
    dh = _per_channel(rstd, h.ndim) * (
        dy * scale - _per_channel(mean_g, h.ndim) - xhat * _per_channel(mean_g_xhat, h.ndim)
    )
    return dh.astype(x.dtype), jnp.sum(sum_dy_xhat, axis=0), jnp.sum(sum_dy, axis=0)


_group_norm.defvjp(_group_norm_forward, _group_norm_backward)


class GroupNorm32(nn.Module):
    """GroupNorm with 32 groups, eps 1e-5, computed in float32 whatever the input dtype.

    Written out (two-pass variance) rather than ``nn.GroupNorm`` so the statistics match the
    reference to float32 round-off; the result is cast back to the input dtype. The gradient is
    a custom VJP (``_group_norm_backward``): autodiff of the forward made XLA:CPU recompute the
    normalised activations in several full passes, which cost more than the block's
    convolutions at 16x16 with 128 channels (docs/history.md).
    """

    num_groups: int = GROUPS
    epsilon: float = GROUP_NORM_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (channels,), jnp.float32)
        bias = self.param("bias", zeros_init, (channels,), jnp.float32)
        return _group_norm(x, scale, bias, self.num_groups, self.epsilon)


def conv3x3(features: int, dtype: Dtype, name: str, *, stride: int = 1, zero: bool = False):
    """3x3 conv with torch's symmetric padding 1 ("SAME" pads asymmetrically at stride 2)."""
    return nn.Conv(
        features,
        (3, 3),
        strides=(stride, stride),
        padding=((1, 1), (1, 1)),
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=zeros_init if zero else torch_default_kernel_init,
        name=name,
    )


def conv1x1(features: int, dtype: Dtype, name: str, *, zero: bool = False):
    return nn.Conv(
        features,
        (1, 1),
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=zeros_init if zero else torch_default_kernel_init,
        name=name,
    )


def dense(features: int, dtype: Dtype, name: str, *, zero: bool = False):
    """Linear layer; also the reference's 1-D kernel-size-1 convs over tokens."""
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=zeros_init if zero else torch_default_kernel_init,
        name=name,
    )


def upsample_nearest(x: jax.Array) -> jax.Array:
    """``F.interpolate(scale_factor=2, mode="nearest")`` on NHWC."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool2(x: jax.Array) -> jax.Array:
    """``AvgPool2d(kernel_size=2, stride=2)`` on NHWC."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling with an optional 3x3 conv (reference ``Upsample``)."""

    channels: int
    use_conv: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = upsample_nearest(x)
        if self.use_conv:
            x = conv3x3(self.channels, self.dtype, "conv")(x)
        return x


class Downsample(nn.Module):
    """Stride-2 3x3 conv, or 2x2 average pooling without it (reference ``Downsample``)."""

    channels: int
    use_conv: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_conv:
            return conv3x3(self.channels, self.dtype, "op", stride=2)(x)
        return avg_pool2(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the embedding (reference ``ResBlock``).

    ``use_scale_shift_norm`` is AdaGN: ``norm(h) * (1 + scale) + shift``; otherwise the
    projected embedding is added before the second norm. ``up``/``down`` make it the BigGAN-style
    resampling block (nearest / average-pool resampling of both paths after the first norm).
    """

    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    up: bool = False
    down: bool = False
    deterministic: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        h = nn.silu(GroupNorm32(name="in_layers_0")(x))
        if self.up:
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.down:
            h, x = avg_pool2(h), avg_pool2(x)
        h = conv3x3(self.out_channels, self.dtype, "in_layers_2")(h)

        emb_width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        emb_out = dense(emb_width, self.dtype, "emb_layers_1")(nn.silu(emb)).astype(h.dtype)
        emb_out = emb_out[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = GroupNorm32(name="out_layers_0")(h) * (1 + scale) + shift
        else:
            h = GroupNorm32(name="out_layers_0")(h + emb_out)
        h = nn.silu(h)
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
        h = conv3x3(self.out_channels, self.dtype, "out_layers_3", zero=True)(h)

        if self.out_channels != channels:
            x = conv1x1(self.out_channels, self.dtype, "skip_connection")(x)
        return x + h


ATTENTION_IMPLS = ("auto", "xla", "cudnn")
# cuDNN flash attention's head-width limit on pre-Hopper GPUs (Hopper allows 256); "auto" stays
# under it so that one rule holds on every GPU.
CUDNN_MAX_HEAD_CHANNELS = 128


def attention_implementation(requested: str, dtype: Dtype, head_channels: int) -> str:
    """The ``jax.nn.dot_product_attention`` implementation for ``requested`` ("auto" | "xla" |
    "cudnn"); raises a one-line ValueError naming ``attention_impl`` for an impossible request.

    "auto" takes cuDNN flash attention on a GPU when it applies (bfloat16 / float16 inputs, a
    head width that is a multiple of 8 and at most 128) and XLA everywhere else: float32
    inputs (the golden-parity and sampling default), CPU and TPU.
    """
    low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    on_gpu = jax.default_backend() == "gpu"
    if requested == "auto":
        fits = head_channels % 8 == 0 and head_channels <= CUDNN_MAX_HEAD_CHANNELS
        return "cudnn" if on_gpu and low_precision and fits else "xla"
    if requested == "cudnn":
        if not on_gpu:
            raise ValueError(
                f"attention_impl: 'cudnn' needs a GPU backend, got {jax.default_backend()!r}; "
                "use 'auto' or 'xla'"
            )
        if not low_precision:
            raise ValueError(
                f"attention_impl: 'cudnn' needs bfloat16 or float16 compute, got "
                f"{jnp.dtype(dtype).name}; use 'auto' or 'xla'"
            )
        return requested
    if requested == "xla":
        return requested
    raise ValueError(f"attention_impl: unknown {requested!r}; expected one of {ATTENTION_IMPLS}")


def qkv_attention(
    qkv: jax.Array, num_heads: int, *, legacy: bool, implementation: str = "auto"
) -> jax.Array:
    """Multi-head attention on packed ``qkv`` of shape (B, T, 3 * H * C) -> (B, T, H * C).

    ``legacy`` (QKVAttentionLegacy) packs channels as [head][q|k|v][c]; the new order
    (QKVAttention, also AttentionPool2d) as [q|k|v][head][c]. Either way q, k and v become
    (B, T, heads, C) for ``jax.nn.dot_product_attention`` (``implementation``: see
    ``attention_implementation``).

    Precision: the softmax is float32 with every implementation. XLA's path computes the logits
    with a float32 result type (bfloat16 products, float32 accumulation), scales them by
    C**-0.5 and takes the softmax in float32 before casting the weights to the input dtype;
    cuDNN flash attention keeps its running softmax statistics and accumulators in float32.
    The reference instead scales q and k by C**-0.25 each before the product (to keep float16
    logits in range); with float32 logits the single scale is the same function, and the
    golden vectors hold to float32 round-off.
    """
    batch, length, width = qkv.shape
    ch = width // (3 * num_heads)
    if legacy:
        qkv = qkv.reshape(batch, length, num_heads, 3, ch)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    else:
        qkv = qkv.reshape(batch, length, 3, num_heads, ch)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=1.0 / math.sqrt(ch),
        implementation=attention_implementation(implementation, qkv.dtype, ch),
    )
    return out.reshape(batch, length, num_heads * ch)


def attention_heads(channels: int, num_heads: int, num_head_channels: int, field: str) -> int:
    """Head count as AttentionBlock derives it; raises a ValueError naming the bad field."""
    if num_head_channels == -1:
        if num_heads < 1 or channels % num_heads:
            raise ValueError(
                f"{field}: {num_heads} heads do not divide the {channels} channels of an "
                "attention layer"
            )
        return num_heads
    if num_head_channels < 1 or channels % num_head_channels:
        raise ValueError(
            f"num_head_channels: {num_head_channels} does not divide the {channels} channels "
            "of an attention layer"
        )
    return channels // num_head_channels


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions with a residual (reference AttentionBlock)."""

    num_heads: int
    use_new_attention_order: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        qkv = dense(3 * c, self.dtype, "qkv")(GroupNorm32(name="norm")(tokens))
        out = qkv_attention(
            qkv,
            self.num_heads,
            legacy=not self.use_new_attention_order,
            implementation=self.attention_impl,
        )
        out = dense(c, self.dtype, "proj_out", zero=True)(out)
        return (tokens + out).reshape(b, h, w, c)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling (reference AttentionPool2d): the mean token plus a learned
    positional embedding attends over all positions; the mean token's output is returned."""

    num_head_channels: int
    output_dim: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
        positional_embedding = self.param(
            "positional_embedding",
            nn.initializers.normal(stddev=c**-0.5),
            (h * w + 1, c),
            jnp.float32,
        )
        tokens = tokens + positional_embedding.astype(tokens.dtype)
        qkv = dense(3 * c, self.dtype, "qkv_proj")(tokens)
        out = qkv_attention(
            qkv, c // self.num_head_channels, legacy=False, implementation=self.attention_impl
        )
        out = dense(self.output_dim, self.dtype, "c_proj")(out)
        return out[:, 0]
