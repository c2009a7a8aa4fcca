"""adm_jax.bench on the tiny config with the cpu preset: the JSON fields a report relies on,
FLOPs cross-checked against an analytic count and against the reference's published forward
FLOPs of ImageNet-128 (traced abstractly: nothing of that size is allocated or compiled)."""

import json
import math
import pathlib
import subprocess
import sys

import jax
import pytest

from adm_jax.benchmark import (
    aot,
    batch_search,
    config_files,
    devices,
    flops,
    report,
    runner,
    sampling,
    timing,
    topology,
)
from adm_jax.diffusion import methods
from adm_jax.recipe import config as config_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def test_demo_config_splits_into_valid_run_configs():
    """configs/demo.py (extra sections: classifier, demo, mode) benchmarks as a diffusion run
    plus its embedded classifier run, both passing the train checks."""
    from adm_jax.recipe import config as config_lib

    run_config, classifier = config_files.split_config(
        config_files.load_config(str(CONFIGS / "demo.py"))
    )
    config_lib.validate_config(run_config, num_devices=1, mode="train")
    config_lib.validate_config(classifier, num_devices=1, mode="train_classifier")


@pytest.fixture(scope="module")
def tiny_result():
    config = config_files.load_config(str(CONFIGS / "tiny.py"))
    config.model.dropout = 0.0  # no dropout RNG in the step: a shorter compile, same FLOPs
    classifier = config_files.load_config(str(CONFIGS / "tiny.py") + ":classifier")
    return runner.run(
        config,
        what=("train", "sample"),
        preset="cpu",
        num_steps=2,
        classifier_config=classifier,
        # Compile time does not depend on the number of steps; one sampler keeps the test
        # short (the CLI default is DDPM-250, DDIM-25, DPM-Solver++ 10 and 20).
        samplers=("dpm++3",),
        num_devices=1,  # one device compiles fastest; the mesh code path is the same
    )


def test_train_fields(tiny_result):
    t = tiny_result["train"]
    assert t["mesh"] == {"data": 1, "fsdp": 1}
    assert t["global_batch"] == 1 and t["batch_per_device"] == 1
    assert t["step_time_s"] > 0 and t["compile_s"] > 0
    assert t["images_per_s_per_device"] == pytest.approx(1 / t["step_time_s"])
    # The inference forward alone: cheaper than the whole step.
    assert 0 < t["forward_time_s"] < t["step_time_s"]
    assert t["forward_images_per_s"] == pytest.approx(1 / t["forward_time_s"])
    assert t["loss_finite"]
    # On CPU there is no peak FLOP/s, hence no MFU.
    assert tiny_result["environment"]["backend"] == "cpu"
    assert t["mfu"] == devices.NA and t["mfu_model"] == devices.NA
    assert t["peak_flops_per_device"] == devices.NA
    assert t["memory"]["peak_bytes_in_use"] > 0


def test_train_without_forward(tiny_result):
    """forward=False (``--noforward``) skips the forward's compile: its fields say n/a, the
    printed table too, and the step is timed as before."""
    config = config_files.load_config(str(CONFIGS / "tiny.py"))
    config.model.dropout = 0.0
    mesh = config_files.make_mesh(config, num_devices=1)
    t = timing.train_benchmark(
        config, mesh, batch_per_device=1, num_steps=1, warmup=0, forward=False
    )
    assert t["forward_time_s"] == t["forward_images_per_s"] == devices.NA
    assert t["step_time_s"] > 0 and t["loss_finite"]
    table = report.format_table({**tiny_result, "train": t})
    assert "forward (median)   n/a, n/a images/s" in table


def test_train_flops_match_analytic_count(tiny_result):
    t = tiny_result["train"]
    assert t["flops_per_image_xla"] > 0 and t["forward_flops_per_image_analytic"] > 0
    # A train step is a forward and a backward (about twice the forward): XLA's count of the
    # compiled step (elementwise ops and AdamW included) must be ~3x the analytic forward.
    ratio = t["flops_per_image_xla"] / t["forward_flops_per_image_analytic"]
    assert 2.5 < ratio < 5.0, f"train step / forward FLOPs = {ratio:.3f}"
    assert t["reference_model"] is None  # the tiny model is not a released one


