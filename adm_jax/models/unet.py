"""ADM UNet and super-resolution UNet (NHWC), mirroring guided_diffusion/unet.py ``UNetModel``
and ``SuperResModel``.

Fields are the reference constructor's keyword arguments (``attention_resolutions`` holds the
downsampling factors ``ds`` the reference class receives, not image resolutions) plus the
compute ``dtype``, ``remat`` and ``attention_impl``. Parameter names mirror the reference
state_dict keys (see ``adm_jax.models.layers``), which is what lets ``adm_jax.convert`` load
released checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from adm_jax.models.layers import (
    ATTENTION_IMPLS,
    GROUPS,
    AttentionBlock,
    Downsample,
    GroupNorm32,
    ResBlock,
    Upsample,
    attention_heads,
    conv3x3,
    dense,
    timestep_embedding,
)


def _conv_saveable(prim, *_, **__) -> bool:
    """Checkpoint policy: keep convolution outputs."""
    return prim is jax.lax.conv_general_dilated_p


# Rematerialisation policies (``remat``), applied per ResBlock and per AttentionBlock: what a
# block keeps from its forward pass for the backward pass; everything else is recomputed there.
# "full" keeps only the block's inputs. "dots-saveable" also keeps the outputs of the layers
# with weights: convolutions and matmuls without batch dimensions (dense layers), so the
# backward pass recomputes only normalisations, activations and the attention itself (logits,
# softmax and the weighted sum). Neither of jax's two dots policies fits a UNet:
# ``dots_saveable`` also keeps every attention matrix (batch x heads x T x T float32 logits,
# the largest residual at 32x32 attention), ``dots_with_no_batch_dims_saveable`` keeps no
# convolution (so recomputes most of the FLOPs). Residual bytes of each: docs/training.md.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots-saveable": jax.checkpoint_policies.save_from_both_policies(
        _conv_saveable, jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    ),
}


def remat_policy_name(remat) -> str:
    """Canonical ``remat`` value: booleans (older configs and callers) mean "none" / "full";
    underscores are read as hyphens ("dots_saveable")."""
    if isinstance(remat, bool) or remat is None:
        return "full" if remat else "none"
    return str(remat).replace("_", "-")


@functools.cache
def _remat_class(cls, policy: str):
    """``nn.remat(cls)`` with the named policy, built once per (class, policy); the lifted
    module keeps the class's parameter names, so checkpoints load with or without it."""
    return nn.remat(cls, policy=REMAT_POLICIES[policy])


@dataclasses.dataclass(frozen=True)
class InputBlock:
    """One entry of the reference's ``input_blocks`` list, as the constructor builds it."""

    kind: str  # "conv" (stem), "res" (ResBlock [+ attention]) or "down"
    channels: int
    attention: bool = False


