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

import dataclasses
import os
import re
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, logging
from absl import flags as absl_flags
from flax import traverse_util

from adm_jax import checkpoints, cli_flags, paths
from adm_jax import diffusion as diffusion_lib
from adm_jax.models import (
    KINDS,
    NUM_CLASSES,
    abstract_params,
    count_params,
    module_from_kwargs,
    parse_flags,
    reference_kwargs_from_flags,
    with_shape,
)
from adm_jax.models.factory import DIFFUSION_DEFAULTS

# Submodules that the reference implements as kernel-size-1 ``conv_nd(1, ...)`` over tokens.
CONV1D_MODULES = ("qkv", "proj_out", "qkv_proj", "c_proj")
_INDEXED_NAME = re.compile(r"(.*?)((?:_\d+)+)")
_MODULE_PREFIX = "module."  # torch.nn.DataParallel / DistributedDataParallel state_dicts
# The README flag behind each reference constructor argument, per kind (for mismatch hints).
_UNET_FLAGS = {
    "model_channels": "num_channels",
    "out_channels": "learn_sigma",
    "num_classes": "class_cond",
    "num_res_blocks": "num_res_blocks",
    "channel_mult": "channel_mult",
    "attention_resolutions": "attention_resolutions",
    "use_scale_shift_norm": "use_scale_shift_norm",
    "resblock_updown": "resblock_updown",
}
_FLAG_NAMES = {
    "unet": _UNET_FLAGS,
    "superres": {**_UNET_FLAGS, "channel_mult": "large_size"},  # sr_create_model's table
    "classifier": {
        "model_channels": "classifier_width",
        "num_res_blocks": "classifier_depth",
        "channel_mult": "image_size",  # create_classifier's table
        "attention_resolutions": "classifier_attention_resolutions",
        "use_scale_shift_norm": "classifier_use_scale_shift_norm",
        "resblock_updown": "classifier_resblock_updown",
        "pool": "classifier_pool",
    },
}


class StateDictMismatchError(ValueError):
    """The state_dict does not fit the architecture.

    ``missing``, ``unexpected`` and ``mis_shaped`` (key -> (file shape, expected shape)) list
    every offending key; the message is ONE line: the first of them (in the reference's key
    order), the README flag most likely responsible (``hint``) and how many keys differ.
    """

    def __init__(self, missing, unexpected, mis_shaped, context: str = "", hint: str = ""):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mis_shaped = dict(mis_shaped)  # key -> (checkpoint shape, expected shape)
        self.hint = hint
        keys = sorted({*self.missing, *self.unexpected, *self.mis_shaped}, key=_natural_order)
        self.first = keys[0] if keys else None
        if self.first in self.mis_shaped:
            got, want = self.mis_shaped[self.first]
            what = f"{self.first} is {tuple(got)} in the file, expected {tuple(want)}"
        elif self.first in self.missing:
            what = f"{self.first} is missing from the file"
        else:
            what = f"{self.first} is in the file but not in this model"
        counts = (
            f"{len(keys)} {'key differs' if len(keys) == 1 else 'keys differ'} "
            f"({len(self.missing)} missing, {len(self.unexpected)} "
            f"unexpected, {len(self.mis_shaped)} mis-shaped)"
        )
        hint = f"; likely cause: {hint}" if hint else ""
        super().__init__(f"state_dict does not fit the model{context}: {what}{hint}; {counts}")


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
    spec: Mapping[str, TorchParam],
    state_dict: Mapping[str, Any],
    context: str = "",
    *,
    kind: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> None:
    """Raises one StateDictMismatchError (one line; every key in its attributes) unless the
    state_dict has exactly the keys and shapes of ``spec``. ``kind`` and ``kwargs`` (the
    constructor arguments ``spec`` was made from) let the message name the likely flag."""
    missing = [k for k in spec if k not in state_dict]
    unexpected = [k for k in state_dict if k not in spec]
    mis_shaped = {
        k: (tuple(np.shape(state_dict[k])), spec[k].torch_shape)
        for k in spec
        if k in state_dict and tuple(np.shape(state_dict[k])) != spec[k].torch_shape
    }
    if missing or unexpected or mis_shaped:
        file_shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
        expected = {k: p.torch_shape for k, p in spec.items()}
        hint = likely_flag(file_shapes, expected, kind=kind, kwargs=kwargs)
        raise StateDictMismatchError(missing, unexpected, mis_shaped, context, hint)


