"""Shared test setup: 8 simulated CPU devices and the golden-vector loader.

XLA_FLAGS must be set before JAX initialises its backends, which is why this runs at import.
"""

import json
import os
import pathlib
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test session, shared with the subprocesses the tests
# start (the entry-point tests compile the same train step in several processes).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="adm_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN_DIR = pathlib.Path(
    os.environ.get("ADM_JAX_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden")
)


def load_golden(name: str):
    """Returns (meta, arrays) for golden case ``name`` (``NAME.json`` + ``NAME.npz``)."""
    json_path = GOLDEN_DIR / f"{name}.json"
    if not json_path.exists():
        raise FileNotFoundError(
            f"golden case {name!r} not found at {json_path}; set ADM_JAX_GOLDEN_DIR to the "
            "folder holding the reference test vectors"
        )
    with open(json_path) as f:
        meta = json.load(f)
    npz_path = GOLDEN_DIR / f"{name}.npz"
    arrays = dict(np.load(npz_path)) if npz_path.exists() else {}
    return meta, arrays


@pytest.fixture(scope="session")
def golden():
    """``golden(name) -> (meta, arrays)``; cached for the session."""
    cache = {}

    def _load(name):
        if name not in cache:
            cache[name] = load_golden(name)
        return cache[name]

    return _load


# The demo (configs/demo.py) shrunk to seconds: 8x8 digits, the smallest networks GroupNorm(32)
# and 64-channel classifier heads allow, a few steps of everything, two guidance scales.
# Shared by the demo's smoke test and the Colab notebook test.
DEMO_SMOKE_OVERRIDES = {
    **{
        f"{prefix}{field}": value
        for prefix in ("", "classifier.")
        for field, value in {
            "data.image_size": 8,
            "train.num_steps": 3,
            "train.batch_size": 8,
            "train.warmup_steps": 0,
            "train.lr_anneal_steps": 0,
            "train.log_every": 1,
        }.items()
    },
    "model.image_size": 8,
    "model.num_channels": 32,
    "model.channel_mult": "1",
    "model.attention_resolutions": "8",
    "classifier.model.image_size": 8,
    "classifier.model.channel_mult": "1,2",
    "classifier.model.classifier_attention_resolutions": "4",
    "sample.num_samples": 16,
    "sample.batch_size": 8,
    "sample.timestep_respacing": "ddim2",
    "sample.sweep_scales": "0,10",
    "demo.judge_steps": 3,
    "demo.judge_width": 4,
    "demo.judge_features": 8,
}


def assert_close(actual, expected, *, case, quantity, rtol, atol):
    """Golden comparison whose failure names the case, the quantity and the error."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (
        f"{case}: {quantity}: shape {actual.shape} != {expected.shape}"
    )
    err = np.abs(actual - expected)
    ok = err <= atol + rtol * np.abs(expected)
    assert ok.all(), (
        f"{case}: {quantity}: max abs err {err.max():.3e}, "
        f"max rel err {np.max(err / np.maximum(np.abs(expected), 1e-30)):.3e} "
        f"(rtol={rtol}, atol={atol})"
    )