class ADMBase(nn.Module):
    """Fields, validation and the shared encoder path of UNetModel and EncoderUNetModel."""

    image_size: int
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: Sequence[int]
    dropout: float = 0.0
    channel_mult: Sequence[float] = (1, 2, 4, 8)
    conv_resample: bool = True
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    dtype: Any = jnp.float32
    # "none" | "full" | "dots-saveable" (REMAT_POLICIES; True / False mean "full" / "none").
    remat: str | bool = "none"
    # "auto" | "xla" | "cudnn": jax.nn.dot_product_attention's implementation
    # (layers.attention_implementation).
    attention_impl: str = "auto"

    def __post_init__(self):
        # Lists (e.g. from JSON) become tuples so that the module stays hashable.
        for field in ("attention_resolutions", "channel_mult"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        object.__setattr__(self, "remat", remat_policy_name(self.remat))
        self.validate()
        super().__post_init__()

    # -- configuration -----------------------------------------------------------------------

    def level_channels(self) -> list[int]:
        return [int(mult * self.model_channels) for mult in self.channel_mult]

    def input_plan(self) -> tuple[list[InputBlock], int]:
        """The reference ``input_blocks`` layout and the final downsampling factor ``ds``."""
        widths = self.level_channels()
        blocks = [InputBlock("conv", widths[0])]
        ds = 1
        for level, width in enumerate(widths):
            for _ in range(self.num_res_blocks):
                blocks.append(InputBlock("res", width, ds in self.attention_resolutions))
            if level != len(widths) - 1:
                blocks.append(InputBlock("down", width))
                ds *= 2
        return blocks, ds

    def decoder_heads(self) -> int:
        return self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample

    def validate(self):
        """Raises a one-line ValueError naming the field of an impossible configuration."""
        if self.remat not in REMAT_POLICIES:
            raise ValueError(
                f"remat: unknown policy {self.remat!r}; expected one of {tuple(REMAT_POLICIES)}"
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl: unknown {self.attention_impl!r}; expected one of "
                f"{ATTENTION_IMPLS}"
            )
        if not self.channel_mult:
            raise ValueError("channel_mult: must name at least one level")
        for name in ("in_channels", "model_channels", "out_channels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.num_res_blocks < 0:
            raise ValueError(f"num_res_blocks: must be >= 0, got {self.num_res_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        widths = self.level_channels()
        for mult, width in zip(self.channel_mult, widths, strict=True):
            if width < GROUPS or width % GROUPS:
                raise ValueError(
                    f"channel_mult: level width model_channels {self.model_channels} x {mult} = "
                    f"{width} is not a positive multiple of the {GROUPS} GroupNorm groups"
                )
        num_levels = len(widths)
        factor = 2 ** (num_levels - 1)
        if self.image_size < factor or self.image_size % factor:
            raise ValueError(
                f"image_size: {self.image_size} is not divisible by 2**(len(channel_mult)-1) = "
                f"{factor}, which {num_levels} levels need"
            )
        level_ds = [2**level for level in range(num_levels)]
        for ds in self.attention_resolutions:
            if ds not in level_ds:
                raise ValueError(
                    f"attention_resolutions: downsampling factor {ds} is not one of the levels' "
                    f"factors {level_ds} (they are ds = image_size // resolution, not resolutions)"
                )
        attention_widths = {
            w for w, m in zip(widths, level_ds, strict=True) if m in self.attention_resolutions
        }
        for width in sorted(attention_widths | {widths[-1]}):
            attention_heads(width, self.num_heads, self.num_head_channels, "num_heads")
        for width in sorted(attention_widths):
            attention_heads(
                width, self.decoder_heads(), self.num_head_channels, "num_heads_upsample"
            )

    # -- shared pieces ------------------------------------------------------------------------

    def embed_timesteps(self, timesteps: jax.Array) -> jax.Array:
        """Linear-SiLU-Linear of the sinusoidal embedding; kept in float32 as the reference."""
        emb = timestep_embedding(timesteps, self.model_channels)
        emb = dense(4 * self.model_channels, jnp.float32, "time_embed_0")(emb)
        return dense(4 * self.model_channels, jnp.float32, "time_embed_2")(nn.silu(emb))

    def block_classes(self):
        if self.remat == "none":
            return ResBlock, AttentionBlock
        return _remat_class(ResBlock, self.remat), _remat_class(AttentionBlock, self.remat)

    def res_block(self, name: str, out_channels: int, train: bool, *, up=False, down=False):
        res_cls, _ = self.block_classes()
        return res_cls(
            out_channels=out_channels,
            dropout=self.dropout,
            use_scale_shift_norm=self.use_scale_shift_norm,
            up=up,
            down=down,
            deterministic=not train,
            dtype=self.dtype,
            name=name,
        )

    def attention_block(self, name: str, channels: int, num_heads: int):
        _, attn_cls = self.block_classes()
        heads = attention_heads(channels, num_heads, self.num_head_channels, "num_heads")
        return attn_cls(
            num_heads=heads,
            use_new_attention_order=self.use_new_attention_order,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            name=name,
        )

    def check_input(self, x: jax.Array, expected_channels: int):
        if x.ndim != 4 or x.shape[-1] != expected_channels:
            raise ValueError(
                f"x: expected NHWC input with {expected_channels} channels, got shape {x.shape}"
            )
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"x: spatial size {x.shape[1:3]} is not divisible by {factor} "
                f"(len(channel_mult) = {len(self.channel_mult)} levels)"
            )

    def encode(self, h: jax.Array, emb: jax.Array, train: bool) -> tuple[jax.Array, list]:
        """Input blocks and middle block; returns the middle output and every block's output."""
        plan, _ = self.input_plan()
        hs = []
        for index, block in enumerate(plan):
            name = f"input_blocks_{index}"
            if block.kind == "conv":
                h = conv3x3(block.channels, self.dtype, f"{name}_0")(h)
            elif block.kind == "res":
                h = self.res_block(f"{name}_0", block.channels, train)(h, emb)
                if block.attention:
                    h = self.attention_block(f"{name}_1", block.channels, self.num_heads)(h)
            elif self.resblock_updown:
                h = self.res_block(f"{name}_0", block.channels, train, down=True)(h, emb)
            else:
                h = Downsample(block.channels, self.conv_resample, self.dtype, name=f"{name}_0")(h)
            hs.append(h)
        width = plan[-1].channels
        h = self.res_block("middle_block_0", width, train)(h, emb)
        h = self.attention_block("middle_block_1", width, self.num_heads)(h)
        h = self.res_block("middle_block_2", width, train)(h, emb)
        return h, hs


class UNet(ADMBase):
    """The ADM UNet (reference ``UNetModel``): ``__call__(x, timesteps, y=None, *, train=False)``
    on NHWC float input, returning float32 NHWC with ``out_channels`` channels."""

    num_classes: int | None = None
    # Classifier-free guidance (Ho & Salimans 2022) trains with label dropout: the dropped
    # labels need their own embedding row. Not a reference argument, so off by default and
    # reference checkpoints load unchanged.
    null_class_embedding: bool = False

    def validate(self):
        super().validate()
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes: must be None or positive, got {self.num_classes}")
        if self.null_class_embedding and self.num_classes is None:
            raise ValueError(
                "null_class_embedding: needs a class-conditional model (num_classes is None)"
            )

    @property
    def null_label(self) -> int | None:
        """The label meaning "no class" (the extra last embedding row), or None without one."""
        return self.num_classes if self.null_class_embedding else None

    def __call__(self, x, timesteps, y=None, *, train: bool = False):
        self.check_input(x, self.in_channels)
        return self.unet_forward(x, timesteps, y, train)

    @nn.compact
    def unet_forward(self, x, timesteps, y, train: bool):
        if (y is None) != (self.num_classes is None):
            raise ValueError(
                f"y: labels must be given if and only if the model is class-conditional "
                f"(num_classes={self.num_classes}, y {'missing' if y is None else 'given'})"
            )
        emb = self.embed_timesteps(timesteps)
        if self.num_classes is not None:
            label_emb = nn.Embed(
                self.num_classes + int(self.null_class_embedding),
                4 * self.model_channels,
                embedding_init=nn.initializers.normal(1.0),
                param_dtype=jnp.float32,
                name="label_emb",
            )
            emb = emb + label_emb(jnp.asarray(y, jnp.int32))

        h, hs = self.encode(x.astype(self.dtype), emb, train)

        widths = self.level_channels()
        ds = 2 ** (len(widths) - 1)
        index = 0
        for level in reversed(range(len(widths))):
            for i in range(self.num_res_blocks + 1):
                name = f"output_blocks_{index}"
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = self.res_block(f"{name}_0", widths[level], train)(h, emb)
                sub = 1
                if ds in self.attention_resolutions:
                    h = self.attention_block(f"{name}_1", widths[level], self.decoder_heads())(h)
                    sub = 2
                if level and i == self.num_res_blocks:
                    if self.resblock_updown:
                        h = self.res_block(f"{name}_{sub}", widths[level], train, up=True)(h, emb)
                    else:
                        upsample = Upsample(
                            widths[level], self.conv_resample, self.dtype, name=f"{name}_{sub}"
                        )
                        h = upsample(h)
                    ds //= 2
                index += 1

        h = nn.silu(GroupNorm32(name="out_0")(h.astype(jnp.float32)))
        return conv3x3(self.out_channels, jnp.float32, "out_2", zero=True)(h)


class SuperResUNet(UNet):
    """UNet conditioned on a low-resolution image (reference ``SuperResModel``).

    ``in_channels`` is the image's channel count, as the reference constructor takes it; the
    bilinearly upsampled ``low_res`` (half-pixel centres, no antialiasing: torch's
    ``F.interpolate(mode="bilinear")``) is concatenated after ``x``, so the first conv sees
    ``2 * in_channels`` channels.
    """

    def __call__(self, x, timesteps, low_res=None, y=None, *, train: bool = False):
        self.check_input(x, self.in_channels)
        if low_res is None or low_res.ndim != 4 or low_res.shape[-1] != self.in_channels:
            raise ValueError(
                f"low_res: expected an NHWC image with {self.in_channels} channels, got "
                f"{None if low_res is None else low_res.shape}"
            )
        batch, height, width, _ = x.shape
        upsampled = jax.image.resize(
            jnp.asarray(low_res, jnp.float32),
            (batch, height, width, self.in_channels),
            method="bilinear",
            antialias=False,
        )
        h = jnp.concatenate([jnp.asarray(x, jnp.float32), upsampled], axis=-1)
        return self.unet_forward(h, timesteps, y, train)
