"""Schedules, respacing and `create_diffusion` against golden case `diffusion_schedules`."""

import jax
import numpy as np
import pytest
from conftest import assert_close as golden_assert_close

from adm_jax.diffusion import (
    COEFFICIENT_NAMES,
    create_diffusion,
    diffusion_kwargs_from_flags,
    get_named_beta_schedule,
    make_diffusion,
    space_timesteps,
)

CASE = "diffusion_schedules"


def assert_close(actual, expected, *, quantity, rtol, atol=0.0, case=CASE):
    golden_assert_close(actual, expected, case=case, quantity=quantity, rtol=rtol, atol=atol)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_base_schedules(golden, schedule):
    meta, arrays = golden(CASE)
    rtol = meta["tolerance_hint"]["rtol"]
    d = make_diffusion(get_named_beta_schedule(schedule, 1000))
    assert d.num_timesteps == 1000
    for attr in meta["attrs"]:
        ours = getattr(d, attr)
        assert ours.dtype == np.float64, f"{CASE}: {schedule}/{attr} dtype {ours.dtype}"
        assert_close(ours, arrays[f"{schedule}/{attr}"], quantity=f"{schedule}/{attr}", rtol=rtol)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_respaced_schedules(golden, schedule):
    meta, arrays = golden(CASE)
    rtol = meta["tolerance_hint"]["rtol"]
    betas = get_named_beta_schedule(schedule, 1000)
    for label, info in meta["section_labels"].items():
        arg = info["section_counts_argument"]
        prefix = f"{schedule}/{label}"
        use = space_timesteps(1000, arg)
        np.testing.assert_array_equal(
            sorted(use),
            arrays[f"{prefix}/use_timesteps"],
            err_msg=f"{CASE}: {prefix}/use_timesteps",
        )
        d = make_diffusion(betas, use_timesteps=use)
        assert d.num_timesteps == info["num_steps"]
        np.testing.assert_array_equal(
            d.timestep_map,
            arrays[f"{prefix}/timestep_map"],
            err_msg=f"{CASE}: {prefix}/timestep_map",
        )
        for attr in meta["attrs"]:
            assert_close(
                getattr(d, attr), arrays[f"{prefix}/{attr}"], quantity=f"{prefix}/{attr}", rtol=rtol
            )
        # create_diffusion (the reference's script_util path) gives the same process.
        d2 = create_diffusion(noise_schedule=schedule, learn_sigma=True, timestep_respacing=arg)
        assert d2 == d and hash(d2) == hash(d)
        assert_close(
            d2.alphas_cumprod,
            arrays[f"{prefix}/alphas_cumprod"],
            quantity=f"create_diffusion {prefix}",
            rtol=rtol,
        )


def test_create_diffusion_unspaced_keeps_every_step(golden):
    _, arrays = golden(CASE)
    d = create_diffusion(noise_schedule="cosine")
    np.testing.assert_array_equal(d.timestep_map, np.arange(1000))
    # Like the reference, betas are recomputed from alphas_cumprod: equal to round-off.
    assert_close(
        d.alphas_cumprod,
        arrays["cosine/alphas_cumprod"],
        quantity="unspaced create_diffusion",
        rtol=1e-12,
    )
    assert_close(
        np.float32(d.betas), np.float32(arrays["cosine/betas"]), quantity="float32 betas", rtol=1e-6
    )


def test_create_diffusion_types_and_flags():
    assert create_diffusion().model_var_type == "fixed_large"
    assert create_diffusion(sigma_small=True).model_var_type == "fixed_small"
    d = create_diffusion(learn_sigma=True, rescale_learned_sigmas=True, predict_xstart=True)
    assert (d.model_var_type, d.loss_type, d.model_mean_type) == (
        "learned_range",
        "rescaled_mse",
        "start_x",
    )
    assert create_diffusion(use_kl=True).loss_type == "rescaled_kl"
    assert create_diffusion(learn_sigma=True).loss_type == "mse"
    flags = dict(
        diffusion_steps=4000,
        noise_schedule="cosine",
        learn_sigma="True",
        timestep_respacing="ddim25",
        image_size=64,
    )
    kwargs = diffusion_kwargs_from_flags(flags)
    assert kwargs == dict(
        steps=4000,
        noise_schedule="cosine",
        learn_sigma=True,
        sigma_small=False,
        use_kl=False,
        predict_xstart=False,
        rescale_learned_sigmas=False,
        timestep_respacing="ddim25",
    )
    d = create_diffusion(**kwargs)
    assert d.num_timesteps == 25 and d.timestep_map[1] == 160
    assert diffusion_kwargs_from_flags({}) == diffusion_kwargs_from_flags(
        dict(diffusion_steps=1000, noise_schedule="linear", timestep_respacing="")
    )


def test_diffusion_is_static_jit_arg():
    d = create_diffusion(timestep_respacing="10")
    assert "num_timesteps=10" in repr(d)
    assert set(COEFFICIENT_NAMES) <= set(vars(d))
    f = jax.jit(lambda diffusion, x: x * diffusion.num_timesteps, static_argnums=0)
    assert float(f(d, 1.0)) == 10.0
    assert float(f(create_diffusion(timestep_respacing="10"), 2.0)) == 20.0
    assert f._cache_size() == 1  # equal diffusions share one compiled program
