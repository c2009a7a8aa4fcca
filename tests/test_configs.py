"""Every config: loads, validates, matches the released model's README flags, constructor
arguments and exact parameter count (golden/published_models.json); bad values fail with a
one-line error naming the field."""

import importlib
import pathlib
import sys

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adm_jax import models, train  # noqa: E402
from adm_jax.recipe import config as config_lib  # noqa: E402

PUBLISHED = {
    "imagenet64": "64x64_diffusion",
    "imagenet128": "128x128_diffusion",
    "imagenet256": "256x256_diffusion",
    "imagenet256_uncond": "256x256_diffusion_uncond",
    "imagenet512": "512x512_diffusion",
    "upsample64_256": "64_256_upsampler",
    "upsample128_512": "128_512_upsampler",
    "classifier64": "64x64_classifier",
    "classifier128": "128x128_classifier",
    "classifier256": "256x256_classifier",
    "classifier512": "512x512_classifier",
    "lsun_bedroom": "lsun_bedroom",
    "lsun_cat": "lsun_cat",
    "lsun_horse": "lsun_horse",
}
DIFFUSION_FLAGS = {"diffusion_steps": "steps", "noise_schedule": "noise_schedule"}


def load(name, arg=None):
    module = importlib.import_module(f"configs.{name}")
    return module.get_config(arg) if arg else module.get_config()


@pytest.fixture(scope="module")
def published(golden):
    meta, _ = golden("published_models")
    return {m["name"]: m for m in meta["models"]}


def test_every_config_file_is_covered():
    files = {p.stem for p in (REPO / "configs").glob("*.py")} - {"__init__", "default", "demo"}
    assert files == set(PUBLISHED) | {"tiny", "image_folder"}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_config_matches_released_model(name, published):
    config = load(name)
    ref = published[PUBLISHED[name]]
    # Validation with a device count the config's batch fits (a v4-128-like 64 devices).
    mode = "train_classifier" if config.model.kind == "classifier" else "train"
    train.validate_config(config, num_devices=8 * config.train.fsdp, mode=mode)

    flags = ref.get("readme_model_flags") or ref.get("extra_flags") or ""
    for flag, value in models.parse_flags(flags).items():
        if flag in DIFFUSION_FLAGS:
            assert config.diffusion[DIFFUSION_FLAGS[flag]] == value, (name, flag)
        elif flag == "learn_sigma":
            assert config.model.learn_sigma == value == config.diffusion.learn_sigma, name
        else:
            assert config.model[flag] == value, (name, flag, config.model[flag], value)

    kwargs = config_lib.model_kwargs(config)
    expected = ref.get("unet_constructor_args") or ref["encoder_constructor_args"]
    for key, value in expected.items():
        got = kwargs[key]
        got = list(got) if isinstance(got, tuple) else got
        if key == "num_heads_upsample" and got == -1:  # the classes resolve -1 to num_heads
            got = kwargs["num_heads"]
        if key == "in_channels" and config.model.kind == "superres":  # SuperResModel doubles it
            got = 2 * got
        assert got == value, (name, key, got, value)

    module = config_lib.build_model(config)
    assert models.count_params(models.abstract_params(module)) == ref["total_params"], name


def test_paper_recipes():
    """Paper App. I: AdamW (0.9, 0.999), lr 3e-4 / batch 2048 at 64, else 1e-4 / 256, EMA
    0.9999; classifiers lr 3e-4, weight decay 0.05, batch 256, annealed, 300K-500K steps."""
    for name in PUBLISHED:
        c = load(name)
        assert (c.train.b1, c.train.b2) == (0.9, 0.999), name
        if c.model.kind == "classifier":
            assert (c.train.lr, c.train.weight_decay, c.train.batch_size) == (3e-4, 0.05, 256)
            assert c.train.lr_anneal_steps == c.train.num_steps
            assert 300_000 <= c.train.num_steps <= 500_000
            assert c.data.random_crop and c.train.noised
        else:
            assert c.train.ema_rate == "0.9999", name
            lr, bs = (3e-4, 2048) if name == "imagenet64" else (1e-4, 256)
            assert (c.train.lr, c.train.batch_size) == (lr, bs), name
        doc = importlib.import_module(f"configs.{name}").__doc__
        assert "python -m adm_jax.main" in doc and "Hardware / time" in doc, name


