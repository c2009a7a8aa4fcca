r"""Benchmarks: train-step throughput and MFU, sampling speed and guidance overhead, max batch.

    python -m adm_jax.bench --config=configs/imagenet128.py \
        [--what=train,sample,maxbatch,flops] [--batch=N] [--steps=N] [--json=out.json] \
        [--preset=cpu] [--classifier_config=configs/classifier128.py] \
        [--samplers=ddpm250,ddim25,dpm++10,dpm++20,heun10,...] \
        [--sample_guidance=none,classifier,cfg]
    python -m adm_jax.bench --config=configs/imagenet256.py --what=aot \
        --topology=v4-8,v5e-8,v5p-8,v6e-8 [--aot_max_compiles=4] [--config.train.remat=...]

``--batch`` is per device (default: config.train.batch_size / devices, or the preset's);
``--what=flops`` compiles the train step without running it (FLOPs per image from XLA's cost
analysis next to the analytic and published counts: works on a CPU for any config).
``--samplers`` takes any sampler of ``adm_jax.diffusion.methods.SAMPLERS`` with a step count, its
options from ``--config.sample.*`` as ``--mode=sample`` reads them (``adm_jax.benchmark.sampling``).
``--preset=cpu`` makes a run fit a small CPU in minutes (use it with configs/tiny.py):
batch 1 per device, 3 timed steps, zero-filled parameters, one timed sampling run each.
``--what=aot`` needs no TPU, only libtpu (``pip install libtpu``, the version ``jax[tpu]``
pins): it compiles the train step and the guided sampling program for each TPU slice of
``--topology`` (v4-8, v5e-8 = v5litepod-8, v5p-8, v6e-8, any power-of-two size) on the
config's mesh and batch (``--batch``: per chip), and reports per-chip HBM use, whether it fits,
the largest per-chip batch that fits, FLOPs per chip and XLA's estimated step time with the
MFU it implies. Any config field can be overridden (``--config.train.dtype=float32``). See
docs/benchmarks.md for measured figures and the accelerator commands. The work is done by the
``adm_jax.benchmark`` package (``runner.run``); this module only reads the flags.
"""

from __future__ import annotations

import sys

from adm_jax import xla_cpu

if __name__ == "__main__":
    xla_cpu.prepare_entry_point()  # may restart the process: before the imports below

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from adm_jax import paths
from adm_jax.benchmark import config_files, report, runner, sampling

_CONFIG = config_flags.DEFINE_config_file("config", None, "Diffusion (or classifier) config.")
_CLASSIFIER = flags.DEFINE_string(
    "classifier_config",
    None,
    "Classifier config for guided sampling (default: the config's pair, e.g. "
    "configs/classifier128.py for configs/imagenet128.py, configs/tiny.py:classifier for tiny; "
    "'none' to skip guidance).",
)
_WHAT = flags.DEFINE_list(
    "what", ["train", "sample"], "Any of train, sample, maxbatch, flops, aot."
)
_PRESET = flags.DEFINE_enum("preset", "", list(runner.PRESETS), "Sizes preset ('' or cpu).")
_BATCH = flags.DEFINE_integer("batch", None, "Per-device train batch.")
_STEPS = flags.DEFINE_integer("steps", None, "Timed train steps (after warm-up).")
_JSON = flags.DEFINE_string("json", None, "Write the results here as JSON.")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", None, "Per-device sampling batch.")
_SAMPLERS = flags.DEFINE_list(
    "samplers",
    None,
    "Samplers to time: a name of adm_jax.diffusion.methods.SAMPLERS with a step count (heun20, "
    "dpmpp_2m_sde10; a bare number is DDPM respaced to it) or a bare name (steps from "
    "--config.sample.steps); their options come from --config.sample.* as in --mode=sample "
    "(default ddpm250,ddim25,dpm++10,dpm++20).",
)
_RESPACINGS = flags.DEFINE_list("sample_respacings", None, "Old name of --samplers.")
_GUIDANCE = flags.DEFINE_list(
    "sample_guidance",
    list(sampling.GUIDANCE_KINDS),
    "Guidance variants to time: none, classifier (needs a classifier config), cfg "
    "(classifier-free; class-conditional models).",
)
_SCALE = flags.DEFINE_float("classifier_scale", None, "Guidance scale (default: config's).")
_CFG_SCALE = flags.DEFINE_float(
    "cfg_scale", None, "Classifier-free scale (default: config's, else 3; the cost is the same)."
)
_SAMPLE_DTYPE = flags.DEFINE_enum(
    "sample_dtype", None, ["float32", "bfloat16", "float16"], "Sampling compute dtype "
    "(default: config.train.dtype)."
)  # fmt: skip
_MEMORY = flags.DEFINE_float(
    "device_memory_gb", None, "Device memory for --what=maxbatch (default: the device's limit)."
)
_DEVICES = flags.DEFINE_integer("num_devices", None, "Use the first N devices (default: all).")
_INIT = flags.DEFINE_enum("init", None, ["real", "zeros"], "Parameter init (default: preset's).")
_TOPOLOGY = flags.DEFINE_list(
    "topology", None, "--what=aot: TPU slices to compile for (v4-8, v5e-8, v5p-8, v6e-8, ...)."
)
_AOT_MAX_COMPILES = flags.DEFINE_integer(
    "aot_max_compiles", 4, "--what=aot: compiles for the largest-batch search (0: no search)."
)
_AOT_SAMPLE = flags.DEFINE_bool("aot_sample", True, "--what=aot: also compile the sampler.")
_FORWARD = flags.DEFINE_bool(
    "forward", True, "--what=train: also time the inference forward (one more compile)."
)


