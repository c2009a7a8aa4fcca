"""``--mode=edit``: inpainting (RePaint), SDEdit and class swap (DDIM inversion).

* behaviour, with an exact denoiser of a two-image data set (one image per class): each kind
  ends at the target class's image through the one compiled program (``BatchSampler`` with an
  ``EditSpec``), and the class swap really inverts under the SOURCE label;
* the masks (standard kinds and folders) and one-line errors for bad masks, sizes and labels;
* the entry point on models in the released checkpoints' format (converted from the
  reference's state_dicts, as the golden networks): inpainting guided by a converted
  classifier, a class swap on a converted class-conditional model, resume, the grid.
"""

import json
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from adm_jax import checkpoints, main, recipe
from adm_jax.batch_sampler import BatchSampler
from adm_jax.convert import convert_state_dict
from adm_jax.diffusion import create_diffusion
from adm_jax.diffusion.editing import EditSpec
from adm_jax.sampling import edit as edit_lib

SIZE = 8
TINY = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py")


def _two_images():
    """Class 0: a bright left half; class 1: a bright bottom half ([-1, 1], 8x8x1)."""
    rows, cols = np.mgrid[:SIZE, :SIZE]
    a = np.where(cols < SIZE // 2, 0.8, -0.8)
    b = np.where(rows >= SIZE // 2, 0.8, -0.8)
    return np.stack([a, b])[..., None].astype(np.float32)


def _exact_eps(diffusion_base):
    """eps of the data set {images[y]} given the label: the exact denoiser of one point."""
    images = jnp.asarray(_two_images())
    abar = jnp.asarray(diffusion_base.alphas_cumprod, jnp.float32)

    def model_apply(params, x, t, y):
        del params
        a = abar[jnp.clip(jnp.round(t).astype(jnp.int32), 0, len(abar) - 1)][:, None, None, None]
        x0 = images[y]
        return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)

    return model_apply


def _to_uint8(x):
    return np.clip((x + 1) * 127.5, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "kind, sampler",
    [("inpaint", "ddpm"), ("sdedit", "ddim"), ("sdedit", "heun"), ("class_swap", "ddim")],
)
def test_each_kind_lands_on_the_target_class(kind, sampler):
    base = create_diffusion(steps=1000, noise_schedule="linear")
    spec = recipe.sampler_spec({"sampler": sampler, "steps": 10})
    respacing = "" if spec.on_training_schedule else spec.respacing
    diffusion = create_diffusion(steps=1000, noise_schedule="linear", timestep_respacing=respacing)
    edit = EditSpec(kind, strength=0.9, jump_length=2, jump_n_sample=2)
    batch = BatchSampler(
        diffusion,
        _exact_eps(base),
        image_shape=(SIZE, SIZE, 1),
        batch_size=2,
        class_cond=True,
        method=spec,
        edit=edit,
    )
    images = _to_uint8(_two_images())
    inputs = dict(x_known=images, labels=np.array([1, 0], np.int32))
    if kind == "inpaint":
        inputs["mask"] = edit_lib.standard_masks("every_second_line", 2, SIZE)
    if batch.needs_source_labels:
        inputs["source_labels"] = np.array([0, 1], np.int32)
    out = batch(None, seed=0, batch_index=0, **inputs)
    out2 = batch(None, seed=0, batch_index=1, **inputs)
    assert batch.trace_count == 1
    swapped = images[::-1].astype(int)
    for result in (out, out2):
        err = np.abs(result.astype(int) - swapped).max()
        assert err <= 3, f"{kind}/{sampler}: {err} grey levels from the target class's image"


def test_class_swap_inverts_under_the_source_label():
    """Classes N(mu_y, s^2 I): DDIM (the probability-flow ODE) maps x_T to mu_y + s * x_T, so
    inverting x under its own label y and sampling under y' gives x - mu_y + mu_y'. Inverting
    under the target label instead would give x back."""
    base = create_diffusion(steps=1000, noise_schedule="linear")
    abar = jnp.asarray(base.alphas_cumprod, jnp.float32)
    mu = jnp.asarray(_two_images()) * 0.5
    s = 0.2

    def model_apply(params, x, t, y):
        a = abar[jnp.clip(jnp.round(t).astype(jnp.int32), 0, 999)][:, None, None, None]
        return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu[y]) / (a * s**2 + 1 - a)

    spec = recipe.sampler_spec({"sampler": "ddim", "steps": 50})
    diffusion = create_diffusion(
        steps=1000, noise_schedule="linear", timestep_respacing=spec.respacing
    )
    batch = BatchSampler(
        diffusion,
        model_apply,
        image_shape=(SIZE, SIZE, 1),
        batch_size=2,
        class_cond=True,
        method=spec,
        edit=EditSpec("class_swap"),
    )
    z = np.clip(np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 1)), -2, 2)
    images = _to_uint8(np.asarray(mu) + s * z)
    x = images / 127.5 - 1
    source, target = np.array([0, 1], np.int32), np.array([1, 0], np.int32)
    out = batch(None, seed=0, batch_index=0, x_known=images, labels=target, source_labels=source)
    expected = _to_uint8(x - np.asarray(mu)[source] + np.asarray(mu)[target])
    # DDIM's discretisation error both ways (50 steps): a few grey levels. Inverting under
    # the target label would leave the image as it was: |mu_1 - mu_0| = 0.8 (102 levels) on
    # the half of the pixels where the two classes differ.
    err = np.abs(out.astype(int) - expected.astype(int))
    assert err.max() <= 24 and err.mean() < 8, (err.max(), err.mean())
    assert np.abs(out.astype(int) - images.astype(int)).mean() > 40


