"""Training loops: ``train_and_evaluate`` (diffusion model) and ``train_classifier``.

Both are plain functions of (config, workdir) that a notebook can call. They validate the
config, build the mesh, the network and the state (in its shards), resume from the latest
finalized checkpoint in ``workdir`` if there is one (state + data iterator position), compile
the step once, then loop: step, periodic logging (clu writers: TensorBoard, console,
metrics.jsonl), evaluation, EMA sample grids, and async Orbax checkpoints. SIGTERM (or Orbax's
multi-host preemption notice) triggers a final save and a clean return.

Process 0 holds the workdir's lock (``adm_jax.workdir``) for the whole call, so a second run
on the same workdir stops at once instead of interleaving checkpoints. A checkpoint that
cannot be written stops the run at the next step with ``CheckpointSaveError``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from adm_jax import images as images_lib
from adm_jax import paths, posthoc_ema
from adm_jax import workdir as workdir_lib
from adm_jax.batch_sampler import BatchSampler
from adm_jax.checkpoints import init_from
from adm_jax.checkpoints import training as checkpointing
from adm_jax.models import count_params
from adm_jax.recipe import config as config_lib
from adm_jax.recipe.train import TrainSettings, read_train
from adm_jax.train import metrics as metrics_lib
from adm_jax.train import sharding, steps
from adm_jax.train import state as state_lib


class NonFiniteError(RuntimeError):
    """Raised when train.max_consecutive_nonfinite steps in a row were non-finite."""


@dataclasses.dataclass
class RunResult:
    """What a loop returns (handy in notebooks and tests)."""

    state: Any
    step: int
    metrics: dict[str, float]
    preempted: bool = False
    finished_before: bool = False  # the workdir already held the final step's checkpoint


class _StopSignals:
    """SIGTERM / SIGINT -> a flag the loop checks between steps (the handler does no I/O).

    Single-process runs only: the loop then stops at the next step with a checkpoint, and a
    second signal of the same kind gets its default action (SIGTERM kills, SIGINT raises
    KeyboardInterrupt). Multi-process runs leave SIGTERM to JAX's preemption service
    (installed by ``jax.distributed.initialize``): it agrees on one step for every process
    (``Checkpointer.reached_preemption``), whereas a handler here would replace its notifier
    and let each process stop wherever its own signal found it, inside another's collective.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.set = False
        self._previous = {}

    def __enter__(self):
        on_main = threading.current_thread() is threading.main_thread()
        if on_main and jax.process_count() == 1:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        logging.warning(
            "%s received: stopping after this step with a checkpoint (send it again to abort).",
            name,
        )
        self.set = True
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def sync_processes(name: str) -> None:
    """Coordination-service barrier (no-op in one process) before a program's first
    collective: processes finish compiling at different times, and XLA:CPU's gloo collectives
    give up after 30 s of waiting for a slower peer to join."""
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(f"adm_jax:{name}")


class _CompileOnceThenSync:
    """A jitted function compiled at its first call, then a barrier, then reused.

    One compilation per run (the sample grid used to recompile at every ``sample_every``), and
    no process enters the program's collectives while another is still compiling.
    """

    def __init__(self, jitted, name: str):
        self._jitted, self._name = jitted, name
        self._compiled = None

    def __call__(self, *args):
        if self._compiled is None:
            self._compiled = self._jitted.lower(*args).compile()
            sync_processes(f"{self._name}_compiled")
        return self._compiled(*args)


def _data_iterator(config, settings: TrainSettings, mesh, *, for_classifier: bool):
    from adm_jax import data as data_lib

    return data_lib.create_train_iterator(
        config.data,
        global_batch_size=settings.batch_size,
        sharding=sharding.batch_sharding(mesh),
        seed=settings.seed,
        split=config.data.split,
        for_classifier=for_classifier,
        num_classes=config_lib.num_classes(config),
    )


def train_and_evaluate(config, workdir: str, **kwargs) -> RunResult:
    """Trains the diffusion model of ``config`` in ``workdir`` (resuming if possible)."""
    return _run(config, workdir, classifier=False, **kwargs)


def train_classifier(config, workdir: str, **kwargs) -> RunResult:
    """Trains the noisy classifier of ``config`` (model.kind "classifier") in ``workdir``."""
    return _run(config, workdir, classifier=True, **kwargs)


