"""DPM-Solver++ and classifier-free guidance against golden case `dpm_solver` (the reference
dpm_solver_pytorch.py driving toy models and guided-diffusion networks). Golden images are
NCHW; the solver is NHWC, so the toy models below are the JSON's formulas written for NHWC.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from adm_jax import diffusion as dm
from adm_jax.convert import reference_model

TOY_CASES = [
    "toy_2m_linear10_scale0",
    "toy_2m_linear10_scale1",
    "toy_2m_linear10_scale10",
    "toy_3m_cosine12_logsnr",
    "toy_1m_linear8_quadratic",
    "toy_2m_linear6_threshold",
]
NETWORK_CASES = ["unet_2m_linear10_guided", "cfg_2m_cosine8"]
# Model times are float32 values near 0..1000 (one ulp at 1000 is 6e-5); the reference's time
# grid came from float32 linspace, ours is float64.
TIME_TOL = dict(rtol=0.0, atol=1e-3)
GRID_TOL = dict(rtol=1e-6, atol=1e-7)


def nhwc(a):
    return np.transpose(a, (0, 2, 3, 1))


def toy_networks(a, labels=None):
    """The golden 'toy_models': eps (plus v, learned sigma) model and a linear classifier."""
    p = {k[len("toy/") :]: jnp.asarray(v) for k, v in a.items() if k.startswith("toy/")}

    def model_fn(x, t, y=labels):
        tt = (t / 1000.0)[:, None, None, None]
        cy = 0.0 if y is None else p["toy_cy"] * jnp.asarray(y, jnp.float32)[:, None, None, None]
        eps = p["toy_a"] * x + p["toy_b"] * jnp.tanh(p["toy_k"] * x) * (tt - 0.5) + cy
        v = p["toy_d"] * jnp.tanh(x + p["toy_e"]) + p["toy_f"] * (2 * tt - 1)
        return jnp.concatenate([eps, v], axis=-1)

    def classifier_fn(x, t):
        flat = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # NCHW (C-order) flatten
        return (flat @ p["cls_W"] + p["cls_c"]) * (1 - p["cls_g"] * t[:, None] / 1000.0)

    return model_fn, classifier_fn


def solver_kwargs(c, a, case, classifier_fn=None):
    kw = dict(
        steps=c["steps"],
        order=c["order"],
        skip_type=c["skip_type"],
        thresholding=c["thresholding"],
        lower_order_final=c["lower_order_final"],
    )
    if c["classifier_scale"] is not None:
        kw.update(
            classifier_fn=classifier_fn, y=a[f"{case}/y"], classifier_scale=c["classifier_scale"]
        )
    return kw


def case_diffusion(c):
    return dm.create_diffusion(
        steps=c["diffusion_steps"], noise_schedule=c["schedule"], learn_sigma=c["learn_sigma"]
    )


def check_plan(c, a, case, diffusion):
    plan = dm.dpm_solver_plan(
        diffusion,
        steps=c["steps"],
        order=c["order"],
        skip_type=c["skip_type"],
        lower_order_final=c["lower_order_final"],
    )
    assert plan["total_n"] == c["total_N_after_clip"], f"{case}: total_N_after_clip"
    assert_close(
        plan["t_continuous"],
        a[f"{case}/t_continuous"],
        case=case,
        quantity="t_continuous",
        **GRID_TOL,
    )
    return plan


def test_every_golden_case_is_tested(golden):
    meta, _ = golden("dpm_solver")
    assert sorted(meta["cases"]) == sorted(TOY_CASES + NETWORK_CASES)


@pytest.mark.parametrize("case", TOY_CASES)
def test_toy_case_matches_reference(golden, case):
    meta, a = golden("dpm_solver")
    c = meta["cases"][case]
    assert (c["method"], c["algorithm_type"]) == ("multistep", "dpmsolver++")
    diffusion = case_diffusion(c)
    plan = check_plan(c, a, case, diffusion)
    model_fn, classifier_fn = toy_networks(a)
    received = []

    def recording_model(x, t):
        jax.debug.callback(lambda tt: received.append(np.asarray(tt)), t, ordered=True)
        return model_fn(x, t)

    x_0 = dm.dpm_solver_sample(
        diffusion,
        recording_model,
        nhwc(a[f"{case}/x_T"]),
        **solver_kwargs(c, a, case, classifier_fn),
    )
    jax.effects_barrier()
    tol = meta["tolerance_hint"]["toy"]
    assert_close(x_0, nhwc(a[f"{case}/x_0"]), case=case, quantity="x_0", **tol)
    times = np.stack(received)
    assert times.shape == (c["steps"], a[f"{case}/x_T"].shape[0]), f"{case}: model calls"
    assert times.dtype == np.float32, f"{case}: model time dtype {times.dtype}"
    for quantity, ours in (
        ("model_input_times", times[:, 0]),
        ("plan model_times", plan["model_times"]),
    ):
        assert_close(ours, a[f"{case}/model_input_times"], case=case, quantity=quantity, **TIME_TOL)


def reference_network(golden, name, kind):
    meta, arrays = golden(name)
    state_dict = {k[len("sd/") :]: v for k, v in arrays.items() if k.startswith("sd/")}
    module, variables = reference_model(kind, meta["constructor"]["kwargs"], state_dict)
    return module, variables


@pytest.mark.slow  # 17-26 s on 2 cores, mostly compiling UNet + classifier gradient inside the scan
def test_classifier_guided_unet_matches_reference(golden):
    """unet_learnsigma (6 output channels: eps, v) + classifier_encoder, scale 2, thresholding."""
    case = "unet_2m_linear10_guided"
    meta, a = golden("dpm_solver")
    c = meta["cases"][case]
    diffusion = case_diffusion(c)
    check_plan(c, a, case, diffusion)
    unet, unet_vars = reference_network(golden, "unet_learnsigma", "unet")
    classifier, cls_vars = reference_network(golden, "classifier_encoder", "classifier")
    x_0 = dm.dpm_solver_sample(
        diffusion,
        lambda x, t: unet.apply(unet_vars, x, t),
        nhwc(a[f"{case}/x_T"]),
        **solver_kwargs(c, a, case, lambda x, t: classifier.apply(cls_vars, x, t)),
    )
    tol = meta["tolerance_hint"]["networks"]
    assert_close(x_0, nhwc(a[f"{case}/x_0"]), case=case, quantity="x_0", **tol)


def test_classifier_free_unet_matches_reference(golden):
    """unet_classcond_legacyattn with label 9 as the null label, cfg scale 3, cosine (N = 996)."""
    case = "cfg_2m_cosine8"
    meta, a = golden("dpm_solver")
    c = meta["cases"][case]
    diffusion = case_diffusion(c)
    check_plan(c, a, case, diffusion)
    unet, variables = reference_network(golden, "unet_classcond_legacyattn", "unet")
    model_fn = dm.classifier_free_model_fn(
        lambda x, t, y: unet.apply(variables, x, t, y=y),
        a[f"{case}/y"],
        c["null_label"],
        c["cfg_scale"],
    )
    x_0 = dm.dpm_solver_sample(
        diffusion, model_fn, nhwc(a[f"{case}/x_T"]), **solver_kwargs(c, a, case)
    )
    tol = meta["tolerance_hint"]["networks"]
    assert_close(x_0, nhwc(a[f"{case}/x_0"]), case=case, quantity="x_0", **tol)


def test_solver_traces_once(golden):
    """One compiled program: new x_T, labels and guidance scales never retrace the model."""
    _, a = golden("dpm_solver")
    model_fn, classifier_fn = toy_networks(a)
    traces = []

    def counting_model(x, t):
        traces.append(1)
        return model_fn(x, t)

    d = dm.create_diffusion(learn_sigma=True)
    x_T = nhwc(a["toy_2m_linear10_scale1/x_T"])
    kw = dict(steps=4, order=3, classifier_fn=classifier_fn, thresholding=True)
    out_a = dm.dpm_solver_sample(d, counting_model, x_T, y=[1, 3], classifier_scale=1.0, **kw)
    out_b = dm.dpm_solver_sample(d, counting_model, 2 * x_T, y=[0, 4], classifier_scale=10, **kw)
    assert len(traces) == 1, f"model_fn traced {len(traces)} times for two calls"
    assert np.isfinite(out_a).all() and np.isfinite(out_b).all()
    assert not np.allclose(out_a, out_b)


def test_cfg_sweep_in_user_jit_compiles_once(golden):
    """classifier_free_model_fn built inside the caller's jit: labels and scale are traced."""
    _, a = golden("dpm_solver")
    model_fn, _ = toy_networks(a)
    d = dm.create_diffusion(noise_schedule="cosine", learn_sigma=True)
    x_T = nhwc(a["toy_3m_cosine12_logsnr/x_T"])

    @jax.jit
    def run(x_T, labels, scale):
        guided = dm.classifier_free_model_fn(model_fn, labels, 9, scale)
        return dm.dpm_solver_sample(d, guided, x_T, steps=5, order=2)

    outs = [run(x_T, jnp.array([1, 3]), jnp.float32(s)) for s in (0.0, 1.0, 3.0)]
    assert run._cache_size() == 1
    cond = dm.dpm_solver_sample(d, lambda x, t: model_fn(x, t, jnp.array([1, 3])), x_T, steps=5)
    uncond = dm.dpm_solver_sample(d, lambda x, t: model_fn(x, t, jnp.array([9, 9])), x_T, steps=5)
    np.testing.assert_allclose(
        outs[1], cond, rtol=1e-5, atol=1e-5, err_msg="cfg scale 1 != conditional"
    )
    np.testing.assert_allclose(
        outs[0], uncond, rtol=1e-5, atol=1e-5, err_msg="cfg scale 0 != unconditional"
    )
    assert not np.allclose(outs[2], cond, atol=1e-3)


