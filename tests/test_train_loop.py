"""The loop with an in-memory iterator: NaN batches never reach params, EMA or a checkpoint,
and max_consecutive_nonfinite stops the run with a clear error; the sample grid is the one
sampling program, compiled once per run."""

import pathlib
import sys

import jax
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from adm_jax import train  # noqa: E402
from adm_jax.checkpoints import training as checkpointing  # noqa: E402
from adm_jax.train import loop, sharding, steps  # noqa: E402
from adm_jax.train import state as state_lib  # noqa: E402
from configs import default, tiny  # noqa: E402


class ListIterator:
    """Batches from a list, with get_state/set_state (checkpointed as JSON)."""

    def __init__(self, batches, mesh):
        self._batches, self._i = batches, 0
        self._sharding = sharding.batch_sharding(mesh)

    def __next__(self):
        batch = self._batches[self._i]
        self._i += 1
        return jax.device_put(batch, self._sharding)

    def get_state(self):
        return {"i": self._i}

    def set_state(self, state):
        self._i = state["i"]


@pytest.mark.slow
def test_nan_never_reaches_a_checkpoint_and_streak_stops_the_run(tmp_path):
    config = tiny.get_config()
    config.model.image_size = config.data.image_size = 8
    config.model.channel_mult = "1"
    config.model.resblock_updown = False
    c = config.train
    c.num_steps, c.log_every, c.checkpoint_every, c.max_to_keep = 10, 1, 1, 10
    c.eval_every = c.sample_every = 0
    c.max_consecutive_nonfinite = 2
    c.async_checkpointing = False
    rng = np.random.default_rng(0)

    def batch(nan):
        image = rng.uniform(-1, 1, (8, 8, 8, 3)).astype(np.float32)
        if nan:
            image[0, 0, 0, 0] = np.nan
        return {"image": image, "label": np.arange(8, dtype=np.int32)}

    mesh = sharding.create_mesh(fsdp=2)
    batches = [batch(False), batch(True), batch(True), batch(True)]
    with pytest.raises(train.NonFiniteError, match="train.max_consecutive_nonfinite: 2"):
        train.train_and_evaluate(config, str(tmp_path), train_iter=ListIterator(batches, mesh))

    module = train.build_model(config)
    tx = state_lib.make_optimizer(config.train)
    abstract, _ = state_lib.abstract_train_state(module, config, tx, mesh)
    ckpt = checkpointing.Checkpointer(str(tmp_path))
    assert ckpt.all_steps() == [1, 2]  # the streak stops the run before step 3 is saved
    with jax.set_mesh(mesh):
        s1, _ = ckpt.restore(abstract, 1)
        s2, _ = ckpt.restore(abstract, 2)
    ckpt.close()
    s1, s2 = jax.device_get((s1, s2))
    assert (int(s2.skipped), int(s2.nonfinite_streak)) == (1, 1)
    for tree in (s2.params, s2.ema_params, s2.opt_state):
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(tree))
    jax.tree.map(
        np.testing.assert_array_equal, (s1.params, s1.ema_params), (s2.params, s2.ema_params)
    )


def test_sample_grid_is_one_sampling_program_compiled_once(tmp_path):
    """The grid logged every ``sample_every`` steps runs ``BatchSampler`` (the program
    ``--mode=sample`` runs), traced once for the whole run, and writes one PNG per grid; a
    grid of 3 images on 8 devices samples 8 and shows the first 3."""
    config = tiny.get_config()
    config.model.image_size = config.data.image_size = 8
    config.model.channel_mult = "1"
    config.model.resblock_updown = False
    c = config.train
    c.num_steps, c.log_every, c.checkpoint_every = 3, 1, 0
    c.eval_every, c.sample_every, c.num_sample_images = 0, 1, 3
    c.async_checkpointing = False
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": rng.uniform(-1, 1, (8, 8, 8, 3)).astype(np.float32),
            "label": np.arange(8, dtype=np.int32),
        }
        for _ in range(3)
    ]
    mesh = sharding.create_mesh(fsdp=2)
    steps.TRACE_COUNTS.pop("sample_grid", None)
    train.train_and_evaluate(config, str(tmp_path), train_iter=ListIterator(batches, mesh))
    assert steps.TRACE_COUNTS["sample_grid"] == 1  # three grids, one trace
    grids = sorted((tmp_path / "samples").glob("step_*.png"))
    assert [g.name for g in grids] == [f"step_{s:08d}.png" for s in (1, 2, 3)]
    grid = np.asarray(Image.open(grids[-1]))
    # 3 images of 8x8 in 2 columns with 2-pixel padding (8 images would make a 3x3 grid).
    assert grid.shape == (22, 22, 3) and grid.std() > 0


@pytest.mark.slow
def test_upsampler_sample_grid_upsamples_the_last_training_batch():
    """An upsampler's grid conditions on the first images (and labels) of the last training
    batch, a global array sharded over the mesh, gathered once per grid; one trace."""
    config = tiny.get_config()
    config.model = default.superres_model(
        large_size=64, small_size=32, num_channels=32, num_res_blocks=1, num_heads=2,
        attention_resolutions="8", class_cond=True, learn_sigma=True,
    )  # fmt: skip
    config.data.image_size = 64
    config.train.num_sample_images = 3
    mesh = sharding.create_mesh(fsdp=2)
    module = train.build_model(config)
    tx = state_lib.make_optimizer(config.train)
    state, _ = state_lib.create_train_state(module, config, tx, mesh)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.uniform(-1, 1, (8, 64, 64, 3)).astype(np.float32),
        "label": np.arange(8, dtype=np.int32),
    }
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    grid = loop._SampleGrid(config, module, mesh)
    with jax.set_mesh(mesh):
        gathered = jax.device_get(grid._gather(batch))
    np.testing.assert_array_equal(gathered["labels"], [0, 1, 2, 0, 1, 2, 0, 1])
    assert gathered["low_res"].shape == (8, 32, 32, 3)
    np.testing.assert_allclose(gathered["low_res"][3], gathered["low_res"][0])
    first = grid(state.params, 1, batch)
    second = grid(state.params, 2, batch)
    assert first.shape == second.shape == (3, 64, 64, 3) and first.dtype == np.uint8
    assert grid.sampler.trace_count == 1
