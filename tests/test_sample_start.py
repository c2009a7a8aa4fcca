"""Starting points for editing: sample_images(x_init=, strength=, x_T=) for every sampler,
BatchSampler's editing arguments, and ddim_invert (the class-swap edit's inversion)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_models import random_params, tiny_unet_kwargs

import adm_jax.diffusion as dm
from adm_jax import recipe
from adm_jax.batch_sampler import BatchSampler
from adm_jax.diffusion import karras, methods
from adm_jax.diffusion.solver_common import vp_log_alpha_table
from adm_jax.models import UNet

T = 100
SHAPE = (2, 4, 4, 3)
BASE = dm.create_diffusion(steps=T, noise_schedule="linear")
SAMPLERS = {
    "ddpm": dict(steps=10),
    "ddim": dict(steps=10),
    "dpm++": dict(steps=6),
    "unipc": dict(steps=6),
    "heun": dict(steps=5),
    "euler_ancestral": dict(steps=5),
    "dpmpp_2m": dict(steps=5),
    "dpmpp_2m_sde": dict(steps=5),
}
X_STAR = jax.random.uniform(jax.random.PRNGKey(7), SHAPE, minval=-0.9, maxval=0.9)
X_INIT = jax.random.uniform(jax.random.PRNGKey(1), SHAPE, minval=-1.0, maxval=1.0)


def _spec(name):
    spec = recipe.sampler_spec({"sampler": name, **SAMPLERS[name]})
    diffusion = (
        BASE
        if spec.on_training_schedule
        else dm.create_diffusion(
            steps=T, noise_schedule="linear", timestep_respacing=spec.respacing
        )
    )
    return spec.with_nfe(diffusion), diffusion


def smooth_model(x, t):
    return 0.3 * x + 0.05 * jnp.sin(t.astype(jnp.float32))[:, None, None, None]


def point_mass_model(name):
    """The exact eps of data = X_STAR, in the time variable each sampler hands the model: so
    every x_0 prediction is X_STAR, and any correct run (from any start) returns X_STAR."""
    abar = jnp.asarray(BASE.alphas_cumprod, jnp.float32)
    if name in ("ddpm", "ddim"):

        def model(x, t):
            a = abar[t][:, None, None, None]
            return (x - jnp.sqrt(a) * X_STAR) / jnp.sqrt(1 - a)

        return model
    if name in ("dpm++", "unipc"):
        t_array, log_alphas = vp_log_alpha_table(BASE.betas, clip_low_lambda=name == "dpm++")
        t_array, log_alphas = (jnp.asarray(a, jnp.float32) for a in (t_array, log_alphas))
        n = t_array.shape[0]

        def model(x, t):
            log_alpha = jnp.interp(t / 1000.0 + 1.0 / n, t_array, log_alphas)[:, None, None, None]
            alpha = jnp.exp(log_alpha)
            return (x - alpha * X_STAR) / jnp.sqrt(1 - alpha**2)

        return model
    log_sigmas = jnp.asarray(np.log(karras.sigma_table(BASE)), jnp.float32)

    def model(x_vp, t):
        sigma = jnp.exp(jnp.interp(t, jnp.arange(T, dtype=jnp.float32), log_sigmas))
        sigma = sigma[:, None, None, None]
        x = x_vp * jnp.sqrt(1 + sigma**2)
        return (x - X_STAR) / sigma

    return model


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_strength_one_is_the_ordinary_sample_and_x_T_replaces_the_draw(name):
    spec, diffusion = _spec(name)
    key = jax.random.PRNGKey(0)
    plain = methods.sample_images(spec, diffusion, smooth_model, key, SHAPE)
    full = methods.sample_images(
        spec, diffusion, smooth_model, key, SHAPE, x_init=X_INIT, strength=1.0
    )
    np.testing.assert_allclose(full, plain, atol=1e-5, err_msg=f"{name}: strength 1")
    x_T = jax.random.normal(jax.random.fold_in(key, 0), SHAPE)
    given = methods.sample_images(spec, diffusion, smooth_model, key, SHAPE, x_T=x_T)
    np.testing.assert_array_equal(given, plain, err_msg=f"{name}: x_T = the key's draw")
    other = methods.sample_images(spec, diffusion, smooth_model, key, SHAPE, x_T=-x_T)
    assert np.abs(np.asarray(other - plain)).max() > 1e-3, f"{name}: x_T ignored"


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_per_example_strengths_equal_separate_runs(name):
    spec, diffusion = _spec(name)
    key = jax.random.PRNGKey(3)
    run = lambda s: methods.sample_images(
        spec, diffusion, smooth_model, key, SHAPE, x_init=X_INIT, strength=s
    )
    mixed = run(jnp.array([0.3, 0.7]))
    np.testing.assert_allclose(mixed[0], run(0.3)[0], atol=1e-5, err_msg=name)
    np.testing.assert_allclose(mixed[1], run(0.7)[1], atol=1e-5, err_msg=name)
    # A weak edit stays closer to the input than a strong one.
    weak, strong = run(0.2), run(0.9)
    assert np.abs(weak - X_INIT).mean() < np.abs(strong - X_INIT).mean(), name


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("strength", [0.35, 0.8, 1.0])
def test_truncated_runs_are_consistent_solvers(name, strength):
    """With the exact eps of a point mass, a run from any start (its first step taken as a
    first step: no stale history in the multistep solvers) lands on the point; dpm++ and unipc
    stop at t = 1/T on the exact ODE path alpha_t x* + sigma_t z, z fixed by the start."""
    spec, diffusion = _spec(name)
    key = jax.random.PRNGKey(4)
    out = methods.sample_images(
        spec,
        diffusion,
        point_mass_model(name),
        key,
        SHAPE,
        clip_denoised=False,
        x_init=X_INIT,
        strength=strength,
    )
    expected = X_STAR
    if name in ("dpm++", "unipc"):
        plan = (dm.dpm_solver_plan if name == "dpm++" else dm.unipc_plan)(BASE, steps=spec.steps)
        alphas, sigmas = plan["grid_alpha"], plan["grid_sigma"]
        j0 = spec.steps - int(np.ceil(strength * spec.steps - 1e-3))
        x_T = jax.random.normal(jax.random.fold_in(key, 0), SHAPE)
        x_start = x_T if j0 == 0 else alphas[j0] * X_INIT + sigmas[j0] * x_T
        z = (x_start - alphas[j0] * X_STAR) / sigmas[j0]
        expected = alphas[-1] * X_STAR + sigmas[-1] * z
    np.testing.assert_allclose(out, expected, atol=2e-3, err_msg=f"{name} from {strength}")


def test_ddpm_start_point_is_q_sample_at_the_respaced_step():
    diffusion = dm.create_diffusion(steps=T, timestep_respacing="10")
    noise = dm.sample_noise(jax.random.PRNGKey(5), 10, SHAPE)
    out = dm.sample_loop(
        diffusion,
        smooth_model,
        noise,
        x_init=X_INIT,
        strength=0.35,  # n = ceil(3.5) = 4 steps, from respaced index 3
        return_trajectory=True,
    )
    start = dm.q_sample(diffusion, X_INIT, jnp.full((2,), 3), noise[0])
    for k in range(6):  # steps before the start keep x
        np.testing.assert_allclose(out["samples"][k], start, atol=1e-6)
    assert np.abs(np.asarray(out["samples"][6] - start)).max() > 1e-3


def test_one_trace_serves_every_strength():
    spec, diffusion = _spec("dpm++")
    traces = []

    @jax.jit
    def run(x_init, strength):
        traces.append(1)
        return methods.sample_images(
            spec,
            diffusion,
            smooth_model,
            jax.random.PRNGKey(0),
            SHAPE,
            x_init=x_init,
            strength=strength,
        )

    for s in (0.2, 0.5, 1.0):
        run(X_INIT, jnp.full((2,), s, jnp.float32))
    assert len(traces) == 1


def test_batch_sampler_editing_arguments_one_program():
    spec, diffusion = _spec("ddim")
    sampler = BatchSampler(
        diffusion,
        lambda p, x, t, y=None: smooth_model(x, t) * p,
        image_shape=SHAPE[1:],
        batch_size=SHAPE[0],
        method=spec,
    )
    params = jnp.float32(1.0)
    plain = sampler(params, seed=0, batch_index=0)
    x_init = np.asarray(X_INIT)
    edited = [
        sampler(params, seed=0, batch_index=b, x_init=x_init, strength=s)
        for b, s in ((0, 1.0), (1, 0.5), (2, np.array([0.2, 0.9])))
    ]
    np.testing.assert_array_equal(edited[0], plain)  # strength 1: the ordinary batch
    assert sampler.trace_count == 2  # the plain program and the editing one
    x_T = np.asarray(jax.random.normal(jax.random.PRNGKey(9), SHAPE))
    sampler(params, seed=0, batch_index=0, x_init=x_init, strength=0.5, x_T=x_T)
    assert sampler.trace_count == 3  # + the one with x_T given
    with pytest.raises(ValueError, match=r"^strength: expected values in \(0, 1\]"):
        sampler(params, seed=0, batch_index=0, x_init=x_init, strength=0.0)
    with pytest.raises(ValueError, match=r"^strength: only used with x_init"):
        sampler(params, seed=0, batch_index=0, strength=0.5)
    with pytest.raises(ValueError, match=r"^x_init: expected shape"):
        sampler(params, seed=0, batch_index=0, x_init=x_init[:1])


def gaussian_data_model(diffusion, mu, scale):
    """The exact eps of data N(mu, scale^2 I), on ORIGINAL timesteps."""
    abar = jnp.asarray(diffusion.alphas_cumprod, jnp.float32)

    def model(x, t):
        a = abar[t][:, None, None, None]
        return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * scale**2 + 1 - a)

    return model


def test_ddim_invert_round_trip_with_an_analytic_model():
    """Data N(mu, scale^2): the exact eps makes the DDIM ODE smooth; over every step of the
    process the round trip is exact to the discretisation error (0.008 here)."""
    diffusion = dm.create_diffusion(steps=1000, timestep_respacing="")
    mu, scale = 0.2, 0.5
    model = gaussian_data_model(diffusion, mu, scale)
    x_0 = mu + scale * jax.random.normal(jax.random.PRNGKey(2), SHAPE)
    x_T = dm.ddim_invert(diffusion, model, x_0, clip_denoised=False)
    assert np.abs(np.asarray(x_T).std() - 1.0) < 0.3  # noise-like
    back = dm.sample(
        diffusion,
        model,
        jax.random.PRNGKey(0),
        SHAPE,
        use_ddim=True,
        clip_denoised=False,
        x_T=x_T,
    )
    np.testing.assert_allclose(back, x_0, atol=2e-2)
    assert np.abs(np.asarray(back - x_0)).max() < 0.05 * np.abs(np.asarray(x_0 - mu)).max()
    # The same through sample_images (the edit path): DDIM from the given x_T.
    spec = recipe.sampler_spec({"sampler": "ddim", "x0_correction": "none"}).with_nfe(diffusion)
    again = methods.sample_images(spec, diffusion, model, jax.random.PRNGKey(1), SHAPE, x_T=x_T)
    np.testing.assert_allclose(again, back, atol=1e-5)


def test_ddim_invert_round_trip_on_a_tiny_unet_traced_once():
    module = UNet(**tiny_unet_kwargs())
    params = random_params(module)
    calls = []

    def model(x, t):  # roughly eps-like: mostly x, plus the network's share
        calls.append(1)
        return 0.9 * x + 0.1 * module.apply({"params": params}, x, t)

    shape = (2, 8, 8, 3)
    diffusion = dm.create_diffusion(steps=T, timestep_respacing="ddim20")
    x_0 = jnp.tanh(jax.random.normal(jax.random.PRNGKey(3), shape))
    # Without the clip (a random network's x_0 leaves [-1, 1], and a clipped step cannot be
    # inverted).
    x_T = dm.ddim_invert(diffusion, model, x_0, clip_denoised=False)
    assert len(calls) == 1  # the network is traced once, inside one scan
    sample = lambda x_T: dm.sample(
        diffusion,
        model,
        jax.random.PRNGKey(0),
        shape,
        use_ddim=True,
        x_T=x_T,
        clip_denoised=False,
    )
    round_trip = float(jnp.abs(sample(x_T) - x_0).mean())
    from_noise = float(
        jnp.abs(sample(jax.random.normal(jax.random.PRNGKey(4), shape)) - x_0).mean()
    )
    assert round_trip < 0.1 * from_noise, (round_trip, from_noise)


def test_strength_outside_the_range_is_refused():
    spec, diffusion = _spec("ddim")
    for bad in (0.0, 1.5, np.array([0.5, -0.1])):
        with pytest.raises(ValueError, match=r"^strength: expected values in \(0, 1\]"):
            methods.sample_images(
                spec,
                diffusion,
                smooth_model,
                jax.random.PRNGKey(0),
                SHAPE,
                x_init=X_INIT,
                strength=bad,
            )


def test_ddim_invert_refinement_makes_the_round_trip_exact():
    """50 steps on Gaussian data: plain inversion is off by its first-order error (~0.14);
    two fixed-point refinements per step bring the round trip to ~1e-3."""
    diffusion = dm.create_diffusion(steps=1000, timestep_respacing="ddim50")
    mu, scale = 0.2, 0.5
    model = gaussian_data_model(dm.create_diffusion(steps=1000), mu, scale)
    x_0 = mu + scale * jax.random.normal(jax.random.PRNGKey(2), SHAPE)

    def round_trip(refine_steps):
        x_T = dm.ddim_invert(diffusion, model, x_0, clip_denoised=False, refine_steps=refine_steps)
        back = dm.sample(
            diffusion,
            model,
            jax.random.PRNGKey(0),
            SHAPE,
            use_ddim=True,
            clip_denoised=False,
            x_T=x_T,
        )
        return float(jnp.abs(back - x_0).max())

    assert round_trip(0) > 0.05
    assert round_trip(2) < 5e-3
