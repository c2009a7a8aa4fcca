"""Sampling steps, guidance and full guided loops against golden cases
`diffusion_sampling_steps` (SpacedDiffusion "250", linear), `diffusion_sampling_steps_base`
(GaussianDiffusion, cosine) and `guided_loops`. Golden arrays are NCHW; the math is
elementwise and the toy networks are defined on NCHW, so everything runs with channel_axis=1.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from adm_jax import diffusion as dm

STEP_CASES = {
    "diffusion_sampling_steps": ("linear", "250"),
    "diffusion_sampling_steps_base": ("cosine", None),
}


class Recorder:
    """Returns a stored array and records the timesteps it receives (eager calls only)."""

    def __init__(self, value):
        self.value = jnp.asarray(value)
        self.received = []

    def __call__(self, x, t):
        self.received.append(np.asarray(t))
        return self.value


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_sampling_steps(golden, case):
    meta, a = golden(case)
    tol = dict(case=case, rtol=meta["tolerance_hint"]["rtol"], atol=meta["tolerance_hint"]["atol"])
    schedule, respacing = STEP_CASES[case]
    use = None if respacing is None else dm.space_timesteps(1000, respacing)
    d = dm.make_diffusion(dm.get_named_beta_schedule(schedule, 1000), use_timesteps=use)
    x, t, z = a["x"], a["t"], a["step_noise"]
    grad = a["cond_grad"] * np.float32(meta["classifier_scale"])
    model, cond_fn = Recorder(a["model_output"]), Recorder(grad)
    kw = dict(channel_axis=1)
    for clip in (True, False):
        pre = f"clip_{clip}"
        out = dm.p_mean_variance(d, model, x, t, clip_denoised=clip, **kw)
        for name in ("mean", "variance", "log_variance", "pred_xstart"):
            assert_close(
                out[name],
                a[f"{pre}/p_mean_variance/{name}"],
                quantity=f"{pre}/p_mean_variance/{name}",
                **tol,
            )
        assert_close(
            dm.condition_mean(out, grad),
            a[f"{pre}/condition_mean/mean"],
            quantity=f"{pre}/condition_mean/mean",
            **tol,
        )
        cs = dm.condition_score(d, out, x, t, grad)
        for name in ("mean", "pred_xstart"):
            assert_close(
                cs[name],
                a[f"{pre}/condition_score/{name}"],
                quantity=f"{pre}/condition_score/{name}",
                **tol,
            )
        for cond in ("nocond", "cond"):
            fn = cond_fn if cond == "cond" else None
            res = dm.p_sample(d, model, x, t, z, clip_denoised=clip, cond_fn=fn, **kw)
            for name in ("sample", "pred_xstart"):
                key = f"{pre}/p_sample/{cond}/{name}"
                assert_close(res[name], a[key], quantity=key, **tol)
            for eta in (0.0, 1.0):
                res = dm.ddim_sample(
                    d, model, x, t, z, clip_denoised=clip, cond_fn=fn, eta=eta, **kw
                )
                for name in ("sample", "pred_xstart"):
                    key = f"{pre}/ddim_sample/eta_{eta}/{cond}/{name}"
                    assert_close(res[name], a[key], quantity=key, **tol)
        res = dm.ddim_reverse_sample(d, model, x, t, clip_denoised=clip, **kw)
        key = f"{pre}/ddim_reverse_sample/sample"
        assert_close(res["sample"], a[key], quantity=key, **tol)
    for received in model.received:
        np.testing.assert_array_equal(
            received, a["model_received_timesteps"], err_msg=f"{case}: model timesteps"
        )
    assert len(cond_fn.received) == 6  # p_sample + ddim eta 0, 1; per clip
    for received in cond_fn.received:
        np.testing.assert_array_equal(
            received, a["cond_fn_received_timesteps"], err_msg=f"{case}: cond_fn timesteps"
        )


def toy_networks(a, y):
    """The toy eps model and linear classifier of `guided_loops` (NCHW, as its JSON says)."""
    per_c = lambda v: jnp.asarray(v)[None, :, None, None]
    per_n = lambda v: v[:, None, None, None]

    def model_fn(x, t):
        tt = per_n(t.astype(jnp.float32) / 1000)
        eps = per_c(a["toy_a"]) * x + per_c(a["toy_b"]) * jnp.tanh(a["toy_k"] * x) * (tt - 0.5)
        eps = eps + a["toy_cy"] * per_n(jnp.asarray(y, jnp.float32))
        v = per_c(a["toy_d"]) * jnp.tanh(x + per_c(a["toy_e"])) + a["toy_f"] * (2 * tt - 1)
        return jnp.concatenate([eps, v], axis=1)

    def classifier_fn(x, t):
        tt = (t.astype(jnp.float32) / 1000)[:, None]
        return (x.reshape(x.shape[0], -1) @ a["cls_W"] + a["cls_c"]) * (1 - a["cls_g"] * tt)

    return model_fn, classifier_fn


LOOPS = {
    "p_sample_cosine10": ("cosine", "10", False),
    "ddim_linear_ddim10": ("linear", "ddim10", True),
}


@pytest.mark.parametrize("loop", list(LOOPS))
def test_guided_loops(golden, loop):
    case = "guided_loops"
    meta, a = golden(case)
    schedule, respacing, use_ddim = LOOPS[loop]
    d = dm.create_diffusion(noise_schedule=schedule, learn_sigma=True, timestep_respacing=respacing)
    np.testing.assert_array_equal(
        d.timestep_map, a[f"{loop}/timestep_map"], err_msg=f"{case}: {loop}/timestep_map"
    )
    y = a["y"]
    model_fn, classifier_fn = toy_networks(a, y)
    noise = np.concatenate([a[f"{loop}/init_noise"][None], a[f"{loop}/step_noise"]])
    np.testing.assert_array_equal(np.arange(d.num_timesteps)[::-1], a[f"{loop}/indices"])
    # x, the guidance gradient and the final sample agree to 1e-5 (10x tighter than the
    # JSON). pred_xstart gets the JSON's 1e-4: at the first DDIM step x_0 = (x - sqrt(1 -
    # abar) eps') / sqrt(abar) multiplies float32 round-off of the classifier gradient by
    # 1 / sqrt(abar_999) ~ 157 (measured 9e-5 at scale 10, <= 2e-5 elsewhere).
    tight = dict(case=case, rtol=1e-5, atol=1e-5)
    json_tol = dict(
        case=case, rtol=meta["tolerance_hint"]["rtol"], atol=meta["tolerance_hint"]["atol"]
    )
    step_tol = {"samples": tight, "pred_xstart": json_tol, "cond_grad": tight}
    final_tol = tight
    for scale in meta["loops"][loop]["classifier_scales"]:
        pre = f"{loop}/scale_{scale}"
        traj = dm.sample_loop(
            d,
            model_fn,
            noise,
            use_ddim=use_ddim,
            eta=0.0,
            clip_denoised=True,
            classifier_fn=classifier_fn,
            y=y,
            classifier_scale=scale,
            return_trajectory=True,
            channel_axis=1,
        )
        np.testing.assert_array_equal(
            traj["timesteps"],
            a[f"{loop}/model_timesteps"],
            err_msg=f"{case}: {loop}/model_timesteps",
        )
        np.testing.assert_array_equal(
            traj["timesteps"],
            a[f"{loop}/classifier_timesteps"],
            err_msg=f"{case}: {loop}/classifier_timesteps",
        )
        for name in ("samples", "pred_xstart", "cond_grad"):
            for k in range(d.num_timesteps):
                assert_close(
                    traj[name][k],
                    a[f"{pre}/{name}"][k],
                    quantity=f"{pre}/{name}[step {k}]",
                    **step_tol[name],
                )
        assert_close(traj["sample"], a[f"{pre}/final"], quantity=f"{pre}/final", **final_tol)
        final = dm.sample_loop(
            d,
            model_fn,
            noise,
            use_ddim=use_ddim,
            classifier_fn=classifier_fn,
            y=y,
            classifier_scale=scale,
            channel_axis=1,
        )
        assert_close(final, a[f"{pre}/final"], quantity=f"{pre}/final (no trajectory)", **final_tol)


def test_one_trace_serves_a_guidance_sweep(golden):
    """classifier_scale is traced: scales 0, 1, 10 reuse one compiled program, inside the
    user's own jit with params as arguments too."""
    _, a = golden("guided_loops")
    d = dm.create_diffusion(noise_schedule="cosine", learn_sigma=True, timestep_respacing="10")
    y = a["y"]
    model_fn, classifier_fn = toy_networks(a, y)
    traces = []

    def counting_model(x, t):
        traces.append(1)
        return model_fn(x, t)

    noise = np.concatenate(
        [a["p_sample_cosine10/init_noise"][None], a["p_sample_cosine10/step_noise"]]
    )
    for scale in (0.0, 1.0, 10.0, jnp.float32(2.5)):
        dm.sample_loop(
            d,
            counting_model,
            noise,
            classifier_fn=classifier_fn,
            y=y,
            classifier_scale=scale,
            channel_axis=1,
        )
    assert len(traces) == 1, f"model traced {len(traces)} times for 4 scales"

    @jax.jit
    def run(w, noise, scale):
        cls = lambda x, t: (
            (x.reshape(x.shape[0], -1) @ w + a["cls_c"]) * (1 - a["cls_g"] * t[:, None] / 1000)
        )
        return dm.sample_loop(
            d, counting_model, noise, classifier_fn=cls, y=y, classifier_scale=scale, channel_axis=1
        )

    ref = run(a["cls_W"], noise, 10.0)
    run(a["cls_W"] * 2, noise, 1.0)
    assert run._cache_size() == 1
    np.testing.assert_allclose(ref, a["p_sample_cosine10/scale_10.0/final"], rtol=1e-4, atol=1e-4)