def test_sample_fields(tiny_result):
    """DPM-Solver++ 3 steps unguided, classifier-guided and classifier-free guided (tiny is
    class-conditional); time per image and per model evaluation."""
    s = tiny_result["sample"]
    assert s["guided"] and [r["guidance"] for r in s["runs"]] == ["none", "classifier", "cfg"]
    for r in s["runs"]:
        assert r["sampler"] == "DPM-Solver++(2M)-3" and r["nfe"] == 3 and r["batch"] == 1
        assert r["per_step_s"] == pytest.approx(r["time_s"] / 3)
        assert r["per_image_s"] == pytest.approx(r["time_s"])
        assert r["per_eval_per_image_s"] > 0 and r["images_per_s"] > 0
    overhead = s["guidance_overhead"]["dpmpp3"]
    by = {r["guidance"]: r for r in s["runs"]}
    for kind in ("classifier", "cfg"):
        assert overhead[kind] == pytest.approx(by[kind]["per_step_s"] / by["none"]["per_step_s"])
        assert overhead[kind] > 0 and math.isfinite(overhead[kind])
    flops = s["guidance_overhead_flops_estimate"]
    assert flops["classifier"] > 1.0 and flops["cfg"] == 2.0
    assert "classifier " in report.format_table(tiny_result)


def test_sample_benchmark_times_new_samplers():
    """Two k-diffusion samplers time through the program --mode=sample compiles, each with the
    config's sample options (here sample.sigma_grid) as --mode=sample would run it."""
    config = config_files.load_config(str(CONFIGS / "tiny.py"))
    config.sample.sigma_grid = "discrete"
    mesh = config_files.make_mesh(config, num_devices=1)
    s = sampling.sample_benchmark(
        config, mesh, batch_per_device=1, samplers=("euler_ancestral2", "dpmpp_2m_sde2"),
        repeats=1, guidance=("none",), init="zeros",
    )  # fmt: skip
    assert [(r["method"], r["nfe"], r["guidance"]) for r in s["runs"]] == [
        ("euler_ancestral", 2, "none"),
        ("dpmpp_2m_sde", 2, "none"),
    ]
    for r in s["runs"]:
        assert r["options"]["sigma_grid"] == "discrete"
        assert r["per_image_s"] > 0 and r["images_nonconstant"]


def test_sampler_names_as_mode_sample_reads_them():
    """Every name of methods.SAMPLERS is accepted, with an NFE or bare (NFE from
    sample.steps); an unknown one is a one-line error listing the valid names."""
    config = config_files.load_config(str(CONFIGS / "tiny.py"))
    config.sample.steps = 7
    tags = [f"{name}5" for name in methods.SAMPLERS] + list(methods.SAMPLERS)
    specs = sampling.sampler_specs(config.sample, tags)
    assert [s.name for s in specs] == list(methods.SAMPLERS) * 2
    assert specs[0].respacing == "5" and specs[1].respacing == "ddim5"
    assert all(s.steps == 5 for s in specs[2 : len(methods.SAMPLERS)])
    assert all(s.steps == 7 for s in specs[len(methods.SAMPLERS) + 2 :])
    # EDM Heun evaluates the network twice per step but the last.
    heun = sampling.sampler_specs(config.sample, ["heun10"])[0]
    diffusion = config_lib.build_diffusion(config, timestep_respacing=heun.respacing)
    assert sampling.model_evaluations(heun, diffusion) == 19
    with pytest.raises(ValueError) as err:
        sampling.sampler_specs(config.sample, ["dpmpp_3m20"])
    message = str(err.value)
    assert "\n" not in message and message.startswith("--samplers:")
    assert all(name in message for name in methods.SAMPLERS)


