"""Bits/dim (`calc_bpd_loop`, `bpd_terms`) against golden cases `diffusion_functions_base`
(GaussianDiffusion, linear, T=1000) and `diffusion_functions_spaced250` (SpacedDiffusion
"250"): the reference computes the same vb term in `training_losses` (loss_type KL: the full
`_vb_terms_bpd` with clip_denoised=False, decoder NLL at t=0) and the same eps in its
`mse`; the per-example t include 0, 1 and T-1. Golden arrays are NCHW (channel_axis=1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import StubModel, assert_close

from adm_jax import diffusion as dm

CASES = {"diffusion_functions_base": None, "diffusion_functions_spaced250": "250"}
KL = "training_losses/LEARNED_RANGE/KL/loss"
HYBRID = "training_losses/LEARNED_RANGE/MSE"
PMV_CLIP = "p_mean_variance/LEARNED_RANGE/EPSILON/clip_True"
# mse re-derives eps from x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar): at t = 0,
# sqrt(1 / abar - 1) ~ 0.01 turns float32 round-off of x_t into ~1e-5 of eps.
MSE_RTOL = 1e-4


def make(case):
    use = None if CASES[case] is None else dm.space_timesteps(1000, CASES[case])
    return dm.make_diffusion(
        dm.get_named_beta_schedule("linear", 1000),
        model_mean_type="epsilon",
        model_var_type="learned_range",
        loss_type="mse",
        use_timesteps=use,
    )


def tolerances(meta, case):
    hint = meta["tolerance_hint"]
    return dict(rtol=hint["rtol"], atol=hint["atol"], case=case)


@pytest.mark.parametrize("case", list(CASES))
def test_bpd_terms_match_reference(golden, case):
    """One step of the bound at the golden t (0, 1, ..., T-1) with the golden noise."""
    meta, a = golden(case)
    tol = tolerances(meta, case)
    d = make(case)
    x0, t, noise = a["x_start"], a["t"], a["noise"]
    assert 0 in t and d.num_timesteps - 1 in t, f"{case}: golden t {t} lacks 0 or T-1"
    stub = StubModel(a["model_output_learned"])
    terms = dm.bpd_terms(d, stub, x0, t, noise, clip_denoised=False, channel_axis=1)
    np.testing.assert_array_equal(
        stub.received[0], a["model_received_timesteps"], err_msg=f"{case}: model timesteps"
    )
    assert_close(terms["vb"], a[KL], quantity=f"vb vs {KL}", **tol)
    assert_close(terms["vb"], a[f"{HYBRID}/vb"], quantity=f"vb vs {HYBRID}/vb", **tol)
    assert_close(
        terms["mse"], a[f"{HYBRID}/mse"], quantity=f"mse vs {HYBRID}/mse", case=case,
        rtol=MSE_RTOL, atol=0.0,
    )  # fmt: skip

    # clip_denoised=True (calc_bpd_loop's default): the terms at the reference's clipped
    # p_mean_variance (mean, log-variance, pred_xstart of the same stub output).
    clipped = dm.bpd_terms(d, StubModel(a["model_output_learned"]), x0, t, noise, channel_axis=1)
    ref_pmv = {k: a[f"{PMV_CLIP}/{k}"] for k in ("mean", "log_variance", "pred_xstart")}
    ref_vb = dm.vb_terms_bpd(d, ref_pmv, x0, a["q_sample/x_t"], t)
    assert_close(clipped["vb"], ref_vb, quantity=f"vb (clipped) at {PMV_CLIP}", **tol)
    ref_xstart_mse = np.mean((ref_pmv["pred_xstart"] - x0) ** 2, axis=(1, 2, 3))
    assert_close(clipped["xstart_mse"], ref_xstart_mse, quantity=f"xstart_mse at {PMV_CLIP}", **tol)


@pytest.mark.parametrize("case", list(CASES))
def test_calc_bpd_loop_matches_reference_at_golden_t(golden, case):
    """The scan itself (jitted) with stored noise: example i's column for its golden t_i
    equals the reference's vb and mse there, and prior_bpd the reference's `_prior_bpd`."""
    meta, a = golden(case)
    tol = tolerances(meta, case)
    d = make(case)
    T, x0, t = d.num_timesteps, a["x_start"], a["t"]
    cols = T - 1 - t  # column j is step T - 1 - j
    noise = np.zeros((T, *x0.shape), np.float32)
    noise[cols, np.arange(len(t))] = a["noise"]
    out = a["model_output_learned"]
    seen = []

    def model_fn(x, ts):
        seen.append(ts)  # traced once: the scan body is not unrolled
        return jnp.asarray(out)

    f = jax.jit(
        lambda x, n: dm.calc_bpd_loop(d, model_fn, x, noise=n, clip_denoised=False, channel_axis=1)
    )
    res = f(x0, noise)
    assert len(seen) == 1, f"{case}: model_fn traced {len(seen)} times"
    rows = np.arange(len(t))
    assert res["vb"].shape == (len(t), T)
    assert_close(res["vb"][rows, cols], a[KL], quantity=f"scan vb vs {KL}", **tol)
    assert_close(
        res["mse"][rows, cols], a[f"{HYBRID}/mse"], quantity=f"scan mse vs {HYBRID}/mse",
        case=case, rtol=MSE_RTOL, atol=0.0,
    )  # fmt: skip
    # prior_bpd is ~1e-5 (atol-sized): compare it relatively.
    assert_close(
        res["prior_bpd"], a["prior_bpd"], quantity="scan prior_bpd", case=case, rtol=1e-6, atol=0
    )
    total = np.asarray(res["vb"], np.float64).sum(1) + np.asarray(res["prior_bpd"], np.float64)
    assert_close(res["total_bpd"], total, quantity="total_bpd", case=case, rtol=1e-6, atol=0)


def test_calc_bpd_loop_key_scan_traces_once_and_sums():
    """Key-based noise on a respaced process: one trace for any batch contents, column j is
    `bpd_terms` at step T - 1 - j with noise normal(fold_in(key, T - 1 - j)) and ORIGINAL
    timesteps for the model, and total = sum of the columns + prior."""
    d = dm.create_diffusion(learn_sigma=True, timestep_respacing="4")
    traces = []

    def model_fn(x, t):  # depends on x and the original timestep
        return jnp.concatenate([0.3 * x, jnp.tanh(x) * (t[:, None, None, None] / 1000)], -1)

    @jax.jit
    def run(x, key):  # the scan, and the same terms step by step (one compilation for both)
        traces.append(1)
        steps = []
        for step in range(d.num_timesteps - 1, -1, -1):
            t = jnp.full((x.shape[0],), step, jnp.int32)
            noise = jax.random.normal(jax.random.fold_in(key, step), x.shape)
            steps.append(dm.bpd_terms(d, model_fn, x, t, noise))
        return dm.calc_bpd_loop(d, model_fn, x, key), steps

    rng = np.random.default_rng(0)
    key = jax.random.key(5)
    for _ in range(2):
        x0 = jnp.asarray(rng.integers(0, 256, (3, 4, 4, 3)) / 127.5 - 1, jnp.float32)
        out, steps = run(x0, key)
    assert len(traces) == 1, f"calc_bpd_loop retraced: {len(traces)} traces"
    assert d.timestep_map.tolist() != list(range(d.num_timesteps))  # respaced: t is mapped
    for j, ref in enumerate(steps):
        for name in ("vb", "xstart_mse", "mse"):
            np.testing.assert_allclose(
                out[name][:, j], ref[name], rtol=1e-5, atol=1e-6, err_msg=f"{name} column {j}"
            )
    total = np.asarray(out["vb"], np.float64).sum(1) + np.asarray(out["prior_bpd"], np.float64)
    np.testing.assert_allclose(out["total_bpd"], total, rtol=1e-6)
    assert np.all(np.isfinite(out["total_bpd"])) and np.all(out["vb"] > 0)


def test_calc_bpd_loop_rejects_bad_noise():
    d = dm.create_diffusion(timestep_respacing="3")
    x0 = jnp.zeros((2, 4, 4, 3))
    model_fn = lambda x, t: x
    with pytest.raises(ValueError, match="exactly one of key and noise"):
        dm.calc_bpd_loop(d, model_fn, x0)
    with pytest.raises(ValueError, match=r"noise must have shape \(3, 2, 4, 4, 3\)"):
        dm.calc_bpd_loop(d, model_fn, x0, noise=jnp.zeros((2, 2, 4, 4, 3)))
