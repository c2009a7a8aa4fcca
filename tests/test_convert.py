"""adm_jax.convert: checkpoint mismatch errors, state_dict file formats, and the CLI round trip
from a reference state_dict to an inference checkpoint that reproduces the golden output."""

import importlib.util
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import app
from conftest import REPO_ROOT
from safetensors.numpy import save, save_file

from adm_jax import checkpoints
from adm_jax.convert import (
    StateDictMismatchError,
    convert_state_dict,
    infer_kind,
    load_state_dict,
    main,
    strip_module_prefix,
)
from adm_jax.models import parse_flags, reference_kwargs_from_flags

# README-style flags that script_util turns into the golden unet_learnsigma constructor kwargs.
UNET_LEARNSIGMA_FLAGS = (
    "--image_size 32 --num_channels 32 --channel_mult 1,2,2 --num_res_blocks 1 "
    "--attention_resolutions 16,8 --learn_sigma True --num_heads 1 --num_head_channels 16 "
    "--use_scale_shift_norm True --resblock_updown True --class_cond False "
    "--diffusion_steps 1000 --noise_schedule cosine"
)


def golden_state_dict(golden, case):
    meta, arrays = golden(case)
    return meta, arrays, {k[3:]: v for k, v in arrays.items() if k.startswith("sd/")}


def test_flags_reproduce_the_golden_constructor_kwargs(golden):
    meta, _, _ = golden_state_dict(golden, "unet_learnsigma")
    kwargs = reference_kwargs_from_flags("unet", UNET_LEARNSIGMA_FLAGS)
    expected = {k: v for k, v in meta["constructor"]["kwargs"].items() if k != "dims"}
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()} == expected


def test_mismatched_checkpoint_raises_one_line_and_keeps_every_key(golden):
    meta, _, state_dict = golden_state_dict(golden, "unet_learnsigma")
    broken = dict(state_dict)
    del broken["out.2.bias"]
    del broken["input_blocks.3.1.qkv.weight"]
    broken["label_emb.weight"] = np.zeros((10, 128), np.float32)
    broken["time_embed.0.weight"] = np.zeros((128, 64), np.float32)
    with pytest.raises(StateDictMismatchError) as info:
        convert_state_dict("unet", meta["constructor"]["kwargs"], broken)
    err = info.value
    assert isinstance(err, ValueError)
    assert sorted(err.missing) == ["input_blocks.3.1.qkv.weight", "out.2.bias"]
    assert err.unexpected == ["label_emb.weight"]
    assert err.mis_shaped == {"time_embed.0.weight": ((128, 64), (128, 32))}
    message = str(err)
    assert "\n" not in message
    # The first offending key in the reference's order, then the likely flag, then counts.
    assert message.startswith(
        "state_dict does not fit the model (kind 'unet'): input_blocks.3.1.qkv.weight is "
        "missing from the file; likely cause: --class_cond (the file suggests True); "
    )
    assert message.endswith("4 keys differ (2 missing, 1 unexpected, 1 mis-shaped)")

    # A classifier checkpoint offered as a UNet: one error, not a KeyError half-way.
    _, _, classifier_sd = golden_state_dict(golden, "classifier_encoder")
    with pytest.raises(StateDictMismatchError, match="likely cause: --kind") as info:
        convert_state_dict("unet", meta["constructor"]["kwargs"], classifier_sd)
    assert "out.2.qkv_proj.weight" in info.value.unexpected


