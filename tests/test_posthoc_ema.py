"""Post-hoc EMA (EDM2): the power-EMA math, and a run that tracks EMAs of sigma_rel 0.05, 0.08
and 0.10: the 0.08 EMA reconstructed from the 0.05 and 0.10 snapshots alone is close to the
0.08 EMA the run tracked directly, also through --mode=export's code path."""

import pathlib
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from test_train_loop import ListIterator  # noqa: E402

from adm_jax import checkpoints as inference_lib  # noqa: E402
from adm_jax import (
    posthoc_ema,  # noqa: E402
    train,  # noqa: E402
)
from adm_jax.checkpoints import training as checkpointing  # noqa: E402
from adm_jax.train import sharding  # noqa: E402
from adm_jax.train import state as state_lib  # noqa: E402
from configs import tiny  # noqa: E402


def test_std_and_exponent_are_inverse_and_bounded():
    for std in (0.01, 0.05, 0.1, 0.2, 0.28):
        gamma = posthoc_ema.std_to_exp(std)
        assert gamma > 0
        assert posthoc_ema.exp_to_std(gamma) == pytest.approx(std, rel=1e-9)
    # EDM2's example: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
    assert posthoc_ema.std_to_exp(0.05) == pytest.approx(16.97, abs=0.01)
    assert posthoc_ema.std_to_exp(0.10) == pytest.approx(6.94, abs=0.01)
    with pytest.raises(ValueError, match="must be in"):
        posthoc_ema.std_to_exp(0.3)


def _track(trajectory, stds, every):
    """Power EMAs of ``trajectory`` (steps x dim) with the update the train step applies;
    returns the final EMAs and the snapshots {step: [ema per std]}."""
    emas = [np.zeros_like(trajectory[0]) for _ in stds]
    snapshots = {}
    gammas = [posthoc_ema.std_to_exp(s) for s in stds]
    for i, params in enumerate(trajectory):
        step = i + 1
        for k, gamma in enumerate(gammas):
            decay = float(posthoc_ema.power_decay(step, gamma))
            emas[k] = decay * emas[k] + (1.0 - decay) * params
        if step % every == 0:
            snapshots[step] = [e.copy() for e in emas]
    return emas, snapshots


def test_reconstruction_matches_a_directly_tracked_ema_on_a_random_walk():
    rng = np.random.default_rng(0)
    steps, every = 400, 20
    trajectory = np.cumsum(rng.normal(size=(steps, 64)), axis=0)
    final, snaps = _track(trajectory, (0.05, 0.08, 0.10), every)
    in_steps = [s for s in sorted(snaps) for _ in (0, 1)]
    in_stds = [x for _ in sorted(snaps) for x in (0.05, 0.10)]
    weights = posthoc_ema.solve_coefficients(in_steps, in_stds, steps, 0.08)
    assert weights.sum() == pytest.approx(1.0)
    stacked = np.stack([snaps[s][k] for s in sorted(snaps) for k in (0, 2)])
    rebuilt = weights @ stacked
    # Relative to how far the 0.08 EMA is from the 0.05 one (the scale of what is chosen).
    spread = np.linalg.norm(final[1] - final[0])
    assert np.linalg.norm(rebuilt - final[1]) < 0.05 * spread
    # Not the trivial answer: the inputs differ from the target by much more.
    assert np.linalg.norm(final[2] - final[1]) > 0.3 * spread


def test_config_errors_name_the_field():
    config = tiny.get_config()
    config.train.posthoc_ema_stds = "0.05,0.4"
    config.train.posthoc_ema_every = 2
    with pytest.raises(train.ConfigError, match="train.posthoc_ema_stds: EMA std"):
        train.validate_config(config)
    config.train.posthoc_ema_stds = "0.05"
    config.train.posthoc_ema_every = 0
    with pytest.raises(train.ConfigError, match="train.posthoc_ema_every: must be > 0"):
        train.validate_config(config)


@pytest.mark.slow
def test_run_snapshots_and_export_reconstruct_the_tracked_ema(tmp_path):
    config = tiny.get_config()
    config.model.image_size = config.data.image_size = 8
    config.model.channel_mult = "1"
    config.model.resblock_updown = False
    c = config.train
    c.num_steps, c.log_every, c.checkpoint_every = 24, 12, 24
    c.eval_every = c.sample_every = 0
    c.async_checkpointing = False
    c.lr = 1e-3
    c.ema_rate = "0.9"
    c.posthoc_ema_stds = "0.05,0.08,0.10"
    c.posthoc_ema_every = 4
    rng = np.random.default_rng(0)
    mesh = sharding.create_mesh(fsdp=2)
    batches = [
        {
            "image": rng.uniform(-1, 1, (8, 8, 8, 3)).astype(np.float32),
            "label": rng.integers(0, 10, 8).astype(np.int32),
        }
        for _ in range(c.num_steps)
    ]

    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir), train_iter=ListIterator(batches, mesh))
    snap_dir = posthoc_ema.snapshot_dir(workdir)
    assert sorted(int(p.name) for p in snap_dir.iterdir() if p.name.isdigit()) == list(
        range(4, 25, 4)
    )

    module = train.build_model(config)
    tx = state_lib.make_optimizer(config.train)
    abstract, _ = state_lib.abstract_train_state(module, config, tx, mesh)
    ckpt = checkpointing.Checkpointer(str(workdir))
    with jax.set_mesh(mesh):
        final, _ = ckpt.restore(abstract, 24)
    ckpt.close()
    final = jax.device_get(final)
    constant, ema05, direct, ema10 = final.ema_params  # ema_rate first, then the power EMAs

    rebuilt = train.export_posthoc_ema(workdir, config, 0.08, from_stds=(0.05, 0.10))
    assert rebuilt.extra["step"] == 24
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa: E731
    err = np.linalg.norm(flat(jax.device_get(rebuilt.params)) - flat(direct))
    spread = np.linalg.norm(flat(ema05) - flat(ema10))
    print(f"post-hoc 0.08 vs tracked: error {err:.3g}, spread 0.05..0.10 {spread:.3g}")
    assert err < 0.05 * spread

    # --mode=export's path: the std chosen in the config, all tracked stds used.
    config.train.export_ema_std = 0.08
    out = train.export(config, str(workdir))
    assert out.endswith("step_00000024_std0.0800")
    loaded = inference_lib.load_inference_checkpoint(out)
    err_all = np.linalg.norm(flat(jax.device_get(loaded.params)) - flat(direct))
    assert err_all < 0.05 * spread
