"""Import of reference PyTorch checkpoints (openai/guided-diffusion ``UNetModel``,
``SuperResModel``, ``EncoderUNetModel`` state_dicts) into our Flax modules.

Our parameter names mirror the torch module paths (``input_blocks.1.0.in_layers.2.weight`` is
``params["input_blocks_1_0"]["in_layers_2"]["kernel"]``), so the mapping is mechanical: every
torch key is derived from a parameter of the module built from the same constructor kwargs, and
only the layouts change: conv OIHW -> HWIO, linear (out, in) -> (in, out), the 1-D convs of the
attention layers (O, I, 1) -> (in, out), AttentionPool2d's positional embedding (C, T) -> (T, C).

Python API: ``reference_model(kind, kwargs, state_dict) -> (module, variables)``,
``convert_state_dict``, ``load_state_dict``, ``state_dict_spec``.
CLI (writes an ``adm_jax.checkpoints`` inference checkpoint)::

    python -m adm_jax.convert --checkpoint 256x256_diffusion.pt \
        --flags "--attention_resolutions 32,16,8 --class_cond True ..." --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from adm_jax import paths
from adm_jax.models import (
    KINDS,
    abstract_params,
    count_params,
    module_from_kwargs,
    parse_flags,
    reference_kwargs_from_flags,
)

# Submodules that the reference implements as kernel-size-1 ``conv_nd(1, ...)`` over tokens.
CONV1D_MODULES = ("qkv", "proj_out", "qkv_proj", "c_proj")
_INDEXED_NAME = re.compile(r"(.*?)((?:_\d+)+)")
_MAX_LISTED = 25


class StateDictMismatchError(ValueError):
    """The state_dict does not fit the architecture; names every offending key."""

    def __init__(self, missing, unexpected, mis_shaped, context: str = ""):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mis_shaped = dict(mis_shaped)  # key -> (checkpoint shape, expected shape)
        parts = []
        if self.missing:
            parts.append(f"missing keys ({len(self.missing)}): {_listing(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys ({len(self.unexpected)}): {_listing(self.unexpected)}")
        if self.mis_shaped:
            shown = [f"{k} {tuple(a)} vs expected {tuple(b)}" for k, (a, b) in mis_shaped.items()]
            parts.append(f"mis-shaped keys ({len(shown)}): {_listing(shown)}")
        prefix = f"state_dict does not fit the model{context}"
        super().__init__(prefix + "; " + "; ".join(parts))


def _listing(items) -> str:
    items = list(items)
    text = ", ".join(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        text += f", ... and {len(items) - _MAX_LISTED} more"
    return text


@dataclasses.dataclass(frozen=True)
class TorchParam:
    """Where one reference tensor goes: its torch shape, our param path and the layout rule."""

    torch_shape: tuple[int, ...]
    flax_path: tuple[str, ...]
    flax_shape: tuple[int, ...]
    layout: str  # "conv2d" | "linear" | "conv1d" | "positional" | "same"


def _torch_module_path(flax_names) -> list[str]:
    parts = []
    for name in flax_names:
        match = _INDEXED_NAME.fullmatch(name)
        if match:
            parts.append(match.group(1))
            parts.extend(match.group(2)[1:].split("_"))
        else:
            parts.append(name)
    return parts


def _describe(flax_path: tuple[str, ...], flax_shape: tuple[int, ...]) -> tuple[str, TorchParam]:
    *modules, leaf = flax_path
    torch_modules = _torch_module_path(modules)
    if leaf == "kernel" and len(flax_shape) == 4:
        kh, kw, cin, cout = flax_shape
        torch_leaf, layout, shape = "weight", "conv2d", (cout, cin, kh, kw)
    elif leaf == "kernel" and modules[-1] in CONV1D_MODULES:
        torch_leaf, layout, shape = "weight", "conv1d", (flax_shape[1], flax_shape[0], 1)
    elif leaf == "kernel":
        torch_leaf, layout, shape = "weight", "linear", (flax_shape[1], flax_shape[0])
    elif leaf == "positional_embedding":
        torch_leaf, layout, shape = leaf, "positional", (flax_shape[1], flax_shape[0])
    elif leaf in ("scale", "embedding"):
        torch_leaf, layout, shape = "weight", "same", flax_shape
    elif leaf == "bias":
        torch_leaf, layout, shape = "bias", "same", flax_shape
    else:  # pragma: no cover - every parameter of our modules is one of the above
        raise AssertionError(f"no torch counterpart for parameter {'/'.join(flax_path)}")
    key = ".".join([*torch_modules, torch_leaf])
    return key, TorchParam(tuple(shape), tuple(flax_path), tuple(flax_shape), layout)


def state_dict_spec(kind: str, kwargs: Mapping[str, Any]) -> dict[str, TorchParam]:
    """The reference state_dict keys (and shapes) the architecture has, without allocating."""
    module = module_from_kwargs(kind, kwargs)
    flat = traverse_util.flatten_dict(abstract_params(module))
    spec = dict(_describe(path, tuple(leaf.shape)) for path, leaf in flat.items())
    return {key: spec[key] for key in sorted(spec, key=_natural_order)}


def _natural_order(key: str):
    """``input_blocks.2`` before ``input_blocks.10``, as the reference lists them."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in key.split(".")]


