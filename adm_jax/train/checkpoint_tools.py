"""``--mode=checkpoints`` (list a workdir's training checkpoints) and ``--mode=verify`` (check one).

Both only read: no Orbax manager that creates folders or cleans up temporary ones is built, so
they are safe to run while a training run writes to the same workdir (local or ``gs://``).

* list: every entry of ``WORKDIR/checkpoints`` with its step, whether Orbax counts it as
  complete (finalized: renamed from its temporary name locally, ``commit_success.txt`` in a
  bucket), its size and the time of its newest file. Temporary, unfinalized and ``.damaged``
  entries are listed as incomplete: they are never restored.
* verify: the step restores onto the abstract state ``--config`` builds (so shapes and dtypes
  match the config's model and optimizer), every floating leaf is finite, and the config
  stored with the checkpoint has the same ``model`` and ``diffusion`` settings.

Each failure is one ValueError/FileNotFoundError line naming the checkpoint and what is wrong.
"""

from __future__ import annotations

import dataclasses
import datetime
import json

import jax
import numpy as np
import orbax.checkpoint as ocp

from adm_jax import paths
from adm_jax.train import checkpointing

COMPARED_SECTIONS = ("model", "diffusion")


@dataclasses.dataclass(frozen=True)
class CheckpointEntry:
    name: str  # the entry's name in WORKDIR/checkpoints (the step, or a temporary name)
    step: int | None
    complete: bool
    size_bytes: int
    modified: float | None  # POSIX time of its newest file (None: empty)


def _stat_tree(folder) -> tuple[int, float | None]:
    size, newest = 0, None
    for rel in paths.walk_files(folder):
        stat = (folder / rel).stat()
        size += int(stat.length)
        newest = stat.mtime if newest is None else max(newest, stat.mtime)
    return size, newest


def list_checkpoints(workdir: paths.PathLike) -> list[CheckpointEntry]:
    """The entries of ``WORKDIR/checkpoints``, by step (FileNotFoundError if there is none)."""
    directory = checkpointing.checkpoint_dir(workdir)
    paths.refresh(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoints: no checkpoint directory {directory}")
    complete = set(ocp.step.checkpoint_steps(directory))
    entries = []
    for child in directory.iterdir():
        if not child.is_dir():
            continue
        try:
            step = ocp.step.step_from_checkpoint_name(child.name)
        except ValueError:
            step = None
        try:
            size, modified = _stat_tree(child)
        except FileNotFoundError:  # removed while we looked (a running job's retention)
            continue
        is_complete = child.name.isdigit() and step in complete
        entries.append(CheckpointEntry(child.name, step, is_complete, size, modified))
    return sorted(entries, key=lambda e: (e.step if e.step is not None else -1, e.name))


def format_listing(workdir: paths.PathLike, entries: list[CheckpointEntry]) -> str:
    lines = [f"{checkpointing.checkpoint_dir(workdir)}:", "step  state       size  modified (UTC)"]
    for e in entries:
        when = (
            datetime.datetime.fromtimestamp(e.modified, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
            if e.modified is not None
            else "-"
        )
        state = "complete" if e.complete else "INCOMPLETE"
        step = str(e.step) if e.step is not None else "?"
        extra = "" if e.complete or e.name == step else f"  ({e.name})"
        lines.append(f"{step:>4}  {state:<10} {_human(e.size_bytes):>6}  {when}{extra}")
    if not entries:
        lines.append("(no checkpoints)")
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n}"


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
    from adm_jax.recipe import config as config_lib

    current = json.loads(json.dumps(config_lib.config_to_dict(config)))
    out = []
    for section in COMPARED_SECTIONS:
        theirs = _flatten(stored.get(section, {}), section)
        ours = _flatten(current.get(section, {}), section)
        for key in sorted(set(theirs) | set(ours)):
            if theirs.get(key, "<absent>") != ours.get(key, "<absent>"):
                out.append(
                    f"{key}: {theirs.get(key, '<absent>')!r} in the checkpoint, "
                    f"{ours.get(key, '<absent>')!r} in --config"
                )
    return out


def _abstract_state(config):
    """ShapeDtypeStructs of the TrainState ``config`` trains, replicated on every device (a
    check needs every value, not the training mesh)."""
    from adm_jax.checkpoints import replicated_sharding
    from adm_jax.recipe import config as config_lib
    from adm_jax.train import state as state_lib

    module = config_lib.build_model(config)
    init = state_lib.make_init_fn(module, config, state_lib.make_optimizer(config.train))
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    sharding = replicated_sharding()
    place = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)  # noqa: E731
    return jax.tree.map(place, abstract)


def nonfinite_leaves(tree) -> list[str]:
    """Key paths of the floating leaves holding NaN or Inf."""
    bad = []
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        value = np.asarray(jax.device_get(leaf))
        if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
            bad.append(jax.tree_util.keystr(key_path))
    return bad


def verify(config, workdir: paths.PathLike, step: int | None = None) -> str:
    """Checks checkpoint ``step`` (default: the newest complete one); returns a one-line
    summary, raises ValueError / FileNotFoundError (one line) on the first problem."""
    directory = checkpointing.checkpoint_dir(workdir)
    entries = {e.step: e for e in list_checkpoints(workdir) if e.complete}
    if step is None:
        if not entries:
            raise FileNotFoundError(f"checkpoints: no complete checkpoint in {directory}")
        step = max(entries)
    where = f"checkpoint {directory / str(step)}"
    if step not in entries:
        found = ", ".join(map(str, sorted(entries))) or "none"
        raise FileNotFoundError(f"{where}: no such complete checkpoint (complete: {found})")
    ckpt = checkpointing.Checkpointer(workdir, max_to_keep=None, async_save=False, read_only=True)
    try:
        try:
            stored = ckpt.restore_config(step)
        except Exception as err:  # noqa: BLE001 - Orbax/TensorStore raise many types
            raise ValueError(f"{where}: its config cannot be read ({_reason(err)})") from err
        differences = config_differences(stored, config)
        if differences:
            more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
            raise ValueError(f"{where}: does not match --config: {differences[0]}{more}")
        try:
            state, _ = ckpt.restore(_abstract_state(config), step)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"{where}: cannot be restored ({_reason(err)})") from err
    finally:
        ckpt.close()
    bad = nonfinite_leaves(state)
    if bad:
        raise ValueError(f"{where}: {len(bad)} leaves hold NaN/Inf, first {bad[0]}")
    num_leaves = len(jax.tree.leaves(state))
    size = entries[step].size_bytes
    return (
        f"{where}: OK (restores onto --config's model and optimizer, {num_leaves} leaves all "
        f"finite, model and diffusion settings match; {_human(size)})"
    )


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return f"{type(err).__name__}: {line[:300]}"


def main_checkpoints(workdir: str) -> None:
    """``--mode=checkpoints``: prints the listing."""
    print(format_listing(workdir, list_checkpoints(workdir)), flush=True)


def main_verify(config, workdir: str, step: int | None) -> None:
    """``--mode=verify``: prints the summary line (or raises the one-line error)."""
    print(verify(config, workdir, step), flush=True)


__all__ = [
    "CheckpointEntry",
    "config_differences",
    "format_listing",
    "list_checkpoints",
    "nonfinite_leaves",
    "verify",
]