def test_classifier_free_model_fn_one_batched_pass():
    """eps_u + s (eps_c - eps_u) on the first C channels, conditional variance, one 2B call."""
    calls = []

    def model_fn(x, t, y):
        calls.append((x.shape, t.shape, np.asarray(y)))
        eps = x * (1.0 + y[:, None, None, None]) + t[:, None, None, None]
        return jnp.concatenate([eps, -eps + 0.5 * y[:, None, None, None]], axis=-1)

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 3)), jnp.float32)
    t = jnp.array([10.0, 500.0])
    y = np.array([1, 2])
    out = dm.classifier_free_model_fn(model_fn, y, 7, 2.5)(x, t)
    assert len(calls) == 1 and calls[0][0] == (4, 4, 4, 3) and calls[0][1] == (4,)
    np.testing.assert_array_equal(calls[0][2], [1, 2, 7, 7])
    cond, uncond = model_fn(x, t, jnp.asarray(y)), model_fn(x, t, jnp.array([7, 7]))
    np.testing.assert_allclose(
        out[..., :3], uncond[..., :3] + 2.5 * (cond[..., :3] - uncond[..., :3]), rtol=1e-6
    )
    np.testing.assert_array_equal(out[..., 3:], cond[..., 3:])


def test_classifier_free_with_ddim_and_classifier_guidance(golden):
    """The wrapper drives sample_loop (DDIM) and combines with classifier guidance in both
    samplers: at scale 1 it is exactly the conditional model."""
    _, a = golden("dpm_solver")
    model_fn, classifier_fn = toy_networks(a)
    labels = jnp.array([1, 3])
    guided = dm.classifier_free_model_fn(model_fn, labels, 9, 1.0)
    cond = lambda x, t: model_fn(x, t, labels)
    x_T = nhwc(a["toy_2m_linear10_scale1/x_T"])
    kw = dict(classifier_fn=classifier_fn, y=labels, classifier_scale=2.0)
    d = dm.create_diffusion(learn_sigma=True, timestep_respacing="ddim4")
    noise = jnp.broadcast_to(x_T, (5, *x_T.shape))
    ours = dm.sample_loop(d, guided, noise, use_ddim=True, **kw)
    np.testing.assert_allclose(ours, dm.sample_loop(d, cond, noise, use_ddim=True, **kw), atol=1e-5)
    base = dm.create_diffusion(learn_sigma=True)
    ours = dm.dpm_solver_sample(base, guided, x_T, steps=4, **kw)
    np.testing.assert_allclose(
        ours, dm.dpm_solver_sample(base, cond, x_T, steps=4, **kw), atol=1e-5
    )


