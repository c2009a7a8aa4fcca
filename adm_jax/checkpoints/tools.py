"""Listing a workdir's training checkpoints and checking one: what ``--mode=checkpoints`` and
``--mode=verify`` print (``adm_jax.train.checkpoint_modes`` runs them).

Both only read: no Orbax manager that creates folders or cleans up temporary ones is built, so
they are safe to run while a training run writes to the same workdir (local or ``gs://``).

* list: every entry of ``WORKDIR/checkpoints`` with its step, whether Orbax counts it as
  complete (finalized: renamed from its temporary name locally, ``commit_success.txt`` in a
  bucket), its size and the time of its newest file. Temporary, unfinalized and ``.damaged``
  entries are listed as incomplete: they are never restored.
* verify: the config stored with the checkpoint has the same ``model`` and ``diffusion``
  settings (``compat.config_differences``), the step restores onto the abstract state
  ``--config`` builds (so shapes and dtypes match the config's model and optimizer), and every
  floating leaf is finite.

Each failure is one ValueError/FileNotFoundError line naming the checkpoint and what is wrong.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from adm_jax import paths
from adm_jax.checkpoints import training
from adm_jax.checkpoints.compat import config_differences


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
    directory = training.checkpoint_dir(workdir)
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
    lines = [f"{training.checkpoint_dir(workdir)}:", "step  state       size  modified (UTC)"]
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


def nonfinite_leaves(tree) -> list[str]:
    """Key paths of the floating leaves holding NaN or Inf."""
    bad = []
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        value = np.asarray(jax.device_get(leaf))
        if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
            bad.append(jax.tree_util.keystr(key_path))
    return bad


def verify(
    config,
    workdir: paths.PathLike,
    step: int | None = None,
    *,
    abstract_state: Callable[[Any], Any],
) -> str:
    """Checks checkpoint ``step`` (default: the newest complete one); returns a one-line
    summary, raises ValueError / FileNotFoundError (one line) on the first problem.

    ``abstract_state(config)``: the ShapeDtypeStructs (with shardings) of the TrainState
    ``config`` trains, the target of the restore (the train layer builds it:
    ``adm_jax.train.state.replicated_abstract_state``)."""
    directory = training.checkpoint_dir(workdir)
    entries = {e.step: e for e in list_checkpoints(workdir) if e.complete}
    if step is None:
        if not entries:
            raise FileNotFoundError(f"checkpoints: no complete checkpoint in {directory}")
        step = max(entries)
    where = f"checkpoint {directory / str(step)}"
    if step not in entries:
        found = ", ".join(map(str, sorted(entries))) or "none"
        raise FileNotFoundError(f"{where}: no such complete checkpoint (complete: {found})")
    ckpt = training.Checkpointer(workdir, max_to_keep=None, async_save=False, read_only=True)
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
            state, _ = ckpt.restore(abstract_state(config), step)
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


__all__ = [
    "CheckpointEntry",
    "format_listing",
    "list_checkpoints",
    "nonfinite_leaves",
    "verify",
]
