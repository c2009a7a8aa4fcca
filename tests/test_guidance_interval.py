"""sample.guidance_interval for every sampler (Kynkaanniemi et al. 2024): guidance only where
lo < sigma <= hi, sigma = sqrt((1 - abar) / abar) at the model call; outside it the classifier
does not run and the model is the unguided one (lax.cond)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adm_jax.diffusion as dm
from adm_jax import recipe
from adm_jax.diffusion import methods, solver_common
from adm_jax.diffusion.samplers import guided_steps

T = 100
SHAPE = (2, 4, 4, 3)
BASE = dm.create_diffusion(steps=T, noise_schedule="linear")
SAMPLERS = {"ddpm": 6, "ddim": 6, "dpm++": 6, "unipc": 6, "heun": 4, "dpmpp_2m_sde": 5}
NOWHERE, EVERYWHERE, PARTIAL = "1e6,1e7", "0,1e7", "0.5,5"
W = jax.random.normal(jax.random.PRNGKey(5), (*SHAPE[1:], 4))
LABELS = jnp.array([1, 3])


def _spec(name, interval=""):
    spec = recipe.sampler_spec(
        {"sampler": name, "steps": SAMPLERS[name], "guidance_interval": interval, "eta": 1.0}
    )
    diffusion = (
        BASE
        if spec.on_training_schedule
        else dm.create_diffusion(
            steps=T, noise_schedule="linear", timestep_respacing=spec.respacing
        )
    )
    return spec.with_nfe(diffusion), diffusion


def model(x, t):
    return 0.3 * x + 0.05 * jnp.cos(t.astype(jnp.float32))[:, None, None, None]


def cond_model(x, t, y):
    return model(x, t) + 0.2 * (y[:, None, None, None] - 1.5) / 1.5


class Classifier:
    """Linear logits; counts its runs (not traces) with a debug callback."""

    def __init__(self):
        self.runs = 0

    def _count(self):
        self.runs += 1

    def __call__(self, x, t):
        jax.debug.callback(self._count)
        return jnp.einsum("bhwc,hwck->bk", x, W)


def _classifier_run(name, interval, classifier=None, scale=3.0):
    spec, diffusion = _spec(name, interval)
    kw = {}
    if classifier is not None:
        kw = dict(classifier_fn=classifier, y=LABELS, classifier_scale=scale)
    x = methods.sample_images(spec, diffusion, model, jax.random.PRNGKey(0), SHAPE, **kw)
    return np.asarray(jax.block_until_ready(x))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_classifier_guidance_only_inside_the_interval(name):
    unguided = _classifier_run(name, "")
    full = _classifier_run(name, "", Classifier())
    assert np.abs(full - unguided).max() > 1e-2, name
    nowhere = Classifier()
    np.testing.assert_allclose(
        _classifier_run(name, NOWHERE, nowhere), unguided, rtol=1e-5, atol=1e-5
    )
    assert nowhere.runs == 0, f"{name}: the classifier ran outside the interval"
    everywhere = Classifier()
    np.testing.assert_allclose(
        _classifier_run(name, EVERYWHERE, everywhere), full, rtol=1e-5, atol=1e-5
    )
    partial = Classifier()
    out = _classifier_run(name, PARTIAL, partial)
    assert 0 < partial.runs < everywhere.runs, (name, partial.runs, everywhere.runs)
    assert np.abs(out - full).max() > 1e-3 and np.abs(out - unguided).max() > 1e-3, name


def _cfg_run(name, interval, scale):
    spec, diffusion = _spec(name, interval)
    guided = dm.classifier_free_model_fn(cond_model, LABELS, 0, scale)
    conditional = lambda x, t: cond_model(x, t, LABELS)
    x = methods.sample_images(
        spec, diffusion, guided, jax.random.PRNGKey(0), SHAPE, unguided_model_fn=conditional
    )
    return np.asarray(x)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++", "unipc"])
def test_classifier_free_guidance_outside_the_interval_is_the_conditional_model(name):
    conditional = _cfg_run(name, "", 1.0)
    full = _cfg_run(name, "", 4.0)
    assert np.abs(full - conditional).max() > 1e-2, name
    np.testing.assert_allclose(_cfg_run(name, NOWHERE, 4.0), conditional, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_cfg_run(name, EVERYWHERE, 4.0), full, rtol=1e-5, atol=1e-5)
    partial = _cfg_run(name, PARTIAL, 4.0)
    assert np.abs(partial - full).max() > 1e-3 and np.abs(partial - conditional).max() > 1e-3


@pytest.mark.parametrize("name", ["ddim", "dpm++"])
def test_one_trace_serves_every_scale(name):
    spec, diffusion = _spec(name, PARTIAL)
    traces = []

    @jax.jit
    def run(scale):
        traces.append(1)
        classifier = lambda x, t: jnp.einsum("bhwc,hwck->bk", x, W)
        return methods.sample_images(
            spec,
            diffusion,
            model,
            jax.random.PRNGKey(0),
            SHAPE,
            classifier_fn=classifier,
            y=LABELS,
            classifier_scale=scale,
        )

    for scale in (0.0, 1.0, 4.0):
        run(jnp.float32(scale))
    assert len(traces) == 1


def test_sigma_of_each_step():
    """ddpm/ddim: the respaced step's original timestep's abar; the solvers: their own
    interpolated schedule at the step's time."""
    respaced = dm.create_diffusion(steps=T, timestep_respacing="5")
    abar = np.asarray(BASE.alphas_cumprod)[respaced.timestep_map]
    sigmas = np.sqrt((1 - abar) / abar)[::-1]  # scan order: the noisiest step first
    lo, hi = sigmas[3] * 0.999, sigmas[1] * 1.001
    np.testing.assert_array_equal(
        guided_steps(respaced, (lo, hi)), [False, True, True, True, False]
    )
    plan = dm.dpm_solver_plan(BASE, steps=5)
    solver_sigmas = plan["sigma"] / plan["alpha"]
    mask = np.asarray(solver_common.guided_mask(plan, (solver_sigmas[2], 1e9)))
    np.testing.assert_array_equal(mask, [True, True, False, False, False])


def test_interval_errors():
    with pytest.raises(ValueError, match=r"^sample\.guidance_interval: needs 0 <= lo < hi"):
        recipe.sampler_spec({"sampler": "ddim", "guidance_interval": "5,1"})
    spec = recipe.sampler_spec({"sampler": "ddpm", "guidance_interval": "0.3,5"})
    assert spec.guidance_interval == (0.3, 5.0)
    assert spec.options() == {"guidance_interval": [0.3, 5.0]}
    with pytest.raises(ValueError, match=r"^guidance_interval: switches classifier_fn"):
        dm.dpm_solver_sample(BASE, model, jnp.zeros(SHAPE), guidance_interval=(0.3, 5))
