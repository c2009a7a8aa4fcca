"""Shared test setup: 8 simulated CPU devices and the golden-vector loader.

XLA_FLAGS must be set before JAX initialises its backends, which is why this runs at import.
"""

import json
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
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
