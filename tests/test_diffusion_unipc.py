"""UniPC against golden case `unipc` (the reference uni_pc.py driving the toy eps/v model and
guided-diffusion networks). Golden images are NCHW, the solver NHWC; the toy networks are the
JSON's formulas for NHWC, shared with the DPM-Solver test (the same formulas in its JSON).
"""

import jax
import numpy as np
import pytest
from conftest import assert_close
from test_diffusion_dpm_solver import nhwc, reference_network, toy_networks

from adm_jax import diffusion as dm
from adm_jax.diffusion.unipc import unipc_plan

TOY_CASES = [
    "toy_bh2_o2_linear8",
    "toy_bh2_o3_linear10_logsnr",
    "toy_bh1_o3_linear6",
    "toy_bh2_o2_linear7_threshold",
    "toy_bh2_o2_linear8_guided",
]
NETWORK_CASES = ["unet_bh2_o2_linear6_guided", "unet_bh2_o3_linear5_threshold"]
# The JSON: model input times are float64 before the float32 cast; compare with atol ~1e-4.
TIME_TOL = dict(rtol=0.0, atol=1e-4)
# Both time grids are float64 from the same formulas.
GRID_TOL = dict(rtol=0.0, atol=1e-12)


def x0_tolerance(meta, case):
    hint = meta["tolerance_hint"]
    return dict(rtol=hint["rtol"], atol=hint["atol_per_case"][case])


def case_diffusion(c):
    return dm.create_diffusion(
        steps=c["diffusion_steps"], noise_schedule=c["schedule"], learn_sigma=c["learn_sigma"]
    )


def solver_kwargs(c, a, case, classifier_fn=None):
    assert (c["method"], c["algorithm_type"]) == ("multistep", "data_prediction"), case
    assert c["lower_order_final"] and not c["denoise_to_zero"], case
    kw = dict(
        steps=c["steps"],
        order=c["order"],
        variant=c["variant"],
        skip_type=c["skip_type"],
        thresholding=c["thresholding"],
    )
    if c["classifier_scale"] is not None:
        kw.update(
            classifier_fn=classifier_fn, y=a[f"{case}/y"], classifier_scale=c["classifier_scale"]
        )
    return kw


def check_plan(c, a, case, diffusion):
    plan = unipc_plan(
        diffusion,
        steps=c["steps"],
        order=c["order"],
        variant=c["variant"],
        skip_type=c["skip_type"],
    )
    assert plan["total_n"] == c["diffusion_steps"], f"{case}: N (no log-SNR clipping)"
    assert_close(
        plan["t_continuous"],
        a[f"{case}/t_continuous"],
        case=case,
        quantity="t_continuous",
        **GRID_TOL,
    )
    assert_close(
        plan["model_times"],
        a[f"{case}/model_input_times"],
        case=case,
        quantity="plan model_times",
        **TIME_TOL,
    )
    return plan


def test_every_golden_case_is_tested(golden):
    meta, _ = golden("unipc")
    assert sorted(meta["cases"]) == sorted(TOY_CASES + NETWORK_CASES)


@pytest.mark.parametrize("case", TOY_CASES)
def test_toy_case_matches_reference(golden, case):
    meta, a = golden("unipc")
    c = meta["cases"][case]
    diffusion = case_diffusion(c)
    check_plan(c, a, case, diffusion)
    guided = c["classifier_scale"] is not None
    # Guided toy cases also condition the toy model on y (its toy_cy * y term).
    model_fn, classifier_fn = toy_networks(a, a[f"{case}/y"] if guided else None)
    received = []

    def recording_model(x, t):
        jax.debug.callback(lambda tt: received.append(np.asarray(tt)), t, ordered=True)
        return model_fn(x, t)

    x_0 = dm.unipc_sample(
        diffusion,
        recording_model,
        nhwc(a[f"{case}/x_T"]),
        **solver_kwargs(c, a, case, classifier_fn),
    )
    jax.effects_barrier()
    assert_close(x_0, nhwc(a[f"{case}/x_0"]), case=case, quantity="x_0", **x0_tolerance(meta, case))
    times = np.stack(received)
    assert times.shape == (c["nfe"], a[f"{case}/x_T"].shape[0]), f"{case}: model calls"
    assert times.dtype == np.float32, f"{case}: model time dtype {times.dtype}"
    assert_close(
        times[:, 0], a[f"{case}/model_input_times"], case=case, quantity="model times", **TIME_TOL
    )


