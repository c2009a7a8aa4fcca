"""--mode=nll end to end: configs/tiny.py's class-conditional learned-sigma UNet, shrunk to one
level (random parameters, saved as an inference checkpoint), on the tiny TFDS dataset with
4 respaced steps on 8 simulated CPU devices; the sharded program's masked sums against
calc_bpd_loop; config errors, in-process and through the entry point."""

import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adm_jax import checkpoints, paths, recipe
from adm_jax import diffusion as dm
from adm_jax.evaluation import bpd as nll_lib
from adm_jax.models import module_from_kwargs
from adm_jax.recipe import config as config_lib
from adm_jax.sampling import sampler as sampler_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import tiny  # noqa: E402


def _random_params(module, image_size, seed=0):
    """Random params, zero-initialised output layers included (numpy on abstract shapes: a
    jitted init would cost seconds of compilation)."""
    x = np.zeros((1, image_size, image_size, 3), np.float32)
    t, y = np.zeros((1,), np.int32), np.zeros((1,), np.int32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, t, y=y)["params"])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        std = 1 / np.sqrt(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 0.1
        scale = "scale" in jax.tree_util.keystr(path)
        return (rng.normal(0.0, std, leaf.shape) + scale).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _tiny_config():
    """configs/tiny.py with one UNet level (attention at 16x16): half the compile time."""
    config = tiny.get_config()
    config.model.channel_mult = "1"
    config.model.attention_resolutions = "16"
    return config


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    config = _tiny_config()
    kwargs = config_lib.model_kwargs(config)
    module = module_from_kwargs("unet", kwargs)
    params = _random_params(module, config.model.image_size)
    path = tmp_path_factory.mktemp("nll_ckpt") / "model"
    return checkpoints.save_inference_checkpoint(
        path,
        params,
        kind="unet",
        model_kwargs=kwargs,
        diffusion_kwargs=config_lib.diffusion_kwargs(config),
    )


def _config(ckpt, tfds_dir, **nll):
    config = _tiny_config()
    config.data.data_dir = tfds_dir
    config.nll.checkpoint = os.fspath(ckpt)
    config.nll.update(nll)
    return config


def test_nll_mode_on_the_tiny_dataset(tiny_ckpt, tiny_tfds_dir, tmp_path):
    """32 images in global batches of 24 over all 8 devices (the second batch: 8 images and
    16 rows of padding): nll.json holds the returned numbers and they are consistent."""
    config = _config(tiny_ckpt, tiny_tfds_dir, batch_size=24, split="train")
    res = nll_lib.nll(config, str(tmp_path), progress=False)
    assert json.loads((tmp_path / nll_lib.OUTPUT_FILE).read_text()) == res
    assert res["num_images"] == 32 and res["split"] == "train"
    diffusion = dm.create_diffusion(**{**config.diffusion.to_dict(), "timestep_respacing": "4"})
    assert res["num_timesteps"] == 4
    assert res["timesteps"] == diffusion.timestep_map[::-1].tolist()
    for name in nll_lib.TERMS:
        assert len(res[name]) == 4 and np.all(np.isfinite(res[name])), name
    assert np.all(np.asarray(res["vb"]) > 0) and res["prior_bpd"] > 0
    assert np.isfinite(res["total_bpd"])
    np.testing.assert_allclose(res["vb_bpd"], np.sum(res["vb"]), rtol=1e-12)
    np.testing.assert_allclose(res["total_bpd"], res["prior_bpd"] + res["vb_bpd"], rtol=1e-6)
    assert res["checkpoint"] == paths.absolute(tiny_ckpt) and res["clip_denoised"] is True


def test_bpd_program_sums_only_real_rows_and_compiles_once():
    """The sharded program's masked sums (batch 16 on 8 devices, 5 padding rows) equal
    calc_bpd_loop's per-image terms summed over the real rows, with the noise key of each batch
    index; a second batch reuses the compiled program."""
    diffusion = dm.create_diffusion(learn_sigma=True, timestep_respacing="3")
    params = {"a": np.float32(0.5)}

    def model_apply(p, x, t, y):  # uses params, labels and the original timestep
        scale = (t[:, None, None, None] + 10 * y[:, None, None, None]) / 1000
        return jnp.concatenate([p["a"] * x, jnp.tanh(x) * scale], -1)

    mesh = sampler_lib.make_mesh(16)
    assert mesh.size == 8
    program = nll_lib.BpdProgram(diffusion, model_apply, mesh=mesh, class_cond=True, seed=3)
    rng = np.random.default_rng(0)
    x = (rng.integers(0, 256, (16, 4, 4, 3)) / 127.5 - 1).astype(np.float32)
    y = rng.integers(0, 10, 16).astype(np.int32)
    mask = np.arange(16) < 11

    @jax.jit
    def direct(x, y, batch_index):
        key = jax.random.fold_in(jax.random.PRNGKey(3), batch_index)
        return dm.calc_bpd_loop(diffusion, lambda xt, t: model_apply(params, xt, t, y), x, key)

    for b in (0, 1):
        sums = program(params, x, y, mask, b)
        ref = jax.device_get(direct(x, y, b))
        assert float(sums["num_images"]) == 11
        for name in ("total_bpd", "prior_bpd"):
            np.testing.assert_allclose(sums[name], ref[name][mask].sum(), rtol=1e-5, err_msg=name)
        for name in nll_lib.TERMS:
            np.testing.assert_allclose(sums[name], ref[name][mask].sum(0), rtol=1e-5, err_msg=name)
    assert program.trace_count == 1


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("batch_size", 0, "nll.batch_size: expected a positive integer, got 0"),
        ("num_samples", -1, "nll.num_samples: expected an integer >= 0"),
        ("split", "nope", "nll.split: split 'nope' is not available"),
        ("num_samples", 33, "nll.num_samples: 33 exceeds the 32 images of split 'train'"),
        ("timestep_respacing", "ddim7x", "nll.timestep_respacing:"),
        ("checkpoint", "/nonexistent/ckpt", "nll.checkpoint: checkpoint: '/nonexistent/ckpt'"),
    ],
)
def test_nll_config_errors_name_the_field(
    tiny_ckpt, tiny_tfds_dir, tmp_path, field, value, message
):
    config = _config(tiny_ckpt, tiny_tfds_dir)
    config.nll[field] = value
    with pytest.raises(ValueError) as err:
        nll_lib.nll(config, str(tmp_path), progress=False)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not paths.path(tmp_path / nll_lib.OUTPUT_FILE).exists()


