"""Batch sampling at scale: ``python -m adm_jax.main --mode=sample``.

``sample.sampler`` picks DDPM, DDIM or DPM-Solver++ (``adm_jax.diffusion.methods``). One
``jax.jit``-compiled reverse-diffusion ``lax.scan`` serves every batch of a run (and every
guidance scale of a sweep): parameters, labels, the classifier and classifier-free guidance
scales and the batch index are traced arguments, so the only compilation happens on the first
batch. The global batch is
sharded over the mesh's ``("data", "fsdp")`` axes across all devices and processes; parameters
are replicated.

Determinism: batch ``b`` draws its noise from ``fold_in(PRNGKey(seed), b)`` and its random
labels from ``numpy.random.default_rng([seed, b])``. Neither depends on the device count, so a
run on one device and on a pod produce the same samples (up to float round-off, which can move
a few uint8 pixels by one).

A run writes ``output_dir/shards/batch_000012.npz`` as it goes (atomically) next to
``shards/args.json``, the arguments that determine the samples. Rerun with the same arguments
it skips the finished shards; with different ones it refuses, naming them. When every shard
exists it assembles ``output_dir/samples_{N}x{H}x{W}x{C}.npz`` in the reference layout
(``arr_0`` uint8 NHWC, ``arr_1`` labels) plus a PNG grid.

Every process of a multi-process run executes the same loop (each batch is one computation
over all devices); the finished batch is replicated to every process, and process
``b % process_count`` writes shard ``b``. After a barrier process 0 assembles, so
``output_dir`` must be visible to all processes: a bucket (``gs://...``) or a shared disk.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from adm_jax import mesh as mesh_lib
from adm_jax import paths, recipe
from adm_jax.batch_sampler import BatchSampler
from adm_jax.checkpoints import check_matches_config, load_checkpoint
from adm_jax.checkpoints.compat import normalize as _normalize
from adm_jax.diffusion import create_diffusion
from adm_jax.diffusion.editing import EditSpec
from adm_jax.recipe import config_get
from adm_jax.recipe.sample import SampleSettings, check_scale, read_sample
from adm_jax.sampling import io

ARGS_FILE = "args.json"
SHARD_PATTERN = "batch_{:06d}.npz"
_SHARD_RE = re.compile(r"batch_(\d{6})\.npz$")


# The inference mesh: all devices, or the largest subset a single-process batch divides.
make_mesh = mesh_lib.batch_mesh


# --------------------------------------------------------------------------------------------
# A sampling job: models loaded once, then run for any number of samples / guidance scales.


@dataclasses.dataclass
class SamplingJob:
    """Everything a run needs; ``sweep`` reuses one job (and its compiled program) for all
    scales, and ``with_sampler`` for other samplers of the same models."""

    sampler: BatchSampler
    settings: SampleSettings
    model_params: Any
    classifier_params: Any
    num_classes: int | None  # label range when labels are used
    base_images: np.ndarray | None = None  # two-stage: uint8 NHWC low-resolution images
    base_labels: np.ndarray | None = None
    default_num_samples: int = 0
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    rebuild: Callable[..., SamplingJob] | None = dataclasses.field(
        default=None, repr=False, compare=False
    )

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    @property
    def seed(self) -> int:
        return self.settings.seed

    @property
    def class_labels(self) -> tuple[int, ...] | None:
        """sample.class_labels; None: random labels."""
        return self.settings.class_labels

    @property
    def classifier_scale(self) -> float:
        """sample.classifier_scale: the classifier guidance scale a run uses unless told."""
        return self.settings.classifier_scale

    @property
    def cfg_scale(self) -> float | None:
        """sample.cfg_scale: None = no classifier-free guidance."""
        return self.settings.cfg_scale

    def with_sampler(self, **overrides) -> SamplingJob:
        """This job's models, labels and seed with other sample.* sampler fields
        (``sampler="dpm++", steps=10``): a new BatchSampler, so one more compilation."""
        if self.rebuild is None:
            raise ValueError("with_sampler: this job was not made by build_job")
        return self.rebuild(**overrides)

    def labels_for(self, batch_index: int) -> np.ndarray | None:
        """Labels of batch ``batch_index``; sample ``i`` of the run is row ``i - b*B``."""
        if not self.sampler.needs_labels:
            return None
        rows = batch_index * self.batch_size + np.arange(self.batch_size)
        if self.base_labels is not None:
            return self.base_labels[rows % len(self.base_labels)].astype(np.int32)
        if self.class_labels is not None:
            return np.asarray(self.class_labels, np.int32)[rows % len(self.class_labels)]
        rng = np.random.default_rng([self.seed, batch_index])
        return rng.integers(0, self.num_classes, self.batch_size).astype(np.int32)

    def low_res_for(self, batch_index: int) -> np.ndarray | None:
        """Two-stage: the base images of this batch in [-1, 1] (cycled like the reference)."""
        if self.base_images is None:
            return None
        rows = batch_index * self.batch_size + np.arange(self.batch_size)
        return self.base_images[rows % len(self.base_images)].astype(np.float32) / 127.5 - 1.0

    def sample_batch(
        self, batch_index: int, classifier_scale: float = 0.0, cfg_scale: float | None = None
    ) -> tuple[np.ndarray, Any]:
        """``(uint8 images, labels or None)`` of batch ``batch_index``; ``cfg_scale`` None
        means the job's own (``sample.cfg_scale``)."""
        images, labels = self.dispatch_batch(batch_index, classifier_scale, cfg_scale)
        return np.asarray(images), labels

    def dispatch_batch(
        self, batch_index: int, classifier_scale: float = 0.0, cfg_scale: float | None = None
    ) -> tuple[jax.Array, Any]:
        """Like ``sample_batch`` but returns before the device finishes."""
        labels = self.labels_for(batch_index)
        images = self.sampler.dispatch(
            self.model_params,
            seed=self.seed,
            batch_index=batch_index,
            labels=labels,
            classifier_params=self.classifier_params,
            classifier_scale=classifier_scale,
            cfg_scale=self.cfg_scale if cfg_scale is None else cfg_scale,
            **self.batch_inputs(batch_index),
        )
        return images, labels

    def batch_inputs(self, batch_index: int) -> dict[str, Any]:
        """Per-batch inputs of the program besides labels (an edit job adds its images)."""
        return {"low_res": self.low_res_for(batch_index)}


