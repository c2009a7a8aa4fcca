"""``--mode=checkpoints`` and ``--mode=verify``: ``adm_jax.checkpoints.tools`` run on a workdir,
verify restoring onto the TrainState ``--config`` trains (which only this layer can build)."""

from __future__ import annotations

from adm_jax.checkpoints import tools
from adm_jax.train import state as state_lib


def main_checkpoints(workdir: str) -> None:
    """``--mode=checkpoints``: prints the listing."""
    print(tools.format_listing(workdir, tools.list_checkpoints(workdir)), flush=True)


def main_verify(config, workdir: str, step: int | None) -> None:
    """``--mode=verify``: prints the summary line (or raises the one-line error)."""
    summary = tools.verify(
        config, workdir, step, abstract_state=state_lib.replicated_abstract_state
    )
    print(summary, flush=True)
