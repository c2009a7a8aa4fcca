"""Forward process, p_mean_variance and training losses against golden cases
`diffusion_functions_base` (GaussianDiffusion, linear, T=1000) and
`diffusion_functions_spaced250` (SpacedDiffusion "250"). Golden arrays are NCHW; the
diffusion math is elementwise, so it runs on them directly with channel_axis=1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import StubModel, assert_close

from adm_jax import diffusion as dm

CASES = {
    "diffusion_functions_base": None,
    "diffusion_functions_spaced250": "250",
}


def make(case, var_type, mean_type="epsilon", loss_type="mse"):
    betas = dm.get_named_beta_schedule("linear", 1000)
    respacing = CASES[case]
    use = None if respacing is None else dm.space_timesteps(1000, respacing)
    return dm.make_diffusion(
        betas,
        model_mean_type=mean_type.lower(),
        model_var_type=var_type.lower(),
        loss_type=loss_type.lower(),
        use_timesteps=use,
    )


def stub_output(arrays, spec):
    if spec == "model_output_eps":
        return arrays["model_output_eps"]
    if spec == "model_output_xstart":
        return arrays["model_output_xstart"]
    c = arrays["model_output_eps"].shape[1]
    if spec.startswith("model_output_xstart concatenated"):
        return np.concatenate(
            [arrays["model_output_xstart"], arrays["model_output_learned"][:, c:]], 1
        )
    assert spec.startswith("model_output_eps concatenated") or spec == "model_output_learned", spec
    return arrays["model_output_learned"]


@pytest.mark.parametrize("case", list(CASES))
def test_forward_process(golden, case):
    meta, a = golden(case)
    tol = dict(rtol=meta["tolerance_hint"]["rtol"], atol=meta["tolerance_hint"]["atol"], case=case)
    d = make(case, "learned_range")
    np.testing.assert_array_equal(
        d.timestep_map, a["timestep_map"], err_msg=f"{case}: timestep_map"
    )
    x0, t, noise = a["x_start"], a["t"], a["noise"]
    for name, value in zip(
        ("mean", "variance", "log_variance"), dm.q_mean_variance(d, x0, t), strict=True
    ):
        assert_close(value, a[f"q_mean_variance/{name}"], quantity=f"q_mean_variance/{name}", **tol)
    x_t = dm.q_sample(d, x0, t, noise)
    assert_close(x_t, a["q_sample/x_t"], quantity="q_sample/x_t", **tol)
    post = dm.q_posterior_mean_variance(d, x0, a["q_sample/x_t"], t)
    for name, value in zip(("mean", "variance", "log_variance_clipped"), post, strict=True):
        assert_close(value, a[f"q_posterior/{name}"], quantity=f"q_posterior/{name}", **tol)
    # prior_bpd is ~1e-5 (atol-sized); check it relatively, eager and jitted.
    strict = dict(case=case, rtol=1e-6, atol=0.0)
    assert_close(dm.prior_bpd(d, x0), a["prior_bpd"], quantity="prior_bpd", **strict)
    jitted = jax.jit(lambda x: dm.prior_bpd(d, x))(x0)
    assert_close(jitted, a["prior_bpd"], quantity="prior_bpd (jit)", **strict)


@pytest.mark.parametrize("case", list(CASES))
def test_p_mean_variance(golden, case):
    meta, a = golden(case)
    tol = dict(rtol=meta["tolerance_hint"]["rtol"], atol=meta["tolerance_hint"]["atol"], case=case)
    x_t, t = a["q_sample/x_t"], a["t"]
    cases = (
        meta.get("p_mean_variance_cases")
        or golden("diffusion_functions_base")[0]["p_mean_variance_cases"]
    )
    assert len(cases) == 11
    for key, spec in cases.items():
        d = make(case, spec["model_var_type"], spec["model_mean_type"])
        stub = StubModel(stub_output(a, spec["model_output"]))
        out = dm.p_mean_variance(
            d, stub, x_t, t, clip_denoised=spec["clip_denoised"], channel_axis=1
        )
        np.testing.assert_array_equal(
            stub.received[0],
            a["model_received_timesteps"],
            err_msg=f"{case}: {key}: model timesteps",
        )
        for name in ("mean", "variance", "log_variance", "pred_xstart"):
            assert_close(out[name], a[f"{key}/{name}"], quantity=f"{key}/{name}", **tol)


@pytest.mark.parametrize("case", list(CASES))
def test_training_losses(golden, case):
    meta, a = golden(case)
    tol = dict(rtol=meta["tolerance_hint"]["rtol"], atol=meta["tolerance_hint"]["atol"], case=case)
    for key, spec in meta["training_losses_cases"].items():
        d = make(case, spec["model_var_type"], loss_type=spec["loss_type"])
        stub = StubModel(stub_output(a, spec["model_output"]))
        terms = dm.training_losses(d, stub, a["x_start"], a["t"], a["noise"], channel_axis=1)
        assert sorted(terms) == sorted(spec["terms"]), f"{case}: {key}: terms {sorted(terms)}"
        for received in stub.received:
            np.testing.assert_array_equal(
                received,
                spec["model_received_timesteps"][0],
                err_msg=f"{case}: {key}: model timesteps",
            )
        for name in spec["terms"]:
            assert_close(terms[name], a[f"{key}/{name}"], quantity=f"{key}/{name}", **tol)


def test_vb_stops_gradient_to_the_mean(golden):
    """Hybrid loss: d(vb)/d(eps) == 0, d(mse)/d(v) == 0, d(vb)/d(v) != 0 (Improved DDPM)."""
    _, a = golden("diffusion_functions_base")
    d = make("diffusion_functions_base", "learned_range")

    def terms(out):
        t = dm.training_losses(
            d, lambda x, ts: out, a["x_start"], a["t"], a["noise"], channel_axis=1
        )
        return jnp.stack([t["vb"].sum(), t["mse"].sum()])

    g_vb, g_mse = jax.jit(jax.jacrev(terms))(jnp.asarray(a["model_output_learned"]))
    assert np.all(g_vb[:, :3] == 0) and np.any(g_vb[:, 3:] != 0)
    assert np.all(g_mse[:, 3:] == 0) and np.any(g_mse[:, :3] != 0)


def test_training_losses_jitted_nhwc(golden):
    """The default NHWC layout under jit reproduces the (NCHW) golden losses."""
    case = "diffusion_functions_spaced250"
    meta, a = golden(case)
    key = "training_losses/LEARNED_RANGE/MSE"
    d = make(case, "learned_range")
    to_nhwc = lambda z: np.transpose(z, (0, 2, 3, 1))
    out = to_nhwc(a["model_output_learned"])
    f = jax.jit(lambda x0, t, n: dm.training_losses(d, lambda x, tt: out, x0, t, n))
    terms = f(to_nhwc(a["x_start"]), a["t"], to_nhwc(a["noise"]))
    for name in ("loss", "mse", "vb"):
        assert_close(
            terms[name],
            a[f"{key}/{name}"],
            case=case,
            quantity=f"NHWC {key}/{name}",
            rtol=1e-5,
            atol=1e-5,
        )