@dataclasses.dataclass(frozen=True)
class _Models:
    """What ``build_job`` loaded and checked: the networks, their label range, base samples."""

    ckpt: Any
    model_path: str
    module: Any
    classifier: Any  # the classifier's linen module, or None
    classifier_params: Any
    num_classes: int | None
    base_images: np.ndarray | None
    base_labels: np.ndarray | None
    base_diffusion: dict[str, Any]
    mesh: Mesh

    @property
    def image_shape(self) -> tuple[int, int, int]:
        mk = self.ckpt.model_kwargs
        return (int(mk["image_size"]), int(mk["image_size"]), int(mk.get("in_channels", 3)))


def build_job(
    config: Any,
    workdir: str,
    *,
    settings: SampleSettings | None = None,
    mesh: Mesh | None = None,
    edit: EditSpec | None = None,
) -> SamplingJob:
    """Loads the model (+ classifier, + base samples), validates everything, compiles nothing.

    ``settings``: ``config.sample`` as read by ``recipe.read_sample`` (read here when None);
    ``config`` itself is only held against the checkpoint (``check_matches_config``).
    ``edit``: the job edits given images (``adm_jax.sampling.edit``) instead of sampling.
    Errors are single-line ``ValueError``/``FileNotFoundError`` naming the config field.
    """
    settings = settings if settings is not None else read_sample(config)
    if edit is not None:
        edit.check_sampler(settings.sampler)
    mesh = mesh if mesh is not None else make_mesh(settings.batch_size)
    models = _load_models(config, workdir, settings, mesh)
    return _make_job(models, settings, edit)


def _load_models(config: Any, workdir: str, settings: SampleSettings, mesh: Mesh) -> _Models:
    replicated = NamedSharding(mesh, P())
    model_path = settings.checkpoint or workdir
    ckpt = load_checkpoint(model_path, replicated)
    if ckpt.kind not in ("unet", "superres"):
        raise ValueError(
            f"sample.checkpoint: {model_path} holds a {ckpt.kind!r} model; sampling needs a "
            "diffusion model ('unet' or 'superres')"
        )
    check_matches_config(ckpt, config, model_path)
    image_size = int(ckpt.model_kwargs["image_size"])
    classifier, classifier_params, classifier_classes = _load_classifier(
        settings, image_size, replicated
    )
    model_classes = ckpt.model_kwargs.get("num_classes")
    needs_labels = model_classes is not None or classifier is not None
    num_classes = _label_range(settings, model_classes, classifier_classes, needs_labels)
    base_images, base_labels = _load_base_samples(
        settings, ckpt, model_path, needs_labels, num_classes
    )
    module = ckpt.module(**settings.module_overrides())
    base_diffusion = ckpt.diffusion_kwargs or recipe.to_dict(config_get(config, "diffusion"))
    return _Models(
        ckpt=ckpt,
        model_path=model_path,
        module=module,
        classifier=classifier,
        classifier_params=classifier_params,
        num_classes=num_classes,
        base_images=base_images,
        base_labels=base_labels,
        base_diffusion=dict(base_diffusion),
        mesh=mesh,
    )