def test_standard_masks():
    half = edit_lib.standard_masks("half", 2, 8)
    assert half.shape == (2, 8, 8, 1) and half[0, :, :4].all() and not half[0, :, 4:].any()
    lines = edit_lib.standard_masks("every_second_line", 1, 8)[0, :, 0, 0]
    np.testing.assert_array_equal(lines, [1, 0] * 4)
    sr = edit_lib.standard_masks("super_resolve", 1, 8)[0, ..., 0]
    assert sr.sum() == 16 and sr[0, 0] == 1 and sr[1, 1] == 0
    for kind in ("thick", "thin"):
        masks = edit_lib.standard_masks(kind, 3, 32, seed=1)
        again = edit_lib.standard_masks(kind, 3, 32, seed=1)
        np.testing.assert_array_equal(masks, again)
        assert not np.array_equal(masks[0], masks[1])  # a different stroke per image
        holes = 1 - masks.mean()
        assert 0.03 < holes < 0.8, (kind, holes)
    thick = 1 - edit_lib.standard_masks("thick", 8, 32).mean()
    thin = 1 - edit_lib.standard_masks("thin", 8, 32).mean()
    assert thick > thin


def _settings(tmp_path, **fields):
    config = {
        "edit": {"kind": "inpaint", "images": str(tmp_path), "masks": "half", **fields},
    }
    return recipe.read_edit(config, str(tmp_path))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"kind": "outpaint"}, "edit.kind: expected one of"),
        ({"images": ""}, "edit.images: give a folder"),
        ({"masks": ""}, "edit.masks: inpainting needs"),
        ({"kind": "sdedit"}, "edit.masks: masks belong to edit.kind=inpaint"),
        ({"kind": "sdedit", "masks": "", "strength": 1.5}, r"edit.strength: expected .* \(0, 1\]"),
        ({"jump_length": 0}, "edit.jump_length: expected an integer >= 1"),
        ({"num_images": -1}, "edit.num_images"),
    ],
)
def test_bad_settings_are_one_line(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message) as err:
        _settings(tmp_path, **fields)
    assert "\n" not in str(err.value)


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_mask_folders(tmp_path):
    settings = _settings(tmp_path, masks=str(tmp_path / "masks"))
    with pytest.raises(ValueError, match="no such folder"):
        edit_lib.load_masks(settings, 3, 8, 0)
    keep_left = np.zeros((8, 8), np.uint8)
    keep_left[:, :4] = 255
    _write_png(tmp_path / "masks" / "a.png", keep_left)
    one = edit_lib.load_masks(settings, 3, 8, 0)  # one mask for every image
    assert one.shape == (3, 8, 8, 1) and (one[:, :, :4] == 1).all() and (one[:, :, 4:] == 0).all()
    with pytest.raises(ValueError, match="is 8x8, the images are 16x16"):
        edit_lib.load_masks(settings, 3, 16, 0)
    _write_png(tmp_path / "masks" / "b.png", keep_left)
    with pytest.raises(ValueError, match="holds 2 masks for 3 images"):
        edit_lib.load_masks(settings, 3, 8, 0)
    _write_png(tmp_path / "masks" / "b.png", np.full((8, 8), 255, np.uint8))
    with pytest.raises(ValueError, match="keeps every pixel"):
        edit_lib.load_masks(settings, 2, 8, 0)


