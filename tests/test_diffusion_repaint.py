"""RePaint inpainting and its jump schedule against golden case `repaint` (the reference
RePaint code with stored noise, driving the toy eps/v model and guided-diffusion networks).
Golden images are NCHW, the sampler NHWC; the toy networks are the DPM-Solver test's (the same
formulas).
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from test_diffusion_dpm_solver import nhwc, reference_network, toy_networks

from adm_jax import diffusion as dm

TOY_CASES = ["toy_linear20_j3n2", "toy_cosine25_j5n3_guided"]
NETWORK_CASES = ["unet_linear20_j3n2", "unet_linear20_j3n2_guided"]


def tolerance(meta):
    hint = meta["tolerance_hint"]
    return dict(rtol=hint["rtol"], atol=hint["atol"])


def case_diffusion(c):
    return dm.create_diffusion(
        steps=c["diffusion_steps"],
        noise_schedule=c["schedule"],
        learn_sigma=c["learn_sigma"],
        timestep_respacing=c["timestep_respacing"],
    )


def case_inputs(a, case):
    """x_known, mask and the stored draws (n_draws, N, C, H, W) as NHWC."""
    noise = np.transpose(a[f"{case}/noise"], (0, 1, 3, 4, 2))
    return nhwc(a[f"{case}/x_known"]), nhwc(a[f"{case}/mask"]), noise


def check_case_setup(c, a, case, diffusion):
    """The schedule, the draw order and the respacing the case used."""
    times = dm.get_schedule_jump(**c["schedule_jump_params"])
    np.testing.assert_array_equal(times, a[f"{case}/times"], err_msg=f"{case}: times")
    kinds, transitions = dm.repaint_draw_order(times)
    np.testing.assert_array_equal(kinds, a[f"{case}/draw_kind"], err_msg=f"{case}: draw_kind")
    np.testing.assert_array_equal(
        transitions, a[f"{case}/draw_transition"], err_msg=f"{case}: draw_transition"
    )
    assert len(times) - 1 == c["n_transitions"] and len(kinds) == c["n_draws"], case
    np.testing.assert_array_equal(
        diffusion.timestep_map, a[f"{case}/timestep_map"], err_msg=f"{case}: timestep_map"
    )
    return times


def check_outputs(meta, a, case, sample, pred_xstart):
    tol = tolerance(meta)
    assert_close(sample, nhwc(a[f"{case}/sample"]), case=case, quantity="sample", **tol)
    assert_close(
        pred_xstart, nhwc(a[f"{case}/pred_xstart"]), case=case, quantity="pred_xstart", **tol
    )


def test_every_golden_case_is_tested(golden):
    meta, _ = golden("repaint")
    assert sorted(meta["cases"]) == sorted(TOY_CASES + NETWORK_CASES)


def test_schedule_jump_matches_reference(golden):
    meta, a = golden("repaint")
    assert meta["schedules"], "no golden schedules"
    for name, params in meta["schedules"].items():
        times = dm.get_schedule_jump(**params)
        assert isinstance(times, list) and all(type(t) is int for t in times), name
        np.testing.assert_array_equal(times, a[f"schedules/{name}"], err_msg=name)


def test_schedule_jump_resampling_and_start():
    """n_sample repeats every step down (t + 1 -> t) n_sample times except the first and the
    last; start_resampling confines the jumps to t <= start_resampling - jump_length."""
    t_T, n_sample = 12, 3
    times = dm.get_schedule_jump(t_T, n_sample, jump_length=1, jump_n_sample=1)
    downs = collections.Counter(a for a, b in zip(times[:-1], times[1:], strict=True) if b < a)
    assert downs == {t_T - 1: 1, 0: 1, **{s: n_sample for s in range(1, t_T - 1)}}

    times = dm.get_schedule_jump(30, 1, jump_length=5, jump_n_sample=3, start_resampling=15)
    ups = [i for i in range(1, len(times)) if times[i] > times[i - 1]]
    starts = [times[i - 1] for i in ups if times[i - 2] > times[i - 1]]  # each jump's foot
    assert sorted(starts) == [0, 0, 5, 5, 10, 10] and len(ups) == 6 * 5
    assert dm.get_schedule_jump(30, 1, 5, 3, start_resampling=4) == list(range(29, -2, -1))


@pytest.mark.parametrize("case", TOY_CASES)
def test_toy_case_matches_reference(golden, case):
    meta, a = golden("repaint")
    c = meta["cases"][case]
    diffusion = case_diffusion(c)
    times = check_case_setup(c, a, case, diffusion)
    guided = c["classifier_scale"] is not None
    # Guided toy cases also condition the toy model on y (its toy_cy * y term).
    model_fn, classifier_fn = toy_networks(a, a[f"{case}/y"] if guided else None)
    received = []

    def recording_model(x, t):
        jax.debug.callback(lambda tt: received.append(np.asarray(tt)), t, ordered=True)
        return model_fn(x, t)

    x_known, mask, noise = case_inputs(a, case)
    kw = {}
    if guided:
        kw = dict(
            classifier_fn=classifier_fn, y=a[f"{case}/y"], classifier_scale=c["classifier_scale"]
        )
    sample, pred_xstart = dm.repaint_sample(
        diffusion,
        recording_model,
        x_known,
        mask,
        times=times,
        noise=noise,
        clip_denoised=c["clip_denoised"],
        return_pred_xstart=True,
        **kw,
    )
    jax.effects_barrier()
    check_outputs(meta, a, case, sample, pred_xstart)
    model_times = np.stack(received)
    assert model_times.shape == (c["nfe"], x_known.shape[0]), f"{case}: model calls"
    assert np.issubdtype(model_times.dtype, np.integer), f"{case}: {model_times.dtype}"
    np.testing.assert_array_equal(
        model_times[:, 0], a[f"{case}/model_input_times"], err_msg=f"{case}: model times"
    )


def run_unet_case(golden, case):
    meta, a = golden("repaint")
    c = meta["cases"][case]
    diffusion = case_diffusion(c)
    times = check_case_setup(c, a, case, diffusion)
    unet, unet_vars = reference_network(golden, "unet_learnsigma", "unet")
    kw = {}
    if c["classifier_scale"] is not None:
        classifier, cls_vars = reference_network(golden, "classifier_encoder", "classifier")
        kw = dict(
            classifier_fn=lambda x, t: classifier.apply(cls_vars, x, t),
            y=a[f"{case}/y"],
            classifier_scale=c["classifier_scale"],
        )
    x_known, mask, noise = case_inputs(a, case)
    sample, pred_xstart = dm.repaint_sample(
        diffusion,
        lambda x, t: unet.apply(unet_vars, x, t),
        x_known,
        mask,
        times=times,
        noise=noise,
        clip_denoised=c["clip_denoised"],
        return_pred_xstart=True,
        **kw,
    )
    check_outputs(meta, a, case, sample, pred_xstart)


def test_unet_matches_reference(golden):
    """unet_learnsigma on a 20-step respacing, jumps of 3 (56 transitions, 38 model calls)."""
    run_unet_case(golden, "unet_linear20_j3n2")


@pytest.mark.slow  # compiling the UNet and the classifier gradient inside the scan's cond
def test_classifier_guided_unet_matches_reference(golden):
    """As above, guided by classifier_encoder at scale 3 (mean shifted at the merged x)."""
    run_unet_case(golden, "unet_linear20_j3n2_guided")


def small_problem(a, batch=2):
    """A toy inpainting problem: 10 respaced steps, jumps of 3, a (N, H, W, 1) mask."""
    d = dm.create_diffusion(learn_sigma=True, noise_schedule="cosine", timestep_respacing="10")
    times = dm.get_schedule_jump(10, 1, jump_length=3, jump_n_sample=2)
    x_known = nhwc(a["toy_linear20_j3n2/x_known"])[:batch]
    mask = np.zeros((batch, 8, 8, 1), np.float32)
    mask[:, :, :4] = 1.0
    return d, times, x_known, mask


def test_key_path_equals_its_documented_noise(golden):
    """key= draws inside the scan exactly the noise repaint_noise(key, times, shape) gives;
    a (N, H, W, 1) mask broadcasts over channels; the known region is kept."""
    _, a = golden("repaint")
    model_fn, _ = toy_networks(a)
    d, times, x_known, mask = small_problem(a)
    key = jax.random.key(7)
    noise = dm.repaint_noise(key, times, x_known.shape)
    assert noise.shape == (len(dm.repaint_draw_order(times)[0]), *x_known.shape)
    from_key = dm.repaint_sample(d, model_fn, x_known, mask, times=times, key=key)
    from_noise = dm.repaint_sample(d, model_fn, x_known, mask, times=times, noise=noise)
    np.testing.assert_allclose(from_key, from_noise, rtol=0, atol=1e-6)
    full_mask = np.broadcast_to(mask, x_known.shape)
    same = dm.repaint_sample(d, model_fn, x_known, full_mask, times=times, noise=noise)
    np.testing.assert_allclose(same, from_noise, rtol=0, atol=1e-6)
    other = dm.repaint_sample(d, model_fn, x_known, mask, times=times, key=jax.random.key(8))
    assert not np.allclose(other, from_key, atol=1e-3)
    # The last reverse step is merged at t = 0 (abar ~ 1), so the known half is nearly x_known.
    np.testing.assert_allclose(np.asarray(from_key)[:, :, :4], x_known[:, :, :4], atol=0.05)


def test_default_times_are_the_papers_jumps(golden):
    """times=None: get_schedule_jump(num_timesteps, n_sample=1, jump_length=10,
    jump_n_sample=10)."""
    _, a = golden("repaint")
    model_fn, _ = toy_networks(a)
    d = dm.create_diffusion(learn_sigma=True, timestep_respacing="25")
    _, _, x_known, mask = small_problem(a)
    key = jax.random.key(1)
    explicit = dm.get_schedule_jump(25, 1, 10, 10)
    ours = dm.repaint_sample(d, model_fn, x_known, mask, key=key)
    np.testing.assert_array_equal(
        ours, dm.repaint_sample(d, model_fn, x_known, mask, times=explicit, key=key)
    )
    shorter = dm.get_schedule_jump(25, 1, 5, 2)
    assert not np.allclose(
        ours, dm.repaint_sample(d, model_fn, x_known, mask, times=shorter, key=key)
    )


def test_sampler_traces_once(golden):
    """One compiled program: new images, masks, noise, labels and guidance scales never
    retrace the model or the classifier."""
    _, a = golden("repaint")
    model_fn, classifier_fn = toy_networks(a)
    traces = collections.Counter()

    def counting_model(x, t):
        traces["model"] += 1
        return model_fn(x, t)

    def counting_classifier(x, t):
        traces["classifier"] += 1
        return classifier_fn(x, t)

    d, times, x_known, mask = small_problem(a)
    noise = dm.repaint_noise(jax.random.key(0), times, x_known.shape)
    kw = dict(times=times, classifier_fn=counting_classifier)
    out_a = dm.repaint_sample(
        d, counting_model, x_known, mask, noise=noise, y=[1, 2], classifier_scale=1.0, **kw
    )
    first = dict(traces)
    assert first["model"] == 1, f"model_fn traced {first['model']} times in one compile"
    out_b = dm.repaint_sample(
        d, counting_model, -x_known, 1 - mask, noise=2 * noise, y=[0, 4], classifier_scale=5, **kw
    )
    assert traces == first, f"traced {dict(traces)} for two calls, {first} for the first"
    assert np.isfinite(out_a).all() and np.isfinite(out_b).all()
    assert not np.allclose(out_a, out_b)


def test_bad_arguments_raise_one_line_errors(golden):
    _, a = golden("repaint")
    model_fn, classifier_fn = toy_networks(a)
    d, times, x_known, mask = small_problem(a)
    noise = np.zeros((len(dm.repaint_draw_order(times)[0]), *x_known.shape), np.float32)
    soft = mask.copy()
    soft[0, 0, 0] = 0.5
    cases = [
        (dict(mask=np.ones((2, 8, 8, 2))), "mask: expected a shape broadcastable to x_known's"),
        (dict(mask=np.ones((3, 8, 8, 3))), "mask: expected a shape broadcastable to x_known's"),
        (dict(mask=soft), "mask: expected only 0 (to inpaint) and 1 (known), got 0.5"),
        (dict(mask=2 * mask), "mask: expected only 0 (to inpaint) and 1 (known), got 2.0"),
        (dict(noise=noise[1:]), "noise: expected shape"),
        (dict(key=jax.random.key(0)), "noise, key: pass exactly one"),
        (dict(noise=None), "noise, key: pass exactly one"),
        (dict(times=[5, 4, 3]), "times: expected a jump schedule"),
        (dict(times=[10, 9, -1]), "times: expected a jump schedule"),
        (dict(times=[12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, -1]), "times: expected a jump"),
        (dict(times=[0, 1, 0, -1]), "times: expected a jump schedule"),
        (dict(classifier_fn=classifier_fn), "y: classifier guidance needs"),
        (dict(x_known=np.zeros(3)), "x_known: expected a batch of NHWC images"),
    ]
    for overrides, message in cases:
        kw = {**dict(x_known=x_known, mask=mask, times=times, noise=noise), **overrides}
        args = (kw.pop("x_known"), kw.pop("mask"))
        with pytest.raises(ValueError) as info:
            dm.repaint_sample(d, model_fn, *args, **kw)
        assert str(info.value).startswith(message), str(info.value)
        assert "\n" not in str(info.value)
    for kwargs, message in [
        (dict(t_T=0), "t_T: expected an int >= 1, got 0"),
        (dict(jump_length=0), "jump_length: expected an int >= 1, got 0"),
        (dict(jump_n_sample=2.5), "jump_n_sample: expected an int >= 1, got 2.5"),
    ]:
        with pytest.raises(ValueError) as info:
            dm.get_schedule_jump(
                **{**dict(t_T=10, n_sample=1, jump_length=3, jump_n_sample=2), **kwargs}
            )
        assert str(info.value) == message


def test_traced_mask_inside_a_users_jit(golden):
    """Inside a caller's jit the mask is traced (its values cannot be checked there) and the
    result equals the eager call."""
    _, a = golden("repaint")
    model_fn, _ = toy_networks(a)
    d, times, x_known, mask = small_problem(a)
    key = jax.random.key(3)
    run = jax.jit(lambda m: dm.repaint_sample(d, model_fn, x_known, m, times=times, key=key))
    np.testing.assert_allclose(
        run(jnp.asarray(mask)),
        dm.repaint_sample(d, model_fn, x_known, mask, times=times, key=key),
        rtol=0,
        atol=1e-6,
    )
