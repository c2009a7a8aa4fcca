"""Fine-tuning: ``train.init_from`` starts a run from another model's parameters.

The source is anything ``restore_inference`` reads: a converted reference checkpoint, an
exported inference checkpoint, or another run's workdir (its EMA). The run starts at step 0
with a fresh optimizer and every EMA equal to the loaded parameters, as the reference's
``--resume_checkpoint`` does when it is given a released model.

Compatibility is checked before anything is replaced: the first architecture argument that
differs (``compat.architecture_difference``), then the first parameter whose name or shape
differs, is reported in one line. A new class count is the one allowed difference: the label
embedding (diffusion models) or the classifier head's output layer is re-initialised, and a
model that only gains the classifier-free null label keeps every trained row.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from flax import traverse_util

from adm_jax.checkpoints.compat import architecture_difference
from adm_jax.checkpoints.restore import restore_inference
from adm_jax.models import count_params
from adm_jax.recipe import config as config_lib


class InitFromError(ValueError):
    """``train.init_from`` names parameters that do not fit this config's model."""


@dataclasses.dataclass(frozen=True)
class LoadedParams:
    params: Any  # the training model's params tree
    source: str
    step: int | None  # the source's training step, when it has one
    reinitialised: tuple[str, ...]  # parameter paths kept at their fresh initialisation
    extended: tuple[str, ...]  # parameter paths whose trained rows were kept, new rows fresh


def _classes(kind: str, kwargs) -> int | None:
    return kwargs.get("out_channels") if kind == "classifier" else kwargs.get("num_classes")


def merge_params(fresh: Any, loaded: Any, *, source_classes, target_classes) -> tuple:
    """(params, reinitialised, extended): ``loaded`` leaves where they fit ``fresh``.

    A leaf may differ only along axes where the source has ``source_classes`` entries and the
    target ``target_classes`` (a new class count, or one more row for the null label); any
    other difference raises InitFromError naming the parameter.
    """
    fresh_flat = traverse_util.flatten_dict(fresh, sep="/")
    loaded_flat = traverse_util.flatten_dict(loaded, sep="/")
    missing = sorted(set(fresh_flat) - set(loaded_flat))
    if missing:
        raise InitFromError(f"{missing[0]}: this model has it, the source checkpoint does not")
    unexpected = sorted(set(loaded_flat) - set(fresh_flat))
    if unexpected:
        raise InitFromError(f"{unexpected[0]}: in the source checkpoint, not in this model")
    merged, reinitialised, extended = {}, [], []
    for name in sorted(fresh_flat):
        new, old = fresh_flat[name], loaded_flat[name]
        if tuple(new.shape) == tuple(old.shape):
            merged[name] = jnp.asarray(old, new.dtype)
            continue
        axes = [i for i, (a, b) in enumerate(zip(old.shape, new.shape, strict=False)) if a != b]
        class_axes = len(old.shape) == len(new.shape) and all(
            old.shape[i] in (source_classes, source_classes + 1)
            and new.shape[i] in (target_classes, target_classes + 1)
            for i in axes
        )
        if source_classes is None or target_classes is None or not class_axes:
            raise InitFromError(
                f"{name}: shape {tuple(old.shape)} in the source checkpoint, "
                f"{tuple(new.shape)} in this model"
            )
        if source_classes == target_classes and len(axes) == 1:
            # Same classes, one more row: the null label of classifier-free guidance.
            rows = old.shape[axes[0]]
            index = tuple(slice(0, rows) if i == axes[0] else slice(None) for i in range(new.ndim))
            merged[name] = new.at[index].set(jnp.asarray(old, new.dtype))
            extended.append(name)
        else:
            merged[name] = new
            reinitialised.append(name)
    return traverse_util.unflatten_dict(merged, sep="/"), tuple(reinitialised), tuple(extended)


def load_init_params(config, fresh_params) -> LoadedParams:
    """Reads ``config.train.init_from`` and fits it to ``fresh_params`` (this model's freshly
    initialised parameters). Raises InitFromError / FileNotFoundError with one line."""
    source = str(config.train.init_from)
    try:
        restored = restore_inference(source)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"train.init_from: {err}") from None
    kind = config.model.kind
    if restored.kind != kind:
        raise InitFromError(
            f"train.init_from: {source} holds a {restored.kind!r} model, this config trains "
            f"a {kind!r}"
        )
    target_kwargs = config_lib.model_kwargs(config)
    difference = architecture_difference(restored.model_kwargs, target_kwargs, kind)
    if difference:
        raise InitFromError(f"train.init_from: {source}: {difference}")
    source_classes = _classes(kind, restored.model_kwargs)
    target_classes = _classes(kind, target_kwargs)
    try:
        params, reinitialised, extended = merge_params(
            fresh_params,
            restored.params,
            source_classes=source_classes,
            target_classes=target_classes,
        )
    except InitFromError as err:
        raise InitFromError(f"train.init_from: {source}: {err}") from None
    step = restored.extra.get("step")
    return LoadedParams(
        params=params,
        source=source,
        step=None if step is None else int(step),
        reinitialised=reinitialised,
        extended=extended,
    )


def apply_init_from(config, state, shardings):
    """The fresh TrainState with its params and every EMA replaced by ``train.init_from``'s
    (placed in the state's shardings); optimizer state and step stay fresh."""
    loaded = load_init_params(config, state.params)
    count = count_params(loaded.params)
    logging.info(
        "train.init_from: %d parameters from %s%s", count, loaded.source,
        "" if loaded.step is None else f" (its step {loaded.step})",
    )  # fmt: skip
    for name in loaded.reinitialised:
        logging.warning(
            "train.init_from: %s re-initialised (the class count changed to %d)",
            name, config_lib.num_classes(config),
        )  # fmt: skip
    for name in loaded.extended:
        logging.info("train.init_from: %s keeps its trained rows; the null-label row is new", name)
    params = jax.device_put(loaded.params, shardings.params)
    ema = tuple(jax.device_put(loaded.params, s) for s in shardings.ema_params)
    return state.replace(params=params, ema_params=ema), loaded