def _run(
    config,
    workdir: str,
    *,
    classifier: bool,
    train_iter: Iterator | None = None,
    eval_iter_fn: Callable[[], Iterator] | None = None,
    mesh=None,
    stop_after: int | None = None,
) -> RunResult:
    """``train_iter`` / ``eval_iter_fn`` replace the TFDS input (tests, benchmarks);
    ``stop_after`` ends this call after that many steps (the run stays resumable).

    The train section is read here, once (``read_train``); what runs below receives its
    ``TrainSettings``."""
    settings = read_train(config)
    mode = "train_classifier" if classifier else "train"
    mesh = mesh or sharding.create_mesh(fsdp=settings.fsdp)
    config_lib.validate_config(config, num_devices=mesh.size, mode=mode)
    workdir = workdir_lib.prepare(workdir)
    with workdir_lib.WorkdirLock(workdir, enabled=jax.process_index() == 0):
        return _train(
            config, settings, workdir, mesh, classifier=classifier, train_iter=train_iter,
            eval_iter_fn=eval_iter_fn, stop_after=stop_after,
        )  # fmt: skip


def _train(
    config,
    settings: TrainSettings,
    workdir,
    mesh,
    *,
    classifier: bool,
    train_iter,
    eval_iter_fn,
    stop_after,
) -> RunResult:
    """The body of ``_run``, with the workdir checked and locked. ``config`` gives the model,
    diffusion and data sections (and is stored next to each checkpoint); ``settings`` the train
    section."""
    logging.info("workdir %s; mesh %s; %d devices", workdir, dict(mesh.shape), mesh.size)

    module = config_lib.build_model(config)
    diffusion = config_lib.build_diffusion(config)
    tx = state_lib.make_optimizer(settings)
    abstract, shardings = state_lib.abstract_train_state(module, config, tx, mesh, settings)
    ckpt = checkpointing.Checkpointer(
        workdir, max_to_keep=settings.max_to_keep, async_save=settings.async_checkpointing
    )
    latest = ckpt.latest_step()
    if latest is not None and latest >= settings.num_steps:
        # Rerunning a finished run (or a pod relaunched after its last save): nothing to
        # compile or train.
        logging.info(
            "%s: already finished (checkpoint at step %d, train.num_steps=%d); nothing to do.",
            ckpt.directory, latest, settings.num_steps,
        )  # fmt: skip
        ckpt.close()
        return RunResult(state=None, step=latest, metrics={}, finished_before=True)
    if train_iter is None:
        train_iter = _data_iterator(config, settings, mesh, for_classifier=classifier)
    state, first_batch = _initial_state(
        config, settings, module, tx, mesh, abstract, shardings, ckpt, latest, train_iter
    )
    if eval_iter_fn is None and settings.eval_every and config.data.eval_split:
        eval_iter_fn = _eval_iterator_fn(config, settings, mesh, classifier)

    train_step = steps.jit_train_step(
        module, diffusion, tx, config, shardings, mesh, classifier=classifier, settings=settings
    )
    eval_step, sample_grid = _eval_programs(config, settings, module, diffusion, mesh, classifier)
    step = int(jax.device_get(state.step))
    writer = metrics_lib.create_writer(workdir, tensorboard=settings.tensorboard, resume_step=step)
    if first_batch is None:
        first_batch = next(train_iter)
    with jax.set_mesh(mesh):
        compiled = train_step.lower(state, first_batch).compile()
    sync_processes("train_step_compiled")
    flops = metrics_lib.compiled_flops(compiled)
    logging.info("Compiled the train step: %.3g FLOPs per device per step", flops)
    if step == 0:
        writer.write_hparams(
            {k: v for k, v in config_lib.config_to_dict(config)["train"].items()
             if isinstance(v, (int, float, str, bool))}
        )  # fmt: skip

    hooks = []
    if jax.process_index() == 0:
        hooks = metrics_lib.progress_hooks(
            num_train_steps=settings.num_steps,
            every_steps=settings.log_every,
            writer=writer,
            workdir=os.fspath(workdir),
            profile_steps=settings.profile_steps,
        )
    stds = settings.posthoc_ema_stds
    periodic = _PeriodicWork(
        settings=settings,
        classifier=classifier,
        writer=writer,
        workdir=workdir,
        eval_step=eval_step,
        eval_iter_fn=eval_iter_fn,
        sample_grid=sample_grid,
        snapshots=posthoc_ema.SnapshotWriter(workdir, stds) if stds else None,
        first_power_ema=len(settings.ema_rate),
    )
    end = settings.num_steps if stop_after is None else min(settings.num_steps, step + stop_after)
    loop = _TrainLoop(
        config, settings, mesh, compiled, train_iter, ckpt, writer, hooks, periodic, flops
    )
    return loop.run(state, step, end, first_batch)