def test_bench_cli_unknown_sampler_is_one_line(tmp_path):
    """python -m adm_jax.bench --samplers=<unknown>: exit code 2 and one line, before any
    compile."""
    result = subprocess.run(
        [sys.executable, "-m", "adm_jax.bench", f"--config={CONFIGS / 'tiny.py'}",
         "--what=sample", "--preset=cpu", "--samplers=heun10,lms20"],
        capture_output=True, text=True, cwd=CONFIGS.parent, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("adm_jax.bench")]
    assert len(lines) == 1 and "'lms20'" in lines[0] and "dpmpp_2m_sde" in lines[0], lines
    assert "Traceback" not in result.stderr


def test_json_serialisable(tiny_result):
    back = json.loads(report.to_json(tiny_result))
    assert back["train"]["mfu"] == "n/a"
    assert "step time" in report.format_table(tiny_result)


def test_analytic_forward_flops_match_reference_imagenet128():
    """Our ImageNet-128 UNet, traced with abstract params, against the reference's
    torch.utils.flop_counter total (published_models.json: 128x128_diffusion)."""
    config = config_files.load_config(str(CONFIGS / "imagenet128.py"))
    entry = flops.published_entry(config)
    assert entry is not None, "no published_models.json entry matches configs/imagenet128.py"
    assert entry["name"] == "128x128_diffusion"
    module = config_lib.build_model(config, dtype=jax.numpy.float32)
    analytic = flops.forward_flops_per_image(module)
    ref = entry["flops_forward_batch1"]
    assert analytic == pytest.approx(ref, rel=1e-3), (
        f"analytic {analytic:.6g} vs reference {ref:.6g}"
    )


def test_find_max_batch_doubling_then_bisection():
    calls = []

    def fits(b):
        calls.append(b)
        return b <= 37

    found = batch_search.find_max_batch(fits, limit=1024)
    assert found["max_batch"] == 37 and found["first_failing"] == 38
    assert calls[:7] == [1, 2, 4, 8, 16, 32, 64]
    assert batch_search.find_max_batch(lambda b: False)["max_batch"] == 0
    assert batch_search.find_max_batch(lambda b: True, limit=48)["max_batch"] == 48
    coarse = batch_search.find_max_batch(fits, limit=1024, resolution=1 / 8)
    assert 32 <= coarse["max_batch"] <= 37 and coarse["first_failing"] - coarse["max_batch"] <= 4


def test_max_batch_not_available_without_memory_limit():
    config = config_files.load_config(str(CONFIGS / "tiny.py"))
    mesh = config_files.make_mesh(config, 1)
    out = batch_search.max_batch(config, mesh)
    assert out["max_batch_per_device"] == devices.NOT_AVAILABLE


# --------------------------------------------------------------------------------------------
# Compile-only fit on TPU slices (needs libtpu, not a TPU; skipped where it is not installed).

requires_libtpu = pytest.mark.skipif(
    not topology.libtpu_available(), reason="libtpu (the TPU compiler) is not installed"
)


F, T = False, True


@pytest.mark.parametrize(
    "name, chips, desc, wrap",
    [
        ("v4-8", 4, "v4:2x2x1", (F, F, F)),
        ("v4-32", 16, "v4:2x2x4", (F, F, F)),
        ("v5p-8", 4, "v5p:2x2x1", (F, F, F)),
        ("v5p-128", 64, "v5p:4x4x4", (T, T, T)),
        ("v5e-8", 8, "v5e:2x4", (F, F, F)),
        ("v5litepod-16", 16, "v5e:4x4", (F, F, F)),
        ("v6e-1", 1, "v6e:1x1", (F, F, F)),
        ("v6e-256", 256, "v6e:16x16", (T, T, F)),
    ],
)
def test_parse_tpu_slice(name, chips, desc, wrap):
    """Cloud TPU names count TensorCores on v4/v5p (2 per chip) and chips on v5e/v6e; full
    cubes (v4/v5p) and 16-chip rows (v5e/v6e) wrap around."""
    s = topology.parse_tpu_slice(name)
    assert (s.num_chips, s.topology, s.wrap) == (chips, desc, wrap)


