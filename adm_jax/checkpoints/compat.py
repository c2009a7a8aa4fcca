"""Does a checkpoint fit a config? The one comparison behind every such check.

``differences`` compares two flat mappings field by field (tuples and lists alike, so a value
read back from JSON equals the one a config holds). Each reader of checkpoints asks it about
the fields that matter to it and words the answer for its own error:

* ``check_matches_config``: sampling and ``--mode=nll`` -- an inference checkpoint's model
  and diffusion against the config about to use it (sampling a checkpoint with the wrong
  config "works" and yields noise, so this makes it an error);
* ``architecture_difference``: ``train.init_from`` -- the arguments that shape the parameters
  (a new class count is allowed: ``init_from.merge_params`` checks those leaf by leaf);
* ``config_differences``: ``--mode=verify`` -- the ``model`` and ``diffusion`` sections of the
  config stored with a training checkpoint against ``--config``, every field.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any

from adm_jax import recipe
from adm_jax.recipe import config as config_lib
from adm_jax.recipe import config_get

# Reference kwargs that do not change what a checkpoint computes at inference.
_IGNORED_MODEL_KWARGS = frozenset({"dropout", "use_fp16", "use_checkpoint", "dims"})
# create_diffusion kwargs that change sampling (use_kl / rescaling only change training).
_SAMPLING_DIFFUSION_KWARGS = (
    "steps",
    "noise_schedule",
    "learn_sigma",
    "sigma_small",
    "predict_xstart",
)
# Constructor arguments that do not change the parameters (or are checked leaf by leaf).
_NOT_ARCHITECTURE = frozenset(
    {"use_fp16", "use_checkpoint", "dropout", "num_classes", "null_class_embedding"}
)
# The config sections --mode=verify holds against --config.
COMPARED_SECTIONS = ("model", "diffusion")

_SKIP = object()  # ``differences``' default: a field absent on either side is not compared


@dataclasses.dataclass(frozen=True)
class Difference:
    name: str
    checkpoint: Any  # normalized; the ``missing`` value when the checkpoint lacks the field
    config: Any


def normalize(value: Any) -> Any:
    """Tuples as lists, recursively (what a JSON round trip does to a value)."""
    if isinstance(value, (list, tuple)):
        return [normalize(v) for v in value]
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items()}
    return value


def differences(
    checkpoint: Mapping[str, Any],
    config: Mapping[str, Any],
    names: Iterable[str],
    *,
    missing: Any = _SKIP,
) -> list[Difference]:
    """The fields among ``names`` (in that order) whose normalized values differ. A field
    absent on one side is skipped, or compared as the value ``missing`` when one is given."""
    out = []
    for name in names:
        if missing is _SKIP and (name not in checkpoint or name not in config):
            continue
        got = normalize(checkpoint.get(name, missing))
        want = normalize(config.get(name, missing))
        if got != want:
            out.append(Difference(name, got, want))
    return out


def check_matches_config(ckpt: Any, config: Any, path: str) -> None:
    """Raises if the checkpoint's architecture or diffusion differs from ``config``.

    Sampling a checkpoint with the wrong config "works" and yields noise; this makes it an
    error. Skipped for config sections that are absent or empty.
    """
    found = []
    model_cfg = config_get(config, "model")
    if model_cfg:
        kind = config_get(model_cfg, "kind", ckpt.kind)
        if kind != ckpt.kind:
            found.append(f"kind={ckpt.kind!r} (checkpoint) vs {kind!r} (config)")
        else:
            # A missing null_class_embedding is False (the reference's kwargs lack it).
            got = {"null_class_embedding": False, **ckpt.model_kwargs}
            want = {"null_class_embedding": False, **recipe.model_kwargs(config)}
            found += _worded(differences(got, want, sorted(set(got) - _IGNORED_MODEL_KWARGS)))
    diffusion_cfg = config_get(config, "diffusion")
    if diffusion_cfg and ckpt.diffusion_kwargs:
        diffusion = recipe.to_dict(diffusion_cfg)
        found += _worded(differences(ckpt.diffusion_kwargs, diffusion, _SAMPLING_DIFFUSION_KWARGS))
    if found:
        raise ValueError(f"checkpoint {path} does not match the config: {'; '.join(found)}")


def _worded(found: list[Difference]) -> list[str]:
    return [f"{d.name}={d.checkpoint!r} (checkpoint) vs {d.config!r} (config)" for d in found]


def architecture_difference(source_kwargs, target_kwargs, kind: str) -> str | None:
    """The first constructor argument (by name) that gives the source checkpoint's parameters
    another structure than this config's model, in words; None if there is none."""
    ignored = _NOT_ARCHITECTURE | ({"out_channels"} if kind == "classifier" else set())
    names = sorted((set(source_kwargs) | set(target_kwargs)) - ignored)
    found = differences(source_kwargs, target_kwargs, names, missing=None)
    if not found:
        return None
    first = found[0]
    source, target = first.checkpoint, first.config
    return f"{first.name}: the source has {source!r}, this config's model {target!r}"


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_differences(stored: dict, config) -> list[str]:
    """``"model.num_channels: 64 in the checkpoint, 32 in --config"`` for each model/diffusion
    field that differs (json round-trip on both sides: tuples vs lists do not count)."""
    current = json.loads(json.dumps(config_lib.config_to_dict(config)))
    out = []
    for section in COMPARED_SECTIONS:
        theirs = _flatten(stored.get(section, {}), section)
        ours = _flatten(current.get(section, {}), section)
        names = sorted(set(theirs) | set(ours))
        for d in differences(theirs, ours, names, missing="<absent>"):
            out.append(f"{d.name}: {d.checkpoint!r} in the checkpoint, {d.config!r} in --config")
    return out


__all__ = [
    "Difference",
    "architecture_difference",
    "check_matches_config",
    "config_differences",
    "differences",
    "normalize",
]
