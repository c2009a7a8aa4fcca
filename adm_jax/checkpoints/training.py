"""Orbax checkpoints of a training run: ``WORKDIR/checkpoints/<step>/{state,data,config}``.

* ``state``: the whole TrainState (PyTree handler; restored straight into the target
  shardings, so a run resumes on a different mesh or device count).
* ``data_iter``: the input iterator's position (grain, one file per process; ``data`` as
  JSON for iterators that only have get_state/set_state), so a resumed run sees the same
  batches.
* ``config``: the run's config (JSON), so ``restore_inference`` can rebuild the model.

Saves are asynchronous (training continues while arrays are written). Orbax writes each step
into a temporary directory and renames it when complete, and only finalized step directories
count as checkpoints: a save interrupted by SIGKILL/preemption never hides the previous
checkpoint, and its leftovers are removed at the next start (``cleanup_tmp_directories``).

A save that fails (disk full, permissions, a bucket error) raises ``CheckpointSaveError``
with Orbax's reason: from ``save`` itself, or for an asynchronous write from the next
``check_for_errors`` (cheap; the loop calls it every step), ``save``, ``wait`` or ``close``.
Orbax alone would only report it at the next save, possibly thousands of steps later.
"""

from __future__ import annotations

import base64
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from adm_jax import paths

