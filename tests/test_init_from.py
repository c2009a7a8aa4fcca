"""Fine-tuning (``train.init_from``) and models with their own channels and class counts.

A reference network (golden ``unet_classcond_legacyattn``: 32x32, 10 classes) is converted with
the real CLI, then fine-tuned on a tiny image folder with 3 classes: every parameter but the
label embedding starts as the converted one, the EMA equals it, the optimizer and step are
fresh, and the run trains on from there.
"""

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT  # noqa: F401 - configs/ importable
from flax import traverse_util
from PIL import Image

from adm_jax import checkpoints, convert, train
from adm_jax.checkpoints import init_from
from adm_jax.models import abstract_params, example_inputs, module_from_kwargs
from adm_jax.recipe import config as config_lib
from configs import default

GOLDEN = "unet_classcond_legacyattn"
# README flags of the golden network (its constructor kwargs, as script_util derives them).
FLAGS = (
    "--image_size 32 --num_channels 32 --channel_mult 1,2 --num_res_blocks 2 "
    "--attention_resolutions 16 --num_heads 2 --use_scale_shift_norm False "
    "--class_cond True --learn_sigma False"
)


@pytest.fixture(scope="module")
def converted(golden, tmp_path_factory):
    """The golden network as an inference checkpoint, through `python -m adm_jax.convert`."""
    meta, arrays = golden(GOLDEN)
    out = tmp_path_factory.mktemp("converted")
    state_dict = {k[3:]: v for k, v in arrays.items() if k.startswith("sd/")}
    np.savez(out / "model.npz", **state_dict)
    path = convert.main(
        ["--checkpoint", str(out / "model.npz"), "--flags", FLAGS, "--num_classes", "10"]
        + ["--out", str(out / "ckpt")]
    )
    ckpt = checkpoints.load_inference_checkpoint(path)
    expected = {k: v for k, v in meta["constructor"]["kwargs"].items() if k != "dims"}
    assert ckpt.model_kwargs == expected  # num_classes=10 reaches the constructor kwargs
    return path, ckpt


@pytest.fixture(scope="module")
def three_class_folder(tmp_path_factory):
    """16 random 32x32 RGB images in 3 class folders, as the TFDS dataset ``finetune_images``."""
    from adm_jax.data import build_image_folder_dataset

    root = tmp_path_factory.mktemp("finetune_images")
    rng = np.random.default_rng(1)
    for i in range(16):
        folder = root / "png" / f"class_{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    build_image_folder_dataset(str(root / "png"), str(root / "tfds"), "finetune_images")
    return str(root / "tfds")


def finetune_config(source, data_dir, *, num_classes=3, **model):
    config = default.get_config()
    architecture = dict(
        image_size=32,
        num_channels=32,
        channel_mult="1,2",
        num_res_blocks=2,
        attention_resolutions="16",
        num_heads=2,
        use_scale_shift_norm=False,
        class_cond=True,
        learn_sigma=False,
        num_classes=num_classes,
    )
    config.model = default.unet_model(**{**architecture, **model})
    config.diffusion.learn_sigma = False
    config.data.update(
        name="finetune_images", data_dir=data_dir, image_size=32, class_cond=True,
        num_workers=0, shuffle_buffer=16, eval_split="",
    )  # fmt: skip
    config.train.update(
        init_from=source, batch_size=8, num_steps=2, lr=1e-4, dtype="float32", fsdp=1,
        log_every=1, checkpoint_every=0, eval_every=0, sample_every=0, tensorboard=False,
        ema_rate="0.9999", async_checkpointing=False,
    )  # fmt: skip
    return config


def flat(tree):
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def fresh_params(config):
    module = config_lib.build_model(config)
    args, kwargs = example_inputs(module)
    return module.init(jax.random.key(0), *args, **kwargs)["params"]


