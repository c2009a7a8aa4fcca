"""The training workdir: checked before anything is built, and held by one run at a time.

Two runs writing one workdir interleave their checkpoints and metrics.jsonl, and neither
notices. So process 0 of a training run creates ``WORKDIR/adm_jax.lock`` (JSON: host, pid,
start time, command) before writing anything, and removes it when the run ends: normal end,
exception, SIGTERM/SIGINT stop. A second run on the same workdir stops at once with one line
naming the holder. A lock left by a run that was killed (SIGKILL, a second SIGTERM, a lost VM):

* on this machine (same host, boot and pid namespace) with its pid gone: provably stale, taken
  over with a warning, so a relaunch after a kill just works;
* elsewhere: we cannot tell whether it still runs. The error says so; ``--break_lock`` (or
  deleting the named file) breaks it.

Local files are created with ``O_EXCL`` (atomic). Object stores (``gs://``) have no exclusive
create: the lock is written, read back and kept only if it still holds our token, which
catches all but simultaneous starts.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import uuid
from typing import Any

from absl import logging
from etils import epath

from adm_jax import paths

LOCK_NAME = "adm_jax.lock"


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir; the message names it and how to break a stale lock."""


def prepare(workdir: paths.PathLike) -> epath.Path:
    """The resolved workdir, created if missing.

    Raises NotADirectoryError (it or a parent is a file) or PermissionError (cannot be
    created), one line naming the path and what was expected.
    """
    wd = paths.resolved(workdir)
    if wd.exists() and not wd.is_dir():
        raise NotADirectoryError(f"--workdir {wd}: is a file; expected a directory (or a new path)")
    try:
        wd.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise NotADirectoryError(
            f"--workdir {wd}: cannot be created, a parent path is a file ({_reason(err)}); "
            "expected a directory path"
        ) from err
    except OSError as err:
        raise _not_writable(wd, err) from err
    return wd


def _reason(err: OSError) -> str:
    if err.strerror:
        return err.strerror
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _not_writable(wd, err: OSError) -> OSError:
    cls = PermissionError if isinstance(err, PermissionError) or err.errno == 30 else OSError
    return cls(
        f"--workdir {wd}: not writable ({_reason(err)}); expected a directory this user can write"
    )


def this_machine() -> str:
    """Host name + boot id + pid namespace: processes with equal values see the same pids
    (two containers may share a host name, not a pid namespace)."""
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        pass  # not Linux: the host name alone
    return "/".join(parts)


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def holder_is_running(holder: dict[str, Any] | None) -> bool | None:
    """Whether the lock's process still runs: True/False on the machine that took it, None
    (cannot tell) elsewhere or for an unreadable lock."""
    if not holder or holder.get("machine") != this_machine():
        return None
    try:
        return _pid_running(int(holder["pid"]))
    except (KeyError, TypeError, ValueError):
        return None


def read_lock(workdir: paths.PathLike) -> dict[str, Any] | None:
    """The lock's contents, {} for an unreadable (empty, partly written) lock file, None when
    there is no lock."""
    lock = paths.path(workdir) / LOCK_NAME
    paths.refresh(lock.parent)
    try:
        text = paths.read_text(lock)
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "an unknown run (unreadable lock file)"
    return (
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
        f"since {holder.get('started', '?')}"
    )


def break_lock(workdir: paths.PathLike) -> dict[str, Any] | None:
    """Removes the workdir's lock (``--break_lock``); returns what it held (None: no lock)."""
    holder = read_lock(workdir)
    if holder is not None:
        (paths.path(workdir) / LOCK_NAME).unlink(missing_ok=True)
        logging.warning("Broke the lock of %s held by %s", workdir, describe(holder))
    return holder


class WorkdirLock:
    """``with WorkdirLock(workdir, enabled=jax.process_index() == 0):`` holds the workdir.

    Raises WorkdirLockedError when another run holds it, PermissionError when the workdir is
    not writable. Disabled instances (processes other than 0) do nothing.
    """

    def __init__(self, workdir: paths.PathLike, *, enabled: bool = True):
        self.workdir = paths.resolved(workdir)
        self.path = self.workdir / LOCK_NAME
        self.enabled = enabled
        self.info: dict[str, Any] | None = None

    def acquire(self) -> WorkdirLock:
        if not self.enabled or self.info is not None:
            return self
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:1000],
            "machine": this_machine(),
            "token": uuid.uuid4().hex,
        }
        for attempt in range(2):
            if self._create(info):
                self.info = info
                return self
            holder = read_lock(self.workdir)
            if holder is None:  # released between our attempt and the read
                continue
            if attempt == 0 and holder_is_running(holder) is False:
                logging.warning(
                    "%s: taking over a stale lock (%s, no longer running)", self.path,
                    describe(holder),
                )  # fmt: skip
                self.path.unlink(missing_ok=True)
                continue
            state = (
                "still running"
                if holder_is_running(holder)
                else "cannot tell from here whether it still runs"
            )
            raise WorkdirLockedError(
                f"--workdir {self.workdir}: in use by another run ({describe(holder)}; {state}); "
                f"if that run is gone, rerun with --break_lock or delete {self.path}"
            )
        raise WorkdirLockedError(f"--workdir {self.workdir}: could not take the lock {self.path}")

    def _create(self, info: dict[str, Any]) -> bool:
        """Writes the lock if there is none; False if one exists (or another run won)."""
        text = json.dumps(info, indent=1)
        try:
            if not paths.is_remote(self.path):
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                return True
            if read_lock(self.workdir) is not None:
                return False
            paths.write_text_atomic(self.path, text)
        except FileExistsError:
            return False
        except paths.StoreError:
            raise  # a bucket that kept failing: its own line names the object
        except OSError as err:
            raise _not_writable(self.workdir, err) from err
        holder = read_lock(self.workdir)
        return bool(holder) and holder.get("token") == info["token"]

    def release(self) -> None:
        if self.info is None:
            return
        token, self.info = self.info["token"], None
        try:
            holder = read_lock(self.workdir)
            if holder and holder.get("token") == token:
                self.path.unlink(missing_ok=True)
            else:
                logging.warning(
                    "%s: no longer ours (broken by another run?); left alone", self.path
                )
        except OSError as err:
            logging.warning("%s: could not remove the lock: %s", self.path, err)

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