# ------------------------------------------------------------------------------------------
# The entry point on converted reference checkpoints.

# configs/tiny.py flags that describe the golden networks (as a user writes for a released
# checkpoint), with the golden unet's diffusion.
UNCOND = [
    "--config.model.image_size=32", "--config.model.num_channels=32",
    "--config.model.channel_mult=1,2,2", "--config.model.attention_resolutions=16,8",
    "--config.model.num_heads=1", "--config.model.num_head_channels=16",
    "--config.model.use_scale_shift_norm=True", "--config.model.resblock_updown=True",
    "--config.model.class_cond=False", "--config.model.learn_sigma=True",
    "--config.model.dropout=0.0", "--config.diffusion.noise_schedule=cosine",
    "--config.diffusion.learn_sigma=True", "--config.data.image_size=32",
]  # fmt: skip


def _convert(golden, case, out, kind, diffusion_kwargs=None):
    meta, arrays = golden(case)
    kwargs = meta["constructor"]["kwargs"]
    state_dict = {k[3:]: v for k, v in arrays.items() if k.startswith("sd/")}
    params = convert_state_dict(kind, kwargs, state_dict)
    model_kwargs = {k: v for k, v in kwargs.items() if k != "dims"}
    return checkpoints.save_inference_checkpoint(
        out, params, kind=kind, model_kwargs=model_kwargs, diffusion_kwargs=diffusion_kwargs
    )


@pytest.fixture(scope="module")
def converted(golden, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    diffusion = dict(steps=1000, noise_schedule="cosine", learn_sigma=True)
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 255, (6, 4, 4, 3)).astype(np.uint8)
    images = np.repeat(np.repeat(smooth, 8, axis=1), 8, axis=2)  # 32x32 blocks
    np.savez(root / "inputs.npz", arr_0=images, arr_1=np.arange(6) % 10)
    return dict(
        root=root,
        unet=_convert(golden, "unet_learnsigma", root / "unet", "unet", diffusion),
        classcond=_convert(
            golden,
            "unet_classcond_legacyattn",
            root / "classcond",
            "unet",
            dict(steps=1000, noise_schedule="linear", learn_sigma=False),
        ),
        classifier=_convert(golden, "classifier_encoder", root / "classifier", "classifier"),
        images=images,
    )


def _edit_argv(workdir, *flags):
    return [
        "adm_jax", f"--config={TINY}", f"--workdir={workdir}", "--mode=edit",
        "--config.sample.batch_size=4", "--config.sample.num_samples=4", *flags,
    ]  # fmt: skip