def _initial_state(
    config, settings, module, tx, mesh, abstract, shardings, ckpt, latest, train_iter
):
    """(state, first batch): the latest intact checkpoint's state (first batch None: read after
    the restore), or a fresh one (from train.init_from if set). A fresh run reads its first
    batch before anything is built, so that broken data (undecodable images, labels outside
    the model) stops it before anything is compiled."""
    first_batch = next(train_iter) if latest is None else None
    if latest is not None:
        with jax.set_mesh(mesh):
            state, resumed = ckpt.restore_latest_intact(abstract, data_iter=train_iter)
        logging.info("Resumed from %s/%d", ckpt.directory, resumed)
    else:
        sync_processes("init")
        state, _ = state_lib.create_train_state(module, config, tx, mesh, settings)
        if settings.init_from:
            with jax.set_mesh(mesh):
                state, _ = init_from.apply_init_from(config, state, shardings)
    logging.info("%s: %d parameters", config.model.kind, count_params(state.params))
    return state, first_batch


def _eval_iterator_fn(
    config, settings: TrainSettings, mesh, classifier: bool
) -> Callable[[], Iterator]:
    """A fresh iterator over the first train.eval_batches batches of data.eval_split."""

    def eval_iter_fn():
        from adm_jax import data as data_lib

        return data_lib.create_eval_iterator(
            config.data,
            global_batch_size=settings.batch_size,
            sharding=sharding.batch_sharding(mesh),
            split=config.data.eval_split,
            num_examples=settings.eval_batches * settings.batch_size,
            num_classes=config_lib.num_classes(config),
            for_classifier=classifier,
        )

    return eval_iter_fn


def _eval_programs(config, settings: TrainSettings, module, diffusion, mesh, classifier: bool):
    """(eval_step, sample_grid): the validation-loss program, and the sample grid of diffusion
    models with train.sample_every (else None)."""
    rep = sharding.replicated(mesh)
    if classifier:
        eval_step = steps.make_classifier_eval_step(module, diffusion, noised=settings.noised)
    else:
        eval_step = steps.make_diffusion_eval_step(module, diffusion, steps.low_res_size(config))
    eval_step = _CompileOnceThenSync(jax.jit(eval_step, out_shardings=rep), "eval_step")
    sample_grid = None
    if not classifier and settings.sample_every:
        sample_grid = _SampleGrid(config, module, mesh, settings)
    return eval_step, sample_grid


def _due(step: int, every: int) -> bool:
    """Periodic work of period ``every`` (0: never) is due at ``step``."""
    return bool(every) and step % every == 0


@dataclasses.dataclass
class _PeriodicWork:
    """The every-N-steps work besides logging and checkpoints: validation loss, sample grids
    and post-hoc EMA snapshots."""

    settings: TrainSettings
    classifier: bool
    writer: Any
    workdir: Any
    eval_step: Any
    eval_iter_fn: Callable[[], Iterator] | None
    sample_grid: Any
    snapshots: Any  # posthoc_ema.SnapshotWriter or None
    first_power_ema: int  # index of the first power-function EMA in state.ema_params

    def __call__(self, step: int, state, last_batch, last: dict) -> None:
        """Runs what is due at ``step``; validation terms join ``last``."""
        settings = self.settings
        if self.eval_iter_fn is not None and _due(step, settings.eval_every):
            batches = settings.eval_batches
            ev = _evaluate(self.eval_step, state, self.eval_iter_fn, batches, self.classifier, step)
            self.writer.write_scalars(step, ev)
            last.update(ev)
        if not self.classifier and _due(step, settings.sample_every):
            _write_samples(self.sample_grid, state, self.writer, self.workdir, step, last_batch)
        if self.snapshots is not None and step % settings.posthoc_ema_every == 0:
            self.snapshots.save(step, state.ema_params[self.first_power_ema :])

    def close(self) -> None:
        if self.snapshots is not None:
            self.snapshots.close()


