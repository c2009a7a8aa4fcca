"""Inference checkpoints: EMA parameters plus what is needed to rebuild the model.

One format is shared by ``--mode=export``, the reference-checkpoint converter and the
sampler, so a converted OpenAI checkpoint and one of our own training runs load the same way.

Layout of a checkpoint directory::

        DIR/params/      Orbax StandardCheckpointer pytree: the float32 ``params`` collection
        DIR/model.json   {"kind", "model_kwargs", "diffusion_kwargs", "extra"}

``params`` is a plain Orbax checkpoint, so ``ocp.StandardCheckpointer().restore(DIR/"params")``
loads it without this package. ``model_kwargs`` uses the reference constructor's argument
names (see ``adm_jax.models.module_from_kwargs``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from adm_jax import paths
from adm_jax.models import module_from_kwargs

MODEL_JSON = "model.json"
PARAMS_DIR = "params"
KINDS = ("unet", "superres", "classifier")


@dataclasses.dataclass
class InferenceCheckpoint:
    kind: str
    model_kwargs: dict[str, Any]
    diffusion_kwargs: dict[str, Any] | None
    params: Any
    extra: dict[str, Any]

    def module(self, **overrides):
        """The linen module these parameters belong to (overrides: dtype, remat, ...)."""
        return module_from_kwargs(self.kind, self.model_kwargs, **overrides)


def replicated_sharding() -> jax.sharding.NamedSharding:
    """Every leaf whole on every device of every process (the default for inference params:
    ``jax.devices()[0]`` belongs to process 0 alone)."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("replica",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def is_inference_checkpoint(path: str | os.PathLike) -> bool:
    return (paths.resolved(path) / MODEL_JSON).is_file()


def save_inference_checkpoint(
    path: str | os.PathLike,
    params: Any,
    *,
    kind: str,
    model_kwargs: Mapping[str, Any],
    diffusion_kwargs: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Writes ``params`` and the model description to ``path`` (created; must not exist)."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    path = paths.resolved(path)
    params_path = path / PARAMS_DIR
    if params_path.exists():
        if (path / MODEL_JSON).exists():
            raise ValueError(f"out: {params_path} already exists; choose an empty directory")
        # No model.json: a save that was killed before it finished; written again.
        if jax.process_index() == 0:
            params_path.rmtree()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("adm_jax.save_inference_checkpoint.clean")
    path.mkdir(parents=True, exist_ok=True)
    paths.bound_tensorstore_retries()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_path, params)
        ckptr.wait_until_finished()
    description = {
        "kind": kind,
        "model_kwargs": _jsonable(dict(model_kwargs)),
        "diffusion_kwargs": None if diffusion_kwargs is None else _jsonable(dict(diffusion_kwargs)),
        "extra": _jsonable(dict(extra or {})),
    }
    if jax.process_index() == 0:
        # Written last, in one write (atomic on object stores): its presence marks a
        # complete checkpoint (``is_inference_checkpoint``).
        (path / MODEL_JSON).write_text(json.dumps(description, indent=2, sort_keys=True))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("adm_jax.save_inference_checkpoint")
    return os.fspath(path)


def load_inference_checkpoint(
    path: str | os.PathLike, *, sharding: Any = None
) -> InferenceCheckpoint:
    """Restores an inference checkpoint.

    ``sharding``: None (replicated on every device), a single ``jax.sharding.Sharding``
    applied to every leaf, or a pytree of shardings matching the parameters. The stored arrays
    can come from any mesh or device count.
    """
    path = paths.resolved(path)
    json_path = path / MODEL_JSON
    if not json_path.is_file():
        raise FileNotFoundError(
            f"checkpoint: {path} is not an adm_jax inference checkpoint (no {MODEL_JSON}); "
            "create one with `python -m adm_jax.main --mode=export` or `python -m adm_jax.convert`"
        )
    description = json.loads(json_path.read_text())
    params_path = path / PARAMS_DIR
    paths.bound_tensorstore_retries()
    with ocp.StandardCheckpointer() as ckptr:
        metadata = ckptr.metadata(params_path)
        tree = metadata.item_metadata if hasattr(metadata, "item_metadata") else metadata
        tree = getattr(tree, "tree", tree)
        if sharding is None:
            sharding = replicated_sharding()
        if isinstance(sharding, jax.sharding.Sharding):
            shardings = jax.tree.map(lambda _: sharding, tree)
        else:
            shardings = sharding
        abstract = jax.tree.map(
            lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), tree, shardings
        )
        params = ckptr.restore(params_path, abstract)
    return InferenceCheckpoint(
        kind=description["kind"],
        model_kwargs=description["model_kwargs"],
        diffusion_kwargs=description.get("diffusion_kwargs"),
        params=params,
        extra=description.get("extra") or {},
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value
