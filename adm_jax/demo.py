"""The demo: the paper's whole pipeline on 5000 embedded MNIST digits, on one CPU.

    python -m adm_jax.main --config=configs/demo.py --workdir=demo_workdir
    python -m adm_jax.demo --workdir=demo_workdir

or, from a notebook, ``adm_jax.demo.run(config, workdir)``. The stages use the code paths of the
ImageNet configs (TFDS ArrayRecord + grain input, ``train_and_evaluate``, ``train_classifier``,
``guidance_sweep``); only the dataset and the metrics' feature extractor are the demo's own:

  1. ``prepare_demo_dataset``: MNIST digits -> TFDS ``mnist_demo`` (train 4500 / test 500);
  2. ONE small class-conditional UNet on grey digits (``model.in_channels=1``), learned sigma,
     hybrid loss, label dropout: its null label makes it the unconditional model too
     (``WORKDIR/diffusion``);
  3. its noisy classifier p_phi(y | x_t, t), EncoderUNet + attention pool (``WORKDIR/classifier``);
  4. an INDEPENDENT clean-digit CNN (``WORKDIR/judge``): its penultimate features are the
     feature space of FID / precision / recall, its predictions judge whether a guided sample
     shows its target digit. It is not the guidance classifier, so guidance cannot "fool" it;
  5. sampling with random target digits, one ``guidance_sweep`` per row group
     (``row_groups``): the unconditional model with classifier guidance, the conditional
     model with classifier guidance (both halves of Table 4), classifier-free guidance, a
     fast sampler at 10 and 20 model evaluations, and classifier-free guidance only inside a
     sigma interval (``WORKDIR/samples/<group>/[<sampler>/]scale_S``: samples .npz,
     ``grid.png`` with one row per target digit); then inpainting (``inpaint_row``): held-out
     digits with half kept, the rest filled towards another digit (``--mode=edit``'s code,
     ``WORKDIR/samples/inpaint``, ``edits.png``);
  6. metrics per row, plus the same metrics for real training digits (the ceiling at this
     sample size) -> ``WORKDIR/metrics.{md,json}``, ``WORKDIR/loss.png``, the printed table;
  7. with ``--config.demo.sampler_table=True``: every sampler x NFE (``sampler_table``) ->
     ``WORKDIR/sampler_table.{md,json}`` (docs/sampling.md quotes it).

These FID / precision / recall numbers use the judge's 128-d features, NOT Inception features:
they show the paper's trends (Table 4) and are not comparable with any published FID.

Every stage first looks for its outputs (finished checkpoints, the judge's parameters, finished
sample shards), so rerunning the command only does what is missing.
"""

from __future__ import annotations

from adm_jax import recipe, xla_cpu

if __name__ == "__main__":
    xla_cpu.prepare_entry_point()  # may restart the process: before the imports below

import copy
import io
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from adm_jax import evaluation, paths
from adm_jax.demo_judge import (
    classify_digits,
    load_judge,
    save_judge,
    target_accuracy,
    train_judge,
)
from adm_jax.diffusion import methods
from adm_jax.sampling import edit as edit_lib
from adm_jax.sampling.io import save_samples_npz

# Top-level config sections that are the demo's own (not read by train/sampling).
DEMO_SECTIONS = ("classifier", "demo", "mode")
NOT_INCEPTION = (
    "These FID / precision / recall values are computed on the features of a small digit "
    "classifier trained for this demo, NOT on Inception features: they are not comparable "
    "with the paper's (or any published) FID numbers, only across the rows of this table."
)

REAL_ROW_NOTE = (
    "'real digits': as many real training digits as samples per scale, scored like the "
    "samples against the held-out digits; the ceiling of precision/recall and the floor of "
    "FID at this sample size."
)


# ----------------------------------------------------------------------------- progress


