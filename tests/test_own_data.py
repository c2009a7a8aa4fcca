"""docs/own_data.md as a user runs it: the walk from a folder of images to a trained model,
samples, a reference batch, FID and the sample grid, through the real entry points.

The commands are not copied here: they are read from the page's fenced blocks (settings,
walk, CPU settings; marked ``<!-- own_data:NAME -->``) and run by a small interpreter of the
shell they are written in (``NAME=value`` lines and ``python -m adm_jax...`` commands, ``$X``
and ``${X}`` expanded), so the page and the test cannot drift. The test replaces only the
paths, the label/colour variant and the Inception weights (the golden seeded random ones).
"""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
DOC = REPO / "docs" / "own_data.md"
GOLDEN_INCEPTION = REPO / "tests" / "golden" / "fid_inception_299.npz"
STEP_TIMEOUT_S = 600  # per command; the loaded 2-core CI machine needs minutes for a compile

ASSIGNMENT = re.compile(r"([A-Za-z_]\w*)=(.*)", re.S)
VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


# --------------------------------------------------------------------------- the page


def fenced_block(name: str) -> str:
    """The ```bash block after ``<!-- own_data:NAME -->`` in docs/own_data.md."""
    text = DOC.read_text()
    match = re.search(rf"<!-- own_data:{name} -->\s*```bash\n(.*?)```", text, re.S)
    assert match, f"{DOC}: no ```bash block after <!-- own_data:{name} -->"
    return match.group(1)


def logical_lines(block: str) -> list[str]:
    """Lines with backslash continuations joined (inside quotes too, as bash does)."""
    joined = re.sub(r"\\\n", " ", block)
    return [line for line in joined.splitlines() if line.strip()]


def expand(text: str, env: dict[str, str]) -> str:
    def value(match):
        name = match.group(1) or match.group(2)
        assert name in env, f"{DOC}: ${name} is used before it is set"
        return env[name]

    return VARIABLE.sub(value, text)


def interpret(block: str, env: dict[str, str]) -> list[list[str]]:
    """Runs the block's assignments into ``env``; returns its commands (argv lists, with
    ``python`` replaced by this interpreter), expanded with the variables set before them."""
    commands = []
    for line in logical_lines(block):
        words = shlex.split(line, comments=True)
        if not words:
            continue  # a comment line
        assignment = ASSIGNMENT.fullmatch(words[0])
        if assignment and len(words) == 1:
            # shlex already removed the quotes; expand what they held (a word, or "" = empty).
            env[assignment.group(1)] = expand(assignment.group(2), env)
            continue
        argv = shlex.split(expand(line, env), comments=True)
        assert argv[:3] == ["python", "-m", argv[2]] and argv[2].startswith("adm_jax."), (
            f"{DOC}: the walk runs only `python -m adm_jax...` commands, got: {line}"
        )
        commands.append([sys.executable, *argv[1:]])
    return commands


def settings(block: str) -> dict[str, str]:
    env = {"HOME": "/home/user"}
    assert interpret(block, env) == [], "a settings block only sets variables"
    del env["HOME"]
    return env


# --------------------------------------------------------------------------- fast checks


def test_settings_blocks_agree_and_the_walk_reads_only_them():
    user, smoke = settings(fenced_block("settings")), settings(fenced_block("smoke"))
    assert list(user) == list(smoke), "section 1 and section 3 must set the same variables"
    commands = interpret(fenced_block("walk"), {**user})
    modules = [argv[2] for argv in commands]
    assert modules == [
        "adm_jax.data.prepare",
        "adm_jax.main",
        "adm_jax.main",
        "adm_jax.sampling.io",
        "adm_jax.main",
    ]
    modes = [next((a for a in argv if a.startswith("--mode=")), "") for argv in commands]
    assert modes == ["", "", "--mode=sample", "", "--mode=evaluate"]
    # The user's settings give the page's 64x64 model: the config the table describes.
    assert "--config=configs/image_folder.py:64" in commands[1]