@pytest.mark.parametrize(
    "flag, value, first, hint",
    [
        (
            "num_channels",
            "64",
            "input_blocks.0.0.bias is (32,) in the file, expected (64,)",
            "--num_channels (the file suggests 32)",
        ),
        (
            "learn_sigma",
            "False",
            "out.2.bias is (6,) in the file, expected (3,)",
            "--learn_sigma (the file suggests True)",
        ),
        (
            "class_cond",
            "True",
            "label_emb.weight is missing from the file",
            "--class_cond (the file suggests False)",
        ),
        (
            "num_res_blocks",
            "2",
            "input_blocks.3.0.emb_layers.1.bias is (128,) in the file, expected (64,)",
            "--num_res_blocks (the file suggests 1)",
        ),
        (
            "attention_resolutions",
            "16",
            "input_blocks.5.1.norm.bias is in the file but not in this model",
            "--attention_resolutions (the file suggests 16,8)",
        ),
    ],
)
def test_mismatch_names_the_likely_flag(golden, flag, value, first, hint):
    """A checkpoint converted with one README flag wrong: ONE line naming the first offending
    parameter (shape in the file vs expected) and that flag, with the file's value."""
    _, _, state_dict = golden_state_dict(golden, "unet_learnsigma")
    flags = re.sub(rf"--{flag} \S+", f"--{flag} {value}", UNET_LEARNSIGMA_FLAGS)
    assert flags != UNET_LEARNSIGMA_FLAGS
    with pytest.raises(StateDictMismatchError) as info:
        convert_state_dict("unet", reference_kwargs_from_flags("unet", flags), state_dict)
    message = str(info.value)
    assert "\n" not in message and first in message and f"likely cause: {hint};" in message


def test_data_parallel_prefix_is_stripped(golden):
    meta, _, state_dict = golden_state_dict(golden, "classifier_encoder_adaptive")
    kwargs = meta["constructor"]["kwargs"]
    prefixed = {f"module.{k}": v for k, v in state_dict.items()}
    jax.tree.map(
        np.testing.assert_array_equal,
        convert_state_dict("classifier", kwargs, prefixed),
        convert_state_dict("classifier", kwargs, state_dict),
    )
    assert strip_module_prefix(prefixed) == (state_dict, True)
    # Only when EVERY key has it: a reference name is never altered.
    partly = {**state_dict, "module.extra": np.zeros(1)}
    assert strip_module_prefix(partly) == (partly, False)


def test_missing_checkpoint_is_one_line(tmp_path):
    for name in ("model.pt", "model.npz", "model.safetensors"):
        with pytest.raises(FileNotFoundError) as info:
            load_state_dict(tmp_path / name)
        assert str(info.value) == f"{tmp_path / name}: no such file"
    with pytest.raises(FileNotFoundError, match="no such file"):
        main(["--checkpoint", str(tmp_path / "x.pt"), "--out", str(tmp_path / "out")])


def test_load_state_dict_formats(golden, tmp_path):
    _, arrays, state_dict = golden_state_dict(golden, "classifier_encoder_adaptive")
    np.savez(tmp_path / "plain.npz", **state_dict)
    np.savez(tmp_path / "golden_layout.npz", **arrays)  # sd/<key> plus inputs and outputs
    save_file(state_dict, str(tmp_path / "model.safetensors"))
    for name in ("plain.npz", "golden_layout.npz", "model.safetensors"):
        loaded = load_state_dict(tmp_path / name)
        assert loaded.keys() == state_dict.keys(), name
        for key, value in state_dict.items():
            np.testing.assert_array_equal(loaded[key], value)

    (tmp_path / "model.h5").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_state_dict(tmp_path / "model.h5")
    if importlib.util.find_spec("torch") is None:
        (tmp_path / "model.pt").write_bytes(b"")
        with pytest.raises(ImportError, match="needs PyTorch"):
            load_state_dict(tmp_path / "model.pt")


def test_load_state_dict_from_gcs(golden, gcs_bucket):  # noqa: F811
    from etils import epath

    _, arrays, state_dict = golden_state_dict(golden, "classifier_encoder_adaptive")
    with epath.Path(f"{gcs_bucket}/c/golden_layout.npz").open("wb") as f:
        np.savez(f, **arrays)
    epath.Path(f"{gcs_bucket}/c/model.safetensors").write_bytes(save(state_dict))
    for name in ("golden_layout.npz", "model.safetensors"):
        loaded = load_state_dict(f"{gcs_bucket}/c/{name}")
        assert loaded.keys() == state_dict.keys(), name
        for key, value in state_dict.items():
            np.testing.assert_array_equal(loaded[key], value)


