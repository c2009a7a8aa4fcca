"""k-diffusion / EDM samplers (`karras_sample`) against golden case `karras_samplers` (the
reference k-diffusion sample_<sampler> driving OpenAIDenoiser over toy models and
guided-diffusion networks). Golden images are NCHW; the samplers are NHWC, so the toy models
below are the JSON's formulas written for NHWC.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from adm_jax import diffusion as dm
from adm_jax.convert import reference_model

GOLDEN = "karras_samplers"
TOY_CASES = [
    "toy_heun_linear6_discrete",
    "toy_heun_cosine6_karras",
    "toy_euler_ancestral_cosine9_discrete",
    "toy_euler_ancestral_linear9_karras",
    "toy_dpmpp_2m_linear8_discrete",
    "toy_dpmpp_2m_cosine8_karras",
    "toy_dpmpp_2m_sde_cosine10_discrete",
    "toy_dpmpp_2m_sde_linear10_karras",
    "toy_euler_ancestral_linear8_karras_guided",
    "toy_dpmpp_2m_sde_cosine10_karras_guided_interval",
    "toy_heun_linear7_karras_guided_interval",
]
NETWORK_CASES = [
    "unet_heun_linear6_karras",
    "unet_dpmpp_2m_sde_cosine8_discrete",
    "classcond_euler_ancestral_cosine8_karras_guided",
    "classcond_dpmpp_2m_linear10_karras_guided_interval",
]
# The plan is float64 like the reference's grid: only rounding separates them.
GRID_TOL = dict(rtol=1e-12, atol=0.0)
# Model times t(sigma) in 0..999; the plan's are float64 (the network gets them in float32).
TIME_TOL = dict(rtol=0.0, atol=1e-9)
# The network receives float32 model times: one ulp at 999 is 6e-5.
RECEIVED_TIME_TOL = dict(rtol=0.0, atol=1e-4)


def nhwc(a):
    return np.transpose(a, (*range(a.ndim - 3), a.ndim - 2, a.ndim - 1, a.ndim - 3))


def toy_networks(a, labels=None):
    """The golden 'toy_models': eps and v model (learned-sigma layout) and linear classifier."""
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


def case_diffusion(c):
    return dm.create_diffusion(
        steps=c["diffusion_steps"], noise_schedule=c["schedule"], learn_sigma=c["learn_sigma"]
    )


def plan_kwargs(c):
    """karras_plan / karras_sample options of a golden case (solver_type: only midpoint)."""
    kw = dict(c["sampler_kwargs"])
    assert kw.pop("solver_type", "midpoint") == "midpoint"
    return dict(
        sampler=c["sampler"].removeprefix("sample_"),
        steps=c["steps"],
        sigma_grid=c["sigma_grid"],
        rho=c["rho"] if c["rho"] is not None else 7.0,
        guidance_interval=c["guidance_interval"],
        **kw,
    )


def sample_kwargs(c, a, case, classifier_fn=None):
    kw = plan_kwargs(c)
    kw["noise"] = nhwc(a[f"{case}/noise"])
    if c["classifier_scale"] is not None:
        kw.update(
            classifier_fn=classifier_fn, y=a[f"{case}/y"], classifier_scale=c["classifier_scale"]
        )
    return kw


def case_tolerance(meta, case):
    hint = meta["tolerance_hint"]
    return dict(rtol=hint["rtol"], atol=hint["atol_per_case"][case])


def test_every_golden_case_is_tested(golden):
    meta, _ = golden(GOLDEN)
    assert sorted(meta["cases"]) == sorted(TOY_CASES + NETWORK_CASES)
    assert sorted(meta["tolerance_hint"]["atol_per_case"]) == sorted(meta["cases"])


@pytest.mark.parametrize("case", TOY_CASES + NETWORK_CASES)
def test_plan_matches_reference(golden, case):
    """Sigma grid, the sigma and fractional model time of every denoiser call, where guidance
    is on, and which noise slices are drawn."""
    meta, a = golden(GOLDEN)
    c = meta["cases"][case]
    plan = dm.karras_plan(case_diffusion(c), **plan_kwargs(c))
    assert_close(plan["sigmas"], a[f"{case}/sigmas"], case=case, quantity="sigmas", **GRID_TOL)
    assert len(plan["denoiser_sigmas"]) == c["nfe"], f"{case}: NFE"
    for quantity, ours, tol in (
        ("denoiser_sigmas", plan["denoiser_sigmas"], GRID_TOL),
        ("model_input_times", plan["model_times"], TIME_TOL),
    ):
        assert_close(ours, a[f"{case}/{quantity}"], case=case, quantity=quantity, **tol)
    applied = plan["guided"] & (c["classifier_scale"] is not None)
    np.testing.assert_array_equal(
        applied, a[f"{case}/guidance_applied"].astype(bool), err_msg=f"{case}: guidance_applied"
    )
    scales = plan["churn"] if c["sampler"] == "sample_heun" else plan["n"]
    used = sorted(set(plan["step"][scales != 0].tolist()))
    # Heun draws at every step (the reference's randn_like), using the draw where gamma > 0.
    drawn = sorted(set(plan["step"].tolist())) if c["sampler"] == "sample_heun" else used
    assert drawn == c["noise_indices_used"], f"{case}: noise_indices_used"
    assert set(used) <= set(drawn)
    assert plan["uses_noise"] == bool(np.any(scales != 0))


@pytest.mark.parametrize("case", TOY_CASES)
def test_toy_case_matches_reference(golden, case):
    meta, a = golden(GOLDEN)
    c = meta["cases"][case]
    guided = c["classifier_scale"] is not None
    model_fn, classifier_fn = toy_networks(a, labels=a[f"{case}/y"] if guided else None)
    received = []

    def recording_model(x, t):
        jax.debug.callback(lambda tt: received.append(np.asarray(tt)), t, ordered=True)
        return model_fn(x, t)

    x_0 = dm.karras_sample(
        case_diffusion(c),
        recording_model,
        nhwc(a[f"{case}/x_T"]),
        **sample_kwargs(c, a, case, classifier_fn),
    )
    jax.effects_barrier()
    assert_close(
        x_0, nhwc(a[f"{case}/x_0"]), case=case, quantity="x_0", **case_tolerance(meta, case)
    )
    times = np.stack(received)
    assert times.shape == (c["nfe"], a[f"{case}/x_T"].shape[0]), f"{case}: model calls"
    assert times.dtype == np.float32, f"{case}: model time dtype {times.dtype}"
    assert_close(
        times[:, 0],
        a[f"{case}/model_input_times"],
        case=case,
        quantity="received model times",
        **RECEIVED_TIME_TOL,
    )


def reference_network(golden, name, kind):
    meta, arrays = golden(name)
    state_dict = {k[len("sd/") :]: v for k, v in arrays.items() if k.startswith("sd/")}
    return reference_model(kind, meta["constructor"]["kwargs"], state_dict)


@pytest.mark.slow  # compiles a UNet (and a classifier gradient) inside the scan
@pytest.mark.parametrize("case", NETWORK_CASES)
def test_network_case_matches_reference(golden, case):
    """unet_learnsigma (eps and v channels) unguided; unet_classcond_legacyattn (y as its label)
    guided by classifier_encoder, once inside a sigma interval."""
    meta, a = golden(GOLDEN)
    c = meta["cases"][case]
    if case.startswith("unet"):
        unet, unet_vars = reference_network(golden, "unet_learnsigma", "unet")
        model_fn = lambda x, t: unet.apply(unet_vars, x, t)
    else:
        unet, unet_vars = reference_network(golden, "unet_classcond_legacyattn", "unet")
        labels = jnp.asarray(a[f"{case}/y"])
        model_fn = lambda x, t: unet.apply(unet_vars, x, t, y=labels)
    classifier_fn = None
    if c["classifier_scale"] is not None:
        classifier, cls_vars = reference_network(golden, "classifier_encoder", "classifier")
        classifier_fn = lambda x, t: classifier.apply(cls_vars, x, t)
    x_0 = dm.karras_sample(
        case_diffusion(c),
        model_fn,
        nhwc(a[f"{case}/x_T"]),
        **sample_kwargs(c, a, case, classifier_fn),
    )
    assert_close(
        x_0, nhwc(a[f"{case}/x_0"]), case=case, quantity="x_0", **case_tolerance(meta, case)
    )


def k_diffusion_transcription(sampler, denoise, x, sigmas, noise, eta, s_noise, churn):
    """k-diffusion's sample_heun / sample_euler_ancestral / sample_dpmpp_2m /
    sample_dpmpp_2m_sde (midpoint) loops transcribed in float64, in their own form (not the
    plan's coefficients); denoise(x, sigma) -> D, noise[i] step i's draw."""
    s_churn, s_tmin, s_tmax = churn
    n = len(sigmas) - 1
    old_denoised, h_last = None, None
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        if sampler == "heun":
            gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= s <= s_tmax else 0.0
            sigma_hat = s * (gamma + 1)
            if gamma > 0:
                x = x + noise[i] * s_noise * (sigma_hat**2 - s**2) ** 0.5
            d = (x - denoise(x, sigma_hat)) / sigma_hat
            dt = s_next - sigma_hat
            if s_next == 0:
                x = x + d * dt
            else:
                x_2 = x + d * dt
                d_2 = (x_2 - denoise(x_2, s_next)) / s_next
                x = x + (d + d_2) / 2 * dt
            continue
        denoised = denoise(x, s)
        if sampler == "euler_ancestral":
            sigma_up = min(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
            sigma_down = (s_next**2 - sigma_up**2) ** 0.5
            x = x + (x - denoised) / s * (sigma_down - s)
            if s_next > 0:
                x = x + noise[i] * s_noise * sigma_up
        elif sampler == "dpmpp_2m":
            t, t_next = -math.log(s), (-math.log(s_next) if s_next > 0 else math.inf)
            h = t_next - t
            if old_denoised is None or s_next == 0:
                x = (s_next / s) * x - math.expm1(-h) * denoised
            else:
                r = (t - -math.log(sigmas[i - 1])) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
                x = (s_next / s) * x - math.expm1(-h) * denoised_d
        else:
            h = None
            if s_next == 0:
                x = denoised
            else:
                h = math.log(s / s_next)
                eta_h = eta * h
                x = s_next / s * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * denoised
                if old_denoised is not None:
                    r = h_last / h
                    x = x + 0.5 * -math.expm1(-h - eta_h) * (1 / r) * (denoised - old_denoised)
                if eta:
                    x = x + noise[i] * s_next * (-math.expm1(-2 * eta_h)) ** 0.5 * s_noise
            h_last = h if h is not None else h_last
        old_denoised = denoised
    return x


@pytest.mark.parametrize(
    "sampler,grid,steps,options",
    [
        ("heun", "karras", 5, dict(s_churn=40.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=0.9)),
        ("heun", "discrete", 1, dict(s_churn=0.0)),
        ("euler_ancestral", "karras", 6, dict(eta=0.5, s_noise=0.9)),
        ("euler_ancestral", "discrete", 4, dict(eta=0.0)),
        ("dpmpp_2m", "karras", 7, dict(rho=3.0)),
        ("dpmpp_2m_sde", "discrete", 6, dict(eta=0.4, s_noise=1.1)),
        ("dpmpp_2m_sde", "karras", 5, dict(eta=0.0)),
    ],
)
def test_samplers_match_k_diffusion_transcription(golden, sampler, grid, steps, options):
    """Options beyond the golden cases (eta < 1, eta 0, large churn, one step, rho 3) against the
    reference loops in float64, driving the same float32 toy denoiser."""
    _, a = golden(GOLDEN)
    model_fn, _ = toy_networks(a)
    d = dm.create_diffusion(noise_schedule="linear", learn_sigma=True)
    x_T = nhwc(a["toy_heun_linear6_discrete/x_T"]).astype(np.float64)
    noise = np.random.default_rng(steps).normal(size=(steps, *x_T.shape))
    plan = dm.karras_plan(d, sampler=sampler, steps=steps, sigma_grid=grid, **options)
    log_sigmas = np.log(dm.karras.sigma_table(d))

    def denoise(x, sigma):
        c_in = 1 / math.sqrt(1 + sigma**2)
        t = np.full(x.shape[0], dm.karras.sigma_to_t(log_sigmas, sigma), np.float32)
        eps = np.asarray(model_fn(jnp.asarray(x * c_in, jnp.float32), jnp.asarray(t)))
        return x - sigma * eps[..., :3].astype(np.float64)

    churn = tuple(
        options.get(k, v) for k, v in (("s_churn", 0.0), ("s_tmin", 0.0), ("s_tmax", math.inf))
    )
    eta, s_noise = options.get("eta", 1.0), options.get("s_noise", 1.0)
    ref = k_diffusion_transcription(
        sampler, denoise, x_T * plan["sigmas"][0], plan["sigmas"], noise, eta, s_noise, churn
    )
    ours = dm.karras_sample(
        d, model_fn, x_T, sampler=sampler, steps=steps, sigma_grid=grid, noise=noise, **options
    )
    atol = 2e-5 * max(np.abs(ref).max(), 0.5)
    assert_close(ours, ref, case=f"{sampler}/{grid}/{steps}", quantity="x_0", rtol=0, atol=atol)


@pytest.mark.parametrize("sampler", dm.karras.SAMPLERS)
def test_sampler_traces_once(golden, sampler):
    """One compiled program: new x_T, noise, labels, guidance scales and even a new eta, churn
    or sigma grid never retrace; the model has one call site in the scan (Heun's two calls per
    step are two iterations), so it is traced exactly once."""
    _, a = golden(GOLDEN)
    model_fn, classifier_fn = toy_networks(a)
    traces = {"model": 0, "classifier": 0}

    def counting_model(x, t):
        traces["model"] += 1
        return model_fn(x, t)

    def counting_classifier(x, t):
        traces["classifier"] += 1
        return classifier_fn(x, t)

    d = dm.create_diffusion(learn_sigma=True)
    x_T = nhwc(a["toy_heun_linear6_discrete/x_T"])
    kw = dict(sampler=sampler, steps=4, classifier_fn=counting_classifier, s_churn=1.0)
    out_a = dm.karras_sample(
        d, counting_model, x_T, key=jax.random.key(0), y=[1, 3], classifier_scale=1.0, **kw
    )
    first = dict(traces)
    out_b = dm.karras_sample(
        d, counting_model, -x_T, key=jax.random.key(1), y=[0, 4], classifier_scale=5, eta=0.5, **kw
    )
    # classifier_guidance_grad traces the classifier once per platform branch (CPU, default).
    assert first["model"] == 1 and first["classifier"] >= 1, f"{sampler}: traced {first}"
    assert traces == first, f"{sampler}: the second call retraced: {first} -> {traces}"
    kw.update(sigma_grid="discrete", s_churn=3.0)
    dm.karras_sample(d, counting_model, x_T, key=jax.random.key(2), y=[2, 2], **kw)
    assert traces == first, f"{sampler}: another sigma grid retraced: {first} -> {traces}"
    assert np.isfinite(out_a).all() and np.isfinite(out_b).all()
    assert not np.allclose(out_a, out_b)


def test_key_path_equals_documented_noise(golden):
    """key draws karras_noise(key, steps, x_T.shape): noise[i] = normal(fold_in(key, i))."""
    _, a = golden(GOLDEN)
    model_fn, _ = toy_networks(a)
    d = dm.create_diffusion(noise_schedule="cosine", learn_sigma=True)
    x_T = nhwc(a["toy_heun_cosine6_karras/x_T"])
    key = jax.random.key(7)
    noise = dm.karras_noise(key, 5, x_T.shape)
    np.testing.assert_array_equal(
        noise[3], jax.random.normal(jax.random.fold_in(key, 3), x_T.shape, jnp.float32)
    )
    for sampler, kw in (
        ("heun", dict(s_churn=2.0, s_tmin=0.05, s_tmax=1e3)),
        ("euler_ancestral", {}),
        ("dpmpp_2m_sde", dict(eta=0.7)),
    ):
        common = dict(sampler=sampler, steps=5, **kw)
        with_key = dm.karras_sample(d, model_fn, x_T, key=key, **common)
        with_noise = dm.karras_sample(d, model_fn, x_T, noise=noise, **common)
        # Two compiled programs (noise drawn inside the scan or read): float32 rounding only,
        # which the cosine schedule's sigma_max ~ 2e4 amplifies (golden rule: 2e-5 max|x_0|).
        atol = 2e-5 * float(np.abs(with_noise).max())
        assert_close(with_key, with_noise, case=sampler, quantity="key path", rtol=0, atol=atol)
        other = dm.karras_sample(d, model_fn, x_T, key=jax.random.key(8), **common)
        assert not np.allclose(with_key, other), f"{sampler}: the key changes nothing"


def test_learned_variance_channels_are_ignored(golden):
    """A 2C-channel output (eps, v) samples exactly as its first C channels alone."""
    _, a = golden(GOLDEN)
    model_fn, _ = toy_networks(a)
    d = dm.create_diffusion(learn_sigma=True)
    x_T = nhwc(a["toy_heun_linear6_discrete/x_T"])
    noise = nhwc(a["toy_heun_linear6_discrete/noise"])
    for sampler in dm.karras.SAMPLERS:
        full = dm.karras_sample(d, model_fn, x_T, sampler=sampler, steps=6, noise=noise)
        eps_only = dm.karras_sample(
            d, lambda x, t: model_fn(x, t)[..., :3], x_T, sampler=sampler, steps=6, noise=noise
        )
        np.testing.assert_array_equal(full, eps_only, err_msg=sampler)


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m_sde"])
def test_classifier_free_guidance_interval(golden, sampler):
    """With unguided_model_fn, the CFG wrapper runs only for calls with lo < sigma <= hi: an
    interval holding no call samples exactly as the unguided model alone, one holding all as
    the guided one, and a partial one calls each network exactly where the plan says."""
    _, a = golden(GOLDEN)
    toy, _ = toy_networks(a)
    labels = jnp.array([1, 3])
    guided = dm.classifier_free_model_fn(toy, labels, 4, 3.0)
    conditional = lambda x, t: toy(x, t, labels)
    d = dm.create_diffusion(learn_sigma=True)
    x_T = nhwc(a["toy_heun_linear6_discrete/x_T"])
    kw = dict(sampler=sampler, steps=6, noise=nhwc(a["toy_heun_linear6_discrete/noise"]))
    if sampler == "heun":
        kw.update(s_churn=2.0, s_tmin=0.05, s_tmax=1e3)
    plain = dm.karras_sample(d, conditional, x_T, **kw)
    full = dm.karras_sample(d, guided, x_T, **kw)
    assert not np.allclose(plain, full, atol=1e-3)
    for interval, expected in (((1e6, 1e7), plain), ((0.0, 1e6), full)):
        ours = dm.karras_sample(
            d, guided, x_T, guidance_interval=interval, unguided_model_fn=conditional, **kw
        )
        # Equal up to float32 rounding (another compiled program: a lax.cond around each call).
        atol = 1e-5 * float(np.abs(expected).max())
        assert_close(ours, expected, case=str(interval), quantity="x_0", rtol=0, atol=atol)

    calls = []

    def recording(name, fn):
        def wrapped(x, t):
            jax.debug.callback(lambda tt: calls.append((name, float(tt[0]))), t, ordered=True)
            return fn(x, t)

        return wrapped

    interval = (0.5, 20.0)
    partial = dm.karras_sample(
        d,
        recording("guided", guided),
        x_T,
        guidance_interval=interval,
        unguided_model_fn=recording("unguided", conditional),
        **kw,
    )
    jax.effects_barrier()
    plan = dm.karras_plan(
        d, guidance_interval=interval, **{k: v for k, v in kw.items() if k != "noise"}
    )
    assert 0 < plan["guided"].sum() < len(plan["guided"])
    assert [name == "guided" for name, _ in calls] == plan["guided"].tolist()
    np.testing.assert_allclose(
        [t for _, t in calls], plan["model_times"], rtol=0, atol=RECEIVED_TIME_TOL["atol"]
    )
    assert not np.allclose(partial, plain, atol=1e-3) and not np.allclose(partial, full, atol=1e-3)


def test_bad_arguments_raise_one_line_errors():
    d = dm.create_diffusion(learn_sigma=True)
    x = jnp.zeros((2, 4, 4, 3))
    model_fn = lambda x, t: jnp.concatenate([x, x], -1)
    key = jax.random.key(0)
    cases = [
        (
            dict(sampler="euler"),
            "sampler: expected one of ('heun', 'euler_ancestral', 'dpmpp_2m', 'dpmpp_2m_sde'), "
            "got 'euler'",
        ),
        (
            dict(sigma_grid="exponential"),
            "sigma_grid: expected one of ('discrete', 'karras'), got 'exponential'",
        ),
        (dict(steps=0), "steps: expected an int >= 1, got 0"),
        (dict(rho=0.0), "rho: expected a number > 0, got 0.0"),
        (dict(steps=3, noise=np.zeros((2, 2, 4, 4, 3)), s_churn=1.0), "noise: expected shape"),
        (dict(steps=3, noise=np.zeros((3, 2, 4, 4, 3)), key=key), "noise, key: pass at most one"),
        (dict(sampler="euler_ancestral", steps=3), "noise, key: sampler 'euler_ancestral'"),
        (dict(classifier_fn=lambda x, t: x.mean((1, 2))), "y: classifier guidance needs"),
        (
            dict(guidance_interval=(5.0, 1.0), unguided_model_fn=model_fn),
            "guidance_interval: expected sigma_lo < sigma_hi",
        ),
        (
            dict(guidance_interval=3.0, unguided_model_fn=model_fn),
            "guidance_interval: expected None or (sigma_lo, sigma_hi)",
        ),
        (dict(guidance_interval=(1.0, 5.0)), "guidance_interval: switches classifier_fn or"),
        (dict(unguided_model_fn=model_fn), "unguided_model_fn: only used outside a guidance"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as info:
            dm.karras_sample(d, model_fn, x, **kwargs)
        text = str(info.value)
        assert text.startswith(message), f"{kwargs}: {text!r}"
        assert "\n" not in text, f"{kwargs}: not one line: {text!r}"
    with pytest.raises(ValueError, match=r"noise: expected shape \(steps, \*x_T.shape\) = "):
        dm.karras_sample(d, model_fn, x, steps=3, noise=np.zeros((3, 2, 4, 4, 1)), s_churn=1.0)
    spaced = dm.create_diffusion(learn_sigma=True, timestep_respacing="250")
    with pytest.raises(ValueError, match="diffusion: the Karras samplers need the unrespaced"):
        dm.karras_sample(spaced, model_fn, x, steps=3)
    with pytest.raises(ValueError, match="model_fn output: expected 3 or 6 channels"):
        dm.karras_sample(d, lambda x, t: x[..., :2], x, steps=3)
