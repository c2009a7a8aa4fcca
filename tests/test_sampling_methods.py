"""sample.sampler / steps / cfg_scale: DDPM, DDIM, DPM-Solver++, UniPC and the k-diffusion
samplers through --mode=sample's BatchSampler equal the diffusion functions called directly;
the guidance interval switches classifier-free guidance; classifier-free guidance at scale 1
is conditional sampling; one compilation per job; one-line field errors; the sweep grid.

Tiny 8x8 networks with random parameters (tests/test_sampling_sampler.py's), T = 100.
"""

import os

import jax
import numpy as np
import pytest
from test_sampling_sampler import DIFFUSION, NUM_CLASSES, SUPERRES, UNET, _config, _random_params

from adm_jax import checkpoints, recipe
from adm_jax import diffusion as dlib
from adm_jax import images as images_lib
from adm_jax.diffusion import methods
from adm_jax.evaluation import sweep
from adm_jax.sampling import io, sampler

STEPS = 4


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A class-conditional UNet without and with a null label, and a null-label upsampler."""
    root = tmp_path_factory.mktemp("ckpts")
    cfg_unet = dict(UNET, null_class_embedding=True)
    cfg_superres = dict(SUPERRES, null_class_embedding=True)
    specs = {
        "cond": ("unet", UNET, _random_params("unet", UNET, 0)),
        "cfg": ("unet", cfg_unet, _random_params("unet", cfg_unet, 0)),
        "cfg_superres": ("superres", cfg_superres, _random_params("superres", cfg_superres, 2)),
    }
    return {
        name: checkpoints.save_inference_checkpoint(
            root / name, params, kind=kind, model_kwargs=kwargs, diffusion_kwargs=DIFFUSION
        )
        for name, (kind, kwargs, params) in specs.items()
    }


def _job(ckpts, tmp_path, **sample):
    sample = {"steps": STEPS, "checkpoint": ckpts["cond"], **sample}
    if sample["checkpoint"] in ckpts:
        sample["checkpoint"] = ckpts[sample["checkpoint"]]
    return sampler.build_job(_config(ckpts, tmp_path, **sample), str(tmp_path))


def _direct(job, name, batch_index):
    """The same batch from adm_jax.diffusion's own functions, outside BatchSampler."""
    ckpt = checkpoints.load_inference_checkpoint(job.provenance["checkpoint"])
    module = ckpt.module()
    labels = job.labels_for(batch_index)
    key = jax.random.fold_in(jax.random.PRNGKey(job.seed), batch_index)
    model_fn = lambda x, t: module.apply({"params": ckpt.params}, x, t, y=labels)
    shape = (job.batch_size, *job.sampler.image_shape)
    if name in methods.SOLVERS:
        x_T = jax.random.normal(jax.random.fold_in(key, 0), shape)
        d = dlib.create_diffusion(**DIFFUSION)
        if name == "dpm++":
            x = dlib.dpm_solver_sample(d, model_fn, x_T, steps=STEPS, order=2)
        elif name == "unipc":
            x = dlib.unipc_sample(d, model_fn, x_T, steps=STEPS, order=2, variant="bh2")
        else:  # k-diffusion: the job's eta (its config sets 0.0), churn 0, Karras grid
            eta = job.sampler.method.eta
            key = jax.random.fold_in(key, 1)
            x = dlib.karras_sample(d, model_fn, x_T, sampler=name, steps=STEPS, eta=eta, key=key)
    else:
        respacing = f"ddim{STEPS}" if name == "ddim" else str(STEPS)
        d = dlib.create_diffusion(**DIFFUSION, timestep_respacing=respacing)
        x = dlib.sample(d, model_fn, key, shape, use_ddim=name == "ddim", clip_denoised=True)
    return np.asarray(images_lib.to_uint8(x))