@pytest.mark.parametrize("variant", ["unet", "classifier"])
def test_tiny_config_builds(variant):
    config = load("tiny", variant)
    mode = "train_classifier" if variant == "classifier" else "train"
    train.validate_config(config, num_devices=8, mode=mode)
    params = models.abstract_params(config_lib.build_model(config))
    assert models.count_params(params) < 2_000_000


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("train.batch_size", 12, "train.batch_size: 12"),
        ("train.lr", 0.0, "train.lr: must be > 0"),
        ("diffusion.noise_schedule", "cosin", "diffusion.noise_schedule: unknown schedule"),
        ("train.schedule_sampler", "foo", "train.schedule_sampler: unknown"),
        ("train.ema_rate", "0.9999,1.5", "train.ema_rate:"),
        ("train.fsdp", 3, "train.fsdp: 3 does not divide"),
        ("data.image_size", 32, "data.image_size: 32 but model.image_size is 16"),
        ("train.dtype", "bf16", "train.dtype: unknown"),
        ("train.dtype", "float16", "train.dtype: float16 training is not supported"),
    ],
)
def test_invalid_values_name_the_field(field, value, message):
    config = load("tiny")
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(train.ConfigError) as err:
        train.validate_config(config, num_devices=8, mode="train")
    text = str(err.value)
    assert text.startswith(message) and "\n" not in text, text


def test_unknown_fields_and_wrong_mode():
    config = load("tiny")
    with config.unlocked():
        config.train.batchsize = 3
    with pytest.raises(train.ConfigError, match=r"^train\.batchsize: unknown field"):
        train.validate_config(config)
    config = load("tiny")
    with config.unlocked():
        config.model.num_chanels = 3
    with pytest.raises(train.ConfigError, match=r"^model\.num_chanels: unknown field"):
        train.validate_config(config)
    with pytest.raises(train.ConfigError, match=r"^model\.kind: a classifier config"):
        train.validate_config(load("tiny", "classifier"), mode="train")


def test_abstract_shapes_without_allocation():
    """eval_shape of the largest config is cheap: no parameters are materialised."""
    config = load("imagenet512")
    shapes = models.abstract_params(config_lib.build_model(config))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize(
    "value, class_cond, message",
    [
        (1.0, True, "model.class_dropout_prob: must be in [0, 1), got 1.0"),
        (-0.1, True, "model.class_dropout_prob: must be in [0, 1), got -0.1"),
        (0.1, False, "model.class_dropout_prob: 0.1 needs model.class_cond"),
    ],
)
def test_class_dropout_prob_is_checked(value, class_cond, message):
    config = load("tiny")
    config.model.class_dropout_prob = value
    config.model.class_cond = config.data.class_cond = class_cond
    with pytest.raises(train.ConfigError) as err:
        train.validate_config(config, num_devices=8, mode="train")
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_class_dropout_adds_the_null_label_row_and_round_trips(tmp_path):
    """Label dropout puts null_class_embedding in the checkpoint kwargs (the module rebuilt
    from an inference checkpoint has the extra row); without it the kwargs are unchanged."""
    from adm_jax import checkpoints

    config = load("tiny")
    plain = config_lib.model_kwargs(config)
    assert "null_class_embedding" not in plain
    config.model.class_dropout_prob = 0.1
    train.validate_config(config, num_devices=8, mode="train")
    kwargs = config_lib.model_kwargs(config)
    assert kwargs == {**plain, "null_class_embedding": True}
    module = config_lib.build_model(config)
    params = models.abstract_params(module)
    assert params["label_emb"]["embedding"].shape == (1001, 128)
    params = jax.tree.map(lambda a: jax.numpy.zeros(a.shape, a.dtype), params)
    path = checkpoints.save_inference_checkpoint(
        tmp_path / "ckpt", params, kind="unet", model_kwargs=kwargs, diffusion_kwargs=None
    )
    rebuilt = checkpoints.load_inference_checkpoint(path).module()
    assert rebuilt.null_label == 1000 and rebuilt == module.clone(dtype=rebuilt.dtype)