def test_config_sizes_twins_and_device_counts():
    from adm_jax import train
    from configs import image_folder

    for size in image_folder.ARCHITECTURE_BY_SIZE:
        config = image_folder.get_config(str(size))
        assert config.data.image_size == config.model.image_size == size
        for devices in (1, 2, 8):  # one GPU, two, a host of eight: the mesh fits each
            train.validate_config(config, num_devices=devices, mode="train")
    config = image_folder.get_config()
    assert config.model.image_size == image_folder.DEFAULT_SIZE
    # One setting each: either twin sets both (what --config.X overrides do).
    config.model.in_channels = 1
    config.data.class_cond = True
    assert config.data.channels == 1 and config.model.class_cond is True
    with pytest.raises(train.ConfigError, match="train.batch_size: 64 .* the 3 devices"):
        train.validate_config(config, num_devices=3, mode="train")
    with pytest.raises(ValueError, match=r"image_folder.py:48: expected an image side among"):
        image_folder.get_config("48")


def test_builder_cli_reports_splits_classes_and_overrides(tmp_path, capsys):
    from adm_jax.data import prepare

    write_images(tmp_path / "train", grey=False, classes=("cat", "dog"), per_class=2)
    write_images(tmp_path / "val", grey=False, classes=("cat", "dog"), per_class=1)
    argv = [str(tmp_path / "train"), f"--data_dir={tmp_path / 'tfds'}", "--name=pets"]
    argv.append(f"--validation_dir={tmp_path / 'val'}")
    assert prepare.main(argv) == "pets"
    out = capsys.readouterr().out
    assert "built: train 4 images, validation 2 images" in out
    assert "2 classes: 0=cat, 1=dog" in out
    overrides = f"--config.data.name=pets --config.data.data_dir={tmp_path / 'tfds'} "
    assert overrides + "--config.model.class_cond=True --config.model.num_classes=2" in out
    prepare.main(argv)  # the same version again: reused, and says how to rebuild
    assert "exists already (reused; pass a new --version to rebuild)" in capsys.readouterr().out
    prepare.main([*argv[:3], "--labels=none", "--version=1.0.1"])
    out = capsys.readouterr().out
    assert "1.0.1 built: train 4 images" in out and "unlabeled" in out
    assert "--config.model.class_cond" not in out