@pytest.mark.parametrize("name", ["v5p", "v5p-6", "v4-4", "v3-8", "tpu-8", "v6e-512", "v5e-x"])
def test_parse_tpu_slice_rejects(name):
    with pytest.raises(ValueError, match="--topology"):
        topology.parse_tpu_slice(name)


def test_hbm_oom_parses_both_compiler_wordings():
    """The TPU compiler's out-of-HBM refusal becomes bytes (a "does not fit" result); any
    other compile error is not swallowed."""
    new_style = RuntimeError(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (100.5G) exceeds available HBM (95.74G)."
    )
    oom = aot.hbm_oom(new_style)
    assert oom["hbm_required_bytes"] == int(100.5 * 2**30)
    assert oom["compiler_hbm_capacity_bytes"] == int(95.74 * 2**30)
    old_style = RuntimeError(
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
        "hbm. Used 40.00G of 30.75G hbm. Exceeded hbm capacity by 9.25G.\n\n"
        "Total hbm usage >= 41.25G:\n    reserved 1.25G\n    program 40.00G"
    )
    oom = aot.hbm_oom(old_style)
    assert oom["hbm_required_bytes"] == int(41.25 * 2**30)
    assert oom["compiler_hbm_capacity_bytes"] == int(30.75 * 2**30)
    assert aot.hbm_oom(RuntimeError("INTERNAL: Used 1G of 2G hbm")) is None
    assert aot.hbm_oom(RuntimeError("RESOURCE_EXHAUSTED: host memory")) is None


def test_xla_estimate_kept_only_when_the_chip_could_achieve_it():
    """libtpu's cost model returned -284 s (ImageNet-128, v4-8) and, for an FSDP mesh, a time
    below what the program's FLOPs need at the chip's peak (ImageNet-256, v5p-8): such values
    are reported as rejected, with the reason, and give no MFU."""
    v5p = topology.parse_tpu_slice("v5p-8")
    floor = 4.0e14 / v5p.generation.peak_bf16_flops
    assert aot._checked_estimate(2 * floor, 4.0e14, v5p) == {"xla_estimated_seconds": 2 * floor}
    assert aot._checked_estimate(None, 4.0e14, v5p) == {"xla_estimated_seconds": None}
    for bad, why in ((-284.3, "not a duration"), (0.5 * floor, "below the")):
        out = aot._checked_estimate(bad, 4.0e14, v5p)
        assert out["xla_estimated_seconds"] is None and why in out["xla_estimate_rejected"]
    part = {"xla_estimated_seconds": None, "xla_estimate_rejected": "negative"}
    assert report._estimate_cell(part, 3) == "rejected"


def test_find_max_batch_from_a_failing_start_and_probe_cap():
    """The AOT search starts at the config's batch: halving when it does not fit, and at most
    max_probes compiles, with an inexact bracket when the cap cuts it short."""
    fits = lambda b: b <= 37  # noqa: E731
    down = batch_search.find_max_batch(fits, start=256)
    assert down["max_batch"] == 37 and down["first_failing"] == 38 and down["exact"]
    assert [b for b, _ in down["probes"][:4]] == [256, 128, 64, 32]
    capped = batch_search.find_max_batch(fits, start=256, max_probes=5)
    assert len(capped["probes"]) == 5 and not capped["exact"]
    assert capped["max_batch"] == 32 and capped["first_failing"] == 48
    up = batch_search.find_max_batch(fits, start=4, max_probes=3)
    assert up["probes"] == [(4, True), (8, True), (16, True)] and up["max_batch"] == 16
    assert up["first_failing"] is None and not up["exact"]
    assert batch_search.find_max_batch(lambda b: False, start=8)["max_batch"] == 0


