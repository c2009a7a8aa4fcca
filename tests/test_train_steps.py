"""The jitted train step: sharding-invariance (8 devices == 1 device), non-finite skipping,
compile-once, gradient accumulation, and the classifier step."""

import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from adm_jax.recipe import config as config_lib  # noqa: E402
from adm_jax.train import sharding, steps  # noqa: E402
from adm_jax.train import state as state_lib  # noqa: E402
from configs import tiny  # noqa: E402


def _batch(config, seed=0, nan=False):
    rng = np.random.default_rng(seed)
    b, s = config.train.batch_size, config.data.image_size
    image = rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32)
    if nan:
        image[1, 3, 3, 0] = np.nan
    return {"image": image, "label": rng.integers(0, 10, (b,)).astype(np.int32)}


def _setup(config, mesh, classifier=False):
    module = config_lib.build_model(config)
    diffusion = config_lib.build_diffusion(config)
    tx = state_lib.make_optimizer(config.train)
    state, shardings = state_lib.create_train_state(module, config, tx, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    step = steps.jit_train_step(
        module, diffusion, tx, config, shardings, mesh, classifier=classifier
    )

    def run(state, batch):
        batch = jax.device_put(batch, batch_sh)
        with jax.set_mesh(mesh):
            return step(state, batch)

    return state, run


def _tiny(**train):
    """configs/tiny.py shrunk to one 8x8 level (compiles several times faster on CPU)."""
    config = tiny.get_config()
    config.model.image_size = config.data.image_size = 8
    config.model.channel_mult = "1"
    config.model.resblock_updown = False
    config.train.fsdp_min_size = 256  # shard most tensors, to exercise FSDP
    for k, v in train.items():
        config.train[k] = v
    return config


@pytest.mark.slow
def test_sharded_step_equals_single_device():
    """One step on a (data 4, fsdp 2) mesh equals the same step on one device: same loss,
    same params. Tolerance: rtol 1e-4 / atol 1e-6 on params (float32 reductions are split
    differently across devices; Adam's first step is g / |g|, so params move by ~lr)."""
    config = _tiny(ema_rate="0.9")
    batch = _batch(config)
    results = []
    for mesh in (
        sharding.create_mesh(fsdp=1, devices=jax.devices()[:1]),
        sharding.create_mesh(fsdp=2),
    ):
        state, run = _setup(config, mesh)
        if mesh.size == 8:
            specs = {
                s.spec for s in jax.tree.leaves(jax.tree.map(lambda x: x.sharding, state.params))
            }
            assert any("fsdp" in str(s) for s in specs)  # parameters really are sharded
        state, metrics = run(state, batch)
        results.append(jax.device_get((state.params, state.ema_params, metrics)))
    (p1, e1, m1), (p8, e8, m8) = results
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p1, p8)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), e1, e8)


def test_nonfinite_batch_is_skipped_and_step_traces_once():
    """A NaN pixel makes loss/grad non-finite: params, EMA, Adam and the importance sampler's
    history stay bit-identical, the skip is counted, and the step never retraces."""
    config = _tiny(schedule_sampler="loss-second-moment")
    mesh = sharding.create_mesh(fsdp=2)
    state, run = _setup(config, mesh)
    before = steps.TRACE_COUNTS.get("diffusion_train", 0)
    state, m = run(state, _batch(config, 0))
    assert bool(m["finite"]) and int(state.sampler_state.counts.sum()) == config.train.batch_size
    kept = jax.device_get((state.params, state.ema_params, state.opt_state, state.sampler_state))
    state, m = run(state, _batch(config, 1, nan=True))
    assert not bool(m["finite"])
    assert (int(state.step), int(state.skipped), int(state.nonfinite_streak)) == (2, 1, 1)
    after = jax.device_get((state.params, state.ema_params, state.opt_state, state.sampler_state))
    jax.tree.map(np.testing.assert_array_equal, kept, after)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(after) if x.dtype.kind == "f")
    state, m = run(state, _batch(config, 2))
    assert bool(m["finite"]) and int(state.nonfinite_streak) == 0 and int(state.skipped) == 1
    assert steps.TRACE_COUNTS["diffusion_train"] - before == 1


@pytest.mark.slow
def test_grad_accumulation_matches_one_big_batch():
    """grad_accum_steps=2 (a scan over strided microbatches) gives the same update as one
    batch: gradients are the batch mean either way (no dropout so the nets see the same)."""
    out = []
    for k in (1, 2):
        config = _tiny(grad_accum_steps=k, ema_rate="")
        config.model.dropout = 0.0
        state, run = _setup(config, sharding.create_mesh(fsdp=2))
        state, m = run(state, _batch(config))
        out.append(jax.device_get((state.params, m["loss"])))
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), out[0][0], out[1][0]
    )