@pytest.mark.slow  # ~15 s on 2 cores: compiling the UNet and the classifier gradient in the scan
def test_classifier_guided_unet_matches_reference(golden):
    """unet_learnsigma (eps, v) guided by classifier_encoder at scale 2, batch 1."""
    case = "unet_bh2_o2_linear6_guided"
    meta, a = golden("unipc")
    c = meta["cases"][case]
    diffusion = case_diffusion(c)
    check_plan(c, a, case, diffusion)
    unet, unet_vars = reference_network(golden, "unet_learnsigma", "unet")
    classifier, cls_vars = reference_network(golden, "classifier_encoder", "classifier")
    x_0 = dm.unipc_sample(
        diffusion,
        lambda x, t: unet.apply(unet_vars, x, t),
        nhwc(a[f"{case}/x_T"]),
        **solver_kwargs(c, a, case, lambda x, t: classifier.apply(cls_vars, x, t)),
    )
    assert_close(x_0, nhwc(a[f"{case}/x_0"]), case=case, quantity="x_0", **x0_tolerance(meta, case))


def test_third_order_thresholded_unet_matches_reference(golden):
    """unet_learnsigma, order 3 over 5 steps (orders 1, 2, 3, 2, 1), dynamic thresholding."""
    case = "unet_bh2_o3_linear5_threshold"
    meta, a = golden("unipc")
    c = meta["cases"][case]
    diffusion = case_diffusion(c)
    plan = check_plan(c, a, case, diffusion)
    assert list(plan["orders"]) == [1, 2, 3, 2, 1]
    unet, unet_vars = reference_network(golden, "unet_learnsigma", "unet")
    x_0 = dm.unipc_sample(
        diffusion,
        lambda x, t: unet.apply(unet_vars, x, t),
        nhwc(a[f"{case}/x_T"]),
        **solver_kwargs(c, a, case),
    )
    assert_close(x_0, nhwc(a[f"{case}/x_0"]), case=case, quantity="x_0", **x0_tolerance(meta, case))


def reference_multistep_unipc(ts, lam, alpha, sigma, data_prediction, x, steps, order, variant):
    """uni_pc.py's UniPC.sample(method="multistep", lower_order_final=True) and its
    multistep_uni_pc_bh_update (data prediction), transcribed in float64 in their D_k form
    (the solver under test expands them into per-step linear coefficients)."""

    def update(x, ms, ks, j, k_order, use_corrector):
        h = lam[j] - lam[ks[-1]]
        hh = -h
        rks = [(lam[ks[-(i + 1)]] - lam[ks[-1]]) / h for i in range(1, k_order)] + [1.0]
        d1s = [(ms[-(i + 1)] - ms[-1]) / rks[i - 1] for i in range(1, k_order)]
        b_h = hh if variant == "bh1" else np.expm1(hh)
        h_phi_k, fact, big_r, b = np.expm1(hh) / hh - 1, 1, [], []
        for i in range(1, k_order + 1):
            big_r.append(np.power(rks, i - 1))
            b.append(h_phi_k * fact / b_h)
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        big_r, b = np.array(big_r), np.array(b)
        x_tilde = sigma[j] / sigma[ks[-1]] * x - alpha[j] * np.expm1(hh) * ms[-1]
        if d1s:
            rhos_p = [0.5] if k_order == 2 else np.linalg.solve(big_r[:-1, :-1], b[:-1])
            x_t = x_tilde - alpha[j] * b_h * sum(r * d for r, d in zip(rhos_p, d1s, strict=True))
        else:
            x_t = x_tilde
        if not use_corrector:
            return x_t, None
        rhos_c = [0.5] if k_order == 1 else np.linalg.solve(big_r, b)
        m_t = data_prediction(x_t, j)
        corr = sum(r * d for r, d in zip(rhos_c[:-1], d1s, strict=True)) + rhos_c[-1] * (
            m_t - ms[-1]
        )
        return x_tilde - alpha[j] * b_h * corr, m_t

    ks, ms = [0], [data_prediction(x, 0)]
    for j in range(1, order):
        x, m = update(x, ms, ks, j, j, True)
        ks.append(j)
        ms.append(m)
    for j in range(order, steps + 1):
        x, m = update(x, ms, ks, j, min(order, steps + 1 - j), j < steps)
        ks, ms = ks[1:] + [j], ms[1:] + [m]
    assert len(ts) == steps + 1
    return x


