"""Config files for the benchmark: loading ``path.py[:arg]`` specs, the classifier paired with a
diffusion config, and the mesh and batch a benchmark run compiles for."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import pathlib
import sys

import jax

from adm_jax import mesh as mesh_lib
from adm_jax.demo import DEMO_SECTIONS


def load_config(spec: str):
    """``path/to/config.py[:arg]`` -> ``get_config(arg)`` (ml_collections config_file style)."""
    path, _, arg = spec.partition(":")
    root = str(pathlib.Path(path).resolve().parents[1])
    if pathlib.Path(path).resolve().parent.name == "configs" and root not in sys.path:
        sys.path.insert(0, root)  # config files import their siblings as `configs.default`
    module_spec = importlib.util.spec_from_file_location(f"bench_cfg_{abs(hash(spec))}", path)
    if module_spec is None:
        raise FileNotFoundError(f"config file not found: {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def default_classifier_spec(config_spec: str) -> str | None:
    """The noisy classifier paired with a diffusion config: configs/imagenetN.py ->
    configs/classifierN.py, configs/tiny.py -> configs/tiny.py:classifier; None otherwise."""
    path = pathlib.Path(config_spec.partition(":")[0])
    stem = path.stem
    if stem == "tiny":
        return f"{path}:classifier"
    if stem.startswith("imagenet") and stem[len("imagenet") :].isdigit():
        candidate = path.with_name(f"classifier{stem[len('imagenet') :]}.py")
        return str(candidate) if candidate.exists() else None
    return None


def split_config(config):
    """(run config, embedded classifier config or None): configs/demo.py carries its
    classifier run as ``config.classifier`` and extra sections the train checks reject."""
    config = copy.deepcopy(config)
    classifier = None
    with config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext():
        if "classifier" in config:
            classifier = config.classifier
        for name in DEMO_SECTIONS:
            if name in config:
                del config[name]
    return config, classifier


def with_batch(config, global_batch: int):
    config = copy.deepcopy(config)
    config.train.batch_size = int(global_batch) * int(config.train.grad_accum_steps)
    return config


def fit_fsdp(config, mesh):
    """config.train.fsdp follows the mesh actually used (see ``make_mesh``)."""
    config = copy.deepcopy(config)
    config.train.fsdp = int(mesh.shape["fsdp"])
    return config


def make_mesh(config, num_devices: int | None = None):
    """The train loop's ("data", "fsdp") mesh over the first ``num_devices`` devices;
    config.train.fsdp when it divides the device count, else 1."""
    devices = jax.devices()[: num_devices or len(jax.devices())]
    fsdp = int(config.train.fsdp) if len(devices) % int(config.train.fsdp) == 0 else 1
    return mesh_lib.create_mesh(fsdp=fsdp, devices=devices)