def test_classifier_step():
    config = tiny.get_config("classifier")
    state, run = _setup(config, sharding.create_mesh(fsdp=2), classifier=True)
    state, m = run(state, _batch(config))
    assert np.isfinite(m["loss"]) and 0 <= m["acc@1"] <= m["acc@5"] <= 1
    assert m["q_count"].sum() == config.train.batch_size
    assert float(m["lr"]) == pytest.approx(config.train.lr)  # anneal starts at lr


def test_lr_schedule_matches_reference_anneal():
    config = _tiny(lr=2e-4, lr_anneal_steps=100)
    sched = state_lib.lr_schedule(config.train)
    for step in (0, 10, 50, 99):
        assert float(sched(step)) == pytest.approx(2e-4 * (1 - step / 100), rel=1e-5)


def test_fsdp_rule():
    spec = sharding.fsdp_spec
    assert spec((3, 3, 64, 128), 2, 1000) == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert spec((128,), 2, 1000) == jax.sharding.PartitionSpec()  # small: replicated
    assert spec((7, 9), 2, 1) == jax.sharding.PartitionSpec()  # nothing divisible


def test_area_downsample_is_mean_pooling():
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    y = steps.area_downsample(x, 2)
    np.testing.assert_allclose(y[0, 0, 0], x[0, :2, :2].mean((0, 1)))


def test_drop_labels_is_seeded_and_uses_the_null_label():
    labels = jnp.arange(1000, dtype=jnp.int32) % 10
    key = jax.random.key(3)
    half = steps.drop_labels(key, labels, 0.5, 10)
    np.testing.assert_array_equal(half, steps.drop_labels(key, labels, 0.5, 10))  # same key
    dropped = np.asarray(half) == 10
    assert 0.4 < dropped.mean() < 0.6
    np.testing.assert_array_equal(np.asarray(half)[~dropped], np.asarray(labels)[~dropped])
    assert not np.array_equal(half, steps.drop_labels(jax.random.key(4), labels, 0.5, 10))
    np.testing.assert_array_equal(steps.drop_labels(key, labels, 1 - 1e-7, 10), 10)


class _LabelNet(nn.Module):
    """A stand-in for the UNet whose output is its label embedding: the train step compiles
    in a second, and the parameters say which labels the step used."""

    image_size: int = 8
    in_channels: int = 3
    num_classes: int = 10

    @property
    def null_label(self):
        return self.num_classes

    @nn.compact
    def __call__(self, x, t, y=None, *, train=False):
        emb = nn.Embed(self.num_classes + 1, 6, name="label_emb")(y)
        return jnp.zeros((*x.shape[:-1], 6)) + emb[:, None, None, :]


def test_label_dropout_step_trains_on_the_null_label():
    """class_dropout_prob ~1: only the null label's embedding row learns, and the step equals
    (bitwise) a step without dropout on a batch that already holds the null label."""
    config = _tiny(ema_rate="")
    config.model.class_dropout_prob = 1 - 1e-7
    no_drop = _tiny(ema_rate="")
    module = _LabelNet()
    diffusion = config_lib.build_diffusion(config)
    tx = state_lib.make_optimizer(config.train)
    state = jax.jit(state_lib.make_init_fn(module, config, tx))(jax.random.PRNGKey(0))
    batch = _batch(config)
    null_batch = dict(batch, label=np.full_like(batch["label"], module.null_label))
    out = []
    for cfg, b in ((config, batch), (no_drop, null_batch)):
        new_state, metrics = jax.jit(steps.make_diffusion_train_step(module, diffusion, tx, cfg))(
            state, b
        )
        out.append(jax.device_get((new_state.params, metrics["loss"])))
    jax.tree.map(np.testing.assert_array_equal, out[0], out[1])
    moved = np.any(out[0][0]["label_emb"]["embedding"] != state.params["label_emb"]["embedding"], 1)
    np.testing.assert_array_equal(np.flatnonzero(moved), [module.null_label])


def test_label_dropout_needs_a_null_label():
    config = _tiny()
    module = config_lib.build_model(config)  # class_dropout_prob 0: no null label
    config.model.class_dropout_prob = 0.1
    with pytest.raises(ValueError, match=r"^model\.class_dropout_prob: 0.1 needs a module"):
        steps.make_diffusion_train_step(module, None, None, config)