def test_base_config_is_the_reference_defaults_but_learn_sigma():
    """configs/default.py re-exports the package's base config, whose model flags and diffusion
    section are script_util's defaults (adm_jax.reference_defaults) except learn_sigma=True."""
    from adm_jax import reference_defaults as ref
    from adm_jax.diffusion import diffusion_kwargs_from_flags
    from adm_jax.recipe import default_config
    from configs import default

    assert default.get_config is default_config.get_config
    assert config_lib._default_module() is default_config
    config = default.get_config()
    assert dict(config.diffusion) == diffusion_kwargs_from_flags({"learn_sigma": True})
    reference = {**ref.MODEL_DEFAULTS, **ref.DIFFUSION_DEFAULTS, "learn_sigma": True}
    assert {k: reference[k] for k in default.UNET_FLAGS} == default.UNET_FLAGS
    classifier = {k: v for k, v in default.CLASSIFIER_FLAGS.items() if k != "channel_mult"}
    assert classifier == {k: ref.CLASSIFIER_DEFAULTS[k] for k in classifier}
    assert set(classifier) == set(ref.CLASSIFIER_DEFAULTS)


def test_read_train_has_every_field_parsed_once():
    """TrainSettings holds every field of the base config's train section under its config
    name, the lists parsed; read_train checks what validate_config checks."""
    import dataclasses

    from adm_jax.recipe import TrainSettings, read_train
    from configs import default, tiny

    base = default.get_config()
    names = {f.name for f in dataclasses.fields(TrainSettings)}
    assert names == set(base.train)
    assert read_train(base) == TrainSettings()  # the dataclass defaults are the base config's
    config = tiny.get_config()
    config.train.ema_rate = "0.9999, 0.99"
    config.train.posthoc_ema_stds = "0.05,0.1"
    config.train.posthoc_ema_every = 10
    config.train.remat = "dots_saveable"  # underscores read as hyphens
    settings = read_train(config)
    assert settings.ema_rate == (0.9999, 0.99) and settings.posthoc_ema_stds == (0.05, 0.1)
    assert settings.num_emas == 4 and settings.remat == "dots-saveable"
    assert settings.microbatch == config.train.batch_size // config.train.grad_accum_steps
    config.train.grad_accum_steps = 3
    config.train.batch_size = 4
    with pytest.raises(train.ConfigError, match="^train.batch_size: 4 not divisible by grad"):
        read_train(config)
    config.train.batch_size = 6
    with pytest.raises(train.ConfigError, match="not divisible by the 4 devices"):
        read_train(config, num_devices=4)


def test_read_train_of_a_stored_config_without_newer_fields():
    """A config stored next to an old checkpoint lacks newer train fields: they read as the
    base config's defaults (the values they had when the run was trained)."""
    from adm_jax.recipe import read_train
    from configs import tiny

    stored = tiny.get_config().to_dict()
    for name in ("posthoc_ema_stds", "posthoc_ema_every", "export_ema_std", "remat",
                 "attention_impl", "tensorboard", "init_from"):  # fmt: skip
        del stored["train"][name]
    assert read_train({**stored, "train": {**stored["train"], "remat": True}}).remat == "full"
    settings = read_train(stored)
    assert settings.posthoc_ema_stds == () and settings.posthoc_ema_every == 0
    assert settings.export_ema_std is None and settings.remat == "none"
    assert settings.attention_impl == "auto" and settings.tensorboard and not settings.init_from
    assert config_lib.ema_rates(stored) == settings.ema_rate