@dataclasses.dataclass
class _TrainLoop:
    """The steps from a state to ``end``: logging, periodic work, checkpoints, and a stop on
    a preemption signal (checkpoint saved) or too many non-finite steps in a row."""

    config: Any  # stored next to each checkpoint
    settings: TrainSettings
    mesh: Any
    compiled: Any  # the compiled train step
    train_iter: Iterator
    ckpt: checkpointing.Checkpointer
    writer: Any
    hooks: list
    periodic: _PeriodicWork
    flops: float  # of the train step, per device

    def save(self, state, at_step: int, *, force: bool = False) -> None:
        started = self.ckpt.save(
            at_step,
            state,
            data_iter=self.train_iter,
            config=config_lib.config_to_dict(self.config),
            force=force,
        )
        if started:
            logging.info("Saving checkpoint at step %d", at_step)
        # The metrics up to a checkpoint outlive a preemption (bucket workdirs).
        self.writer.flush()

    def log(self, acc, step: int, steps_since_log: int, t_log: float) -> dict:
        """Writes the mean train metrics and throughput since the last log; stops the run
        after train.max_consecutive_nonfinite non-finite steps in a row."""
        settings = self.settings
        scalars = acc.reduce(prefix="train/")
        elapsed = time.perf_counter() - t_log
        perf = metrics_lib.throughput(
            steps=steps_since_log, seconds=elapsed, batch_size=settings.batch_size,
            flops_per_device=self.flops,
        )  # fmt: skip
        scalars.update({f"perf/{k}": v for k, v in perf.items()})
        self.writer.write_scalars(step, scalars)
        return scalars

    def stop_if_nonfinite(self, scalars: dict, step: int) -> None:
        settings, ckpt = self.settings, self.ckpt
        streak = scalars.get("train/max_nonfinite_streak", 0)
        if settings.max_consecutive_nonfinite and streak >= settings.max_consecutive_nonfinite:
            ckpt.close()
            self.writer.flush()
            raise NonFiniteError(
                f"train.max_consecutive_nonfinite: {int(streak)} non-finite steps in a "
                f"row by step {step}; stopping (last good checkpoint: "
                f"{ckpt.latest_step()}). Lower train.lr or set train.grad_clip."
            )

    def run(self, state, step: int, end: int, first_batch) -> RunResult:
        settings, ckpt = self.settings, self.ckpt
        acc = metrics_lib.MetricAccumulator()
        last = {}
        preempted = False
        t_log, steps_since_log = time.perf_counter(), 0
        batch = first_batch
        with _StopSignals() as flag, jax.set_mesh(self.mesh):
            while step < end:
                if batch is None:
                    batch = next(self.train_iter)
                state, step_metrics = self.compiled(state, batch)
                last_batch, batch = batch, None
                # A failed async save stops the run now, not at the next save.
                ckpt.check_for_errors()
                step += 1
                steps_since_log += 1
                acc.add(step_metrics)
                for hook in self.hooks:
                    hook(step)
                is_last = step == end
                if settings.log_every and (step % settings.log_every == 0 or is_last):
                    last = self.log(acc, step, steps_since_log, t_log)
                    t_log, steps_since_log = time.perf_counter(), 0
                    self.stop_if_nonfinite(last, step)
                t_side = time.perf_counter()  # periodic work below is excluded from img/s
                self.periodic(step, state, last_batch, last)
                if _due(step, settings.checkpoint_every) and not is_last:
                    self.save(state, step)
                t_log += time.perf_counter() - t_side
                if flag.set or ckpt.reached_preemption(step):
                    preempted = True
                    break
            if step not in ckpt.all_steps():  # already saved: a periodic save at the same step
                self.save(state, step, force=True)
            ckpt.close()
            self.periodic.close()
        self.writer.flush()
        if preempted:
            logging.warning(
                "Stopped at step %d after a preemption signal (checkpoint saved).", step
            )
        return RunResult(state=state, step=step, metrics=last, preempted=preempted)