def test_nll_rejects_unknown_fields_and_mismatched_data(tiny_ckpt, tiny_tfds_dir, tmp_path):
    config = _config(tiny_ckpt, tiny_tfds_dir)
    with config.unlocked():
        config.nll.steps = 3
    with pytest.raises(ValueError, match=r"^nll.steps: unknown field; expected one of"):
        recipe.read_nll(config)
    config = _config(tiny_ckpt, tiny_tfds_dir)
    config.model.image_size = config.data.image_size = 8
    with pytest.raises(ValueError, match=r"image_size=16 \(checkpoint\) vs 8 \(config\)"):
        nll_lib.nll(config, str(tmp_path), progress=False)
    config = _config(tiny_ckpt, tiny_tfds_dir)
    config.data.image_size = 8
    with pytest.raises(ValueError, match=r"^data.image_size/channels: 8/3 but .* takes 16x16x3"):
        nll_lib.nll(config, str(tmp_path), progress=False)


def test_entry_point_nll_mode_reports_config_errors_as_one_line(tiny_ckpt, tiny_tfds_dir, tmp_path):
    """--mode=nll is a mode of adm_jax.main (adm_jax.modes); a bad field stops it, before
    compiling, with the one line that main prints."""
    from absl import app

    from adm_jax import modes

    assert "nll" in modes.MODES
    config = _config(tiny_ckpt, tiny_tfds_dir, num_samples=1000)
    with pytest.raises((app.UsageError, ValueError)) as err:
        modes.run_mode(config, str(tmp_path), "nll")
    assert (
        str(err.value)
        == "nll.num_samples: 1000 exceeds the 32 images of split 'train' (0 = all of them)"
    )