def test_builder_cli_one_line_errors(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "adm_jax.data.prepare", str(tmp_path / "missing")]
    proc = subprocess.run(
        [*cmd, f"--data_dir={tmp_path}", "--name=my_images"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "no jpg/jpeg/png/gif images found under" in proc.stderr


# --------------------------------------------------------------------------- the walk


def write_images(folder: pathlib.Path, *, grey: bool, classes: tuple[str, ...], per_class: int):
    """Random 12x12 PNGs (centre-cropped to the smoke run's 8x8 by the pipeline); one
    subfolder per class, or a flat folder when ``classes`` is empty."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes or ("",)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (12, 12) if grey else (12, 12, 3)
            pixels = rng.integers(0, 128, shape) + 100 * c  # the classes differ in brightness
            image = Image.fromarray(pixels.astype(np.uint8), "L" if grey else "RGB")
            image.save(folder / name / f"{i:03d}.png")


def device_env(num_devices: int) -> dict[str, str]:
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
    )
    flags = f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, PYTHONPATH=str(REPO))


def run_walk(tmp_path, variant: dict[str, str], *, num_devices: int, num_commands: int):
    """Section 3's settings with ``variant`` and the test's paths, then the walk's first
    ``num_commands`` commands; returns (env, seconds per command)."""
    env = settings(fenced_block("smoke"))
    env.update(
        IMAGES=str(tmp_path / "images"),
        DATA=str(tmp_path / "tfds"),
        RUN=str(tmp_path / "run"),
        INCEPTION=f"--config.evaluate.inception_weights={GOLDEN_INCEPTION} "
        "--config.evaluate.inception_sha256=none",
        **variant,
    )
    commands = interpret(fenced_block("walk"), env)
    seconds = []
    for argv in commands[:num_commands]:
        start = time.monotonic()
        proc = subprocess.run(
            argv, cwd=REPO, env=device_env(num_devices), capture_output=True, text=True,
            timeout=STEP_TIMEOUT_S,
        )  # fmt: skip
        seconds.append(round(time.monotonic() - start, 1))
        assert proc.returncode == 0, f"{shlex.join(argv[1:])}\n{proc.stderr[-4000:]}"
        if argv[2] == "adm_jax.data.prepare":
            env["_build_stdout"] = proc.stdout
    print(f"own_data walk ({num_devices} devices, {variant}): seconds per command {seconds}")
    return env, seconds


def check_training(env):
    from adm_jax.train.metrics import read_metrics

    run = pathlib.Path(env["RUN"])
    metrics = read_metrics(str(run))
    last = max(metrics)
    assert last == 20 and np.isfinite(metrics[last]["train/loss"])
    assert (run / "checkpoints" / "20").is_dir()


def check_samples(env, *, channels: int, num_classes: int | None) -> pathlib.Path:
    n, size = int(env["SAMPLES"]), int(env["SIZE"])
    npz = pathlib.Path(env["RUN"]) / "samples" / f"samples_{n}x{size}x{size}x{channels}.npz"
    with np.load(npz) as f:
        assert f["arr_0"].shape == (n, size, size, channels) and f["arr_0"].dtype == np.uint8
        if num_classes is None:
            assert "arr_1" not in f.files
        else:
            labels = f["arr_1"]
            assert labels.shape == (n,) and 0 <= labels.min() <= labels.max() < num_classes
    with Image.open(npz.with_suffix(".png")) as grid:  # the grid the page tells users to open
        grid.load()
        assert min(grid.size) > size
    return npz


@pytest.mark.slow
def test_walk_grey_labelled_on_one_device(tmp_path):
    """Grey images in two class folders, one device (the one-GPU case): every step."""
    write_images(tmp_path / "images", grey=True, classes=("dark", "light"), per_class=8)
    variant = dict(
        LABELS="subdir",
        CHANNELS="1",
        CLASSES="--config.model.class_cond=True --config.model.num_classes=2",
    )
    env, _ = run_walk(tmp_path, variant, num_devices=1, num_commands=5)

    # 1. The builder names the classes and the overrides that match them.
    assert "train 16 images" in env["_build_stdout"]
    assert "2 classes: 0=dark, 1=light" in env["_build_stdout"]
    assert "--config.model.num_classes=2" in env["_build_stdout"]
    check_training(env)
    samples = check_samples(env, channels=1, num_classes=2)
    # 4. The reference batch: every image, centre-cropped to 8x8, grey.
    reference = pathlib.Path(env["RUN"]) / f"reference_{env['SIZE']}.npz"
    with np.load(reference) as f:
        assert f["arr_0"].shape == (16, 8, 8, 1) and f["arr_0"].dtype == np.uint8
    # 5. FID & co. of the samples against it (random Inception weights: only finiteness and
    # the counts mean something here).
    record = json.loads(
        (pathlib.Path(env["RUN"]) / "evaluation" / f"{samples.stem}.json").read_text()
    )
    assert record["num_samples"] == int(env["SAMPLES"]) and record["num_reference"] == 16
    assert np.isfinite(record["fid"]) and record["fid"] >= 0
    assert 0 <= record["precision"] <= 1 and 0 <= record["recall"] <= 1


@pytest.mark.slow
def test_walk_colour_unlabelled_on_two_devices(tmp_path):
    """Colour images in one flat folder, no labels, 2 devices (a host of several GPUs; 2
    rather than 8 because XLA:CPU compiles an 8-way program about twice as long): build,
    train and sample."""
    write_images(tmp_path / "images", grey=False, classes=(), per_class=16)
    variant = dict(LABELS="none", CHANNELS="3", CLASSES="")
    env, _ = run_walk(tmp_path, variant, num_devices=2, num_commands=3)
    assert "unlabeled" in env["_build_stdout"]
    check_training(env)
    check_samples(env, channels=3, num_classes=None)
