"""XLA:CPU settings that the entry points (``main``, ``bench``, ``demo``) and the tests make
before JAX starts its CPU backend: kernel flags, and huge pages for the step's temporaries.

jaxlib 0.10's XLA:CPU hands convolutions, dots, elementwise ops and reductions to YNNPACK by
default. On the project's 2-core CPU, YNNPACK's convolutions (above all the weight gradients,
a 16x16 window over the batch) run 2-4x slower than the Eigen kernels XLA uses otherwise, while
its reductions are 3-5x faster than XLA's own loops. Keeping YNNPACK for reductions only takes
the demo UNet's train step from 31 to 55-63 img/s and halves the sampler's time per step
(docs/history.md, "CPU: where the train step lost to PyTorch"); YNNPACK's dots (attention,
dense layers) gain a few percent more. The flags choose kernels, not math: results differ by
float32 round-off. TPU and GPU backends ignore them.

XLA:CPU allocates each execution's temporaries (142 MB for the demo's train step at batch 32)
on its worker threads, and glibc serves a block that large on a non-main thread with a fresh
``mmap`` that ``free`` unmaps again: every step faulted in ~35,000 new 4 KiB pages, 18% of the
process's CPU time in the kernel. ``glibc.malloc.hugetlb=1`` makes glibc ask for transparent
huge pages there (2 MiB faults, 70x fewer). glibc reads its tunables only at start-up, so
``use_huge_pages`` restarts the process with them (same pid, same command line).
"""

from __future__ import annotations

import logging
import os
import pathlib
import platform
import sys
from collections.abc import Callable, Mapping, MutableMapping, Sequence

import jax
import jaxlib

CPU_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "dot,reduce"}
# The flag names exist from this jaxlib on; XLA aborts the process on an unknown flag.
MIN_JAXLIB = (0, 10)


def _jaxlib_version() -> tuple[int, ...]:
    return tuple(int(p) for p in jaxlib.__version__.split(".")[:2] if p.isdigit())


def _backends_started() -> bool:
    # jax has no public question for this; a jax without the private one gets no warning.
    started = getattr(getattr(jax._src, "xla_bridge", None), "backends_are_initialized", None)
    return bool(started and started())


def set_cpu_flags(environ: MutableMapping[str, str] = os.environ) -> str:
    """Appends ``CPU_FLAGS`` to ``XLA_FLAGS`` (each unless XLA_FLAGS already names it: the
    user's setting wins) and returns the new value. XLA reads XLA_FLAGS when the first backend
    starts, so call this before the first computation; later it has no effect (logged)."""
    current = environ.get("XLA_FLAGS", "")
    if _jaxlib_version() < MIN_JAXLIB:
        return current
    extra = [f"--{name}={value}" for name, value in CPU_FLAGS.items() if name not in current]
    if extra:
        environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
        if _backends_started():
            logging.warning(
                "XLA_FLAGS %s set after JAX started its backends: they take effect in the next "
                "process only",
                " ".join(extra),
            )
    return environ.get("XLA_FLAGS", "")


HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"
# The tunable exists from glibc 2.35 on; older ones ignore it.
MIN_GLIBC = (2, 35)
# Set to 0 to keep the process as started.
HUGE_PAGES_ENV = "ADM_JAX_HUGE_PAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), None if unknown."""
    try:
        text = pathlib.Path(path).read_text()
    except OSError:
        return None
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else None


def _hugetlb_tunable_set(environ: Mapping[str, str]) -> bool:
    return "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", "")


def huge_pages_wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a restart with ``HUGE_PAGE_TUNABLE`` would change anything: Linux glibc >= 2.35,
    transparent huge pages on request only ("madvise"; "always" needs no advice, "never"
    takes none), no ``glibc.malloc.hugetlb`` in GLIBC_TUNABLES yet (a user's own setting
    wins), and not switched off with ADM_JAX_HUGE_PAGES=0."""
    libc, version = platform.libc_ver()
    if sys.platform != "linux" or libc != "glibc":
        return False
    if tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < MIN_GLIBC:
        return False
    if environ.get(HUGE_PAGES_ENV, "1") == "0" or _hugetlb_tunable_set(environ):
        return False
    return _thp_mode() == "madvise"


def add_huge_page_tunable(environ: MutableMapping[str, str] = os.environ) -> None:
    """Adds ``HUGE_PAGE_TUNABLE`` to GLIBC_TUNABLES (for the processes this one starts)."""
    if not _hugetlb_tunable_set(environ):
        current = environ.get("GLIBC_TUNABLES", "")
        environ["GLIBC_TUNABLES"] = ":".join(filter(None, [current, HUGE_PAGE_TUNABLE]))


def use_huge_pages(
    environ: MutableMapping[str, str] = os.environ,
    argv: Sequence[str] | None = None,
    execv: Callable[[str, Sequence[str]], None] = os.execv,
) -> bool:
    """Restarts this process (``os.execv``: same pid, same command line, this environment)
    with ``HUGE_PAGE_TUNABLE`` where ``huge_pages_wanted``; returns False where it does not.
    Call it first thing in an entry point: whatever ran before runs again."""
    if not huge_pages_wanted(environ):
        return False
    add_huge_page_tunable(environ)
    argv = list(sys.orig_argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    execv(sys.executable, [sys.executable, *argv[1:]])
    return True


def prepare_entry_point() -> None:
    """What ``main``, ``bench`` and ``demo`` do first, before their heavy imports: restart with
    huge pages where that helps (``use_huge_pages``), then set ``CPU_FLAGS``."""
    use_huge_pages()
    set_cpu_flags()