def test_kind_is_inferred_from_the_flags():
    assert infer_kind(parse_flags("--image_size 256 --class_cond True")) == "unet"
    assert infer_kind(parse_flags("--large_size 256 --small_size 64")) == "superres"
    assert infer_kind(parse_flags("--classifier_depth 4 --image_size 64")) == "classifier"
    # Sampling flags of classifier_sample.py do not make a diffusion model a classifier.
    assert infer_kind(parse_flags("--classifier_scale 1.0 --image_size 64")) == "unet"


def test_cli_round_trip_reproduces_the_golden_output(golden, tmp_path, capsys):
    meta, arrays, state_dict = golden_state_dict(golden, "unet_learnsigma")
    np.savez(tmp_path / "model.npz", **state_dict)
    # As saved from a DataParallel/DDP-wrapped model: every key prefixed "module.".
    save_file(
        {f"module.{k}": v for k, v in state_dict.items()}, str(tmp_path / "model.safetensors")
    )

    # The real entry point, as a user runs it.
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "adm_jax.convert", "--checkpoint", str(tmp_path / "model.npz")]
        + ["--flags", UNET_LEARNSIGMA_FLAGS, "--out", str(tmp_path / "from_npz")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1,422,278 parameters" in result.stdout
    main(
        ["--checkpoint", str(tmp_path / "model.safetensors"), "--flags", UNET_LEARNSIGMA_FLAGS]
        + ["--out", str(tmp_path / "from_safetensors"), "--kind", "unet"]
    )
    assert "'module.' prefix (saved from DataParallel/DDP): stripped it" in capsys.readouterr().out

    ckpt = checkpoints.load_inference_checkpoint(tmp_path / "from_npz")
    other = checkpoints.load_inference_checkpoint(tmp_path / "from_safetensors")
    assert ckpt.kind == "unet"
    expected_kwargs = {k: v for k, v in meta["constructor"]["kwargs"].items() if k != "dims"}
    assert ckpt.model_kwargs == expected_kwargs
    assert ckpt.diffusion_kwargs["noise_schedule"] == "cosine"
    assert ckpt.diffusion_kwargs["learn_sigma"] is True
    assert ckpt.diffusion_kwargs["steps"] == 1000
    jax.tree.map(np.testing.assert_array_equal, other.params, ckpt.params)

    x = np.transpose(arrays["x"], (0, 2, 3, 1))
    out = jax.jit(ckpt.module().apply)({"params": ckpt.params}, x, arrays["timesteps"])
    ref = np.transpose(arrays["out"], (0, 2, 3, 1))
    err = float(np.abs(np.asarray(out) - ref).max())
    assert err <= 1e-5 * np.abs(ref).max(), f"unet_learnsigma/out after CLI round trip: {err:.3g}"

    with pytest.raises(ValueError, match="already exists"):
        main(
            ["--checkpoint", str(tmp_path / "model.npz"), "--flags", UNET_LEARNSIGMA_FLAGS]
            + ["--out", str(tmp_path / "from_npz")]
        )


def test_cli_usage_errors_are_one_line_exit_2(tmp_path):
    """A missing or bad flag: in process a one-line error naming it; from the real entry point
    exit code 2 and that one line on stderr, before any file is read."""
    with pytest.raises(app.UsageError, match="^--checkpoint: required"):
        main(["--out", str(tmp_path / "o")])
    with pytest.raises(app.UsageError, match="unexpected arguments"):
        main(["--checkpoint", "a.pt", "--out", str(tmp_path / "o"), "stray"])
    result = subprocess.run(
        [sys.executable, "-m", "adm_jax.convert", "--checkpoint=a.pt", "--kind", "vae"]
        + ["--out", str(tmp_path / "o")],
        cwd=REPO_ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "error: flag --kind=vae: value should be one of <unet|superres|classifier>"
    ]