def _load_classifier(settings: SampleSettings, image_size: int, replicated):
    """``(module, params, number of classes)`` of ``sample.classifier_checkpoint`` (Nones
    without one)."""
    path = settings.classifier_checkpoint
    if not path:
        return None, None, None
    ckpt = load_checkpoint(path, replicated)
    if ckpt.kind != "classifier":
        raise ValueError(
            f"sample.classifier_checkpoint: {path} holds a {ckpt.kind!r} model, not a 'classifier'"
        )
    size = int(ckpt.model_kwargs["image_size"])
    if size != image_size:
        raise ValueError(
            f"sample.classifier_checkpoint: classifier image_size {size} does not match "
            f"the diffusion model's image_size {image_size}"
        )
    module = ckpt.module(**settings.module_overrides())
    return module, ckpt.params, int(ckpt.model_kwargs.get("out_channels", 1000))


def _label_range(
    settings: SampleSettings,
    model_classes: int | None,
    classifier_classes: int | None,
    needs_labels: bool,
) -> int | None:
    """The range random labels are drawn from: the narrower network's, or sample.num_classes
    (the reference's classifiers always have 1000 outputs, so one trained on 10 classes needs
    sample.num_classes=10); checks sample.class_labels against it."""
    labels = settings.class_labels
    if labels is not None and not needs_labels:
        raise ValueError(
            "sample.class_labels: the model is unconditional and no classifier guides it, so it "
            "cannot take class labels; use 'random' (ignored) or add sample.classifier_checkpoint"
        )
    limits = [n for n in (model_classes, classifier_classes) if n is not None]
    num_classes = min(limits) if limits else None
    source = "the model" if num_classes == model_classes else "the classifier"
    if settings.num_classes and needs_labels:
        if settings.num_classes > num_classes:
            raise ValueError(
                f"sample.num_classes={settings.num_classes} exceeds {source}'s {num_classes} "
                "classes"
            )
        num_classes, source = settings.num_classes, "sample.num_classes"
    bad = [y for y in labels or () if not 0 <= y < num_classes]
    if bad:
        raise ValueError(
            f"sample.class_labels: {bad} outside [0, {num_classes}), the range of {source}"
        )
    return num_classes


def _load_base_samples(settings, ckpt, model_path: str, needs_labels: bool, num_classes):
    """Two-stage sampling: the upsampler's input images and labels (Nones otherwise)."""
    base_path = settings.base_samples
    if ckpt.kind != "superres":
        if base_path:
            raise ValueError(
                f"sample.base_samples is set but {model_path} is a {ckpt.kind!r} model; base "
                "samples feed an upsampler ('superres') checkpoint"
            )
        return None, None
    if not base_path:
        raise ValueError(
            f"sample.base_samples: {model_path} is an upsampler; give it the .npz of base "
            "samples to upsample"
        )
    if settings.class_labels is not None:
        raise ValueError(
            "sample.class_labels: an upsampler takes its labels from base_samples arr_1; "
            "leave class_labels 'random'"
        )
    images, labels = io.load_base_samples(
        base_path,
        large_size=int(ckpt.model_kwargs["image_size"]),
        channels=int(ckpt.model_kwargs.get("in_channels", 3)),
        class_cond=needs_labels,
    )
    if labels is not None and num_classes is not None:
        bad = np.unique(labels[(labels < 0) | (labels >= num_classes)])
        if bad.size:
            raise ValueError(
                f"sample.base_samples: labels {bad.tolist()} outside [0, {num_classes})"
            )
    return images, labels