def _evaluate(
    eval_step, state, eval_iter_fn, eval_batches: int, classifier: bool, step: int
) -> dict:
    """Mean validation terms over ``eval_batches`` batches (EMA params for the diffusion
    model, the ones we sample with; raw params for the classifier, which keeps no EMA)."""
    params = state.ema_params[0] if (state.ema_params and not classifier) else state.params
    it = eval_iter_fn()
    results = []
    for i in range(eval_batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        results.append(eval_step(params, batch, jax.random.PRNGKey(i)))
    if hasattr(it, "close"):
        it.close()
    if not results:
        return {}
    results = jax.device_get(results)
    count = sum(float(r["count"]) for r in results)
    names = [k for k in results[0] if k != "count"]
    return {f"val/{k}": sum(float(r[k]) for r in results) / max(count, 1.0) for k in names}


class _SampleGrid:
    """The EMA sample grid logged every ``train.sample_every`` steps: DDPM on the
    ``train.sample_respacing`` process through the one sampling program
    (``adm_jax.batch_sampler.BatchSampler``, as ``--mode=sample``), compiled once per run.

    The batch is ``train.num_sample_images`` rounded up to a multiple of the devices (each
    device samples its share; the grid shows the first ones). Class-conditional models get
    random labels; super-resolution models upsample the last training batch (with its labels).
    """

    def __init__(self, config, module, mesh, settings: TrainSettings | None = None):
        settings = read_train(config) if settings is None else settings
        self.num_images = settings.num_sample_images
        self.seed = settings.seed + 17
        self.num_classes = getattr(module, "num_classes", None)
        self.small_size = steps.low_res_size(config)
        self.mesh = mesh
        batch = -(-self.num_images // mesh.size) * mesh.size
        channels = config_lib.in_channels(config)
        size = config_lib.model_image_size(config)
        self.sampler = BatchSampler.for_networks(
            config_lib.build_diffusion(config, timestep_respacing=settings.sample_respacing),
            module,
            model_options=dict(train=False),
            image_shape=(size, size, channels),
            batch_size=batch,
            mesh=mesh,
        )
        self.program = _CompileOnceThenSync(self.sampler.program, "sample_grid")
        self._gather = jax.jit(self._last_batch_inputs, out_shardings=self.sampler.replicated)

    def _last_batch_inputs(self, batch) -> dict:
        """low_res (and labels) of the grid from the first images of the last training batch,
        repeated up to the sampler's batch (traced once; replicated to every process)."""
        n, size = self.num_images, self.sampler.batch_size
        take = lambda a: jax.numpy.resize(a[:n], (size, *a.shape[1:]))
        out = {"low_res": take(steps.area_downsample(batch["image"], self.small_size))}
        if "label" in batch and self.num_classes is not None:
            out["labels"] = take(batch["label"])
        return out

    def __call__(self, params, step: int, last_batch) -> np.ndarray:
        labels = low_res = None
        if self.small_size is not None:
            with jax.set_mesh(self.mesh):
                inputs = jax.device_get(self._gather(last_batch))
            low_res, labels = inputs["low_res"], inputs.get("labels")
        elif self.num_classes is not None:
            rng = np.random.default_rng([self.seed, step])
            labels = rng.integers(0, self.num_classes, self.sampler.batch_size, dtype=np.int32)
        params = jax.device_put(params, self.sampler.replicated)
        args = self.sampler.arguments(
            params, seed=self.seed, batch_index=step, labels=labels, low_res=low_res
        )
        images = np.asarray(self.program(*args))[: self.num_images]
        steps.TRACE_COUNTS["sample_grid"] = self.sampler.trace_count
        return images


def _write_samples(sample_grid, state, writer, workdir, step, last_batch) -> None:
    """A grid of EMA samples -> PNG + image summary."""
    params = state.ema_params[0] if state.ema_params else state.params
    images = sample_grid(params, step, last_batch)
    writer.write_images(step, {"samples": images_lib.image_grid(images)[None]})
    if jax.process_index() == 0:
        out_dir = paths.resolved(workdir) / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        images_lib.save_image_grid(out_dir / f"step_{step:08d}.png", images)