@pytest.mark.parametrize(
    "steps,order,variant",
    [(7, 3, "bh1"), (12, 3, "bh2"), (6, 2, "bh1"), (5, 1, "bh2"), (4, 1, "bh1")],
)
def test_multistep_loop_matches_reference_transcription(golden, steps, order, variant):
    """Orders, variants and a cosine schedule beyond the golden cases (order 1: UniC-1 on
    DDIM), against the reference loop in float64."""
    _, a = golden("unipc")
    model_fn, _ = toy_networks(a)
    d = dm.create_diffusion(noise_schedule="cosine", learn_sigma=True)
    plan = unipc_plan(d, steps=steps, order=order, variant=variant)
    lam = plan["lambda"]
    alpha, sigma = np.sqrt(1 / (1 + np.exp(-2 * lam))), np.sqrt(1 / (1 + np.exp(2 * lam)))
    x_T = nhwc(a["toy_bh2_o2_linear8/x_T"]).astype(np.float64)
    calls = []

    def data_prediction(x, k):
        calls.append(k)
        t = np.full(x.shape[0], (plan["t_continuous"][k] - 1 / plan["total_n"]) * 1000)
        eps = np.asarray(model_fn(x.astype(np.float32), t.astype(np.float32)), np.float64)
        return (x - sigma[k] * eps[..., :3]) / alpha[k]

    ref = reference_multistep_unipc(
        plan["t_continuous"], lam, alpha, sigma, data_prediction, x_T, steps, order, variant
    )
    assert calls == list(range(steps)), "the reference loop evaluates the model once per step"
    ours = dm.unipc_sample(d, model_fn, x_T, steps=steps, order=order, variant=variant)
    scale = np.abs(ref).max()
    assert_close(
        ours,
        ref,
        case=f"UniPC-{order} {variant} {steps} steps",
        quantity="x_0",
        rtol=0.0,
        atol=2e-5 * scale,
    )


def test_plan_orders_schedule_and_first_update():
    """No log-SNR clipping (N = T even for cosine, where DPM-Solver drops 4 steps); orders as
    the reference (lower_order_final for any number of steps); the first update's predictor is
    DDIM and its corrector the trapezoid UniC-1."""
    d = dm.create_diffusion(noise_schedule="cosine")
    assert unipc_plan(d, steps=4)["total_n"] == 1000
    assert dm.dpm_solver_plan(d, steps=4)["total_n"] == 996
    orders = lambda **kw: list(unipc_plan(d, **kw)["orders"])
    assert orders(steps=6, order=3) == [1, 2, 3, 3, 2, 1]
    assert orders(steps=12, order=3) == [1, 2] + [3] * 8 + [2, 1]
    assert orders(steps=6, order=3, lower_order_final=False) == [1, 2, 3, 3, 3, 3]
    plan = unipc_plan(d, steps=5, order=2, variant="bh2")
    lam = plan["lambda"]
    alpha, sigma = np.sqrt(1 / (1 + np.exp(-2 * lam))), np.sqrt(1 / (1 + np.exp(2 * lam)))
    np.testing.assert_allclose(alpha[:-1], plan["alpha"], rtol=1e-12)
    np.testing.assert_allclose(sigma[:-1], plan["sigma"], rtol=1e-12)
    np.testing.assert_allclose(plan["pred_x"], sigma[1:] / sigma[:-1], rtol=1e-12)
    ddim_x0 = alpha[1] - sigma[1] * alpha[0] / sigma[0]
    np.testing.assert_allclose(plan["pred_model"][0], [ddim_x0, 0.0], rtol=1e-9)
    # UniC-1 with bh2: x~ - alpha_t (e^-h - 1) / 2 (m_t - m_s): the trapezoid in lambda.
    phi = np.expm1(-(lam[1] - lam[0]))
    np.testing.assert_allclose(
        plan["corr_model"][1], [-alpha[1] * phi / 2, -alpha[1] * phi / 2, 0.0], rtol=1e-9
    )
    assert plan["corr_x"][0] == 1.0 and np.all(plan["corr_model"][0] == 0)


