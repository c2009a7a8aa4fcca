"""adm_jax.bench on the tiny config with the cpu preset: the JSON fields a report relies on,
FLOPs cross-checked against an analytic count and against the reference's published forward
FLOPs of ImageNet-128 (traced abstractly: nothing of that size is allocated or compiled)."""

import json
import math
import pathlib

import jax
import pytest

from adm_jax import bench_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def test_demo_config_splits_into_valid_run_configs():
    """configs/demo.py (extra sections: classifier, demo, mode) benchmarks as a diffusion run
    plus its embedded classifier run, both passing the train checks."""
    from adm_jax.train import config_lib

    run_config, classifier = bench_lib.split_config(bench_lib.load_config(str(CONFIGS / "demo.py")))
    config_lib.validate_config(run_config, num_devices=1, mode="train")
    config_lib.validate_config(classifier, num_devices=1, mode="train_classifier")


@pytest.fixture(scope="module")
def tiny_result():
    config = bench_lib.load_config(str(CONFIGS / "tiny.py"))
    config.model.dropout = 0.0  # no dropout RNG in the step: a shorter compile, same FLOPs
    classifier = bench_lib.load_config(str(CONFIGS / "tiny.py") + ":classifier")
    return bench_lib.run(
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
    assert t["loss_finite"]
    # On CPU there is no peak FLOP/s, hence no MFU.
    assert tiny_result["environment"]["backend"] == "cpu"
    assert t["mfu"] == bench_lib.NA and t["mfu_model"] == bench_lib.NA
    assert t["peak_flops_per_device"] == bench_lib.NA
    assert t["memory"]["peak_bytes_in_use"] > 0


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
    assert "classifier " in bench_lib.format_table(tiny_result)


def test_json_serialisable(tiny_result):
    back = json.loads(bench_lib.to_json(tiny_result))
    assert back["train"]["mfu"] == "n/a"
    assert "step time" in bench_lib.format_table(tiny_result)


def test_analytic_forward_flops_match_reference_imagenet128():
    """Our ImageNet-128 UNet, traced with abstract params, against the reference's
    torch.utils.flop_counter total (published_models.json: 128x128_diffusion)."""
    config = bench_lib.load_config(str(CONFIGS / "imagenet128.py"))
    entry = bench_lib.published_entry(config)
    if entry is None:
        pytest.skip("published_models.json not found (set ADM_JAX_GOLDEN_DIR)")
    assert entry["name"] == "128x128_diffusion"
    module = bench_lib.build_module(config, dtype=jax.numpy.float32)
    flops = bench_lib.forward_flops_per_image(module)
    ref = entry["flops_forward_batch1"]
    assert flops == pytest.approx(ref, rel=1e-3), f"analytic {flops:.6g} vs reference {ref:.6g}"


def test_find_max_batch_doubling_then_bisection():
    calls = []

    def fits(b):
        calls.append(b)
        return b <= 37

    found = bench_lib.find_max_batch(fits, limit=1024)
    assert found["max_batch"] == 37 and found["first_failing"] == 38
    assert calls[:7] == [1, 2, 4, 8, 16, 32, 64]
    assert bench_lib.find_max_batch(lambda b: False)["max_batch"] == 0
    assert bench_lib.find_max_batch(lambda b: True, limit=48)["max_batch"] == 48
    coarse = bench_lib.find_max_batch(fits, limit=1024, resolution=1 / 8)
    assert 32 <= coarse["max_batch"] <= 37 and coarse["first_failing"] - coarse["max_batch"] <= 4


def test_max_batch_not_available_without_memory_limit():
    config = bench_lib.load_config(str(CONFIGS / "tiny.py"))
    mesh = bench_lib.make_mesh(config, 1)
    out = bench_lib.max_batch(config, mesh)
    assert out["max_batch_per_device"] == bench_lib.NOT_AVAILABLE