@pytest.mark.slow
def test_fine_tune_a_converted_reference_network(converted, three_class_folder, tmp_path, caplog):
    path, ckpt = converted
    config = finetune_config(path, three_class_folder)
    workdir = tmp_path / "run"
    with caplog.at_level("WARNING"):
        start = train.train_and_evaluate(config, str(workdir), stop_after=0)
    assert "label_emb/embedding re-initialised" in caplog.text
    assert int(start.state.step) == 0
    source, params = flat(ckpt.params), flat(start.state.params)
    assert set(params) == set(source)
    for name, value in params.items():
        if name == "label_emb/embedding":
            assert value.shape == (3, 128) and source[name].shape == (10, 128)
        else:
            np.testing.assert_array_equal(value, source[name], err_msg=name)
    jax.tree.map(np.testing.assert_array_equal, start.state.ema_params[0], start.state.params)
    moments = [
        leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(start.state.opt_state)[0]
        if any(getattr(k, "name", None) in ("mu", "nu", "count") for k in path)
    ]
    assert len(moments) > 2 * len(params) and not any(np.any(np.asarray(m)) for m in moments)

    # Later launches resume from the run's own checkpoint (init_from is not read again).
    done = train.train_and_evaluate(config, str(workdir))
    assert done.step == 2 and np.isfinite(done.metrics["train/loss"])
    moved = flat(done.state.params)
    assert any(not np.array_equal(moved[n], params[n]) for n in params)

    # Another run's workdir is a source too: its EMA, with this model's 3 classes kept.
    again = init_from.load_init_params(
        finetune_config(str(workdir), three_class_folder), fresh_params(config)
    )
    assert again.step == 2 and again.reinitialised == ()
    jax.tree.map(
        np.testing.assert_array_equal, again.params, jax.device_get(done.state.ema_params[0])
    )


def test_adding_the_null_label_keeps_every_trained_row(converted, three_class_folder):
    path, ckpt = converted
    config = finetune_config(path, three_class_folder, num_classes=10, class_dropout_prob=0.1)
    loaded = init_from.load_init_params(config, fresh_params(config))
    assert loaded.extended == ("label_emb/embedding",) and loaded.reinitialised == ()
    rows = flat(loaded.params)["label_emb/embedding"]
    assert rows.shape == (11, 128)
    np.testing.assert_array_equal(rows[:10], flat(ckpt.params)["label_emb/embedding"])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_channels=64), "train.init_from: .*model_channels: the source has 32"),
        (dict(class_cond=False), "train.init_from: .*num_classes|label_emb"),
    ],
)
def test_an_incompatible_source_is_named_in_one_line(
    converted, three_class_folder, change, message
):
    path, _ = converted
    config = finetune_config(path, three_class_folder, **change)
    if not config.model.class_cond:
        config.data.class_cond = False
    with pytest.raises(ValueError, match=message) as err:
        init_from.load_init_params(config, jax.eval_shape(lambda: fresh_params(config)))
    assert "\n" not in str(err.value)


def test_missing_source_is_a_config_error(three_class_folder, tmp_path):
    config = finetune_config(str(tmp_path / "nowhere"), three_class_folder)
    with pytest.raises(train.ConfigError, match="train.init_from: .*nowhere: no such"):
        config_lib.validate_config(config)


def test_grey_model_with_ten_classes_has_those_shapes():
    config = default.get_config()
    config.model = default.unet_model(
        image_size=16, num_channels=32, channel_mult="1,2", num_res_blocks=1,
        attention_resolutions="8", class_cond=True, learn_sigma=True, in_channels=1,
        num_classes=10,
    )  # fmt: skip
    config.data.update(image_size=16, channels=1, class_cond=True)
    config.train.update(batch_size=8)
    config_lib.validate_config(config)
    module = config_lib.build_model(config)
    params = flat(abstract_params(module))
    assert params["label_emb/embedding"].shape == (10, 128)
    assert params["out_2/kernel"].shape[-1] == 2  # eps + learned variance of one channel
    assert params["input_blocks_0_0/kernel"].shape[-2] == 1
    args, kwargs = example_inputs(module)
    assert args[0].shape[-1] == 1

    config.data.channels = 3
    with pytest.raises(train.ConfigError, match="data.channels: 3 but model.in_channels is 1"):
        config_lib.validate_config(config)

    classifier = default.classifier_config(
        16,
        num_steps=1,
        channel_mult="1,2",
        in_channels=1,
        num_classes=10,
        classifier_width=32,
        classifier_attention_resolutions="8",
    )
    classifier.data.channels = 1
    head = module_from_kwargs("classifier", config_lib.model_kwargs(classifier))
    assert head.out_channels == 10 and head.in_channels == 1
