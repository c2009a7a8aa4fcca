"""Launch paths: the Colab notebook is valid and its code runs on CPU; the scripts parse."""

import json
import os
import shutil
import subprocess

import nbformat
import numpy as np
import pytest
from conftest import DEMO_SMOKE_OVERRIDES, REPO_ROOT

NOTEBOOK = REPO_ROOT / "launch" / "colab_tpu.ipynb"
# Cells that need Colab itself, a TPU, or the network.
SKIPPED_TAGS = {"install", "tpu-only", "download"}


def _cells():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    return notebook.cells


def test_notebook_is_valid_and_shell_magics_only_in_skipped_cells():
    cells = _cells()
    code = [c for c in cells if c.cell_type == "code"]
    assert {t for c in code for t in c.metadata.get("tags", [])} >= {"tpu-only", "parameters"}
    for cell in code:
        if SKIPPED_TAGS & set(cell.metadata.get("tags", [])):
            continue
        for line in cell.source.splitlines():
            assert not line.lstrip().startswith(("!", "%")), f"magic in a CPU cell: {line}"


def _tiny_reference_checkpoint(path, kind, flags):
    """A random state dict in the reference's layout for these README flags."""
    from adm_jax.convert import state_dict_spec
    from adm_jax.models import reference_kwargs_from_flags

    spec = state_dict_spec(kind, reference_kwargs_from_flags(kind, flags))
    rng = np.random.default_rng(0)
    state_dict = {
        key: (rng.standard_normal(p.torch_shape) * 0.05).astype(np.float32)
        for key, p in spec.items()
    }
    np.savez(path, **state_dict)
    return str(path)


@pytest.mark.slow
@pytest.mark.xdist_group("demo")
def test_notebook_code_runs_on_cpu(tmp_path, monkeypatch, demo_smoke_run):
    """Runs every cell a CPU can run, in order, with small parameters: the demo on a smoke
    config (in a copy of the shared smoke run's workdir, so it completes at once), then
    conversion of and guided sampling from a (random, tiny) reference-format checkpoint in
    place of the downloaded OpenAI one, DPM-Solver++, and classifier-free guidance."""
    shutil.copytree(demo_smoke_run[0], tmp_path / "demo")
    model_flags = (
        "--image_size 64 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 "
        "--attention_resolutions 32 --class_cond True --learn_sigma True "
        "--num_head_channels 16 --diffusion_steps 1000 --noise_schedule cosine"
    )
    classifier_flags = (
        "--image_size 64 --classifier_width 32 --classifier_depth 1 "
        "--classifier_attention_resolutions 8"
    )
    overrides = {
        "WORKDIR": str(tmp_path / "demo"),
        "DEMO_OVERRIDES": DEMO_SMOKE_OVERRIDES,
        "MODEL_CHECKPOINT": _tiny_reference_checkpoint(tmp_path / "m.npz", "unet", model_flags),
        "MODEL_FLAGS": model_flags,
        "CLASSIFIER_CHECKPOINT": _tiny_reference_checkpoint(
            tmp_path / "c.npz", "classifier", classifier_flags
        ),
        "CLASSIFIER_FLAGS": classifier_flags,
        "CONVERTED_DIR": str(tmp_path / "converted"),
        "LABELS": [1, 2],
        "TIMESTEP_RESPACING": "ddim3",
        "DPM_STEPS": 3,
    }
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    namespace = {"__name__": "__notebook__"}
    for cell in _cells():
        tags = set(cell.metadata.get("tags", []))
        if cell.cell_type != "code" or SKIPPED_TAGS & tags:
            continue
        exec(compile(cell.source, f"<notebook cell {cell.execution_count}>", "exec"), namespace)
        if "parameters" in tags:
            namespace.update(overrides)
    assert (tmp_path / "demo" / "openai_guided_samples.png").stat().st_size > 0
    assert (tmp_path / "converted" / "model" / "model.json").exists()
    assert (tmp_path / "demo" / "openai_dpm_solver_3.png").stat().st_size > 0
    assert (tmp_path / "demo" / "demo_classifier_free.png").stat().st_size > 0
    with open(tmp_path / "demo" / "metrics.json") as f:
        assert len(namespace["rows"]) == len(json.load(f)["rows"]) == 5


def test_gpu_bench_script_parses_and_runs_the_benchmark_through_gpu_sh():
    path = REPO_ROOT / "launch" / "gpu_bench.sh"
    assert os.access(path, os.X_OK), "gpu_bench.sh is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert "ADM_JAX_MODULE=adm_jax.bench bash launch/gpu.sh" in text
    assert 'python -m "${ADM_JAX_MODULE:-adm_jax.main}"' in (path.parent / "gpu.sh").read_text()
    for what in ("--what=maxbatch", "--what=train", "attention_impl=$impl", "--what=sample"):
        assert what in text, what


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu.sh", "slurm_gpu.sh"])
def test_launch_scripts_parse(script):
    path = REPO_ROOT / "launch" / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert "python -m adm_jax.main" in text
    assert "requirements.txt" in text