def _assert_images_close(a, b):
    """Equal up to float round-off of different XLA programs, which can move a pixel across a
    uint8 boundary: +-1 on at most 1% of values."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, (diff.max(), (diff > 0).mean())


@pytest.mark.parametrize(
    "name",
    [
        "ddpm",
        pytest.param("ddim", marks=pytest.mark.slow),
        "dpm++",
        "unipc",
        pytest.param("heun", marks=pytest.mark.slow),
        pytest.param("euler_ancestral", marks=pytest.mark.slow),
        pytest.param("dpmpp_2m", marks=pytest.mark.slow),
        "dpmpp_2m_sde",
    ],
)  # slow: code paths another case covers (ddim: ddpm's; the k-diffusion samplers: one scan)
def test_dispatch_equals_the_diffusion_functions(ckpts, tmp_path, name):
    # eta 1 (k-diffusion's default) for the ancestral samplers: _config's 0.0 is DDIM's.
    job = _job(ckpts, tmp_path, sampler=name, **({"eta": 1.0} if name != "ddim" else {}))
    assert job.sampler.method.name == name and job.sampler.method.steps == STEPS
    assert job.provenance["sampler"] == name and job.provenance["steps"] == STEPS
    images, _ = job.sample_batch(1)
    _assert_images_close(images, _direct(job, name, 1))
    assert images.std() > 10


def test_cfg_scale_one_is_conditional_and_one_trace_serves_every_scale(ckpts, tmp_path):
    conditional = _job(ckpts, tmp_path, checkpoint="cfg", sampler="ddim")
    guided = _job(ckpts, tmp_path, checkpoint="cfg", sampler="ddim", cfg_scale=1.0)
    assert guided.sampler.cfg and not conditional.sampler.cfg
    assert guided.sampler.null_label == NUM_CLASSES
    images, labels = conditional.sample_batch(0)
    at_one, same_labels = guided.sample_batch(0)
    np.testing.assert_array_equal(labels, same_labels)
    _assert_images_close(at_one, images)
    at_three = guided.sample_batch(0, cfg_scale=3.0)[0]
    assert np.abs(at_three.astype(int) - at_one.astype(int)).mean() > 1.0
    at_zero = guided.sample_batch(1, cfg_scale=0.0)[0]  # the unconditional model
    assert guided.sampler.trace_count == 1

    # sample.cfg_scale=0 builds the unconditional model as one pass with the null label: the
    # same images as the doubled batch at scale 0, and no other scale.
    unconditional = _job(ckpts, tmp_path, checkpoint="cfg", sampler="ddim", cfg_scale=0.0)
    assert unconditional.sampler.unconditional and not guided.sampler.unconditional
    _assert_images_close(unconditional.sample_batch(1)[0], at_zero)
    with pytest.raises(ValueError, match=r"^sample\.cfg_scale=2: this sampler runs the uncond"):
        unconditional.sample_batch(1, cfg_scale=2.0)


def test_resuming_with_another_sampler_is_refused(ckpts, tmp_path):
    job = _job(ckpts, tmp_path, sampler="ddim")
    out = str(tmp_path / "run")
    assert sampler.run_job(job, out, num_samples=16, max_batches=1) is None
    other = job.with_sampler(sampler="dpm++")
    with pytest.raises(ValueError, match=r"sampler: 'ddim' -> 'dpm\+\+'") as info:
        sampler.run_job(other, out, num_samples=16)
    assert "\n" not in str(info.value)
    # The k-diffusion samplers' options shape the images too.
    heun = job.with_sampler(sampler="heun")
    out = str(tmp_path / "heun")
    assert sampler.run_job(heun, out, num_samples=16, max_batches=1) is None
    discrete = job.with_sampler(sampler="heun", sigma_grid="discrete")
    with pytest.raises(ValueError, match=r"sigma_grid: 'karras' -> 'discrete'"):
        sampler.run_job(discrete, out, num_samples=16)


@pytest.mark.parametrize(
    "sample, error",
    [
        (dict(sampler="euler"), r"^sample\.sampler: expected one of"),
        (dict(steps=-1), r"^sample\.steps: must be >= 0"),
        (dict(steps=300), r"^sample\.steps: cannot divide section of 100 steps into 300"),
        (dict(cfg_scale=-1.0), r"^sample\.cfg_scale: must be a finite number >= 0"),
        (dict(cfg_scale=float("nan"), checkpoint="cfg"), r"^sample\.cfg_scale: must be a finite"),
        (dict(classifier_scale=float("inf")), r"^sample\.classifier_scale: must be a finite"),
        (dict(classifier_scale=-2.0), r"^sample\.classifier_scale: must be a finite"),
        (dict(cfg_scale=1.0), r"^sample\.cfg_scale: .* has no null label"),
        (dict(thresholding=True, x0_correction="clip"), r"^sample\.thresholding: True contra"),
        (dict(sampler="dpm++", use_ddim=True), r"^sample\.use_ddim: True contradicts"),
        (dict(sampler="heun", sigma_grid="edm"), r"^sample\.sigma_grid: expected one of"),
        (dict(sampler="unipc", unipc_variant="bh3"), r"^sample\.unipc_variant: expected one"),
        (dict(x0_correction="clamp"), r"^sample\.x0_correction: expected one of"),
        (dict(sampler="heun", guidance_interval="5"), r"^sample\.guidance_interval: expected"),
        (dict(sampler="heun", guidance_interval="5,1"), r"^sample\.guidance_interval: needs"),
        (dict(sampler="euler_ancestral", eta=-1.0), r"^sample\.eta: must be a finite number"),
    ],
)
def test_field_errors_are_one_line(ckpts, tmp_path, sample, error):
    with pytest.raises(ValueError, match=error) as info:
        _job(ckpts, tmp_path, **sample)
    assert "\n" not in str(info.value)


def test_run_job_refuses_bad_scales(ckpts, tmp_path):
    job = _job(ckpts, tmp_path)
    with pytest.raises(ValueError, match=r"^sample\.cfg_scale=2.0: this job samples without"):
        sampler.run_job(job, str(tmp_path), num_samples=8, cfg_scale=2.0)
    with pytest.raises(ValueError, match=r"^sample\.classifier_scale: must be a finite"):
        sampler.run_job(job, str(tmp_path), num_samples=8, classifier_scale=float("nan"))


def test_guidance_interval_switches_classifier_free_guidance(ckpts, tmp_path):
    """dpmpp_2m (deterministic) with cfg_scale 3: an interval that holds no step's sigma is
    the conditional model; one that holds every sigma is guidance at every step."""
    kw = dict(checkpoint="cfg", sampler="dpmpp_2m")
    conditional = _job(ckpts, tmp_path, **kw)
    everywhere = _job(ckpts, tmp_path, **kw, cfg_scale=3.0)
    nowhere = _job(ckpts, tmp_path, **kw, cfg_scale=3.0, guidance_interval="1e6,1e7")
    inside = _job(ckpts, tmp_path, **kw, cfg_scale=3.0, guidance_interval="0,1e7")
    base = conditional.sample_batch(0)[0]
    guided = everywhere.sample_batch(0)[0]
    assert np.abs(guided.astype(int) - base.astype(int)).mean() > 1.0
    _assert_images_close(nowhere.sample_batch(0)[0], base)
    _assert_images_close(inside.sample_batch(0)[0], guided)


def test_sampler_spec_fields_and_backward_compatibility():
    spec = lambda **f: recipe.sampler_spec({"timestep_respacing": "250", **f})
    assert spec() == methods.SamplerSpec("ddpm", "250")
    assert spec(steps=50) == methods.SamplerSpec("ddpm", "50")
    assert spec(use_ddim=True, timestep_respacing="ddim25").respacing == "ddim25"
    assert spec(use_ddim=True).name == "ddim"  # the old spelling of sampler="ddim"
    assert spec(sampler="ddim", steps=10, eta=0.5) == methods.SamplerSpec("ddim", "ddim10", 0, 0.5)
    dpm = spec(sampler="DPM++")
    assert (dpm.name, dpm.respacing, dpm.steps, dpm.order) == ("dpm++", "", 20, 2)
    assert (dpm.label, dpm.tag) == ("DPM-Solver++(2M)-20", "dpmpp20")
    assert spec(sampler="dpm++", steps=1).order == 1
    heun = spec(sampler="heun", steps=10, s_churn=40, sigma_grid="discrete")
    assert (heun.respacing, heun.steps, heun.s_churn, heun.sigma_grid) == ("", 10, 40, "discrete")
    assert (heun.label, heun.tag) == ("Heun-10", "heun10")
    assert spec(sampler="euler_ancestral").eta == 1.0  # k-diffusion's default; DDIM's is 0
    assert spec(sampler="ddim").eta == 0.0
    assert spec(sampler="dpmpp_2m_sde", guidance_interval="0.3,5").guidance_interval == (0.3, 5)
    assert recipe.parse_sampler("dpmpp_2m_sde10").name == "dpmpp_2m_sde"
    assert recipe.parse_sampler("unipc8").steps == 8
    assert recipe.cfg_scale_of({"cfg_scale": ""}) is None
    assert recipe.cfg_scale_of({"cfg_scale": None}) is None
    assert recipe.cfg_scale_of({"cfg_scale": 0}) == 0.0


def test_sweep_grid_of_scales_samplers_and_nfe(ckpts, tmp_path):
    """Classifier-free scales x {ddim, dpm++} at one NFE: one compilation per sampler, a
    folder per point, Sampler and NFE columns in the table, one curve per sampler."""
    config = _config(
        ckpts, tmp_path, checkpoint=ckpts["cfg"], num_samples=8, steps=STEPS,
        sweep_scales="1,3", sweep_samplers="ddim,dpm++",
    )  # fmt: skip

    def metrics(npz_path):
        images, labels = io.load_samples_npz(npz_path)
        assert labels.shape == (8,)
        return {"fid": float(images.mean())}

    rows = sweep.guidance_sweep(config, str(tmp_path), metrics_fn=metrics)
    got = [(r["sampler"], r["nfe"], r["guidance"], r["scale"]) for r in rows]
    assert got == [
        ("ddim", STEPS, "cfg", 1.0), ("ddim", STEPS, "cfg", 3.0),
        ("dpm++", STEPS, "cfg", 1.0), ("dpm++", STEPS, "cfg", 3.0),
    ]  # fmt: skip
    for folder in ("ddim4/scale_1", "ddim4/scale_3", "dpmpp4/scale_1", "dpmpp4/scale_3"):
        assert os.path.exists(tmp_path / folder / "samples_8x8x8x3.npz"), folder
    table = (tmp_path / "sweep.md").read_text().splitlines()
    assert table[0] == "| Sampler | NFE | Scale | FID |"
    assert table[5].startswith("| dpm++ | 4 | 3 |")
    with pytest.raises(ValueError, match=r"^sample\.sweep_scales: scales other than 0 need"):
        sweep.guidance_sweep(_config(ckpts, tmp_path, sweep_scales="0,2"), str(tmp_path))
    with pytest.raises(ValueError, match=r"^sample\.sweep_scales: must be a finite"):
        sweep.guidance_sweep(config, str(tmp_path), scales=[1.0, -1.0])


def test_entry_point_sweep_mode(ckpts, tmp_path):
    """--mode=sweep is a mode of adm_jax.main (adm_jax.modes): a bad field is one line;
    without metrics or a reference batch it samples every point and writes the table."""
    from absl import app

    from adm_jax import modes

    assert "sweep" in modes.MODES
    config = _config(ckpts, tmp_path, num_samples=8, steps=STEPS, sweep_scales="")
    with pytest.raises(app.UsageError, match=r"^sample\.sweep_scales: give at least one"):
        modes.run_mode(config, str(tmp_path), "sweep")
    config.sample.sweep_scales = "0"
    modes.run_mode(config, str(tmp_path), "sweep")
    assert os.path.exists(tmp_path / "scale_0" / "samples_8x8x8x3.npz")
    table = (tmp_path / "sweep.md").read_text().splitlines()
    assert table[0] == "| Scale |" and table[2] == "| 0 |"


@pytest.mark.slow
def test_two_stage_upsampler_with_dpm_solver_and_cfg(ckpts, tmp_path):
    """An upsampler under DPM-Solver++ with classifier-free guidance (low_res repeated for the
    doubled batch)."""
    base = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    base_path = io.save_samples_npz(str(tmp_path / "base.npz"), base, np.arange(8) % NUM_CLASSES)
    config = _config(
        ckpts, tmp_path / "up", checkpoint=ckpts["cfg_superres"], base_samples=base_path,
        num_samples=0, sampler="dpm++", steps=3, cfg_scale=2.0,
    )  # fmt: skip
    images, labels = io.load_samples_npz(sampler.sample(config, str(tmp_path)))
    assert images.shape == (8, 16, 16, 3) and images.std() > 10
    np.testing.assert_array_equal(labels, np.arange(8) % NUM_CLASSES)
    args = (tmp_path / "up" / "shards" / "args.json").read_text()
    for text in ('"sampler": "dpm++"', '"steps": 3', '"cfg_scale": 2.0'):
        assert text in args, text


def test_config_without_label_dropout_does_not_describe_a_null_label_checkpoint(ckpts, tmp_path):
    config = _config(ckpts, tmp_path)
    flags = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1")
    config.model = dict(flags, kind="unet", class_cond=True, learn_sigma=True)
    ckpt = checkpoints.load_inference_checkpoint(ckpts["cfg"])
    with pytest.raises(ValueError, match="null_class_embedding=True \\(checkpoint\\) vs False"):
        sampler.check_matches_config(ckpt, config, "c")
    config.model.class_dropout_prob = 0.1
    with pytest.raises(ValueError) as info:  # other fields still differ, this one no longer
        sampler.check_matches_config(ckpt, config, "c")
    assert "null_class_embedding" not in str(info.value)