def test_inpaint_guided_by_a_converted_classifier_through_the_entry_point(converted, tmp_path):
    root = converted["root"]
    argv = _edit_argv(
        tmp_path, *UNCOND,
        f"--config.sample.checkpoint={converted['unet']}",
        f"--config.sample.classifier_checkpoint={converted['classifier']}",
        "--config.sample.classifier_scale=2", "--config.sample.steps=4",
        f"--config.edit.images={root / 'inputs.npz'}", "--config.edit.masks=thick",
        "--config.edit.target_labels=3,7", "--config.edit.jump_length=2",
        "--config.edit.jump_n_sample=2", "--config.edit.num_images=5",
    )  # fmt: skip
    assert main.run(argv) == 0
    out = tmp_path / "edits" / "inpaint"
    with np.load(out / "samples_5x32x32x3.npz") as data:
        np.testing.assert_array_equal(data["arr_1"], [3, 7, 3, 7, 3])
        results = data["arr_0"]
    assert results.shape == (5, 32, 32, 3)
    assert (out / "edits.png").is_file()
    args = json.loads((out / "shards" / "args.json").read_text())
    assert args["edit"]["kind"] == "inpaint" and args["edit_masks"] == "thick"
    # A second run finds every shard: nothing to do, the same file.
    assert main.run(argv) == 0
    with np.load(out / "samples_5x32x32x3.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], results)
    # Another mask is another run: refused in the same output_dir, naming the difference.
    assert main.run([*argv, "--config.edit.masks=half"]) == 2


def test_class_swap_and_sdedit_on_a_converted_class_conditional_model(converted, tmp_path):
    root = converted["root"]
    folder = tmp_path / "in"
    for i, image in enumerate(converted["images"][:2]):
        _write_png(folder / str(i) / f"{i}.png", image)  # class subfolders 0 and 1
    classcond = [
        "--config.model.image_size=32", "--config.model.num_channels=32",
        "--config.model.channel_mult=1,2", "--config.model.attention_resolutions=16",
        "--config.model.num_res_blocks=2", "--config.model.num_heads=2",
        "--config.model.num_head_channels=-1", "--config.model.use_scale_shift_norm=False",
        "--config.model.resblock_updown=False", "--config.model.class_cond=True",
        "--config.model.num_classes=10", "--config.model.learn_sigma=False",
        "--config.model.dropout=0.0", "--config.diffusion.noise_schedule=linear",
        "--config.diffusion.learn_sigma=False", "--config.data.image_size=32",
        f"--config.sample.checkpoint={converted['classcond']}",
        "--config.sample.classifier_scale=0",
    ]  # fmt: skip
    swap = _edit_argv(
        tmp_path, *classcond, "--config.edit.kind=class_swap", "--config.sample.sampler=ddim",
        "--config.sample.steps=3", f"--config.edit.images={folder}",
        "--config.edit.labels=subdir", "--config.edit.target_labels=5",
    )  # fmt: skip
    assert main.run(swap) == 0, "class swap"
    with np.load(tmp_path / "edits" / "class_swap" / "samples_2x32x32x3.npz") as data:
        np.testing.assert_array_equal(data["arr_1"], [5, 5])
    # Without the images' own labels the inversion has nothing to condition on: one line.
    assert main.run([*swap, "--config.edit.labels=none"]) == 2
    sdedit = _edit_argv(
        tmp_path, *classcond, "--config.edit.kind=sdedit", "--config.sample.sampler=dpm++",
        "--config.sample.steps=4", "--config.edit.strength=0.3", "--config.edit.masks=",
        f"--config.edit.images={root / 'inputs.npz'}", "--config.edit.num_images=4",
    )  # fmt: skip
    assert main.run(sdedit) == 0, "sdedit"
    with np.load(tmp_path / "edits" / "sdedit" / "samples_4x32x32x3.npz") as data:
        np.testing.assert_array_equal(data["arr_1"], [0, 1, 2, 3])  # the images' own labels


def test_bad_inputs_through_the_entry_point(converted, tmp_path, capsys):
    root = converted["root"]
    base = [*UNCOND, f"--config.sample.checkpoint={converted['unet']}",
            "--config.sample.classifier_scale=0", "--config.edit.masks=half"]  # fmt: skip
    small = np.zeros((2, 16, 16, 3), np.uint8)
    np.savez(tmp_path / "small.npz", arr_0=small)
    cases = [
        (["--config.edit.images=" + str(tmp_path / "small.npz")], "holds 16x16x3 images"),
        (["--config.edit.images=" + str(root / "inputs.npz"), "--config.edit.target_labels=1"],
         "edit.target_labels: the model is unconditional"),
        (["--config.edit.images=" + str(root / "inputs.npz"), "--config.sample.sampler=ddim"],
         "sample.sampler: edit.kind=inpaint runs with ddpm"),
    ]  # fmt: skip
    for flags, message in cases:
        assert main.run(_edit_argv(tmp_path, *base, *flags)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1], err[-3:]


@pytest.mark.slow
def test_two_processes_write_what_one_writes(converted, tmp_path):
    """``--mode=edit`` in 2 real JAX processes (4 devices each, gloo) and in 1 (8 devices):
    the same edited images and labels, the shards written by both processes."""
    from test_multiprocess import Job

    root = converted["root"]
    flags = [
        *UNCOND, f"--config.sample.checkpoint={converted['unet']}",
        "--config.sample.classifier_scale=0", "--config.sample.steps=3",
        f"--config.edit.images={root / 'inputs.npz'}", "--config.edit.masks=thin",
        "--config.edit.jump_length=2", "--config.edit.jump_n_sample=2",
        "--config.sample.batch_size=8",
    ]  # fmt: skip
    results = {}
    for n in (1, 2):
        workdir = tmp_path / f"p{n}"
        argv = [sys.executable, "-m", "adm_jax.main", *_edit_argv(workdir, *flags)[1:]]
        Job(f"edit{n}", argv, num_processes=n, logdir=tmp_path).check()
        with np.load(workdir / "edits" / "inpaint" / "samples_6x32x32x3.npz") as data:
            results[n] = data["arr_0"]
        assert (workdir / "edits" / "inpaint" / "edits.png").is_file()
    # uint8 pixels: float round-off of the sharded network may move a few by one.
    diff = np.abs(results[1].astype(int) - results[2].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