def _make_job(models: _Models, settings: SampleSettings, edit: EditSpec | None) -> SamplingJob:
    """The job of ``settings.sampler`` on the loaded models (``with_sampler`` calls it again
    with other sampler settings: one more compilation, no more loading)."""
    spec = settings.sampler
    diffusion_kwargs = dict(models.base_diffusion)
    if spec.on_training_schedule:  # the solvers discretise the training schedule
        diffusion_kwargs["timestep_respacing"] = ""
    elif spec.respacing:
        diffusion_kwargs["timestep_respacing"] = spec.respacing
    try:
        diffusion = create_diffusion(**diffusion_kwargs)
    except (ValueError, AssertionError) as err:
        steps = settings.sampler_fields.get("steps")
        field = "sample.steps" if steps else "sample.timestep_respacing"
        raise ValueError(f"{field}: {err}") from None
    if spec.name == "ddpm" and spec.respacing.startswith("ddim"):
        logging.warning("timestep_respacing=%s with sampler ddpm: ancestral", spec.respacing)
    ckpt = models.ckpt
    sampler = BatchSampler.for_networks(
        diffusion,
        models.module,
        classifier=models.classifier,
        cfg=settings.cfg_scale is not None,
        unconditional=settings.cfg_scale == 0,
        source=models.model_path,
        image_shape=models.image_shape,
        batch_size=settings.batch_size,
        mesh=models.mesh,
        clip_denoised=settings.clip_denoised,
        method=spec,
        edit=edit,
    )
    spec = sampler.method
    provenance = dict(
        checkpoint=paths.absolute(models.model_path),
        checkpoint_step=ckpt.extra.get("step"),
        classifier_checkpoint=(
            paths.absolute(settings.classifier_checkpoint) if settings.classifier_checkpoint else ""
        ),
        base_samples=paths.absolute(settings.base_samples) if settings.base_samples else "",
        base_samples_shape=None if models.base_images is None else list(models.base_images.shape),
        seed=settings.seed,
        image_shape=list(models.image_shape),
        clip_denoised=settings.clip_denoised,
        class_labels="random" if settings.class_labels is None else list(settings.class_labels),
        num_classes=models.num_classes,
        batch_size=sampler.batch_size,
        diffusion=_normalize(diffusion_kwargs),
        sampler=spec.name,
        steps=spec.steps,
        eta=spec.eta,
        thresholding=spec.thresholding,
        **spec.options(),
    )
    return SamplingJob(
        sampler=sampler,
        settings=settings,
        model_params=ckpt.params,
        classifier_params=models.classifier_params,
        num_classes=models.num_classes,
        base_images=models.base_images,
        base_labels=models.base_labels,
        default_num_samples=0 if models.base_images is None else len(models.base_images),
        provenance=provenance,
        rebuild=lambda **overrides: _make_job(models, settings.with_sampler(**overrides), edit),
    )


# --------------------------------------------------------------------------------------------
# Running a job: shards, resume, assembly.


def _is_main() -> bool:
    return jax.process_index() == 0


def _broadcast(value: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(value))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _check_or_store_args(shard_dir: str, args: dict[str, Any]) -> str | None:
    """Stores ``args`` for a new run; for a resumed one returns what differs (or None)."""
    path = paths.path(shard_dir) / ARGS_FILE
    args = json.loads(json.dumps(args))  # what a reader will see (tuples -> lists, ...)
    if path.exists():
        stored = json.loads(path.read_text())
        keys = sorted(set(stored) | set(args))
        diffs = [
            f"{k}: {stored.get(k)!r} -> {args.get(k)!r}"
            for k in keys
            if stored.get(k) != args.get(k)
        ]
        return "; ".join(diffs) if diffs else None
    paths.write_text_atomic(path, json.dumps(args, indent=2, sort_keys=True))
    return None


def finished_batches(shard_dir: str) -> set[int]:
    """Indices of the shards already written (complete by construction: atomic writes)."""
    shard_dir = paths.path(shard_dir)
    paths.refresh(shard_dir)  # another process may have written shards since the last look
    found = set()
    for path in shard_dir.glob("batch_*.npz"):
        match = _SHARD_RE.search(path.name)
        if match:
            found.add(int(match.group(1)))
    return found


def shard_writer(batch_index: int) -> int:
    """The process that writes shard ``batch_index``: writing is spread over all processes."""
    return batch_index % jax.process_count()


def samples_filename(num_samples: int, image_shape: Sequence[int]) -> str:
    """The reference's name: ``samples_{N}x{H}x{W}x{C}.npz``."""
    return "samples_" + "x".join(str(s) for s in (num_samples, *image_shape)) + ".npz"