def test_aot_needs_topology():
    config = config_files.load_config(str(CONFIGS / "tiny.py"))
    with pytest.raises(ValueError, match="--topology"):
        runner.run(config, what=("aot",), num_devices=1)
    with pytest.raises(ValueError, match="--topology"):
        runner.run(config, what=("aot",), topology=["v5p-7"], num_devices=1)


@requires_libtpu
def test_topology_devices_and_peaks():
    """One compile-only device per chip, of the right kind; the HBM/peak table agrees with
    the peaks the train loop's MFU uses."""
    from adm_jax.train import metrics

    kinds = {"v4-8": "TPU v4", "v5e-8": "TPU v5 lite", "v5p-8": "TPU v5", "v6e-8": "TPU v6 lite"}
    for name, kind in kinds.items():
        s = topology.parse_tpu_slice(name)
        devices = topology.topology_devices(s)
        assert len(devices) == s.num_chips and devices[0].device_kind == kind
        assert metrics.peak_flops_per_device(devices[0]) == s.generation.peak_bf16_flops


def _aot_config():
    """configs/tiny.py without dropout and with one EMA (a shorter TPU compile: about a minute
    per program on a shared 2-core CPU)."""
    config = config_files.load_config(str(CONFIGS / "tiny.py"))
    config.model.dropout = 0.0
    config.train.ema_rate = "0.9999"
    config.train.dtype = "bfloat16"
    config.sample.timestep_respacing = "ddim2"
    return config


@requires_libtpu
@pytest.mark.slow
def test_aot_report_fields_consistent():
    """Train step (on the config's mesh: fsdp 2 over v5p-8's 4 chips, batch 8 -> 2 per chip)
    and the guided sampling program compiled for a TPU slice without a TPU: memory parts add
    up, fits == total <= HBM, the largest batch is at least the one that fits, FLOPs > 0,
    the compiler's step-time estimate and its MFU are positive."""
    config = _aot_config()
    classifier = config_files.load_config(str(CONFIGS / "tiny.py") + ":classifier")
    logs = []
    result = runner.run(
        config,
        what=("aot",),
        topology=["v5p-8"],
        classifier_config=classifier,
        aot_max_compiles=1,
        num_devices=1,
        log=logs.append,
    )
    (e,) = result["aot"]["slices"]
    assert e["slice"] == "v5p-8" and e["chips"] == 4 and e["device_kind"] == "TPU v5"
    hbm = 95 * 2**30
    assert e["hbm_bytes_per_chip"] == hbm
    t = e["train"]
    assert t["mesh"] == {"data": 2, "fsdp": 2} and t["batch_per_chip"] == 2
    assert t["global_batch"] == 8 and t["compile_s"] > 0
    for part in (t, e.get("sample")):
        mem = part["memory"]
        assert 0 < mem["temp_bytes"] + mem["argument_bytes"] <= mem["total_bytes"]
        assert part["fits"] == (mem["total_bytes"] <= hbm)
        assert part["flops_per_chip"] > 0 and part["xla_estimated_seconds"] > 0
    assert t["fits"]
    assert 0 < t["xla_estimated_mfu_model"] < 1 and 0 < t["xla_estimated_mfu"] < 1
    assert t["flops_per_image_xla"] == pytest.approx(t["flops_per_chip"] / 2)
    m = e["max_batch"]
    assert m["compiles"] == 1 and m["probes"][:2] == [(2, True), (4, True)]
    assert m["max_batch_per_chip"] >= t["batch_per_chip"]
    # More examples per chip cost more memory.
    sizes = m["bytes_by_batch"]
    assert sizes["4"]["total_bytes"] > sizes["2"]["total_bytes"]
    assert sizes["4"]["compile_s"] > 0 and sizes["2"]["compile_s"] is None
    s = e["sample"]
    assert s["guidance"] == "classifier" and s["nfe"] == 2
    assert s["mesh"] == {"data": 4, "fsdp": 1} and s["global_batch"] == 4
    assert any("compiling" in line for line in logs)
    table = report.format_table(result)
    assert "| v5p-8 | 4 | 2 |" in table and "XLA est." in table
    json.loads(report.to_json(result))
