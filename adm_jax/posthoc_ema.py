"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", EDM2, Sec. 3): choose the EMA length after training.

Training keeps power-function EMAs (``train.posthoc_ema_stds``, their relative standard
deviations sigma_rel) and stores snapshots of them every ``train.posthoc_ema_every`` steps in
``WORKDIR/posthoc_ema/<step>`` (Orbax, sharded like the train state). An EMA of the raw
parameters is a weighted average over the training steps, with a weight profile p(t); a power
EMA's profile at step T is ``(gamma + 1) t^gamma / T^(gamma + 1)``. Any other power EMA at
any step is then approximated by the linear combination of the stored snapshots whose profile
is closest in L2 (a least-squares solve on the profiles' closed-form inner products), and
``--mode=export`` with ``train.export_ema_std`` writes it as an inference checkpoint.

Times are in steps (EDM2 counts images; the solve is invariant to that scale).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from adm_jax import paths

SNAPSHOT_DIR = "posthoc_ema"
# sigma_rel of a power EMA tends to this as gamma -> 0 (a uniform average over all steps);
# longer EMAs do not exist in this family.
MAX_STD = float(np.sqrt(1.0 / 12.0))


def std_to_exp(std: float) -> float:
    """The exponent gamma of the power EMA with relative standard deviation ``std``:
    the largest real root of gamma^3 + 7 gamma^2 + (16 - std^-2) gamma + (12 - std^-2)."""
    if not 0.0 < std < MAX_STD:
        raise ValueError(f"EMA std (sigma_rel) must be in (0, {MAX_STD:.4f}), got {std}")
    inv = float(std) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def exp_to_std(gamma: float) -> float:
    return float(np.sqrt(gamma + 1.0) / (gamma + 2.0) / np.sqrt(gamma + 3.0))


def power_decay(step, gamma: float):
    """The decay of a power EMA at its ``step``-th update (1-based): ``(1 - 1/step)^(gamma+1)``,
    0 at the first update (the EMA starts at the first updated parameters)."""
    t = jnp.asarray(step, jnp.float32)
    return jnp.power(jnp.maximum(1.0 - 1.0 / jnp.maximum(t, 1.0), 0.0), gamma + 1.0)


def _profile_dot(t_a, gamma_a, t_b, gamma_b):
    """<p_a, p_b> of two power-EMA profiles that end at steps t_a and t_b (closed form)."""
    t_ratio = t_a / t_b
    t_exp = np.where(t_a < t_b, gamma_b, -gamma_a)
    t_max = np.maximum(t_a, t_b)
    num = (gamma_a + 1.0) * (gamma_b + 1.0) * t_ratio**t_exp
    return num / ((gamma_a + gamma_b + 1.0) * t_max)


def solve_coefficients(
    in_steps: Sequence[float], in_stds: Sequence[float], out_step: float, out_std: float
) -> np.ndarray:
    """Weights of the stored EMAs (``in_steps[i]``, ``in_stds[i]``) whose combination best
    matches the EMA of ``out_std`` at ``out_step``; they sum to 1."""
    t_in = np.asarray(in_steps, np.float64).reshape(-1, 1)
    g_in = np.asarray([std_to_exp(s) for s in in_stds], np.float64).reshape(-1, 1)
    gram = _profile_dot(t_in, g_in, t_in.T, g_in.T)
    target = _profile_dot(t_in, g_in, np.float64(out_step), np.float64(std_to_exp(out_std)))
    weights = np.linalg.lstsq(gram, target, rcond=None)[0].reshape(-1)
    return weights / weights.sum()


def snapshot_dir(workdir) -> epath.Path:
    return paths.resolved(workdir) / SNAPSHOT_DIR


class SnapshotWriter:
    """Saves the power EMAs at a step (every process calls it; Orbax writes each shard once).
    A step that already has a snapshot (a resumed run redoing steps after its checkpoint, with
    the same values) is skipped."""

    def __init__(self, workdir, stds: Sequence[float]):
        self.stds = tuple(float(s) for s in stds)
        self._manager = ocp.CheckpointManager(
            snapshot_dir(workdir),
            options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True),
            metadata={"stds": list(self.stds)},
        )

    def save(self, step: int, emas: Sequence) -> None:
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.StandardSave(list(emas)))

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def reconstruct(
    workdir,
    std: float,
    abstract_params,
    *,
    step: int | None = None,
    from_stds: Sequence[float] | None = None,
):
    """(params, step) of the EMA with relative std ``std`` at ``step`` (default: the last
    snapshot), reconstructed from the snapshots in ``workdir`` (of the EMAs in ``from_stds``;
    default all tracked ones). ``abstract_params``: ShapeDtypeStructs with shardings."""
    directory = snapshot_dir(workdir)
    if not directory.exists():
        raise FileNotFoundError(
            f"train.export_ema_std: {directory} holds no post-hoc EMA snapshots (train with "
            "train.posthoc_ema_stds and train.posthoc_ema_every > 0)"
        )
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
    try:
        tracked = [float(s) for s in (manager.metadata().custom_metadata or {}).get("stds", [])]
        steps = sorted(s for s in manager.all_steps() if step is None or s <= step)
        if not tracked or not steps:
            raise FileNotFoundError(f"train.export_ema_std: no snapshots in {directory}")
        out_step = steps[-1] if step is None else step
        use = tracked if from_stds is None else [float(s) for s in from_stds]
        missing = [s for s in use if s not in tracked]
        if missing:
            raise ValueError(f"from_stds: {missing} not tracked in {directory} (tracked {tracked})")
        columns = [(s, tracked.index(x), x) for s in steps for x in use]
        weights = solve_coefficients(
            [c[0] for c in columns], [c[2] for c in columns], out_step, float(std)
        )
        logging.info(
            "Post-hoc EMA std %.4f at step %d from %d snapshots of stds %s",
            std, out_step, len(steps), use,
        )  # fmt: skip
        target = [abstract_params] * len(tracked)
        total = None
        for snap_step in steps:
            emas = manager.restore(snap_step, args=ocp.args.StandardRestore(target))
            for weight, (s, index, _) in zip(weights, columns, strict=True):
                if s != snap_step:
                    continue
                scaled = jax.tree.map(lambda e, w=weight: e * jnp.float32(w), emas[index])
                total = scaled if total is None else jax.tree.map(jnp.add, total, scaled)
        return total, int(out_step)
    finally:
        manager.close()


def default_export_path(workdir, step: int, std: float) -> str:
    return os.fspath(paths.resolved(workdir) / "export" / f"step_{step:08d}_std{std:.4f}")