def run_job(
    job: SamplingJob,
    output_dir: str,
    *,
    num_samples: int,
    classifier_scale: float | None = None,
    cfg_scale: float | None = None,
    max_batches: int | None = None,
    grid_images: int = 64,
    progress: bool = True,
) -> str | None:
    """Samples ``num_samples`` images into ``output_dir``; returns the final ``.npz`` path.

    ``output_dir`` may be local or ``gs://``/``s3://``. Every process calls this (each batch
    spans all devices); each writes its share of the shards, process 0 assembles them.
    ``classifier_scale`` / ``cfg_scale`` None mean the job's (``sample.classifier_scale`` /
    ``sample.cfg_scale``, checked when the config was read); a number given here (a sweep's)
    is checked here, and a cfg_scale needs a job built with classifier-free guidance.
    ``max_batches`` stops after that many NEW batches (a preemption stand-in, also handy to
    split a run over jobs); the return value is then None unless the run is complete.
    """
    if classifier_scale is None:
        classifier_scale = job.classifier_scale
    else:
        classifier_scale = check_scale("sample.classifier_scale", classifier_scale)
    if classifier_scale and not job.sampler.guided:
        raise ValueError(
            f"sample.classifier_scale={classifier_scale:g} needs sample.classifier_checkpoint"
        )
    if cfg_scale is None:
        cfg_scale = job.cfg_scale
    elif not job.sampler.cfg:
        raise ValueError(
            f"sample.cfg_scale={cfg_scale!r}: this job samples without classifier-free guidance "
            "(build it with sample.cfg_scale set)"
        )
    else:
        cfg_scale = check_scale("sample.cfg_scale", cfg_scale)
    if num_samples <= 0:
        raise ValueError(f"sample.num_samples must be positive, got {num_samples}")
    num_batches = math.ceil(num_samples / job.batch_size)
    shard_dir = paths.path(output_dir) / "shards"
    args = dict(job.provenance, classifier_scale=classifier_scale, cfg_scale=cfg_scale)
    done = _batches_done(shard_dir, args, num_batches, output_dir)
    remaining = [b for b in range(num_batches) if b not in done]
    todo = remaining if max_batches is None else remaining[:max_batches]
    bar = None
    if progress and _is_main():
        bar = tqdm(
            total=num_batches,
            initial=len(done),
            unit="batch",
            desc=f"sampling {num_samples} ({_describe(job, classifier_scale, cfg_scale)})",
        )
    _write_shards(job, todo, shard_dir, classifier_scale, cfg_scale, bar)
    _sync("adm_jax.sampling.shards_written")  # every process's shards exist from here on
    if len(todo) < len(remaining):
        return None
    final = paths.path(output_dir) / samples_filename(num_samples, job.sampler.image_shape)
    if _is_main():
        assemble(shard_dir, final, num_samples, job.batch_size)
        num_grid = min(grid_images, num_samples)
        grid = [
            io.load_samples_npz(shard_dir / SHARD_PATTERN.format(b))[0]
            for b in range(math.ceil(num_grid / job.batch_size))
        ]
        io.save_image_grid(final.with_suffix(".png"), np.concatenate(grid)[:num_grid])
        logging.info("Wrote %s", final)
    _sync("adm_jax.sampling.done")
    return str(final)


def _batches_done(shard_dir, args: dict[str, Any], num_batches: int, output_dir: str) -> set[int]:
    """The batches already written by an earlier run with the same ``args`` (stored for a new
    run), as process 0 sees them, on every process; refuses a folder of other arguments."""
    mismatch = None
    if _is_main():
        shard_dir.mkdir(parents=True, exist_ok=True)
        mismatch = _check_or_store_args(shard_dir, args)
    done_mask = np.zeros(num_batches + 1, np.int32)  # last entry: argument mismatch flag
    if _is_main():
        for b in finished_batches(shard_dir):
            if b < num_batches:
                done_mask[b] = 1
        done_mask[-1] = mismatch is not None
    done_mask = _broadcast(done_mask)  # every process runs the same batches
    if done_mask[-1]:
        raise ValueError(
            f"sample.output_dir: {output_dir} holds samples from other arguments "
            f"({mismatch or 'see process 0'}); use another output_dir or delete {shard_dir}"
        )
    if not _is_main():
        shard_dir.mkdir(parents=True, exist_ok=True)
    done = {int(b) for b in np.flatnonzero(done_mask[:-1])}
    if done and _is_main():
        logging.info("Resuming %s: %d of %d batches done", output_dir, len(done), num_batches)
    return done