class _Stages:
    """Prints a banner per stage and records its wall / CPU seconds for ``timings.json``."""

    def __init__(self, total: int):
        self.total = total
        self.times: dict[str, dict[str, float]] = {}
        self._start = time.perf_counter()

    def __call__(self, index: int, name: str):
        return _Stage(self, index, name)

    def wall(self) -> float:
        return time.perf_counter() - self._start


class _Stage:
    def __init__(self, stages: _Stages, index: int, name: str):
        self._stages, self._index, self._name = stages, index, name

    def __enter__(self):
        self._t, self._c = time.perf_counter(), time.process_time()
        _say(f"[{self._index}/{self._stages.total}] {self._name} ...")
        return self

    def skip(self, why: str) -> None:
        _say(f"[{self._index}/{self._stages.total}] {self._name}: {why}")

    def __exit__(self, *exc):
        wall, cpu = time.perf_counter() - self._t, time.process_time() - self._c
        self._stages.times[self._name] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
        if exc[0] is None:
            _say(
                f"[{self._index}/{self._stages.total}] {self._name}: done in {wall:.0f}s "
                f"(total {self._stages.wall() / 60:.1f} min)"
            )


def _say(message: str) -> None:
    """Progress on stdout: visible in a terminal and a notebook alike (the training loops log
    their steps, ETA and losses through absl)."""
    print(message, flush=True)


# ----------------------------------------------------------------------------- configs


def _without(config: ml_collections.ConfigDict, names: Sequence[str]) -> ml_collections.ConfigDict:
    d = config.to_dict()
    for name in names:
        d.pop(name, None)
    return ml_collections.ConfigDict(d)


def data_dir_for(config, workdir: str) -> str:
    """``config.data.data_dir``, or ``WORKDIR/tfds`` when it is empty."""
    return config.data.data_dir or str(paths.path(workdir) / "tfds")


def diffusion_config(config, workdir: str) -> ml_collections.ConfigDict:
    """The diffusion run's config: ``config`` without the demo's own sections."""
    out = _without(config, DEMO_SECTIONS)
    out.data.data_dir = data_dir_for(config, workdir)
    return out


def classifier_run_config(config, workdir: str) -> ml_collections.ConfigDict:
    """The noisy classifier's run config (``config.classifier``), reading the same data."""
    out = _without(config.classifier, DEMO_SECTIONS)
    out.data.data_dir = data_dir_for(config, workdir)
    return out


def _data_fields(data_config) -> dict[str, Any]:
    """config.data restricted to what ``adm_jax.data`` reads (the run configs carry more)."""
    from adm_jax.data import DATA_CONFIG_FIELDS

    return {k: v for k, v in data_config.items() if k in DATA_CONFIG_FIELDS}