def check_state_dict(
    spec: Mapping[str, TorchParam], state_dict: Mapping[str, Any], context: str = ""
) -> None:
    """Raises one StateDictMismatchError naming every missing, unexpected and mis-shaped key."""
    missing = [k for k in spec if k not in state_dict]
    unexpected = [k for k in state_dict if k not in spec]
    mis_shaped = {
        k: (tuple(np.shape(state_dict[k])), spec[k].torch_shape)
        for k in spec
        if k in state_dict and tuple(np.shape(state_dict[k])) != spec[k].torch_shape
    }
    if missing or unexpected or mis_shaped:
        raise StateDictMismatchError(missing, unexpected, mis_shaped, context)


def convert_tensor(param: TorchParam, value: Any) -> np.ndarray:
    """One torch tensor (as a numpy array) in our layout; float32."""
    value = np.asarray(value)
    if param.layout == "conv2d":
        value = value.transpose(2, 3, 1, 0)
    elif param.layout == "conv1d":
        value = value[:, :, 0].T
    elif param.layout in ("linear", "positional"):
        value = value.T
    return np.ascontiguousarray(value, dtype=np.float32)


def iter_converted(
    spec: Mapping[str, TorchParam], state_dict: Mapping[str, Any]
) -> Iterator[tuple[str, TorchParam, np.ndarray]]:
    """Yields (torch key, param, converted array) one tensor at a time (bounded memory)."""
    for key, param in spec.items():
        value = convert_tensor(param, state_dict[key])
        assert value.shape == param.flax_shape, (key, value.shape, param.flax_shape)
        yield key, param, value


