"""Building networks from reference arguments, mirroring guided_diffusion/script_util.py
(``model_and_diffusion_defaults``, ``classifier_defaults``, ``sr_model_and_diffusion_defaults``,
``create_model``, ``create_classifier``, ``sr_create_model``).

Two levels of description exist, both with the reference's own names:
README *flags* (``--image_size 256 --attention_resolutions 32,16,8 ...``) and the *constructor
kwargs* the model classes receive (``attention_resolutions=(8, 16, 32)`` as ds factors).
``reference_kwargs_from_flags`` turns the first into the second exactly as script_util does;
``module_from_kwargs`` builds our module from the second (what checkpoints store).
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adm_jax.models.classifier import EncoderUNet
from adm_jax.models.unet import SuperResUNet, UNet
from adm_jax.reference_defaults import (
    CLASSIFIER_DEFAULTS,
    DIFFUSION_DEFAULTS,
    MODEL_DEFAULTS,
    NUM_CLASSES,
    SCRIPT_FLAGS,
    SR_DEFAULTS,
)

KINDS = ("unet", "superres", "classifier")
# Every flag of the reference scripts, with its default (adm_jax.reference_defaults).
KNOWN_FLAGS = {
    **SCRIPT_FLAGS,
    **DIFFUSION_DEFAULTS,
    **MODEL_DEFAULTS,
    **CLASSIFIER_DEFAULTS,
    **SR_DEFAULTS,
}

# Constructor kwargs of the reference classes that have no effect on our modules.
IGNORED_KWARGS = ("use_fp16", "use_checkpoint")


def _str2bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("yes", "true", "t", "y", "1"):
        return True
    if text in ("no", "false", "f", "n", "0"):
        return False
    raise ValueError(f"expected a boolean, got {value!r}")


def parse_flags(flags: str | Mapping[str, Any]) -> dict[str, Any]:
    """README flags (a ``"--name value ..."`` string or a mapping) typed like the reference's
    argparse (``add_dict_to_argparser``); only the flags given are returned.

    Unknown flag names raise a ValueError naming them, so a typo cannot silently fall back to a
    default.
    """
    if isinstance(flags, str):
        tokens = shlex.split(flags)
        items = {}
        i = 0
        while i < len(tokens):
            token = tokens[i]
            if not token.startswith("--"):
                raise ValueError(f"flags: expected --name, got {token!r}")
            if "=" in token:
                name, value = token[2:].split("=", 1)
                i += 1
            else:
                if i + 1 >= len(tokens):
                    raise ValueError(f"{token[2:]}: flag has no value")
                name, value = token[2:], tokens[i + 1]
                i += 2
            items[name] = value
    else:
        items = dict(flags)
    parsed = {}
    for name, value in items.items():
        if name not in KNOWN_FLAGS:
            raise ValueError(f"{name}: not a flag of the reference scripts")
        default = KNOWN_FLAGS[name]
        try:
            if isinstance(default, bool):
                parsed[name] = _str2bool(value)
            elif isinstance(default, int):
                parsed[name] = int(value)
            elif isinstance(default, float):
                parsed[name] = float(value)
            else:
                parsed[name] = str(value)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    return parsed


def _attention_ds(resolutions: str, image_size: int) -> tuple[int, ...]:
    return tuple(image_size // int(r) for r in str(resolutions).split(","))


def _default_channel_mult(size: int, table: Mapping[int, tuple], field: str) -> tuple:
    if size not in table:
        raise ValueError(f"{field}: unsupported size {size}; the reference knows {sorted(table)}")
    return table[size]


_UNET_MULTS = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}
_SR_MULTS = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}


def _unet_kwargs(a: Mapping[str, Any], size: int, channel_mult, new_attention_order: bool):
    """UNetModel / SuperResModel kwargs as create_model and sr_create_model pass them."""
    return dict(
        image_size=size,
        in_channels=3,
        model_channels=a["num_channels"],
        out_channels=6 if a.get("learn_sigma", False) else 3,
        num_res_blocks=a["num_res_blocks"],
        attention_resolutions=_attention_ds(a["attention_resolutions"], size),
        dropout=a["dropout"],
        channel_mult=channel_mult,
        conv_resample=True,
        num_classes=NUM_CLASSES if a["class_cond"] else None,
        use_checkpoint=a["use_checkpoint"],
        use_fp16=a["use_fp16"],
        num_heads=a["num_heads"],
        num_head_channels=a["num_head_channels"],
        num_heads_upsample=a["num_heads_upsample"],
        use_scale_shift_norm=a["use_scale_shift_norm"],
        resblock_updown=a["resblock_updown"],
        use_new_attention_order=new_attention_order,
    )


def reference_kwargs_from_flags(kind: str, flags: str | Mapping[str, Any]) -> dict[str, Any]:
    """Constructor kwargs that script_util's create_model / sr_create_model / create_classifier
    would pass for these README flags (missing flags take the reference defaults)."""
    args = parse_flags(flags)
    if kind == "unet":
        a = {**MODEL_DEFAULTS, **args}
        size = a["image_size"]
        if a["channel_mult"] == "":
            channel_mult = _default_channel_mult(size, _UNET_MULTS, "image_size")
        else:
            channel_mult = tuple(int(m) for m in a["channel_mult"].split(","))
        return _unet_kwargs(a, size, channel_mult, a["use_new_attention_order"])
    if kind == "superres":
        a = {**MODEL_DEFAULTS, **SR_DEFAULTS, **args}
        size = a["large_size"]
        channel_mult = _default_channel_mult(size, _SR_MULTS, "large_size")
        # sr_create_model does not pass use_new_attention_order: always the legacy order.
        return _unet_kwargs(a, size, channel_mult, False)
    if kind == "classifier":
        a = {**CLASSIFIER_DEFAULTS, **args}
        size = a["image_size"]
        return dict(
            image_size=size,
            in_channels=3,
            model_channels=a["classifier_width"],
            out_channels=NUM_CLASSES,
            num_res_blocks=a["classifier_depth"],
            attention_resolutions=_attention_ds(a["classifier_attention_resolutions"], size),
            dropout=0.0,
            channel_mult=_default_channel_mult(size, _UNET_MULTS, "image_size"),
            conv_resample=True,
            use_checkpoint=False,
            use_fp16=a["classifier_use_fp16"],
            num_heads=1,
            num_head_channels=64,
            num_heads_upsample=-1,
            use_scale_shift_norm=a["classifier_use_scale_shift_norm"],
            resblock_updown=a["classifier_resblock_updown"],
            use_new_attention_order=False,
            pool=a["classifier_pool"],
        )
    raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")


def with_shape(
    kind: str, kwargs: Mapping[str, Any], *, in_channels: int = 3, num_classes: int = NUM_CLASSES
) -> dict[str, Any]:
    """Reference constructor kwargs for ``in_channels`` image channels and ``num_classes``
    labels (the reference fixes RGB and ImageNet's 1000 classes; the defaults leave the kwargs
    unchanged). A learned-variance UNet outputs twice its input channels."""
    kwargs = dict(kwargs)
    learn_sigma = kind != "classifier" and kwargs["out_channels"] == 2 * kwargs["in_channels"]
    kwargs["in_channels"] = int(in_channels)
    if kind == "classifier":
        kwargs["out_channels"] = int(num_classes)
        return kwargs
    kwargs["out_channels"] = int(in_channels) * (2 if learn_sigma else 1)
    if kwargs.get("num_classes") is not None:
        kwargs["num_classes"] = int(num_classes)
    return kwargs


def module_from_kwargs(
    kind: str,
    kwargs: Mapping[str, Any],
    *,
    dtype: Any = jnp.float32,
    remat: str | bool = "none",
    attention_impl: str = "auto",
):
    """Our module for reference constructor kwargs (as stored in checkpoints and golden JSON).

    ``use_fp16`` / ``use_checkpoint`` are accepted and ignored: precision is ``dtype`` and
    rematerialisation is ``remat`` (a policy name, see ``unet.REMAT_POLICIES``) here;
    ``attention_impl`` picks the attention kernel. Unknown kwargs raise a ValueError naming
    them.
    """
    classes = {"unet": UNet, "superres": SuperResUNet, "classifier": EncoderUNet}
    if kind not in classes:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    cls = classes[kind]
    kwargs = dict(kwargs)
    dims = kwargs.pop("dims", 2)
    if dims != 2:
        raise ValueError(f"dims: only 2-D images are supported, got {dims}")
    for name in IGNORED_KWARGS:
        kwargs.pop(name, None)
    fields = {f for f in cls.__dataclass_fields__ if f not in ("parent", "name")}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"{unknown[0]}: not an argument of the reference {kind} constructor")
    for name in ("attention_resolutions", "channel_mult"):
        if name in kwargs:
            kwargs[name] = tuple(kwargs[name])
    return cls(**kwargs, dtype=dtype, remat=remat, attention_impl=attention_impl)


def example_inputs(module, batch_size: int = 1) -> tuple[tuple, dict]:
    """Zero (args, kwargs) of the right shapes for ``module.init`` / ``jax.eval_shape``."""
    size = module.image_size
    x = jnp.zeros((batch_size, size, size, module.in_channels), jnp.float32)
    t = jnp.zeros((batch_size,), jnp.int32)
    kwargs = {}
    if isinstance(module, SuperResUNet):
        kwargs["low_res"] = jnp.zeros((batch_size, size // 4, size // 4, module.in_channels))
    if getattr(module, "num_classes", None) is not None:
        kwargs["y"] = jnp.zeros((batch_size,), jnp.int32)
    return (x, t), kwargs


def abstract_params(module) -> Any:
    """The ``params`` pytree as ShapeDtypeStructs, without allocating (``jax.eval_shape``)."""

    def init(rng):
        args, kwargs = example_inputs(module)
        return module.init(rng, *args, **kwargs)["params"]

    return jax.eval_shape(init, jax.random.key(0))


def count_params(params) -> int:
    """Number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params))
