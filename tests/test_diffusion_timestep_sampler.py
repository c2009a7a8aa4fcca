"""Timestep samplers against golden case `resample` (UniformSampler and
LossSecondMomentResampler(history_per_term=10, uniform_prob=0.001) on 20 timesteps)."""

import jax
import jax.numpy as jnp
import numpy as np

from adm_jax import diffusion as dm

CASE = "resample"


def run_updates(a, dtype):
    """Weights and warm-up flag after each golden batch; the update is jitted once."""
    num_timesteps = a["uniform_weights"].shape[0]
    state = dm.loss_second_moment_init(num_timesteps, history_per_term=10, dtype=dtype)
    traces = []

    @jax.jit
    def update(state, ts, losses):
        traces.append(1)
        return dm.loss_second_moment_update(state, ts, losses)

    weights, warm = [], []
    for ts, losses in zip(a["update_ts"], a["update_losses"], strict=True):
        state = update(state, ts, losses)
        weights.append(np.asarray(dm.loss_second_moment_weights(state, uniform_prob=0.001)))
        warm.append(bool(dm.loss_second_moment_warmed_up(state)))
    assert len(traces) == 1, f"update traced {len(traces)} times"
    return state, np.stack(weights), np.array(warm)


def check(state, weights, warm, a, rtol):
    np.testing.assert_array_equal(
        warm, a["warmed_up_after_update"], err_msg=f"{CASE}: warmed_up_after_update"
    )
    assert int(np.argmax(warm)) == 42
    for i, (ours, ref) in enumerate(zip(weights, a["weights_after_update"], strict=True)):
        np.testing.assert_allclose(
            ours, ref, rtol=rtol, atol=0, err_msg=f"{CASE}: weights_after_update[{i}]"
        )
    np.testing.assert_array_equal(
        state.counts, a["final_loss_counts"], err_msg=f"{CASE}: final_loss_counts"
    )
    np.testing.assert_allclose(
        state.history, a["final_loss_history"], rtol=rtol, err_msg=f"{CASE}: final_loss_history"
    )


def test_loss_second_moment_float32(golden):
    """Default float32 state (no x64 flag): FIFO bookkeeping exact, weights to float32."""
    _, a = golden(CASE)
    state, weights, warm = run_updates(a, jnp.float32)
    assert state.history.dtype == jnp.float32
    check(state, weights, warm, a, rtol=2e-6)


def test_loss_second_moment_float64(golden):
    """With x64 and a float64 history the reference's float64 weights match to 1e-12."""
    meta, a = golden(CASE)
    with jax.enable_x64(True):
        state, weights, warm = run_updates(a, jnp.float64)
        assert state.history.dtype == jnp.float64
        check(state, weights, warm, a, rtol=meta["tolerance_hint"]["rtol"])


def test_uniform_and_sample_weights(golden):
    _, a = golden(CASE)
    num_timesteps = 20
    state = dm.loss_second_moment_init(num_timesteps)
    np.testing.assert_array_equal(dm.loss_second_moment_weights(state), a["uniform_weights"])
    t, w = dm.uniform_sample_timesteps(jax.random.key(0), num_timesteps, 64)
    assert t.dtype == jnp.int32 and t.shape == (64,) and 0 <= t.min() and t.max() < num_timesteps
    np.testing.assert_array_equal(w, np.ones(64, np.float32))

    # sample_weights == float32(1 / (T p[t])), p = w / sum(w), from the final weights.
    final = a["weights_after_update"][-1]
    p = final / final.sum()
    np.testing.assert_allclose(
        a["sample_weights"],
        (1 / (num_timesteps * p[a["sample_indices"]])).astype(np.float32),
        rtol=1e-7,
        err_msg=f"{CASE}: sample_weights semantics",
    )
    t, w = jax.jit(dm.importance_sample_timesteps, static_argnums=2)(
        jax.random.key(1), jnp.asarray(final, jnp.float32), 4096
    )
    assert w.dtype == jnp.float32 and t.dtype == jnp.int32
    np.testing.assert_allclose(w, 1 / (num_timesteps * p[np.asarray(t)]), rtol=1e-5)
    # Importance weights keep the loss estimate unbiased: E_p[w] = 1; frequencies follow p.
    assert abs(float(w.mean()) - 1) < 0.05
    freq = np.bincount(np.asarray(t), minlength=num_timesteps) / t.shape[0]
    np.testing.assert_allclose(freq, p, atol=0.02)


def test_state_is_a_checkpointable_pytree():
    state = dm.loss_second_moment_init(5, history_per_term=3)
    leaves = jax.tree_util.tree_leaves(state)
    assert [x.shape for x in leaves] == [(5, 3), (5,)]
    # Duplicate timesteps in one batch are processed in order, like the reference.
    state = dm.loss_second_moment_update(state, jnp.array([2, 2, 2, 2]), jnp.array([1.0, 2, 3, 4]))
    np.testing.assert_array_equal(state.history[2], [2.0, 3.0, 4.0])
    assert int(state.counts[2]) == 3
