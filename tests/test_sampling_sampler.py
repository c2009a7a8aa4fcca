"""adm_jax.sampling end to end with tiny real networks on 8 simulated CPU devices.

Checkpoints are tiny UNet / EncoderUNet / SuperResUNet with random (not zero-initialised
output) parameters saved with ``save_inference_checkpoint``; sampling uses 5 respaced steps.
"""

import dataclasses
import os
import pathlib

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh

from adm_jax import checkpoints
from adm_jax.evaluation import sweep
from adm_jax.models import module_from_kwargs
from adm_jax.sampling import io, sampler, two_stage

NUM_CLASSES = 10
DIFFUSION = dict(steps=100, noise_schedule="linear", learn_sigma=True)
UNET = dict(
    image_size=8,
    in_channels=3,
    model_channels=32,
    out_channels=6,
    num_res_blocks=1,
    attention_resolutions=[],
    dropout=0.0,
    channel_mult=[1],
    conv_resample=True,
    num_classes=NUM_CLASSES,
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=True,
    resblock_updown=False,
    use_new_attention_order=False,
)
SUPERRES = dict(UNET, image_size=16)
CLASSIFIER = dict(
    {k: v for k, v in UNET.items() if k != "num_classes"}, out_channels=NUM_CLASSES, pool="adaptive"
)