def strip_module_prefix(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """``(state_dict, stripped)``: keys without the ``module.`` prefix that
    ``torch.nn.DataParallel``/``DistributedDataParallel`` add, when EVERY key has it (then
    no key can be a reference name, so removing it cannot change which tensor goes where)."""
    state_dict = dict(state_dict)
    stripped = False
    while state_dict and all(k.startswith(_MODULE_PREFIX) for k in state_dict):
        state_dict = {k[len(_MODULE_PREFIX) :]: v for k, v in state_dict.items()}
        stripped = True
    return state_dict, stripped


# ----------------------------------------------------------------------------------------------
# Which flag makes a checkpoint not fit: compare the structure of the file with the model's.


def _block_count(shapes, prefix: str) -> int:
    indices = [int(k.split(".")[1]) for k in shapes if k.startswith(prefix + ".")]
    return max(indices) + 1 if indices else 0


def _out_width(shapes, block: int) -> int | None:
    """Output width of input block ``block``: its ResBlock's last conv or Downsample's op."""
    for leaf in ("0.out_layers.3.weight", "0.op.weight"):
        shape = shapes.get(f"input_blocks.{block}.{leaf}")
        if shape:
            return shape[0]
    return None


def _structure(shapes) -> dict[str, Any]:
    """The architecture facts a state_dict's shapes reveal (same function on file and model)."""
    stem = shapes.get("input_blocks.0.0.weight") or (None, None)
    n_in = _block_count(shapes, "input_blocks")
    emb = shapes.get("input_blocks.1.0.emb_layers.1.weight")
    width_1 = _out_width(shapes, 1)
    return {
        "decoder": any(k.startswith("output_blocks.") for k in shapes),
        "in_channels": stem[1],
        "model_channels": stem[0],
        "out_channels": (shapes.get("out.2.weight") or (None,))[0],
        "label_emb": shapes.get("label_emb.weight"),
        "input_blocks": n_in,
        "widths": tuple(_out_width(shapes, i) for i in range(1, n_in)),
        "attention": tuple(i for i in range(n_in) if f"input_blocks.{i}.1.qkv.weight" in shapes),
        "scale_shift": None if emb is None or not width_1 else emb[0] == 2 * width_1,
        "skips": tuple(
            i for i in range(n_in) if f"input_blocks.{i}.0.skip_connection.weight" in shapes
        ),
        "downsample_ops": tuple(
            i for i in range(n_in) if f"input_blocks.{i}.0.op.weight" in shapes
        ),
        "updown_resblocks": not any(k.endswith(".op.weight") for k in shapes),
        "pool": tuple(sorted(k for k in shapes if k.startswith("out."))),
    }


def _fits_layout(structure, num_res_blocks: int, levels: int) -> bool:
    """Whether input blocks as ``_structure`` found them can be ``levels`` levels of
    ``num_res_blocks`` ResBlocks each plus a downsampler: downsamplers keep the width and have
    no attention or skip connection, and the width changes only at a level's first block."""
    n, per = structure["input_blocks"], num_res_blocks + 1
    if num_res_blocks < 1 or n != levels * per:
        return False
    widths = (structure["model_channels"], *structure["widths"])  # widths[i]: block i's output
    for i in range(2, n):
        if i % per == 0:  # a downsampler
            if i in structure["attention"] or i in structure["skips"] or widths[i] != widths[i - 1]:
                return False
        elif i % per != 1 and widths[i] != widths[i - 1]:  # not a level's first ResBlock
            return False
    return True


def _fmt(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(_fmt(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def likely_flag(
    file_shapes: Mapping[str, tuple],
    expected_shapes: Mapping[str, tuple],
    *,
    kind: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> str:
    """The README flag most likely responsible for a checkpoint that does not fit, with the
    value the file suggests where the shapes tell it ("" when nothing stands out).

    Checked from the most to the least far-reaching difference (a different width changes
    every shape, so it is named before anything else).
    """
    got, want = _structure(file_shapes), _structure(expected_shapes)
    kind = kind or ("unet" if want["decoder"] else "classifier")
    flags = _FLAG_NAMES.get(kind, _UNET_FLAGS)
    kwargs = dict(kwargs or {})

    def flag(arg: str, value: Any = None) -> str:
        name = flags.get(arg, arg)
        if value is None:
            return f"--{name}"
        if arg == "channel_mult" and name != arg:  # derived from --image_size / --large_size
            return f"--{name} (the file's {arg} is {_fmt(value)})"
        return f"--{name} (the file suggests {_fmt(value)})"

    if got["decoder"] != want["decoder"]:
        file_kind = "a diffusion UNet/upsampler" if got["decoder"] else "a classifier"
        return f"--kind (the file holds {file_kind}, the model is a {kind})"
    if got["in_channels"] != want["in_channels"] and got["in_channels"]:
        if got["in_channels"] == 2 * (want["in_channels"] or 0):
            return "--kind superres (the file is an upsampler)"
        if 2 * got["in_channels"] == want["in_channels"]:
            return "--kind unet (the file is a base model, not an upsampler)"
        return f"--kind (the file takes {got['in_channels']} input channels)"
    if got["model_channels"] != want["model_channels"] and got["model_channels"]:
        return flag("model_channels", got["model_channels"])
    if got["out_channels"] != want["out_channels"] and got["out_channels"] and kind != "classifier":
        learned = got["out_channels"] == 2 * (want["in_channels"] or 3)
        return flag("out_channels", learned)
    if (got["label_emb"] is None) != (want["label_emb"] is None):
        return flag("num_classes", got["label_emb"] is not None)
    if got["label_emb"] != want["label_emb"]:
        return f"the number of classes (the file has {got['label_emb'][0]})"
    nrb = kwargs.get("num_res_blocks")
    levels = len(kwargs.get("channel_mult", ())) or None
    if got["input_blocks"] != want["input_blocks"]:
        # input blocks = levels * (num_res_blocks + 1): the stem, then per level the
        # ResBlocks and a Downsample (none after the last level).
        n, ops = got["input_blocks"], got["downsample_ops"]
        if ops:  # plain Downsample convs mark the level ends exactly
            file_nrb, file_levels = ops[0] - 1, len(ops) + 1
        else:  # ResBlock downsamplers: keep the layouts that the widths and attention allow
            layouts = {(n // lv - 1, lv) for lv in (levels, n // (nrb + 1) if nrb else None) if lv}
            layouts = [(r, lv) for r, lv in sorted(layouts) if _fits_layout(got, r, lv)]
            if len(layouts) != 1:
                return f"{flag('num_res_blocks')} or {flag('channel_mult')} (number of levels)"
            ((file_nrb, file_levels),) = layouts
        if file_nrb != nrb:
            return flag("num_res_blocks", file_nrb)
        return f"{flag('channel_mult')} (the file has {file_levels} levels, the model {levels})"
    if got["widths"] != want["widths"]:
        base = got["model_channels"]
        if nrb and base and got["input_blocks"] % (nrb + 1) == 0:
            firsts = [
                got["widths"][lvl * (nrb + 1)] for lvl in range(len(got["widths"]) // (nrb + 1) + 1)
            ]
            if all(w is not None for w in firsts):
                return flag("channel_mult", tuple(w / base for w in firsts))
        return flag("channel_mult")
    if got["attention"] != want["attention"]:
        size = kwargs.get("image_size")
        if nrb and size:
            res = sorted(
                {size // 2 ** ((i - 1) // (nrb + 1)) for i in got["attention"]}, reverse=True
            )
            return flag("attention_resolutions", tuple(res) if res else "none")
        return flag("attention_resolutions")
    if got["scale_shift"] != want["scale_shift"] and got["scale_shift"] is not None:
        return flag("use_scale_shift_norm", got["scale_shift"])
    if got["updown_resblocks"] != want["updown_resblocks"]:
        return flag("resblock_updown", got["updown_resblocks"])
    if got["pool"] != want["pool"] and kind == "classifier":
        return flag("pool")
    return ""


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

    Raises StateDictMismatchError when the checkpoint does not fit ``kwargs``. Keys saved
    through DataParallel/DDP (all prefixed ``module.``) are taken without the prefix.
    """
    state_dict, stripped = strip_module_prefix(state_dict)
    if stripped:
        logging.warning("state_dict: stripped the 'module.' prefix (DataParallel/DDP) of its keys")
    spec = state_dict_spec(kind, kwargs)
    check_state_dict(spec, state_dict, context=f" (kind {kind!r})", kind=kind, kwargs=kwargs)
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
    if not file.exists():
        raise FileNotFoundError(f"{path}: no such file")
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
    return diffusion_lib.diffusion_kwargs_from_flags(
        {**DIFFUSION_DEFAULTS, "sigma_small": False, **flags}
    )


USAGE = (
    'python -m adm_jax.convert --checkpoint FILE --out DIR [--flags "REFERENCE FLAGS"] '
    "[--kind unet|superres|classifier] [--in_channels N] [--num_classes N]"
)


def _flag_values() -> absl_flags.FlagValues:
    """The command's flags, on a ``FlagValues`` of their own (see ``adm_jax.cli_flags``)."""
    fv = absl_flags.FlagValues()
    absl_flags.DEFINE_string(
        "checkpoint", None, ".pt, .npz or .safetensors file (local or gs://)", flag_values=fv
    )
    absl_flags.DEFINE_string(
        "flags",
        "",
        'the reference README flags of the model, e.g. "--image_size 256 --class_cond True"',
        flag_values=fv,
    )
    absl_flags.DEFINE_string(
        "out", None, "output directory, local or gs:// (must not exist)", flag_values=fv
    )
    absl_flags.DEFINE_enum(
        "kind",
        None,
        KINDS,
        "default: classifier_* flags -> classifier, large_size -> superres, else unet",
        flag_values=fv,
    )
    absl_flags.DEFINE_integer(
        "in_channels",
        3,
        "image channels the model was trained on (the reference's models: 3)",
        flag_values=fv,
    )
    absl_flags.DEFINE_integer(
        "num_classes",
        NUM_CLASSES,
        "label range of a class-conditional model or classifier (the reference's: 1000)",
        flag_values=fv,
    )
    return fv


def main(argv: Sequence[str] | None = None) -> str:
    """``python -m adm_jax.convert ARGS`` as a function (``argv`` without the program name;
    None: ``sys.argv[1:]``): converts a reference checkpoint and returns the written
    inference-checkpoint directory. Bad input raises a one-line error naming the flag or file."""
    fv = _flag_values()
    extra = cli_flags.parse(fv, argv, usage=USAGE, required=["checkpoint", "out"])
    if extra:
        raise app.UsageError(f"unexpected arguments {extra} (flags are --name=value)")
    args = types.SimpleNamespace(**fv.flag_values_dict())

    started = time.time()
    flags = parse_flags(args.flags)
    kind = args.kind or infer_kind(flags)
    model_kwargs = with_shape(
        kind,
        reference_kwargs_from_flags(kind, flags),
        in_channels=args.in_channels,
        num_classes=args.num_classes,
    )
    diffusion_kwargs = diffusion_kwargs_from_flags(flags)
    how = "given" if args.kind else "inferred from the flags; override with --kind"
    print(f"[convert] kind {kind!r} ({how})", flush=True)
    print(f"[convert] reading {args.checkpoint}", flush=True)
    state_dict, stripped = strip_module_prefix(load_state_dict(args.checkpoint))
    if stripped:
        print("[convert] keys carry a 'module.' prefix (saved from DataParallel/DDP): stripped it")
    print(f"[convert] {len(state_dict)} tensors; mapping to {kind} parameters", flush=True)
    spec = state_dict_spec(kind, model_kwargs)
    check_state_dict(
        spec, state_dict, context=f" (kind {kind!r}, {how})", kind=kind, kwargs=model_kwargs
    )
    flat = {}
    for _, param, value in iter_converted(spec, state_dict):
        flat[param.flax_path] = value
    del state_dict
    params = traverse_util.unflatten_dict(flat)
    num_params = count_params(params)

    out = checkpoints.save_inference_checkpoint(
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
    cli_flags.run(main)