def main(argv):
    del argv
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required")
    what = tuple(_WHAT.value)
    unknown = set(what) - {"train", "sample", "maxbatch", "flops", "aot"}
    if unknown:
        raise app.UsageError(f"--what: unknown {sorted(unknown)}")
    if set(what) == {"aot"}:
        # Compiling for a TPU slice runs nothing locally: keep JAX off a local TPU (a training
        # run may hold it) and quiet libtpu's search for one.
        jax.config.update("jax_platforms", "cpu")
    classifier_config = None
    spec = _CLASSIFIER.value
    samples = "sample" in what or ("aot" in what and _AOT_SAMPLE.value)
    if spec is None and samples:
        config_file = config_flags.get_config_filename(flags.FLAGS["config"])
        spec = config_files.default_classifier_spec(config_file)
    if spec and spec.lower() != "none" and samples:
        classifier_config = config_files.load_config(spec)
        logging.info("guidance classifier: %s", spec)
    try:
        result = runner.run(
            config,
            what=what,
            preset=_PRESET.value,
            batch_per_device=_BATCH.value,
            num_steps=_STEPS.value,
            classifier_config=classifier_config,
            samplers=_SAMPLERS.value,
            sample_respacings=_RESPACINGS.value,
            sample_batch_per_device=_SAMPLE_BATCH.value,
            classifier_scale=_SCALE.value,
            cfg_scale=_CFG_SCALE.value,
            sample_guidance=_GUIDANCE.value,
            sample_dtype=_SAMPLE_DTYPE.value,
            device_memory_bytes=int(_MEMORY.value * 2**30) if _MEMORY.value else None,
            num_devices=_DEVICES.value,
            init=_INIT.value,
            topology=_TOPOLOGY.value,
            aot_max_compiles=_AOT_MAX_COMPILES.value,
            aot_sample=_AOT_SAMPLE.value,
            forward=_FORWARD.value,
            log=lambda s: logging.info("%s", s),
        )
    except ValueError as err:  # a sampler, --topology or config field: one line, exit 2
        print(f"adm_jax.bench: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    result["command"] = {
        "config": config_flags.get_config_filename(flags.FLAGS["config"]),
        "classifier_config": spec,
        "what": list(what),
        "preset": _PRESET.value,
        "topology": _TOPOLOGY.value,
    }
    if _JSON.value and jax.process_index() == 0:  # first: compile-only runs take hours
        out = paths.path(_JSON.value)  # local or gs://
        out.parent.mkdir(parents=True, exist_ok=True)
        paths.write_text_atomic(out, report.to_json(result))
    print(report.format_table(result))
    if _JSON.value and jax.process_index() == 0:
        print(f"\nwrote {_JSON.value}")


if __name__ == "__main__":
    app.run(main)