def _random_params(kind, kwargs, seed):
    """Random params, output layers included so every network (and guidance) has an effect.

    Drawn with numpy on the abstract shapes: jitted inits would cost seconds of compile each.
    """
    module = module_from_kwargs(kind, kwargs)
    size = kwargs["image_size"]
    x = np.zeros((1, size, size, 3), np.float32)
    t = np.zeros((1,), np.int32)
    extra = {}
    if kind != "classifier" and kwargs.get("num_classes") is not None:
        extra["y"] = np.zeros((1,), np.int32)
    if kind == "superres":
        extra["low_res"] = np.zeros((1, size // 2, size // 2, 3), np.float32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, t, **extra)["params"])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        std = 1 / np.sqrt(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 0.1
        value = rng.normal(0.0, std, leaf.shape) + ("scale" in name)
        return value.astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Three initialisations serve five checkpoints (compiles dominate the test time)."""
    root = tmp_path_factory.mktemp("ckpts")
    unet = _random_params("unet", UNET, 0)
    classifier = _random_params("classifier", CLASSIFIER, 1)  # adaptive pool: any image size
    specs = {
        "cond": ("unet", UNET, unet),
        "uncond": (
            "unet",
            dict(UNET, num_classes=None),
            {k: v for k, v in unet.items() if k != "label_emb"},
        ),
        "classifier": ("classifier", CLASSIFIER, classifier),
        "classifier16": ("classifier", dict(CLASSIFIER, image_size=16), classifier),
        "superres": ("superres", SUPERRES, _random_params("superres", SUPERRES, 2)),
    }
    return {
        name: checkpoints.save_inference_checkpoint(
            root / name,
            params,
            kind=kind,
            model_kwargs=kwargs,
            diffusion_kwargs=None if kind == "classifier" else DIFFUSION,
        )
        for name, (kind, kwargs, params) in specs.items()
    }


@pytest.fixture(scope="module")
def cond_job(ckpts, tmp_path_factory):
    """The class-conditional model on all 8 devices; its one compiled scan is shared."""
    return sampler.build_job(_config(ckpts, ""), str(tmp_path_factory.mktemp("work")))


def _config(ckpts, out, **sample):
    config = ml_collections.ConfigDict()
    config.sample = dict(
        checkpoint=ckpts["cond"],
        classifier_checkpoint="",
        classifier_scale=0.0,
        num_samples=20,
        batch_size=8,
        use_ddim=False,
        eta=0.0,
        timestep_respacing="5",
        clip_denoised=True,
        class_labels="random",
        seed=0,
        output_dir=str(out),
        base_samples="",
        sweep_scales="0,4",
        reference_batch="",
    )
    config.sample.update(sample)
    return config


def _one_device_mesh():
    return Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))


def test_reference_npz_format_resume_and_single_compile(ckpts, cond_job, tmp_path):
    path = sampler.run_job(cond_job, str(tmp_path / "full"), num_samples=20)
    assert os.path.basename(path) == "samples_20x8x8x3.npz"
    assert os.path.exists(path[: -len(".npz")] + ".png")
    with np.load(path) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
        images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (20, 8, 8, 3)
    assert labels.shape == (20,) and labels.min() >= 0 and labels.max() < NUM_CLASSES
    assert images.std() > 10  # not a constant image

    # Interrupted after 1 of 3 batches, then rerun with the same arguments: same file.
    out = str(tmp_path / "resumed")
    assert sampler.run_job(cond_job, out, num_samples=20, max_batches=1) is None
    assert sampler.finished_batches(os.path.join(out, "shards")) == {0}
    resumed = sampler.run_job(cond_job, out, num_samples=20)
    assert sampler.finished_batches(os.path.join(out, "shards")) == {0, 1, 2}
    got, got_labels = io.load_samples_npz(resumed)
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(got_labels, labels)
    # One compiled scan served every batch of both runs.
    assert cond_job.sampler.trace_count == 1

    # Resuming with different arguments is refused, naming them.
    settings = dataclasses.replace(cond_job.settings, seed=1)
    other = dataclasses.replace(
        cond_job, settings=settings, provenance=dict(cond_job.provenance, seed=1)
    )
    with pytest.raises(ValueError, match=r"other arguments \(seed: 0 -> 1"):
        sampler.run_job(other, out, num_samples=20)

    # The evaluator's streaming reader (memory-maps stored members) takes the file as it is.
    from adm_jax.evaluation import open_npz_array

    array = open_npz_array(path, "arr_0")
    assert (len(array), array.dtype) == (20, np.uint8)
    np.testing.assert_array_equal(np.concatenate(list(array.read_batches(6))), images)


def test_sampling_into_gcs_resumes_and_matches_local(cond_job, tmp_path, gcs_bucket):  # noqa: F811
    out = f"{gcs_bucket}/run/samples"
    assert sampler.run_job(cond_job, out, num_samples=20, max_batches=2) is None
    assert sampler.finished_batches(f"{out}/shards") == {0, 1}
    final = sampler.run_job(cond_job, out, num_samples=20)
    assert final == f"{out}/samples_20x8x8x3.npz"
    local = sampler.run_job(cond_job, str(tmp_path / "local"), num_samples=20)
    for got, want in zip(io.load_samples_npz(final), io.load_samples_npz(local), strict=True):
        np.testing.assert_array_equal(got, want)
    from etils import epath

    names = {p.name for p in epath.Path(out).iterdir()}
    assert names == {"shards", "samples_20x8x8x3.npz", "samples_20x8x8x3.png"}
    with pytest.raises(ValueError, match="other arguments"):  # args.json read back from gs://
        sampler.run_job(dataclasses.replace(cond_job, provenance={}), out, num_samples=20)
    rows = [{"scale": 0.0, "samples": final, "fid": 1.0}]
    written = sweep.write_sweep_report(rows, f"{gcs_bucket}/run")
    assert written["md"] == f"{gcs_bucket}/run/sweep.md"
    assert epath.Path(written["md"]).read_text().startswith("| Scale | FID |")


def test_sharded_equals_one_device_and_explicit_labels(ckpts, cond_job, tmp_path):
    config = _config(ckpts, tmp_path, class_labels="3,7", num_samples=8)
    settings = dataclasses.replace(cond_job.settings, class_labels=(3, 7))
    job8 = dataclasses.replace(cond_job, settings=settings)  # labels are traced: no recompile
    job1 = sampler.build_job(config, str(tmp_path), mesh=_one_device_mesh())
    assert job8.sampler.mesh.size == 8 and job1.sampler.mesh.size == 1
    images8, labels8 = job8.sample_batch(1)
    images1, labels1 = job1.sample_batch(1)
    np.testing.assert_array_equal(labels8, [3, 7] * 4)
    np.testing.assert_array_equal(labels8, labels1)
    # Same noise and labels; only float round-off differs (different XLA partitioning), which
    # can move a pixel across a uint8 boundary: allow +-1 on at most 1% of values.
    diff = np.abs(images8.astype(int) - images1.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, (diff.max(), (diff > 0).mean())
    # Different batches get different noise.
    assert not np.array_equal(job8.sample_batch(0)[0], images8)


def test_guided_differs_from_unguided(ckpts, tmp_path):
    config = _config(ckpts, tmp_path, classifier_checkpoint=ckpts["classifier"], use_ddim=True)
    job = sampler.build_job(config, str(tmp_path))
    unguided, labels = job.sample_batch(0, classifier_scale=0.0)
    guided, guided_labels = job.sample_batch(0, classifier_scale=20.0)
    np.testing.assert_array_equal(labels, guided_labels)
    assert np.abs(guided.astype(int) - unguided.astype(int)).mean() > 1.0
    assert job.sampler.trace_count == 1  # the scale is a traced argument


@pytest.mark.parametrize(
    "overrides, error",
    [
        (dict(classifier_scale=1.0), "needs sample.classifier_checkpoint"),
        (dict(class_labels="2,10"), r"\[10\] outside \[0, 10\)"),
        (dict(classifier_checkpoint="classifier16"), "classifier image_size 16 does not match"),
        (dict(checkpoint="uncond", class_labels="1"), "unconditional"),
        (dict(checkpoint="classifier"), "sampling needs a diffusion model"),
        (dict(base_samples="x.npz"), "feed an upsampler"),
        (dict(checkpoint="superres"), "base_samples"),
        (dict(checkpoint="missing"), "does not exist"),
        (dict(num_classes=11), "exceeds the model's 10 classes"),
        (dict(num_classes=3, class_labels="3"), r"outside \[0, 3\), the range of sample.num"),
    ],
)
def test_clear_errors(ckpts, tmp_path, overrides, error):
    for key in ("checkpoint", "classifier_checkpoint"):
        if key in overrides:
            overrides[key] = ckpts.get(overrides[key], str(tmp_path / overrides[key]))
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        sampler.build_job(_config(ckpts, tmp_path, **overrides), str(tmp_path))


def test_batch_sharding_rules(ckpts, tmp_path):
    # A batch that does not divide the 8 devices runs on the largest subset it divides.
    job = sampler.build_job(_config(ckpts, tmp_path, batch_size=12), str(tmp_path))
    assert job.sampler.mesh.size == 4
    mesh8 = sampler.make_mesh()
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        sampler.BatchSampler(None, None, image_shape=(8, 8, 3), batch_size=4, mesh=mesh8)


def test_random_labels(ckpts, tmp_path):
    job = sampler.build_job(_config(ckpts, tmp_path, num_classes=3), str(tmp_path))
    labels = np.concatenate([job.labels_for(b) for b in range(4)])
    assert set(labels.tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(job.labels_for(2), job.labels_for(2))  # per-batch seeded
    assert not np.array_equal(job.labels_for(0), job.labels_for(1))


def test_checkpoint_config_mismatch(ckpts, tmp_path):
    config = _config(ckpts, tmp_path)
    flags = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1")
    config.model = dict(flags, kind="unet")
    config.diffusion = dict(DIFFUSION, noise_schedule="cosine")
    with pytest.raises(ValueError, match="does not match the config") as info:
        sampler.check_matches_config(
            checkpoints.load_inference_checkpoint(ckpts["cond"]), config, "c"
        )
    message = str(info.value)
    assert "image_size=8 (checkpoint) vs 16 (config)" in message
    assert "noise_schedule='linear' (checkpoint) vs 'cosine' (config)" in message
    assert "\n" not in message


def test_two_stage(ckpts, tmp_path):
    base = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    base_labels = np.arange(6) % NUM_CLASSES
    base_path = io.save_samples_npz(str(tmp_path / "base.npz"), base, base_labels)
    config = _config(
        ckpts, tmp_path / "up", checkpoint=ckpts["superres"], base_samples=base_path, num_samples=0
    )
    path = sampler.sample(config, str(tmp_path))
    images, labels = io.load_samples_npz(path)
    assert os.path.basename(path) == "samples_6x16x16x3.npz"
    assert images.shape == (6, 16, 16, 3)
    np.testing.assert_array_equal(labels, base_labels)
    # low_res is the base image in [-1, 1], cycled when more samples than base images.
    job = sampler.build_job(config, str(tmp_path))
    np.testing.assert_allclose(job.low_res_for(0)[6], base[0] / 127.5 - 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="no arr_1 labels"):
        io.save_samples_npz(base_path, base)
        two_stage.load_base_samples(base_path, large_size=16, channels=3, class_cond=True)


def test_guidance_sweep_unconditional_model(ckpts, tmp_path):
    """Table 4's unconditional rows: an unconditional model guided by the classifier."""
    config = _config(
        ckpts,
        tmp_path,
        checkpoint=ckpts["uncond"],
        classifier_checkpoint=ckpts["classifier"],
        num_samples=8,
    )

    def metrics(npz_path):  # stand-in for Inception metrics
        images, labels = io.load_samples_npz(npz_path)
        assert labels is not None and labels.shape == (8,)  # guided: labels saved
        # evaluate_npz's keys; recall is None without reference images.
        return {"fid": float(images.mean()), "precision": 0.5, "recall": None, "num_samples": 8}

    rows = sweep.guidance_sweep(config, str(tmp_path), metrics_fn=metrics)
    assert [r["scale"] for r in rows] == [0.0, 4.0]
    assert rows[0]["fid"] != rows[1]["fid"]
    for name in ("sweep.json", "sweep.md", "sweep.png", "scale_0", "scale_4"):
        assert os.path.exists(tmp_path / name), name
    table = (tmp_path / "sweep.md").read_text().splitlines()
    assert table[0] == "| Scale | FID | Precision | Recall |"
    assert table[3].startswith("| 4 |") and table[3].endswith("| 0.5 | n/a |")


def test_real_config_matches_exported_checkpoint(tmp_path, monkeypatch):
    """configs/tiny.py against a checkpoint written from it; then a mismatching config."""
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1]))
    from adm_jax.train import diffusion_kwargs, model_kwargs
    from configs import tiny

    config = tiny.get_config()
    config.sample.classifier_scale = 0.0
    kwargs = model_kwargs(config)
    config.sample.checkpoint = checkpoints.save_inference_checkpoint(
        tmp_path / "tiny",
        _random_params("unet", kwargs, 0),
        kind="unet",
        model_kwargs=kwargs,
        diffusion_kwargs=diffusion_kwargs(config),
    )
    job = sampler.build_job(config, str(tmp_path))  # loads and checks; compiles nothing
    assert job.sampler.image_shape == (16, 16, 3) and job.num_classes == 1000
    assert job.sampler.mesh.size == 4  # tiny's batch of 4 on 8 devices
    config.model.num_channels = 64
    with pytest.raises(ValueError, match=r"model_channels=32 \(checkpoint\) vs 64 \(config\)"):
        sampler.build_job(config, str(tmp_path))
