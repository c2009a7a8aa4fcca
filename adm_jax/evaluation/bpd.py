"""Bits/dim of a diffusion model on a dataset split: ``python -m adm_jax.main --mode=nll``.

The reference's ``scripts/image_nll.py``: for every image, the full variational bound
``calc_bpd_loop`` (T model evaluations: the vb term of each step, the prior term, and the
eps / x_0 errors), then means over the images. ``nll(config, workdir)`` is the mode; a
notebook calls it too. The model comes from ``config.nll.checkpoint`` (else
``config.sample.checkpoint``, else ``workdir``: an exported or converted checkpoint, or a
training workdir), the images from ``config.data`` (split ``config.nll.split``) through the
evaluation pipeline (center crop, no flip; each process reads its shard).

One ``jax.jit`` program (the whole ``lax.scan`` over the T steps) serves every batch: the
global batch is sharded over all devices of all processes, parameters are replicated, and it
returns masked sums (padding and undecodable records count for nothing), replicated, so every
process accumulates the same float64 totals. Batch ``b`` draws its noise from
``fold_in(PRNGKey(seed), b)``. Process 0 shows progress and writes ``<workdir>/nll.json``.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adm_jax import data as data_lib
from adm_jax import diffusion as dm
from adm_jax import mesh as mesh_lib
from adm_jax import paths
from adm_jax.checkpoints import check_matches_config, load_checkpoint
from adm_jax.recipe.evaluate import NllSettings, read_nll

OUTPUT_FILE = "nll.json"
TERMS = ("vb", "mse", "xstart_mse")  # per-timestep terms, as the reference's *_terms.npz


class BpdProgram:
    """``calc_bpd_loop`` over one global batch, compiled once for a run.

    ``__call__(params, images, labels, mask, batch_index)`` returns replicated masked sums over
    the batch: ``num_images``, ``total_bpd``, ``prior_bpd`` (scalars) and the (T,) columns of
    ``vb``, ``mse``, ``xstart_mse`` (column j is step T - 1 - j). ``trace_count`` above one
    means a batch recompiled.
    """

    def __init__(
        self,
        diffusion: Any,
        model_apply: Any,
        *,
        mesh: jax.sharding.Mesh,
        clip_denoised: bool = True,
        class_cond: bool = False,
        seed: int = 0,
    ):
        self.batch_sharding = NamedSharding(mesh, P(mesh_lib.batch_axes(mesh)))
        self.replicated = NamedSharding(mesh, P())
        self.trace_count = 0
        constrain = lambda a: jax.lax.with_sharding_constraint(a, self.batch_sharding)

        def run(params, images, labels, mask, batch_index):
            self.trace_count += 1
            key = jax.random.fold_in(jax.random.PRNGKey(seed % 2**32), batch_index)
            y = labels if class_cond else None
            # The constraints keep XLA from replicating the batch (an unconditional model
            # has no other sharded input).
            model_fn = lambda x, t: constrain(model_apply(params, constrain(x), t, y))
            out = dm.calc_bpd_loop(diffusion, model_fn, images, key, clip_denoised=clip_denoised)
            w = mask.astype(jnp.float32)
            sums = {name: jnp.dot(w, out[name]) for name in ("total_bpd", "prior_bpd", *TERMS)}
            return {"num_images": jnp.sum(w), **sums}

        b, r = self.batch_sharding, self.replicated
        self._jitted = jax.jit(run, in_shardings=(r, b, b, b, r), out_shardings=r)
        self._compiled = None

    def __call__(self, params, images, labels, mask, batch_index: int) -> dict[str, jax.Array]:
        args = (params, images, labels, mask, np.int32(batch_index))
        if self._compiled is None:
            self._compiled = self._jitted.lower(*args).compile()
            _sync("adm_jax.nll.compiled")  # no process enters the collectives while one compiles
        return self._compiled(*args)


_barriers = itertools.count()


def _sync(name: str) -> None:
    """Coordination-service barrier (no device collective: gloo gives up on a peer that is
    still compiling after 30 s); names are made unique per call, as Orbax requires."""
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost

        multihost.sync_global_processes(f"{name}.{next(_barriers)}")


class _Totals:
    """float64 sums of the program's outputs, and the means they give."""

    def __init__(self):
        self.sums: dict[str, np.ndarray] = {}

    def add(self, batch: dict[str, jax.Array]) -> None:
        for name, value in batch.items():
            value = np.asarray(value, np.float64)
            self.sums[name] = self.sums.get(name, 0.0) + value

    @property
    def count(self) -> int:
        return int(round(float(self.sums.get("num_images", 0.0))))

    def mean(self, name: str) -> np.ndarray:
        return self.sums[name] / max(self.sums["num_images"], 1.0)