def test_guided_batch_is_per_example(golden):
    """sigma_t and the guidance gradient apply per example (the reference's broadcast bug
    limited its guided cases to batch 1): a guided, thresholded batch of 2 equals its two
    examples run alone."""
    meta, a = golden("unipc")
    x_T = nhwc(a["toy_bh2_o2_linear8/x_T"])
    labels = np.array([1, 4], np.int32)
    model_fn, classifier_fn = toy_networks(a, labels)
    d = dm.create_diffusion(learn_sigma=True)
    kw = dict(steps=5, order=3, classifier_fn=classifier_fn, classifier_scale=10.0)
    both = dm.unipc_sample(d, model_fn, x_T, y=labels, thresholding=True, **kw)
    for i in range(2):
        one_model, one_classifier = toy_networks(a, labels[i : i + 1])
        one = dm.unipc_sample(
            d,
            one_model,
            x_T[i : i + 1],
            y=labels[i : i + 1],
            thresholding=True,
            **{**kw, "classifier_fn": one_classifier},
        )
        np.testing.assert_allclose(both[i : i + 1], one, rtol=1e-6, atol=1e-6)


def test_solver_traces_once(golden):
    """One compiled program: new x_T, labels and guidance scales never retrace the model."""
    _, a = golden("unipc")
    model_fn, classifier_fn = toy_networks(a)
    traces = []

    def counting_model(x, t):
        traces.append(1)
        return model_fn(x, t)

    d = dm.create_diffusion(learn_sigma=True)
    x_T = nhwc(a["toy_bh2_o2_linear8/x_T"])
    kw = dict(steps=4, order=3, classifier_fn=classifier_fn, thresholding=True)
    out_a = dm.unipc_sample(d, counting_model, x_T, y=[1, 3], classifier_scale=1.0, **kw)
    out_b = dm.unipc_sample(d, counting_model, 2 * x_T, y=[0, 4], classifier_scale=10, **kw)
    assert len(traces) == 1, f"model_fn traced {len(traces)} times for two calls"
    assert np.isfinite(out_a).all() and np.isfinite(out_b).all()
    assert not np.allclose(out_a, out_b)


def test_bad_arguments_raise_one_line_errors():
    d = dm.create_diffusion(learn_sigma=True)
    x = np.zeros((1, 4, 4, 3), np.float32)
    model_fn = lambda x, t: x
    cases = [
        (dict(variant="vary_coeff"), "variant: expected one of ('bh1', 'bh2'), got 'vary_coeff'"),
        (dict(variant="bh3"), "variant: expected one of ('bh1', 'bh2'), got 'bh3'"),
        (dict(order=4), "order: expected 1, 2 or 3, got 4"),
        (dict(order=0), "order: expected 1, 2 or 3, got 0"),
        (dict(steps=2, order=3), "steps: expected an int >= order (3), got 2"),
        (dict(skip_type="karras"), "skip_type: expected one of"),
        (dict(classifier_fn=lambda x, t: x.mean((1, 2))), "y: classifier guidance needs"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as info:
            dm.unipc_sample(d, model_fn, x, **kwargs)
        assert str(info.value).startswith(message), str(info.value)
        assert "\n" not in str(info.value)
    spaced = dm.create_diffusion(learn_sigma=True, timestep_respacing="250")
    with pytest.raises(ValueError, match="diffusion: UniPC needs the unrespaced schedule"):
        dm.unipc_sample(spaced, model_fn, x, steps=3)
    with pytest.raises(ValueError, match="model_fn output: expected 3 or 6 channels"):
        dm.unipc_sample(d, lambda x, t: x[..., :2], x, steps=3)