def _load_images(data_config, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A whole split as (uint8 NHWC, int labels) through the ImageNet reading path."""
    from adm_jax.data import iterate_images

    images, labels = [], []
    for x, y in iterate_images(_data_fields(data_config), split, with_labels=True):
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels).astype(np.int32)


# ----------------------------------------------------------------------------- stages


def _write_json(path: paths.PathLike, obj: Any) -> None:
    paths.write_text_atomic(path, json.dumps(obj, indent=2))


def _record_timings(path: paths.PathLike, stages: _Stages) -> None:
    """``timings.json``: per stage the wall / CPU seconds of the run that did it (a rerun
    that skips a stage keeps the earlier numbers), and every run's total."""
    timings = {"stages": {}, "runs": []}
    if paths.path(path).exists():
        timings = json.loads(paths.path(path).read_text())
    timings["stages"].update(stages.times)
    timings["runs"].append(
        {
            "wall_s": round(stages.wall(), 1),
            "stages_run": list(stages.times),
            "load_average": list(os.getloadavg()),
            "cpu_count": os.cpu_count(),
        }
    )
    _write_json(path, timings)


def _check_reusable(path: str, recorded: Mapping[str, Any] | None, wanted: Mapping[str, Any]):
    """A finished stage is reused only for the config that made it: a changed field is a
    one-line error (naming it) rather than a silent reuse or a failure stages later."""
    if recorded is None:
        raise ValueError(
            f"{path} was written by an older demo that did not record its config; delete "
            "it or choose another --workdir"
        )
    diffs = [
        f"{k}={recorded.get(k)!r} (workdir) vs {v!r} (config)"
        for k, v in wanted.items()
        if recorded.get(k) != v
    ]
    if diffs:
        raise ValueError(
            f"{path} was made with another config: {'; '.join(diffs)}; delete it or choose "
            "another --workdir"
        )


def _training_signature(run_config) -> dict[str, Any]:
    """The fields that define a trained checkpoint (not its length, logging or sampling)."""
    signature = {
        f"{section}.{k}": v
        for section in ("model", "diffusion")
        for k, v in run_config[section].to_dict().items()
    }
    return json.loads(json.dumps(signature))  # as done.json gives it back


def _training_done(run_dir: str, run_config) -> bool:
    path = paths.path(run_dir) / "done.json"
    if not path.exists():
        return False
    done = json.loads(path.read_text())
    _check_reusable(path, done.get("config"), _training_signature(run_config))
    return done.get("step", -1) >= int(run_config.train.num_steps)


def _train_stage(stage, fn, run_config, run_dir: str) -> None:
    num_steps = int(run_config.train.num_steps)
    if _training_done(run_dir, run_config):
        stage.skip(f"{run_dir} already holds the step-{num_steps} checkpoint")
        return
    with stage:
        result = fn(run_config, run_dir)
        if result.preempted:
            raise SystemExit(f"stopped by a preemption signal at step {result.step}; rerun")
        _write_json(
            paths.path(run_dir) / "done.json",
            {
                "step": int(result.step),
                "metrics": result.metrics,
                "config": _training_signature(run_config),
            },
        )


def _sample_config(config, workdir: str, dirs: Mapping[str, str]) -> ml_collections.ConfigDict:
    """The sweeps' base config: checkpoints from stages 2-3, random target digits 0..9."""
    out = diffusion_config(config, workdir)
    sc = out.sample
    sc.checkpoint = dirs["diffusion"]
    sc.classifier_checkpoint = dirs["classifier"]
    sc.output_dir = dirs["samples"]
    # Random targets, fixed by the seed and spelled out, so that every row of the table
    # draws the same digits.
    rng = np.random.default_rng(int(sc.seed))
    targets = rng.integers(0, int(config.demo.num_classes), int(sc.num_samples))
    sc.class_labels = ",".join(str(int(y)) for y in targets)
    return out


def row_groups(config) -> list[dict[str, Any]]:
    """The table's groups of rows, each one ``guidance_sweep`` into ``samples/<name>``.

    The diffusion model is class-conditional with label dropout, so it is also the
    unconditional model (its null label: classifier-free scale 0): the two halves of the
    paper's Table 4 come from one network.
    """
    dc, sc = config.demo, config.sample
    groups = [
        dict(name="uncond", model="unconditional", guidance="classifier",
             scales=dc.uncond_scales, cfg_scale=0.0),
        dict(name="cond", model="conditional", guidance="classifier",
             scales=sc.sweep_scales, cfg_scale=None),
        dict(name="cfg", model="conditional", guidance="classifier-free",
             scales=dc.cfg_scales, cfg_scale=None),
        dict(name="fast", model="conditional", guidance="classifier",
             scales=str(dc.fast_scale) if dc.fast_steps else "", cfg_scale=None,
             samplers=dc.fast_sampler, steps=dc.fast_steps, x0_correction=dc.fast_x0_correction),
        dict(name="interval", model="conditional",
             guidance=f"classifier-free, sigma in ({dc.guidance_interval.replace(',', ', ')}]",
             scales=dc.interval_scales if dc.guidance_interval else "", cfg_scale=None,
             guidance_interval=dc.guidance_interval),
    ]  # fmt: skip
    return [g for g in groups if str(g["scales"]).strip()]


def _group_config(sample_cfg, group: Mapping[str, Any], samples_dir: str):
    out = copy.deepcopy(sample_cfg)
    sc = out.sample
    sc.output_dir = str(paths.path(samples_dir) / group["name"])
    sc.sweep_scales = str(group["scales"])
    sc.cfg_scale = group["cfg_scale"]
    if group["guidance"].startswith("classifier-free"):
        sc.classifier_checkpoint = ""
        sc.classifier_scale = 0.0
    sc.sweep_samplers = group.get("samplers", "")
    if group.get("samplers"):  # the sampler its options belong to
        sc.sampler, sc.use_ddim = str(group["samplers"]).split(",")[0], False
    sc.sweep_steps = group.get("steps", "")
    sc.guidance_interval = group.get("guidance_interval", "")
    sc.x0_correction = group.get("x0_correction", "")
    return out


def inpaint_row(config, sample_cfg, dirs, images, labels, metrics_fn) -> dict[str, Any]:
    """Issue-style editing row: the first ``sample.num_samples`` held-out digits with the
    ``demo.inpaint_mask`` region kept, the rest inpainted by RePaint towards another digit
    (never the source), classifier-guided; accuracy is the judge's against that target."""
    dc, n = config.demo, int(sample_cfg.sample.num_samples)
    out_dir = paths.path(dirs["samples"]) / "inpaint"
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = out_dir / "inputs.npz"
    if not inputs.exists():
        save_samples_npz(inputs, images[:n], labels[:n])
    classes = int(dc.num_classes)
    rng = np.random.default_rng([int(sample_cfg.sample.seed), 1])
    targets = (labels[:n] + rng.integers(1, classes, n)) % classes
    cfg = copy.deepcopy(sample_cfg)
    ec, sc = cfg.edit, cfg.sample
    ec.kind, ec.images, ec.masks, ec.output_dir = (
        "inpaint",
        str(inputs),
        dc.inpaint_mask,
        str(out_dir),
    )
    ec.target_labels = ",".join(str(int(y)) for y in targets)
    ec.jump_length, ec.jump_n_sample = int(dc.inpaint_jump_length), int(dc.inpaint_jump_n_sample)
    sc.sampler, sc.classifier_scale = "ddpm", float(dc.inpaint_scale)
    npz = edit_lib.edit(cfg, dirs["diffusion"])
    settings = recipe.read_edit(cfg, dirs["diffusion"])
    steps = json.loads((out_dir / "shards" / "args.json").read_text())["steps"]  # respaced
    row = dict(
        sampler="repaint", nfe=settings.spec.nfe(methods.SamplerSpec("ddpm", steps=steps)),
        guidance="classifier", scale=float(dc.inpaint_scale), samples=npz, group="inpaint",
        model=f"conditional, inpainting ({dc.inpaint_mask} kept, another digit)",
    )  # fmt: skip
    row.update(metrics_fn(npz))
    return row


def sampler_table(config, sample_cfg, dirs, metrics_fn, workdir: str) -> str:
    """Every sampler x NFE of ``demo.table_samplers`` x ``demo.table_nfe`` on the demo model
    (conditional, classifier scale ``demo.fast_scale``; "name:correction" picks an x_0
    correction, else the sampler's own), ``demo.table_samples`` samples per point: FID /
    precision / recall / accuracy and the seconds sampling took (first run, compilation
    included). Writes ``WORKDIR/sampler_table.{md,json}``."""
    dc, rows = config.demo, []
    sample_cfg = copy.deepcopy(sample_cfg)
    num = int(dc.table_samples)
    labels = sample_cfg.sample.class_labels.split(",")[:num]
    sample_cfg.sample.num_samples, sample_cfg.sample.class_labels = num, ",".join(labels)
    for entry in [s.strip() for s in str(dc.table_samplers).split(",") if s.strip()]:
        name, _, correction = entry.partition(":")
        for nfe in [int(s) for s in str(dc.table_nfe).split(",") if s.strip()]:
            steps = (nfe + 1) // 2 if name == "heun" else nfe  # EDM Heun: 2 * steps - 1 NFE
            tag = f"{name.replace('++', 'pp')}{nfe}" + (f"_{correction}" if correction else "")
            group = dict(name=f"table/{tag}", guidance="classifier", scales=str(dc.fast_scale),
                         cfg_scale=None, samplers=name, steps=str(steps))  # fmt: skip
            cfg = _group_config(sample_cfg, group, dirs["samples"])
            cfg.sample.x0_correction = correction
            seconds_file = paths.path(cfg.sample.output_dir) / "seconds.json"
            start = time.perf_counter()
            (row,) = evaluation.guidance_sweep(cfg, dirs["diffusion"], metrics_fn=metrics_fn)
            if not seconds_file.exists():
                _write_json(seconds_file, {"seconds": round(time.perf_counter() - start, 1)})
            row["seconds"] = json.loads(seconds_file.read_text())["seconds"]
            row["nfe"] = 2 * steps - 1 if name == "heun" else steps
            row["x0_correction"] = correction or "default"
            rows.append(row)
    lines = [
        f"| Sampler | x_0 correction | NFE | FID (judge features) | Precision | Recall "
        f"| Target accuracy | Seconds ({num} samples) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    order = lambda r: (methods.SAMPLERS.index(r["sampler"]), r["x0_correction"], r["nfe"])
    for r in sorted(rows, key=order):
        spec = recipe.sampler_spec({"sampler": r["sampler"]})
        correction = r["x0_correction"].replace("default", f"{spec.correction} (default)")
        lines.append(
            f"| {spec.label.rsplit('-', 1)[0]} | {correction} | {r['nfe']} | {r['fid']:.2f} "
            f"| {r['precision']:.3f} | {r['recall']:.3f} | {r['accuracy']:.3f} "
            f"| {r['seconds']:.0f} |"
        )
    table = "\n".join(lines)
    out = paths.path(workdir)
    _write_json(out / "sampler_table.json", {"rows": rows, "note": NOT_INCEPTION})
    paths.write_text_atomic(out / "sampler_table.md", table + "\n\n" + NOT_INCEPTION + "\n")
    return table


def _digit_grid(images: np.ndarray, labels: np.ndarray, num_classes: int, per_row: int = 10):
    """One row per target digit (its first ``per_row`` samples), blank where there are none.

    Shows the channel mean: the grey digit itself (1 channel), as the judge sees it.
    """
    images = np.round(np.mean(images, axis=-1, keepdims=True)).astype(np.uint8)
    _, h, w, c = images.shape
    grid = np.full((num_classes * h, per_row * w, c), 255, np.uint8)
    for digit in range(num_classes):
        for j, i in enumerate(np.flatnonzero(labels == digit)[:per_row]):
            grid[digit * h : (digit + 1) * h, j * w : (j + 1) * w] = images[i]
    return grid


def _save_png(path: paths.PathLike, image: np.ndarray, scale: int = 2) -> None:
    from PIL import Image

    image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    if image.shape[-1] == 1:
        image = image[..., 0]
    with paths.open_atomic(path) as f:
        Image.fromarray(image).save(f, format="PNG")


def _metrics_fn(config, judge_module, judge_params, ref_features):
    """``npz path -> {fid, precision, recall, accuracy}`` on the judge's features."""
    from adm_jax.evaluation.metrics import metrics_from_features
    from adm_jax.sampling import load_samples_npz

    def metrics(npz_path: str) -> dict[str, float]:
        images, targets = load_samples_npz(npz_path)
        out = classify_digits(judge_module, judge_params, images)
        m = metrics_from_features(
            ref_features, out["features"], nhood_size=int(config.demo.nhood_size)
        )
        grid = _digit_grid(images, targets, int(config.demo.num_classes))
        _save_png(paths.path(npz_path).parent / "grid.png", grid)
        return {
            "fid": float(m["fid"]),
            "precision": float(m["precision"]),
            "recall": float(m["recall"]),
            "accuracy": target_accuracy(out["pred"], targets),
        }

    return metrics


def _plot_losses(dirs: Mapping[str, str], path: paths.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adm_jax.train.metrics import read_metrics

    panels = [
        ("diffusion model: loss = mse + vb", dirs["diffusion"], ("loss", "mse", "vb"), "log"),
        ("noisy classifier (x_t at random t)", dirs["classifier"], ("loss", "acc@1"), "linear"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, (title, run_dir, names, yscale) in zip(axes, panels, strict=True):
        rows = read_metrics(run_dir)
        steps = sorted(rows)
        for name in names:
            key = f"train/{name}"
            pts = [(s, rows[s][key]) for s in steps if isinstance(rows[s].get(key), float)]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=name)
        ax.set_yscale(yscale)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    paths.write_bytes_atomic(path, png.getvalue())


def real_reference_row(
    judge_module, judge_params, real_features, images, labels, *, num, nhood_size, seed=0
) -> dict[str, Any]:
    """The metrics of ``num`` real training digits against the held-out ones: the best a
    model can score in this feature space with this many samples (P/R below 1, FID above 0)."""
    from adm_jax.evaluation.metrics import metrics_from_features

    idx = np.random.default_rng(seed).choice(len(images), min(num, len(images)), replace=False)
    out = classify_digits(judge_module, judge_params, images[idx])
    m = metrics_from_features(real_features, out["features"], nhood_size=nhood_size)
    return {
        "model": "real digits",
        "scale": "",
        "fid": float(m["fid"]),
        "precision": float(m["precision"]),
        "recall": float(m["recall"]),
        "accuracy": target_accuracy(out["pred"], labels[idx]),
    }


def format_table(
    rows: Sequence[Mapping[str, Any]], reference: Mapping[str, Any] | None = None
) -> str:
    """The Table 4-style markdown table of the sweep (``reference``: a last row, real digits)."""
    lines = [
        "| Model | Guidance | Sampler | Scale | FID (judge features) | Precision | Recall "
        "| Target accuracy |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in [*rows, *([reference] if reference else [])]:
        scale = f"{r['scale']:g}" if isinstance(r["scale"], (int, float)) else r["scale"]
        sampler = f"{sampler_name(r['sampler'])}-{r['nfe']}" if r.get("sampler") else ""
        if r.get("x0_correction"):
            sampler += f" (x_0 {r['x0_correction']})"
        lines.append(
            f"| {r.get('model', '')} | {r.get('guidance', '')} | {sampler} | {scale} "
            f"| {r['fid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['accuracy']:.3f} |"
        )
    return "\n".join(lines)


def sampler_name(name: str) -> str:
    """ "DDPM", "DPM-Solver++", "DPM++(2M)-SDE", "RePaint", ... (the table's Sampler column)."""
    if name == "repaint":
        return "RePaint"
    if name == "dpm++":
        return "DPM-Solver++"
    return recipe.sampler_spec({"sampler": name}).label.rsplit("-", 1)[0]


# ----------------------------------------------------------------------------- entry point


def _judge_stage(stage, dc, seed: int, judge_dir: str, train_digits, test_digits):
    """Stage 4: the independent digit classifier, trained on the clean training digits (or
    reused from ``judge_dir``); returns (module, params, meta)."""
    (train_images, train_labels), (test_images, test_labels) = train_digits, test_digits
    judge_config = {
        k: dc[k]
        for k in (
            "judge_steps",
            "judge_batch_size",
            "judge_lr",
            "judge_width",
            "judge_features",
            "num_classes",
        )
    }
    judge_config["seed"] = seed
    judge_json = paths.path(judge_dir) / "judge.json"
    if judge_json.exists():
        _check_reusable(judge_json, json.loads(judge_json.read_text()).get("config"), judge_config)
        stage.skip("reusing " + judge_dir)
    else:
        with stage:
            module, params = train_judge(
                train_images,
                train_labels,
                steps=int(dc.judge_steps),
                batch_size=int(dc.judge_batch_size),
                lr=float(dc.judge_lr),
                width=int(dc.judge_width),
                features=int(dc.judge_features),
                num_classes=int(dc.num_classes),
                seed=seed,
            )
            acc = target_accuracy(classify_digits(module, params, test_images)["pred"], test_labels)
            _say(f"    judge accuracy on the {len(test_images)} held-out digits: {acc:.3f}")
            meta = dict(
                width=module.width,
                features=module.features,
                num_classes=module.num_classes,
                test_accuracy=acc,
                config=judge_config,
            )
            save_judge(judge_dir, params, meta)
    return load_judge(judge_dir)


def _sample_rows(config, sample_cfg, groups, dirs, metrics_fn, test_digits) -> list[dict]:
    """Stage 5: guided sampling for every row group (resumable shards) and the inpainting row,
    with the metrics of each."""
    rows = []
    for group in groups:
        _say(f"    {group['model']} model, {group['guidance']} guidance, "
             f"scales {group['scales']}")  # fmt: skip
        for r in evaluation.guidance_sweep(
            _group_config(sample_cfg, group, dirs["samples"]),
            dirs["diffusion"],
            metrics_fn=metrics_fn,
        ):
            r.update(group=group["name"], model=group["model"], guidance=group["guidance"])
            if group.get("x0_correction"):
                r["x0_correction"] = group["x0_correction"]
            rows.append(r)
    dc = config.demo
    if str(dc.inpaint_mask).strip():
        _say(f"    inpainting: {dc.inpaint_mask} of each held-out digit kept, another digit")
        test_images, test_labels = test_digits
        rows.append(inpaint_row(config, sample_cfg, dirs, test_images, test_labels, metrics_fn))
    return rows


def _write_results(workdir, config, sample_cfg, dirs, rows, judge, real_features, digits):
    """Stage 6: metrics.json, metrics.md, real_digits.png and loss.png in ``workdir``; returns
    the table. ``judge``: (module, params, meta); ``digits``: the (train, test) digits."""
    dc = config.demo
    judge_module, judge_params, judge_meta = judge
    (train_images, train_labels), (test_images, test_labels) = digits
    prefix = str(workdir).rstrip("/") + "/"
    for r in rows:  # relative to the workdir
        grid = str(paths.path(r.pop("samples")).parent / "grid.png")
        r["grid"] = grid[len(prefix) :] if grid.startswith(prefix) else grid
    real_row = real_reference_row(
        judge_module,
        judge_params,
        real_features,
        train_images,
        train_labels,
        num=int(sample_cfg.sample.num_samples),
        nhood_size=int(dc.nhood_size),
    )
    reference = {
        "real_digits_row": real_row,
        "num_reference_digits": len(test_images),
        "judge_test_accuracy": judge_meta["test_accuracy"],
        "num_samples_per_scale": int(sample_cfg.sample.num_samples),
    }
    table = format_table(rows, real_row)
    out = paths.path(workdir)
    _write_json(out / "metrics.json", {"rows": rows, **reference, "note": NOT_INCEPTION})
    paths.write_text_atomic(
        out / "metrics.md", table + "\n\n" + REAL_ROW_NOTE + "\n\n" + NOT_INCEPTION + "\n"
    )
    real_grid = _digit_grid(test_images, test_labels, int(dc.num_classes))
    _save_png(out / "real_digits.png", real_grid)
    _plot_losses(dirs, out / "loss.png")
    return table


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """Runs (or completes) the whole demo in ``workdir``; returns the metric rows per scale."""
    from adm_jax import data as data_lib
    from adm_jax import train

    config = copy.deepcopy(config)
    workdir = paths.absolute(workdir)  # local or gs://
    paths.path(workdir).mkdir(parents=True, exist_ok=True)
    dirs = {
        name: str(paths.path(workdir) / name)
        for name in ("diffusion", "classifier", "judge", "samples")
    }
    with_sampler_table = bool(config.demo.get("sampler_table", False))
    stages = _Stages(7 if with_sampler_table else 6)
    _say(f"ADM demo in {workdir} on {jax.device_count()} {jax.default_backend()} device(s)")

    # 1. Data: the digits as a TFDS ArrayRecord dataset, read by the ImageNet pipeline.
    with stages(1, "prepare the mnist_demo TFDS dataset"):
        data_lib.prepare_demo_dataset(data_dir_for(config, workdir))

    # 2-3. The diffusion model and its noisy classifier, with the ImageNet training loops.
    diff_cfg = diffusion_config(config, workdir)
    _train_stage(
        stages(2, f"train the diffusion model ({diff_cfg.train.num_steps} steps)"),
        train.train_and_evaluate,
        diff_cfg,
        dirs["diffusion"],
    )
    cls_cfg = classifier_run_config(config, workdir)
    _train_stage(
        stages(3, f"train the noisy classifier ({cls_cfg.train.num_steps} steps)"),
        train.train_classifier,
        cls_cfg,
        dirs["classifier"],
    )

    # 4. The independent judge on clean digits; the held-out digits' features.
    dc = config.demo
    stage = stages(4, f"train the independent digit classifier ({dc.judge_steps} steps)")
    test_digits = _load_images(diff_cfg.data, "test")
    # The judge trains on these; stage 6 scores a draw of them as the "real digits" row.
    train_digits = _load_images(diff_cfg.data, "train")
    seed = int(diff_cfg.train.seed)
    judge = _judge_stage(stage, dc, seed, dirs["judge"], train_digits, test_digits)
    judge_module, judge_params, judge_meta = judge
    real = classify_digits(judge_module, judge_params, test_digits[0])

    # 5-6. Guided sampling for every row group (resumable shards) and the metrics per row.
    sample_cfg = _sample_config(config, workdir, dirs)
    groups = row_groups(config)
    metrics_fn = _metrics_fn(config, judge_module, judge_params, real["features"])
    with stages(5, f"sampling + metrics: {', '.join(g['name'] for g in groups)}"):
        rows = _sample_rows(config, sample_cfg, groups, dirs, metrics_fn, test_digits)
    with stages(6, "write the table and plots"):
        digits = (train_digits, test_digits)
        table = _write_results(
            workdir, config, sample_cfg, dirs, rows, judge, real["features"], digits
        )
    if with_sampler_table:
        with stages(7, "sampler table: every sampler x NFE"):
            _say(sampler_table(config, sample_cfg, dirs, metrics_fn, workdir))
    _record_timings(paths.path(workdir) / "timings.json", stages)

    _say("\n" + table + "\n")
    _say(
        f"Judge accuracy on the {len(test_digits[0])} held-out real digits: "
        f"{judge_meta['test_accuracy']:.3f}. {NOT_INCEPTION}"
    )
    _say(
        f"Grids: {workdir}/samples/<group>/scale_*/grid.png; table: {workdir}/metrics.md; "
        f"loss curves: {workdir}/loss.png; this run: {stages.wall() / 60:.1f} min"
    )
    return rows


def default_config_path() -> str:
    """configs/demo.py of this checkout."""
    return os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py"
    )


def main(argv: Sequence[str]) -> None:
    del argv
    from absl import flags

    run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    import sys

    from absl import app, flags
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", "demo_workdir", "Where the demo writes everything.")
    # configs/demo.py imports `from configs import default`: make this checkout's configs/
    # importable wherever the command runs.
    sys.path.insert(0, os.path.dirname(os.path.dirname(default_config_path())))
    config_flags.DEFINE_config_file("config", default_config_path(), "The demo config.")
    app.run(main)