def test_plan_orders_and_first_order_is_ddim():
    """Warm-up and lower_order_final follow the reference; order 1 is deterministic DDIM."""
    d = dm.create_diffusion()
    orders = lambda **kw: list(dm.dpm_solver_plan(d, **kw)["orders"])
    assert orders(steps=6, order=3) == [1, 2, 3, 3, 2, 1]
    assert orders(steps=6, order=3, lower_order_final=False) == [1, 2, 3, 3, 3, 3]
    assert orders(steps=10, order=3) == [1, 2] + [3] * 8  # only steps < 10 lower the end
    plan = dm.dpm_solver_plan(d, steps=5, order=1)
    lam = plan["lambda"]
    alpha, sigma = np.sqrt(1 / (1 + np.exp(-2 * lam))), np.sqrt(1 / (1 + np.exp(2 * lam)))
    np.testing.assert_allclose(alpha[:-1], plan["alpha"], rtol=1e-12)
    np.testing.assert_allclose(sigma[:-1], plan["sigma"], rtol=1e-12)
    # DDIM (eta 0): x_t = alpha_t x_0 + sigma_t (x_s - alpha_s x_0) / sigma_s
    np.testing.assert_allclose(plan["coef_x"], sigma[1:] / sigma[:-1], rtol=1e-12)
    ddim_x0 = alpha[1:] - sigma[1:] * alpha[:-1] / sigma[:-1]
    np.testing.assert_allclose(plan["coef_model"][:, 0], ddim_x0, rtol=1e-9)
    assert np.all(plan["coef_model"][:, 1:] == 0)