def test_key_based_sample_equals_sample_loop():
    """`sample(key)` runs exactly `sample_loop` on the noise `sample_noise(key)` describes."""
    d = dm.create_diffusion(learn_sigma=True, timestep_respacing="6")
    model_fn = lambda x, t: jnp.concatenate([0.3 * x, jnp.tanh(x) * (t[:, None] / 1000)], -1)
    classifier_fn = lambda x, t: jnp.stack([x.mean(1), -x.mean(1), x.std(1)], -1)
    key, shape = jax.random.key(7), [2, 5]
    kw = dict(classifier_fn=classifier_fn, y=[0, 2], classifier_scale=2.0, return_trajectory=True)
    noise = dm.sample_noise(key, d.num_timesteps, shape)
    assert noise.shape == (7, 2, 5)
    ours = dm.sample(d, model_fn, key, shape, **kw)
    ref = dm.sample_loop(d, model_fn, noise, **kw)
    assert sorted(ours) == ["cond_grad", "pred_xstart", "sample", "samples", "timesteps"]
    for name in ours:
        np.testing.assert_allclose(ours[name], ref[name], rtol=1e-6, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(ours["samples"][-1], ours["sample"])
    np.testing.assert_array_equal(ours["timesteps"][:, 0], d.timestep_map[::-1])