def _model(config: Any, workdir: str, settings: NllSettings, mesh):
    """(checkpoint, path, module, diffusion) of the run, checked against config.data."""
    sample = config.get("sample") or {}
    path = settings.checkpoint or sample.get("checkpoint", "") or workdir
    field = "nll.checkpoint"
    try:
        ckpt = load_checkpoint(path, NamedSharding(mesh, P()))
    except FileNotFoundError as err:
        raise ValueError(f"{field}: {err}") from None
    if ckpt.kind != "unet":
        raise ValueError(
            f"{field}: {path} holds a {ckpt.kind!r} model; --mode=nll evaluates a diffusion "
            "model of kind 'unet'"
        )
    check_matches_config(ckpt, config, path)
    mk = ckpt.model_kwargs
    size, channels = int(mk["image_size"]), int(mk.get("in_channels", 3))
    if (config.data.image_size, config.data.channels) != (size, channels):
        raise ValueError(
            f"data.image_size/channels: {config.data.image_size}/{config.data.channels} but the "
            f"model in {path} takes {size}x{size}x{channels} images"
        )
    kwargs = dict(ckpt.diffusion_kwargs or config.diffusion)
    kwargs["timestep_respacing"] = settings.timestep_respacing
    try:
        diffusion = dm.create_diffusion(**kwargs)
    except (ValueError, AssertionError) as err:
        raise ValueError(f"nll.timestep_respacing: {err}") from None
    return ckpt, path, ckpt.module(), diffusion, kwargs


def _images(config: Any, settings: NllSettings, ckpt, path: str) -> tuple[str, bool, int]:
    """(split, class_cond, number of images): the data section and split, checked against
    the model and ``nll.num_samples`` (one-line ValueErrors naming the field)."""
    split = settings.split or config.data.get("eval_split") or config.data.split
    try:
        data_lib.validate_data_config(config.data)
    except ValueError as err:
        raise ValueError(f"data: {err}") from None
    try:
        info = data_lib.dataset_info(config.data, split)
    except data_lib.DatasetNotPreparedError as err:  # names data_dir and how to build it
        raise ValueError(str(err)) from None
    except ValueError as err:  # e.g. no such split
        field = "nll.split" if settings.split else "data.eval_split"
        raise ValueError(f"{field}: {err}") from None
    class_cond = ckpt.model_kwargs.get("num_classes") is not None
    if class_cond and info["num_classes"] is None:
        raise ValueError(
            f"data.name: split {split!r} of {config.data.name!r} has no labels, but the model in "
            f"{path} is class-conditional"
        )
    available = info["num_examples"]
    if settings.num_samples > available:
        raise ValueError(
            f"nll.num_samples: {settings.num_samples} exceeds the {available} images of split "
            f"{split!r} (0 = all of them)"
        )
    return split, class_cond, settings.num_samples or available


