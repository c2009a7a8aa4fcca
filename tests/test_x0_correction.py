"""sample.x0_correction: "clip", "threshold" or "none" on every x_0 prediction of every
sampler; the old spellings (thresholding, clip_denoised) and what a run records."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adm_jax.diffusion as dm
from adm_jax import recipe
from adm_jax.diffusion import guidance, methods
from adm_jax.diffusion.solver_common import data_prediction_fn

T = 100
SHAPE = (2, 4, 4, 3)
BASE = dm.create_diffusion(steps=T, noise_schedule="linear")
SAMPLERS = {
    "ddpm": 6,
    "ddim": 6,
    "dpm++": 5,
    "unipc": 5,
    "heun": 4,
    "euler_ancestral": 4,
    "dpmpp_2m": 4,
    "dpmpp_2m_sde": 4,
}


def _spec(name, **fields):
    spec = recipe.sampler_spec({"sampler": name, "steps": SAMPLERS[name], **fields})
    diffusion = (
        BASE
        if spec.on_training_schedule
        else dm.create_diffusion(
            steps=T, noise_schedule="linear", timestep_respacing=spec.respacing
        )
    )
    return spec.with_nfe(diffusion), diffusion


def overshooting_model(x, t):
    """eps pointing away from the data: every x_0 = (x - sqrt(1 - abar) eps) / sqrt(abar)
    leaves [-1, 1] by far."""
    return -2.0 * x - 1.5 * jnp.sign(x)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_clip_keeps_every_x0_prediction_in_range(name, monkeypatch):
    seen = []

    def record(before, after):
        seen.append((float(np.abs(before).max()), float(np.abs(after).max())))

    def spy(x0):
        out = jnp.clip(x0, -1.0, 1.0)
        jax.debug.callback(record, x0, out)
        return out

    monkeypatch.setattr(guidance, "clip_x0", spy)
    spec, diffusion = _spec(name, x0_correction="clip")
    assert spec.correction == "clip"
    key = jax.random.PRNGKey(0)
    x = methods.sample_images(spec, diffusion, overshooting_model, key, SHAPE)
    jax.block_until_ready(x)
    # One x_0 per model call (heun: 2 per step but the last), each clipped from far outside.
    assert len(seen) == (2 * spec.steps - 1 if name == "heun" else spec.steps), name
    assert all(after <= 1.0 for _, after in seen), name
    assert max(before for before, _ in seen) > 2.0, name


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_threshold_none_and_clip_differ(name):
    key = jax.random.PRNGKey(1)
    out = {}
    for correction in ("none", "threshold", "clip"):
        spec, diffusion = _spec(name, x0_correction=correction)
        out[correction] = np.asarray(
            methods.sample_images(
                spec, diffusion, overshooting_model, key, SHAPE, clip_denoised=False
            )
        )
    assert np.abs(out["threshold"] - out["none"]).max() > 1e-2, name
    assert np.abs(out["threshold"] - out["clip"]).max() > 1e-3, name


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_the_default_is_the_samplers_own(name):
    """ "" is clip for ddpm/ddim (the reference's clip_denoised=True) and none for the others:
    the same images as saying so, and the same SamplerSpec."""
    default = "clip" if name in ("ddpm", "ddim") else "none"
    spec, diffusion = _spec(name)
    explicit, _ = _spec(name, x0_correction=default)
    assert spec == explicit and spec.x0_correction == "" and spec.correction == default
    assert spec.options() == _spec(name, x0_correction="")[0].options()


def test_data_prediction_threshold_is_dynamic_thresholding():
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(2), SHAPE)
    predict = lambda **kw: data_prediction_fn(lambda x, t: -x, batch=2, channels=3, **kw)(
        x, 10.0, 0.5, 0.8
    )
    threshold = predict(denoised_fn=dm.dynamic_threshold)
    np.testing.assert_array_equal(threshold, predict(thresholding=True))
    raw = predict()
    np.testing.assert_allclose(threshold, dm.dynamic_threshold(raw), rtol=1e-6)
    with pytest.raises(ValueError, match=r"^thresholding, denoised_fn: pass at most one"):
        predict(thresholding=True, denoised_fn=guidance.clip_x0)


def test_old_spellings_and_contradictions():
    spec = lambda **f: recipe.sampler_spec({"timestep_respacing": "10", **f})
    assert spec(clip_denoised=False).x0_correction == "none"
    assert spec(clip_denoised=False) == spec(x0_correction="none")
    assert spec(thresholding=True).x0_correction == "threshold"
    assert spec(thresholding=True).thresholding  # recorded as before for dpm++ / unipc
    assert spec(sampler="dpm++", thresholding=True) == spec(
        sampler="dpm++", x0_correction="threshold"
    )
    assert spec(sampler="heun", thresholding=True).correction == "threshold"
    assert spec(sampler="dpm++", clip_denoised=False).x0_correction == ""  # ddpm/ddim's field
    assert spec(sampler="dpm++", x0_correction="CLIP").x0_correction == "clip"
    with pytest.raises(ValueError, match=r"^sample\.thresholding: True contradicts") as err:
        spec(thresholding=True, x0_correction="none")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"^sample\.clip_denoised: False contradicts"):
        spec(clip_denoised=False, x0_correction="clip")
    with pytest.raises(ValueError, match=r"^sample\.x0_correction: expected one of"):
        spec(x0_correction="clamp")


def test_what_a_run_records():
    """Defaults add no key (earlier runs resume); "threshold" is thresholding=True as before;
    ddpm/ddim's "none" is clip_denoised=False, the record of its old spelling."""
    spec = lambda **f: recipe.sampler_spec({"timestep_respacing": "10", **f})
    assert spec().options() == {} and spec(sampler="dpm++").options() == {}
    assert spec(x0_correction="none").options() == {"clip_denoised": False}
    assert spec(x0_correction="threshold").options() == {}
    assert spec(x0_correction="threshold").thresholding
    assert spec(sampler="dpm++", x0_correction="clip").options() == {"x0_correction": "clip"}
    assert spec(sampler="unipc", x0_correction="clip").options() == {
        "unipc_variant": "bh2",
        "x0_correction": "clip",
    }