CHECKPOINT_DIR = "checkpoints"
DATA_ITER_ITEM = "data_iter"  # == adm_jax.data.DATA_ITER_ITEM (grain per-process files)
JSON_DATA_ITEM = "data"  # iterators with only get_state()/set_state() (tests, custom input)
ITEMS = ("state", "config", DATA_ITER_ITEM, JSON_DATA_ITEM)


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the message names the step, directory and reason."""


def _first_line(err: BaseException, limit: int = 400) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    if len(line) <= limit:
        return line
    # Keep both ends: the operation and path lead, the OS error ("File too large") ends it.
    half = (limit - 5) // 2
    return f"{line[:half]} ... {line[-half:]}"


# TensorStore's status codes for a store that did not answer (its HTTP retries exhausted).
_UNAVAILABLE_STATUS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")


def _store_unavailable(err: BaseException) -> bool:
    """Whether a restore failed because the store kept failing (gcsfs / TensorStore after
    their retries), as opposed to a damaged checkpoint."""
    seen = err
    while seen is not None:
        if paths.is_transient(seen) or any(
            str(seen).lstrip().startswith(code) for code in _UNAVAILABLE_STATUS
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
    return paths.resolved(workdir) / CHECKPOINT_DIR


def complete_steps_on_store(directory: epath.Path) -> list[int]:
    """The finalized steps in ``directory``, each checked on the store; a step that cannot be
    checked (the store failing) is left out rather than failing the whole listing."""
    steps = []
    try:
        children = [c for c in directory.iterdir() if c.name.isdigit()]
    except Exception:  # noqa: BLE001 - the store may be failing
        return steps
    for child in children:
        try:
            if ocp.step.is_path_finalized(child):
                steps.append(int(child.name))
        except Exception:  # noqa: BLE001
            continue
    return sorted(steps)


def _encode(data_state):
    """Iterator state -> JSON (grain states are dicts or bytes)."""
    if data_state is None:
        return {"kind": "none"}
    if isinstance(data_state, bytes):
        return {"kind": "bytes", "value": base64.b64encode(data_state).decode("ascii")}
    return {"kind": "json", "value": data_state}


def _data_save_args(data_iter) -> dict:
    if data_iter is None:
        return {}
    if hasattr(data_iter, "save_args"):
        return {DATA_ITER_ITEM: data_iter.save_args()}
    if hasattr(data_iter, "get_state"):
        return {JSON_DATA_ITEM: ocp.args.JsonSave(_encode(data_iter.get_state()))}
    return {}


def _decode(payload):
    if not payload or payload.get("kind") == "none":
        return None
    if payload["kind"] == "bytes":
        return base64.b64decode(payload["value"])
    return payload["value"]


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for (state, data position, config)."""

    def __init__(
        self,
        workdir: str,
        *,
        max_to_keep: int = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        """``read_only``: for tools that inspect a workdir a run may be writing to; it creates
        nothing and leaves the running save's temporary directory alone."""
        paths.bound_tensorstore_retries()  # a failing bucket stops a save, not hangs it
        self.directory = checkpoint_dir(workdir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=not read_only,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self._pending: int | None = None  # step of an asynchronous save not yet checked

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self):
        return self.manager.all_steps()

    def save(self, step: int, state, *, data_iter=None, config=None, force=False) -> bool:
        """Starts an (async) save of ``state`` (+ the iterator position) at ``step``; returns
        whether a save was started."""
        self._finish_pending()
        items = dict(state=ocp.args.PyTreeSave(state), config=ocp.args.JsonSave(config or {}))
        items.update(_data_save_args(data_iter))
        try:
            started = self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)
        except Exception as err:  # noqa: BLE001 - Orbax/TensorStore raise many types
            raise self._save_error(int(step), err) from err
        if started:
            self._pending = int(step)
            if not self.manager.is_saving_in_progress():  # synchronous, or already done
                self._finish_pending()
        return started

    def _save_error(self, step: int, err: BaseException) -> CheckpointSaveError:
        # Read from the store, not the manager's list: after a failed save Orbax has already
        # dropped the steps that save would have retired (they are still on the store).
        good = [s for s in complete_steps_on_store(self.directory) if s != step]
        return CheckpointSaveError(
            f"checkpoint: saving step {step} to {self.directory} failed "
            f"({type(err).__name__}: {_first_line(err)}); the run stopped, last good "
            f"checkpoint: {max(good) if good else 'none'}"
        )

    def _finish_pending(self) -> None:
        """Waits for the pending asynchronous save; CheckpointSaveError if it failed."""
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001
            raise self._save_error(step, err) from err

    def check_for_errors(self) -> None:
        """Raises CheckpointSaveError if an asynchronous save has finished and failed; returns
        at once while it is still writing (call it every step)."""
        if self._pending is not None and not self.manager.is_saving_in_progress():
            self._finish_pending()

    def restore(self, abstract_state, step: int | None = None, *, data_iter=None):
        """(state, config_dict) of ``step`` (default: latest) onto the shardings carried by
        ``abstract_state`` (ShapeDtypeStructs with .sharding); ``data_iter`` (if given) is
        moved to the saved position in place."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"checkpoint: no finalized checkpoint in {self.directory}")
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        items = dict(
            state=ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args),
            config=ocp.args.JsonRestore(),
        )
        step_dir = self.directory / str(step)
        has = lambda item: (step_dir / item).is_dir()  # noqa: E731
        if data_iter is not None:
            if hasattr(data_iter, "restore_args") and has(DATA_ITER_ITEM):
                items[DATA_ITER_ITEM] = data_iter.restore_args()
            elif hasattr(data_iter, "set_state") and has(JSON_DATA_ITEM):
                items[JSON_DATA_ITEM] = ocp.args.JsonRestore()
            else:
                raise ValueError(
                    f"checkpoint: {step_dir} holds no input position this iterator can restore"
                )
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        if JSON_DATA_ITEM in items:
            data_iter.set_state(_decode(out[JSON_DATA_ITEM]))
        return out["state"], out["config"]

    def restore_latest_intact(self, abstract_state, *, data_iter=None):
        """(state, step) of the newest checkpoint that restores, newest first: a damaged
        newest step (a file lost or truncated by a crash outside Orbax's atomic commit, a
        bucket object deleted) is skipped with a warning instead of blocking every resume."""
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"checkpoint: no finalized checkpoint in {self.directory}")
        errors = []
        for step in steps:
            try:
                state, _ = self.restore(abstract_state, step, data_iter=data_iter)
            except Exception as err:  # noqa: BLE001 - any failure means "not restorable"
                reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
                if _store_unavailable(err):
                    # The store failed, not the checkpoint: setting it aside would lose it.
                    raise OSError(
                        f"checkpoint: reading {self.directory}/{step} failed: the store kept "
                        f"failing ({type(err).__name__}: {reason}); nothing was set aside, "
                        "rerun when the store answers"
                    ) from err
                errors.append(f"step {step}: {type(err).__name__}: {reason}")
                logging.warning(
                    "checkpoint %s/%d cannot be restored (%s); trying an older one",
                    self.directory, step, errors[-1],
                )  # fmt: skip
                continue
            self._set_aside([s for s in steps if s > step])
            return state, step
        raise ValueError(
            f"checkpoint: no checkpoint in {self.directory} can be restored ({errors[0]}); "
            "if the config changed since they were written, use a new --workdir"
        )

    def _set_aside(self, damaged: list[int]) -> None:
        """Renames damaged steps to ``<step>.damaged`` (kept for inspection, no longer a
        checkpoint), so the resumed run can save those steps again."""
        if not damaged:
            return
        if jax.process_index() == 0:
            for step in damaged:
                target = self.directory / f"{step}.damaged"
                if target.exists():
                    target.rmtree()
                (self.directory / str(step)).rename(target)
                logging.warning("checkpoint: moved damaged %s/%d to %s", self.directory, step,
                                target)  # fmt: skip
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes("adm_jax:checkpoint_set_aside")
        self.manager.reload()

    def restore_config(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return out["config"]

    def restore_subtree(self, abstract_subtree, step: int | None = None):
        """Partial restore of the state item (e.g. only ``{"ema_params": ...}``)."""
        step = self.latest_step() if step is None else step
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_subtree)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    abstract_subtree, restore_args=restore_args, partial_restore=True
                )
            ),
        )
        return out["state"]

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(int(step))

    def wait(self) -> None:
        self._finish_pending()
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for a running save (CheckpointSaveError if it failed), then closes."""
        try:
            self._finish_pending()
        finally:
            self.manager.close()


def tree_to_host(tree):
    return jax.device_get(tree)
