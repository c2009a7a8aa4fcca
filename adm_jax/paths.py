"""Local and object-store paths (``gs://``, ``s3://``) behind one API: ``etils.epath``.

Orbax and TFDS take ``epath.Path`` too, so a workdir in a bucket behaves like a local one.
Object stores have no rename and no append, but a file written by one ``open("wb")`` appears
whole or not at all; local files are written under a temporary name and renamed. So
``open_atomic`` never leaves a half-written file behind, wherever the path points.

gcsfs (epath's backend with ``EPATH_USE_TF=false``) caches directory listings per process:
after another process wrote into a folder, call ``refresh(folder)`` before ``exists``/``open``.

A bucket misbehaves now and then (503, 429, a dropped connection). gcsfs and TensorStore retry
each request; ``with_retries`` is the one place this package adds to that: it repeats a whole
object operation (writing or reading one file, idempotent by construction) a few times with
exponential backoff, and turns a failure that persists into ``StoreError``, an OSError whose
one line names the operation and the object (gcsfs's own error is no OSError, so the entry
point would print a traceback). ``write_bytes_atomic`` / ``write_text_atomic`` /
``read_bytes`` / ``read_text`` go through it.

TensorStore (Orbax's array I/O) retries each failed GCS request itself, by default up to 32
times with waits growing to 32 s: a store that keeps failing would hold a checkpoint save or
restore for a quarter of an hour. ``bound_tensorstore_retries`` lowers that to
``TENSORSTORE_RETRIES`` (about a minute, like gcsfs plus ``with_retries``), after which the
save or restore fails with TensorStore's error naming the object.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import time
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

from absl import logging
from etils import epath

PathLike = str | os.PathLike
T = TypeVar("T")

# Whole-operation attempts on top of the client's own per-request retries (gcsfs: 6 requests
# over ~30 s), so a persistent fault stops the run after about a minute.
RETRY_ATTEMPTS = 3
RETRY_FIRST_DELAY_S = 1.0
_TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}
# TensorStore's gcs_request_retries for Orbax: tries per request and the waits between them
# (doubling from the first, capped at the second): at most ~47 s per request.
TENSORSTORE_RETRIES = {"max_retries": 6, "initial_delay_s": 1.0, "max_delay_s": 16.0}


class StoreError(OSError):
    """A store operation that kept failing through every retry: ``"<operation> <path>: ..."``."""


def is_remote(p: PathLike) -> bool:
    """True for ``scheme://...`` paths (gs://, s3://, ...), False for local ones."""
    return "://" in os.fspath(p)


def path(p: PathLike) -> epath.Path:
    """``epath.Path`` of ``p``; ``~`` expanded for local paths, relative ones kept relative."""
    p = epath.Path(os.fspath(p))
    return p if is_remote(p) else p.expanduser()


def absolute(p: PathLike) -> str:
    """A string naming ``p`` from anywhere: local paths made absolute, remote ones unchanged
    (``os.path.abspath`` would turn ``gs://b/x`` into ``<cwd>/gs:/b/x``)."""
    if is_remote(p):
        return os.fspath(path(p))
    return os.path.abspath(os.path.expanduser(os.fspath(p)))


def resolved(p: PathLike) -> epath.Path:
    """``epath.Path`` naming ``p`` from anywhere (Orbax needs absolute local paths)."""
    return path(absolute(p))


@contextlib.contextmanager
def open_atomic(p: PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Opens ``p`` for writing (``"wb"`` or ``"w"``); the file appears complete on success.

    Local: writes ``<name>.tmp<pid>`` and renames it. Remote: writes ``p`` directly (the
    object is created when the file closes). On an exception nothing is left at ``p``.
    The parent folder must exist (``path(p).parent.mkdir(parents=True, exist_ok=True)``).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"open_atomic: mode must be 'wb' or 'w', got {mode!r}")
    target = path(p)
    if not is_remote(target):
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        try:
            with open(tmp, mode) as f:
                yield f
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        return
    f = target.open(mode)
    try:
        yield f
    except BaseException:
        with contextlib.suppress(Exception):
            getattr(f, "discard", lambda: None)()  # gcsfs: cancels a started upload
        with contextlib.suppress(Exception):
            f.close()
        with contextlib.suppress(Exception):
            target.unlink(missing_ok=True)  # a small buffer was uploaded on close
        raise
    f.close()