def _write_shards(job, todo, shard_dir, classifier_scale, cfg_scale, bar) -> None:
    """Samples the ``todo`` batches, writing each shard from its writer process while the
    devices compute the next batch."""
    start = time.time()

    def save(pending):
        b, images, labels = pending
        if shard_writer(b) == jax.process_index():
            images = np.asarray(images)  # waits for the device
            io.save_samples_npz(shard_dir / SHARD_PATTERN.format(b), images, labels)
        else:
            jax.block_until_ready(images)
        if bar is not None:
            bar.update(1)

    pending = None
    for b in todo:  # batch b runs on the devices while the host writes batch b - 1
        images, labels = job.dispatch_batch(b, classifier_scale, cfg_scale)
        if pending is not None:
            save(pending)
        pending = (b, images, labels)
    if pending is not None:
        save(pending)
    if bar is not None:
        bar.close()
    if todo and _is_main():
        elapsed = time.time() - start
        logging.info(
            "Sampled %d batches of %d in %.1fs (%.2f samples/s)",
            len(todo),
            job.batch_size,
            elapsed,
            len(todo) * job.batch_size / max(elapsed, 1e-9),
        )


def _describe(job: SamplingJob, classifier_scale: float, cfg_scale: float | None) -> str:
    text = job.sampler.method.label
    if job.sampler.guided:
        text += f", classifier scale {classifier_scale:g}"
    if cfg_scale is not None:
        text += f", cfg scale {cfg_scale:g}"
    return text


def assemble(shard_dir: str, out_path: str, num_samples: int, batch_size: int) -> str:
    """Concatenates the shards into one reference-format ``.npz``, streaming from storage."""
    shard_dir = paths.path(shard_dir)
    num_batches = math.ceil(num_samples / batch_size)
    shards = [shard_dir / SHARD_PATTERN.format(b) for b in range(num_batches)]
    missing = sorted(set(range(num_batches)) - finished_batches(shard_dir))  # one listing
    if missing:
        raise FileNotFoundError(
            f"sample.output_dir: {len(missing)} shard(s) missing in {shard_dir} (e.g. "
            f"{SHARD_PATTERN.format(missing[0])}); in a multi-process run output_dir must be "
            "shared by all processes (a gs:// bucket or a shared disk)"
        )
    with shards[0].open("rb") as f, np.load(f) as first:
        image_shape, has_labels = first[io.IMAGES_KEY].shape[1:], io.LABELS_KEY in first
        label_dtype = first[io.LABELS_KEY].dtype if has_labels else None

    def chunks(key):
        remaining = num_samples
        for path in shards:
            with path.open("rb") as f, np.load(f) as data:
                chunk = data[key][:remaining]
            remaining -= len(chunk)
            yield chunk

    arrays = {io.IMAGES_KEY: ((num_samples, *image_shape), np.uint8, chunks(io.IMAGES_KEY))}
    if has_labels:
        arrays[io.LABELS_KEY] = ((num_samples,), label_dtype, chunks(io.LABELS_KEY))
    return str(io.write_npz_streaming(out_path, arrays))


# --------------------------------------------------------------------------------------------
# Entry point.


def output_dir_for(config: Any, workdir: str) -> str:
    """sample.output_dir, or WORKDIR/samples when it is empty."""
    out = recipe.config_text(config_get(config, "sample"), "output_dir")
    return out or str(paths.path(workdir or ".") / "samples")


def sample(config: Any, workdir: str, *, max_batches: int | None = None) -> str | None:
    """``--mode=sample``: samples ``config.sample.num_samples`` images; returns the ``.npz``.

    The model comes from ``config.sample.checkpoint`` (an exported or converted checkpoint, or
    a training workdir), or from ``workdir`` when that is empty; the sampler, NFE and guidance
    from ``sample.sampler`` / ``steps`` / ``classifier_scale`` / ``cfg_scale``. With an
    upsampler checkpoint and ``config.sample.base_samples`` this is the second stage of
    two-stage sampling.
    """
    settings = read_sample(config)
    job = build_job(config, workdir, settings=settings)
    return run_job(
        job,
        output_dir_for(config, workdir),
        num_samples=settings.num_samples or job.default_num_samples,
        max_batches=max_batches,
    )