def convert_state_dict(
    kind: str, kwargs: Mapping[str, Any], state_dict: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``params`` pytree (jax arrays, float32) for a reference state_dict.

    Raises StateDictMismatchError when the checkpoint does not fit ``kwargs``.
    """
    spec = state_dict_spec(kind, kwargs)
    check_state_dict(spec, state_dict, context=f" (kind {kind!r})")
    flat = {
        param.flax_path: jnp.asarray(value) for _, param, value in iter_converted(spec, state_dict)
    }
    return traverse_util.unflatten_dict(flat)


def reference_model(kind: str, kwargs: Mapping[str, Any], state_dict: Mapping[str, Any]):
    """``(module, variables)`` for reference constructor ``kwargs`` and a torch state_dict.

    ``module.apply(variables, x, timesteps, y=None)`` ("unet", "classifier") or
    ``module.apply(variables, x, timesteps, low_res=..., y=None)`` ("superres"), NHWC float32.
    """
    module = module_from_kwargs(kind, kwargs)
    return module, {"params": convert_state_dict(kind, kwargs, state_dict)}


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a reference state_dict from .pt/.pth (needs torch), .npz or .safetensors, local
    or in a bucket (``gs://``, ``s3://``).

    In an .npz whose keys are namespaced like the golden vectors (``sd/<torch key>``), only the
    ``sd/`` entries are taken.
    """
    file = paths.path(path)
    path = os.fspath(file)
    suffix = file.suffix.lower()
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            import torch
        except ImportError:
            raise ImportError(
                f"checkpoint: reading {path} needs PyTorch (`pip install torch`, CPU build is "
                "enough); alternatively save the state_dict as .npz or .safetensors elsewhere"
            ) from None
        with file.open("rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
        if isinstance(state.get("state_dict"), Mapping):  # a training checkpoint wrapper
            state = state["state_dict"]
        return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()}
    if suffix == ".npz":
        with file.open("rb") as f, np.load(f) as archive:
            names = list(archive.keys())
            if any(n.startswith("sd/") for n in names):
                return {n[3:]: archive[n] for n in names if n.startswith("sd/")}
            return {n: archive[n] for n in names}
    if suffix == ".safetensors":
        from safetensors.numpy import load, load_file

        return load(file.read_bytes()) if paths.is_remote(file) else load_file(path)
    raise ValueError(
        f"checkpoint: unsupported file type {suffix!r} ({path}); use .pt, .npz or .safetensors"
    )


def infer_kind(flags: Mapping[str, Any]) -> str:
    """ "classifier" if classifier architecture flags are given, "superres" if large_size is."""
    classifier_arch = [
        k
        for k in flags
        if k.startswith("classifier_") and k not in ("classifier_scale", "classifier_path")
    ]
    if classifier_arch:
        return "classifier"
    if "large_size" in flags or "small_size" in flags:
        return "superres"
    return "unet"


def diffusion_kwargs_from_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """``create_diffusion`` kwargs from parsed README flags (reference defaults otherwise)."""
    if flags.get("rescale_timesteps", False):
        raise ValueError("rescale_timesteps: True is not supported (ADM's models use False)")
    try:
        from adm_jax.diffusion import diffusion_kwargs_from_flags as from_flags
    except ImportError:
        from_flags = None
    if from_flags is not None:
        from adm_jax.models.factory import DIFFUSION_DEFAULTS

        return from_flags({**DIFFUSION_DEFAULTS, "sigma_small": False, **flags})
    get = lambda name, default: flags.get(name, default)
    return dict(
        steps=int(get("diffusion_steps", 1000)),
        noise_schedule=str(get("noise_schedule", "linear")),
        learn_sigma=bool(get("learn_sigma", False)),
        sigma_small=bool(get("sigma_small", False)),
        use_kl=bool(get("use_kl", False)),
        predict_xstart=bool(get("predict_xstart", False)),
        rescale_learned_sigmas=bool(get("rescale_learned_sigmas", False)),
        timestep_respacing=str(get("timestep_respacing", "")),
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m adm_jax.convert",
        description="Convert a reference guided-diffusion checkpoint into an adm_jax inference "
        "checkpoint.",
    )
    parser.add_argument(
        "--checkpoint", required=True, help=".pt, .npz or .safetensors file (local or gs://)"
    )
    parser.add_argument(
        "--flags",
        default="",
        help='the reference README flags of the model, e.g. "--image_size 256 --class_cond True"',
    )
    parser.add_argument(
        "--out", required=True, help="output directory, local or gs:// (must not exist)"
    )
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default=None,
        help="default: classifier_* flags -> classifier, large_size -> superres, else unet",
    )
    args = parser.parse_args(argv)

    started = time.time()
    flags = parse_flags(args.flags)
    kind = args.kind or infer_kind(flags)
    model_kwargs = reference_kwargs_from_flags(kind, flags)
    diffusion_kwargs = diffusion_kwargs_from_flags(flags)
    how = "given" if args.kind else "inferred from the flags; override with --kind"
    print(f"[convert] kind {kind!r} ({how})", flush=True)
    print(f"[convert] reading {args.checkpoint}", flush=True)
    state_dict = load_state_dict(args.checkpoint)
    print(f"[convert] {len(state_dict)} tensors; mapping to {kind} parameters", flush=True)
    spec = state_dict_spec(kind, model_kwargs)
    check_state_dict(spec, state_dict, context=f" (kind {kind!r}, {how})")
    flat = {}
    for _, param, value in iter_converted(spec, state_dict):
        flat[param.flax_path] = value
    del state_dict
    params = traverse_util.unflatten_dict(flat)
    num_params = count_params(params)

    from adm_jax.checkpoints import save_inference_checkpoint

    out = save_inference_checkpoint(
        args.out,
        jax.tree.map(jnp.asarray, params),
        kind=kind,
        model_kwargs=model_kwargs,
        diffusion_kwargs=diffusion_kwargs,
        extra={
            "converted_from": paths.path(args.checkpoint).name,
            "reference_flags": args.flags,
        },
    )
    print(
        f"[convert] wrote {out}: {kind}, {num_params:,} parameters in {len(spec)} tensors, "
        f"{time.time() - started:.1f}s",
        flush=True,
    )
    return out


if __name__ == "__main__":
    try:
        main()
    except (ValueError, ImportError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