def is_transient(err: BaseException) -> bool:
    """Whether ``err`` is a store hiccup worth retrying: an HTTP 408/429/5xx (gcsfs's
    HttpError, google-api-core's errors) or a connection dropped or timed out."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, StoreError)):
        return False
    code = getattr(err, "code", None)
    if callable(code):  # grpc-style errors
        code = None
    try:
        if code is not None and int(code) in _TRANSIENT_HTTP:
            return True
    except (TypeError, ValueError):
        pass
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    module = type(err).__module__.split(".")[0]
    return module in ("aiohttp", "requests", "urllib3", "google") and "auth" not in str(
        type(err).__module__
    )


def with_retries(operation: str, target: PathLike, fn: Callable[[], T]) -> T:
    """``fn()``, a whole operation on the object ``target`` (safe to repeat), retried on a
    transient store error with exponential backoff (remote paths only); a failure that
    persists raises StoreError naming the operation and the object."""
    attempts = RETRY_ATTEMPTS if is_remote(target) else 1
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - filtered by is_transient
            if not is_transient(err):
                raise
            reason = _one_line(err)
            if attempt + 1 == attempts:
                raise StoreError(
                    f"{operation} {target}: the store kept failing ({reason}); gave up after "
                    f"{attempts} attempts"
                ) from err
            delay = RETRY_FIRST_DELAY_S * 2**attempt
            logging.warning("%s %s failed (%s); retrying in %.1f s", operation, target, reason,
                            delay)  # fmt: skip
            time.sleep(delay)
    raise AssertionError("unreachable")


def bound_tensorstore_retries() -> None:
    """Makes the TensorStore contexts that Orbax creates from now on retry a failing GCS
    request as ``TENSORSTORE_RETRIES`` says (instead of 32 tries up to 32 s apart). Orbax
    0.12 builds every context from two module dicts and offers no option for it; with another
    layout this does nothing. Call it before Orbax I/O (the checkpointers do); idempotent."""
    try:
        from orbax.checkpoint._src.serialization import tensorstore_utils
    except ImportError:
        return
    retries = {
        "max_retries": int(TENSORSTORE_RETRIES["max_retries"]),
        "initial_delay": f"{float(TENSORSTORE_RETRIES['initial_delay_s'])}s",
        "max_delay": f"{float(TENSORSTORE_RETRIES['max_delay_s'])}s",
    }
    for name in ("_BASE_TS_CONTEXT", "_DEFAULT_OCDBT_TS_CONTEXT"):
        context = getattr(tensorstore_utils, name, None)
        if isinstance(context, dict):
            context["gcs_request_retries"] = dict(retries)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def write_bytes_atomic(p: PathLike, data: bytes) -> epath.Path:
    """Writes ``data`` to ``p`` with ``open_atomic`` (``with_retries``); returns ``path(p)``."""

    def write():
        with open_atomic(p, "wb") as f:
            f.write(data)

    with_retries("write", p, write)
    return path(p)


def write_text_atomic(p: PathLike, text: str) -> epath.Path:
    """Writes ``text`` (UTF-8) to ``p`` with ``open_atomic``; returns ``path(p)``."""
    return write_bytes_atomic(p, text.encode("utf-8"))


def read_bytes(p: PathLike) -> bytes:
    """The contents of ``p`` (``with_retries``; FileNotFoundError as usual)."""
    return with_retries("read", p, path(p).read_bytes)


def read_text(p: PathLike) -> str:
    return read_bytes(p).decode("utf-8")


def refresh(p: PathLike) -> None:
    """Forgets this process's cached listings of ``p`` and its parent folders, so that files
    another process wrote there since are found. A no-op for local paths and uncached
    backends (TF's gfile)."""
    if not is_remote(p):
        return
    p = path(p)
    try:
        from etils.epath import backend

        if getattr(p, "_backend", None) is not backend.fsspec_backend:
            return
        fs = backend.fsspec_backend.fs(os.fspath(p))
    except Exception:  # noqa: BLE001  (no fsspec filesystem: nothing cached)
        return
    fs.invalidate_cache(os.fspath(p))


def walk_files(folder: PathLike) -> Iterator[str]:
    """Relative POSIX paths (``"sub/x.png"``) of all files below ``folder``, recursively."""
    folder = path(folder)
    no_scheme = lambda p: os.fspath(p).split("://", 1)[-1].rstrip("/")
    for root, _, files in folder.walk():
        if is_remote(folder):  # fsspec's walk yields roots without the scheme
            rel = posixpath.relpath(no_scheme(root), no_scheme(folder))
        else:
            rel = os.path.relpath(root, folder).replace(os.sep, "/")
        for name in files:
            yield name if rel == "." else f"{rel}/{name}"
