"""The project's train step as the train loop jits it, built from a config on abstract inputs:
lowering and compiling it, a fake batch, an initial state, and its FLOPs per image
(``flops_report`` compiles without running anything)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp

from adm_jax.benchmark.config_files import fit_fsdp, with_batch
from adm_jax.benchmark.devices import memory_analysis
from adm_jax.benchmark.flops import forward_flops_per_image, published_entry, xla_flops
from adm_jax.recipe import config as config_lib
from adm_jax.recipe.train import TrainSettings, read_train
from adm_jax.train import sharding, steps
from adm_jax.train import state as state_lib


@dataclasses.dataclass
class TrainSetup:
    """Everything a compiled train step needs, built from a config (nothing allocated)."""

    config: Any  # the config at the benchmark's batch and mesh
    train: TrainSettings  # its train section
    mesh: Any
    module: Any
    diffusion: Any
    tx: Any
    abstract_state: Any
    state_shardings: Any
    batch_sharding: Any
    jitted: Any
    classifier: bool

    @property
    def global_batch(self) -> int:
        """The global batch of one microbatch."""
        return self.train.microbatch


def train_setup(config, mesh, batch_per_device: int) -> TrainSetup:
    """The project's train state and step for a per-device batch, jitted as the train loop
    jits it (state and batch shardings, donated state, replicated metrics)."""
    classifier = config.model.kind == "classifier"
    config = with_batch(fit_fsdp(config, mesh), batch_per_device * mesh.size)
    mode = "train_classifier" if classifier else "train"
    config_lib.validate_config(config, num_devices=mesh.size, mode=mode)
    settings = read_train(config, num_devices=mesh.size)
    module = config_lib.build_model(config)
    diffusion = config_lib.build_diffusion(config)
    tx = state_lib.make_optimizer(settings)
    abstract, shardings = state_lib.abstract_train_state(module, config, tx, mesh, settings)
    batch_sh = sharding.batch_sharding(mesh)
    jitted = steps.jit_train_step(
        module, diffusion, tx, config, shardings, mesh, classifier=classifier, settings=settings
    )
    return TrainSetup(
        config, settings, mesh, module, diffusion, tx, abstract, shardings, batch_sh, jitted,
        classifier,
    )  # fmt: skip


def abstract_batch(setup: TrainSetup) -> dict:
    size = config_lib.model_image_size(setup.config)
    n, c = setup.train.batch_size, int(setup.config.data.channels)
    sh = setup.batch_sharding
    return {
        "image": jax.ShapeDtypeStruct((n, size, size, c), jnp.float32, sharding=sh),
        "label": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sh),
    }


def fake_batch(setup: TrainSetup, seed: int = 0) -> dict:
    """A fixed random batch in [-1, 1] with random labels, generated in its shards."""
    spec = abstract_batch(setup)
    num_classes = getattr(setup.module, "num_classes", None) or 1000

    def make(key):
        k1, k2 = jax.random.split(key)
        image = jax.random.uniform(k1, spec["image"].shape, jnp.float32, -1.0, 1.0)
        label = jax.random.randint(k2, spec["label"].shape, 0, num_classes, jnp.int32)
        return {"image": image, "label": label}

    out_sh = {"image": setup.batch_sharding, "label": setup.batch_sharding}
    return jax.jit(make, out_shardings=out_sh)(jax.random.PRNGKey(seed))


def zeros_like_tree(abstract, shardings):
    return jax.jit(
        lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract),
        out_shardings=shardings,
    )()


def initial_state(setup: TrainSetup, init: str = "real"):
    """``real``: the project's ``create_train_state`` (jitted init in its shards); ``zeros``:
    the same pytree filled with zeros (timing does not depend on values; skips compiling
    ``module.init``, which dominates small CPU runs)."""
    if init == "zeros":
        return zeros_like_tree(setup.abstract_state, setup.state_shardings)
    state, _ = state_lib.create_train_state(
        setup.module, setup.config, setup.tx, setup.mesh, setup.train
    )
    return state


def lower_train_step(setup: TrainSetup):
    """(lowered, lower_s) from abstract inputs only."""
    with jax.set_mesh(setup.mesh):
        t0 = time.perf_counter()
        lowered = setup.jitted.lower(setup.abstract_state, abstract_batch(setup))
    return lowered, time.perf_counter() - t0


def compile_train_step(setup: TrainSetup):
    """(lowered, compiled, lower_s, compile_s) from abstract inputs only."""
    lowered, lower_s = lower_train_step(setup)
    with jax.set_mesh(setup.mesh):
        t0 = time.perf_counter()
        compiled = lowered.compile()
    return lowered, compiled, lower_s, time.perf_counter() - t0


def flops_fields(setup: TrainSetup, compiled, lowered=None) -> dict:
    per_device_batch = setup.global_batch // setup.mesh.size
    flops_dev = xla_flops(compiled)
    fwd = forward_flops_per_image(setup.module)
    entry = published_entry(setup.config)
    out = {
        "flops_per_device_step_xla": flops_dev,
        "flops_per_image_xla": flops_dev / per_device_batch if flops_dev else None,
        "forward_flops_per_image_analytic": fwd,
        "model_flops_per_image": 3.0 * fwd,
        "reference_model": entry["name"] if entry else None,
        "reference_forward_flops_per_image": entry["flops_forward_batch1"] if entry else None,
    }
    if lowered is not None:
        lowered_flops = xla_flops(lowered)
        out["flops_per_image_xla_lowered"] = (
            lowered_flops / per_device_batch if lowered_flops else None
        )
    if entry:
        out["analytic_vs_reference_forward"] = fwd / entry["flops_forward_batch1"]
        if out["flops_per_image_xla"]:
            out["xla_step_vs_3x_reference_forward"] = out["flops_per_image_xla"] / (
                3.0 * entry["flops_forward_batch1"]
            )
    return out


def flops_report(config, mesh, *, batch_per_device: int = 1, compile: bool = True) -> dict:
    """Compile-only (nothing allocated or run) FLOPs per image of the train step."""
    setup = train_setup(config, mesh, batch_per_device)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        lowered = setup.jitted.lower(setup.abstract_state, abstract_batch(setup))
        lower_s = time.perf_counter() - t0
        compiled, compile_s = None, None
        if compile:
            t0 = time.perf_counter()
            compiled = lowered.compile()
            compile_s = time.perf_counter() - t0
    per_device_batch = setup.global_batch // mesh.size
    out = {
        "batch_per_device": per_device_batch,
        "dtype": setup.train.dtype,
        "mesh": dict(mesh.shape),
        "lower_s": lower_s,
        "compile_s": compile_s,
    }
    if compiled is not None:
        out.update(flops_fields(setup, compiled, lowered))
        out["memory"] = memory_analysis(compiled)
    else:
        lowered_flops = xla_flops(lowered)
        fwd = forward_flops_per_image(setup.module)
        entry = published_entry(setup.config)
        out.update(
            flops_per_image_xla_lowered=lowered_flops / per_device_batch if lowered_flops else None,
            forward_flops_per_image_analytic=fwd,
            model_flops_per_image=3.0 * fwd,
            reference_model=entry["name"] if entry else None,
            reference_forward_flops_per_image=entry["flops_forward_batch1"] if entry else None,
        )
    return out