def reference_multistep(plan, data_prediction, x, steps, order, lower_order_final):
    """The reference's DPM_Solver.sample(method="multistep") loop and its multistep updates
    (dpmsolver++, solver_type "dpmsolver"), transcribed in float64 with their D1/D2 form."""
    lam, ts = plan["lambda"], plan["t_continuous"]
    alpha, sigma = np.sqrt(1 / (1 + np.exp(-2 * lam))), np.sqrt(1 / (1 + np.exp(2 * lam)))

    def update(x, ms, ks, j, o):
        h = lam[j] - lam[ks[-1]]
        phi_1 = np.expm1(-h)
        x_t = sigma[j] / sigma[ks[-1]] * x - alpha[j] * phi_1 * ms[-1]
        if o == 2:
            d1_0 = (ms[-1] - ms[-2]) / ((lam[ks[-1]] - lam[ks[-2]]) / h)
            x_t = x_t - 0.5 * alpha[j] * phi_1 * d1_0
        if o == 3:
            r0, r1 = (lam[ks[-1]] - lam[ks[-2]]) / h, (lam[ks[-2]] - lam[ks[-3]]) / h
            d1_0, d1_1 = (ms[-1] - ms[-2]) / r0, (ms[-2] - ms[-3]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_2 = phi_1 / h + 1.0
            x_t = x_t + alpha[j] * phi_2 * d1 - alpha[j] * (phi_2 / h - 0.5) * d2
        return x_t

    ks, ms = [0], [data_prediction(x, 0)]
    for j in range(1, order):
        x = update(x, ms, ks, j, j)
        ks.append(j)
        ms.append(data_prediction(x, j))
    for j in range(order, steps + 1):
        o = min(order, steps + 1 - j) if lower_order_final and steps < 10 else order
        x = update(x, ms, ks, j, o)
        ks, ms = ks[1:] + [j], ms[1:] + [None]
        if j < steps:
            ms[-1] = data_prediction(x, j)
    assert len(ts) == steps + 1
    return x


@pytest.mark.parametrize("steps,order", [(6, 3), (9, 2), (11, 3)])
def test_multistep_loop_matches_reference_transcription(golden, steps, order):
    """Orders and lower_order_final beyond the golden cases (third order with a lowered end)."""
    _, a = golden("dpm_solver")
    model_fn, _ = toy_networks(a)
    d = dm.create_diffusion(noise_schedule="cosine", learn_sigma=True)
    plan = dm.dpm_solver_plan(d, steps=steps, order=order)
    x_T = nhwc(a["toy_3m_cosine12_logsnr/x_T"]).astype(np.float64)
    lam = plan["lambda"]
    alpha, sigma = np.sqrt(1 / (1 + np.exp(-2 * lam))), np.sqrt(1 / (1 + np.exp(2 * lam)))

    def data_prediction(x, k):
        t = np.full(x.shape[0], (plan["t_continuous"][k] - 1 / plan["total_n"]) * 1000)
        eps = np.asarray(model_fn(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32)))
        return (x - sigma[k] * eps[..., :3]) / alpha[k]

    ref = reference_multistep(plan, data_prediction, x_T, steps, order, True)
    ours = dm.dpm_solver_sample(d, model_fn, x_T, steps=steps, order=order)
    assert_close(ours, ref, case=f"{order}M/{steps} steps", quantity="x_0", rtol=1e-5, atol=1e-4)


def test_bad_arguments_raise_one_line_errors():
    d = dm.create_diffusion(learn_sigma=True)
    x = jnp.zeros((1, 4, 4, 3))
    model_fn = lambda x, t: jnp.concatenate([x, x], -1)
    cases = [
        (dict(order=4), "order: expected 1, 2 or 3, got 4"),
        (dict(steps=2, order=3), "steps: expected an int >= order (3), got 2"),
        (dict(skip_type="karras"), "skip_type: expected one of"),
        (dict(classifier_fn=lambda x, t: x.mean((1, 2))), "y: classifier guidance needs"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            dm.dpm_solver_sample(d, model_fn, x, **kwargs)
    spaced = dm.create_diffusion(learn_sigma=True, timestep_respacing="250")
    with pytest.raises(ValueError, match="diffusion: DPM-Solver needs the unrespaced schedule"):
        dm.dpm_solver_sample(spaced, model_fn, x, steps=3)
    with pytest.raises(ValueError, match="model_fn output: expected 3 or 6 channels"):
        dm.dpm_solver_sample(d, lambda x, t: x[..., :2], x, steps=3)