def _accumulate(program, params, batches, num_batches: int, *, bar, is_main: bool) -> _Totals:
    """Runs ``program`` on every batch and sums its terms: batch b runs on the device while
    the host reads batch b - 1's sums; progress on ``bar`` and in the log (process 0)."""
    totals, log_every = _Totals(), max(1, num_batches // 10)
    done = 0

    def collect(pending):
        nonlocal done
        totals.add(pending)  # waits for the device
        done += 1
        bpd = float(totals.mean("total_bpd")) if totals.count else float("nan")
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{bpd:.4f} bits/dim")
        if is_main and (done % log_every == 0 or done == num_batches):
            logging.info(
                "nll: %d/%d batches, %d images: %.4f bits/dim", done, num_batches,
                totals.count, bpd,
            )  # fmt: skip

    pending = None
    for b, batch in enumerate(batches):  # batch b runs while the host reads batch b - 1's sums
        out = program(params, batch["image"], batch["label"], batch["mask"], b)
        if pending is not None:
            collect(pending)
        pending = out
    if pending is not None:
        collect(pending)
    if bar is not None:
        bar.close()
    return totals


def nll(config: Any, workdir: str, *, progress: bool = True) -> dict[str, Any]:
    """``--mode=nll``: bits/dim of the model over ``config.nll.num_samples`` images of a split.

    Returns (and process 0 writes to ``<workdir>/nll.json``) the means over the images of
    ``total_bpd`` (= ``prior_bpd`` + ``vb_bpd``), ``prior_bpd`` and ``vb_bpd`` (the summed vb
    terms), the per-timestep means ``vb``, ``mse``, ``xstart_mse`` (index j is step T - 1 - j,
    whose network timestep is ``timesteps[j]``), ``num_images`` and the run's settings.
    Errors in the config are one-line ``ValueError``s naming the field.
    """
    settings = read_nll(config)
    mesh = mesh_lib.batch_mesh(settings.batch_size, field="nll.batch_size")
    ckpt, path, module, diffusion, diffusion_kwargs = _model(config, workdir, settings, mesh)
    split, class_cond, requested = _images(config, settings, ckpt, path)
    pc = jax.process_count()
    local_batch = settings.batch_size // pc
    num_batches = math.ceil((requested // pc) / local_batch)

    program = BpdProgram(
        diffusion,
        lambda p, x, t, y: module.apply({"params": p}, x, t, y=y),
        mesh=mesh,
        clip_denoised=settings.clip_denoised,
        class_cond=class_cond,
        seed=settings.seed,
    )
    batches = data_lib.create_eval_iterator(
        config.data,
        global_batch_size=settings.batch_size,
        sharding=program.batch_sharding,
        split=split,
        num_examples=requested,
    )
    is_main = jax.process_index() == 0
    bar = None
    if progress and is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_batches, unit="batch", desc=f"nll {config.data.name}:{split}")
    logging.info(
        "nll: %d images of %s:%s in %d batches of %d, T=%d (%s), clip_denoised=%s",
        requested, config.data.name, split, num_batches, settings.batch_size,
        diffusion.num_timesteps, settings.timestep_respacing or "all steps",
        settings.clip_denoised,
    )  # fmt: skip
    start = time.time()
    totals = _accumulate(program, ckpt.params, batches, num_batches, bar=bar, is_main=is_main)
    if not totals.count:
        raise ValueError(f"nll.split: no decodable images in split {split!r}")

    timesteps = np.asarray(diffusion.timestep_map)[::-1]
    result = {
        "total_bpd": float(totals.mean("total_bpd")),
        "prior_bpd": float(totals.mean("prior_bpd")),
        "vb_bpd": float(np.sum(totals.mean("vb"))),
        "num_images": totals.count,
        **{name: totals.mean(name).tolist() for name in TERMS},
        "timesteps": timesteps.tolist(),
        "num_timesteps": int(diffusion.num_timesteps),
        "checkpoint": paths.absolute(path),
        "checkpoint_step": ckpt.extra.get("step"),
        "dataset": config.data.name,
        "split": split,
        "clip_denoised": settings.clip_denoised,
        "diffusion": dict(diffusion_kwargs),
        "batch_size": settings.batch_size,
        "seed": settings.seed,
        "seconds": round(time.time() - start, 3),
    }
    logging.info(
        "nll: %.4f bits/dim (prior %.3g, vb %.4f) over %d images in %.1fs",
        result["total_bpd"], result["prior_bpd"], result["vb_bpd"], result["num_images"],
        result["seconds"],
    )  # fmt: skip
    if is_main:
        out_dir = paths.path(workdir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths.write_text_atomic(out_dir / OUTPUT_FILE, json.dumps(result, indent=2) + "\n")
        logging.info("nll: wrote %s", out_dir / OUTPUT_FILE)
    _sync("adm_jax.nll.done")
    return result
