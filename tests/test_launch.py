"""Launch paths: the Colab notebook is valid (tests/test_demo.py runs its code on CPU, beside the
demo run it reuses); the scripts parse."""

import json
import os
import re
import subprocess
import sys

import nbformat
import pytest
from conftest import REPO_ROOT

NOTEBOOK = REPO_ROOT / "launch" / "colab_tpu.ipynb"
# Cells the notebook test skips: those that need a TPU (none today). Every other cell, the
# install and download cells included, runs on the CPU in tests/test_demo.py.
SKIPPED_TAGS = {"tpu-only"}


def _cells():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    return notebook.cells


def test_notebook_is_valid_and_shell_magics_only_in_skipped_cells(monkeypatch):
    """The settings cell comes first with REPO_URL at its top, then the install cell; no shell
    magic outside skipped cells (the notebook test runs cells as plain Python); the override
    example names fields configs/demo.py has; the fast sampler's FIDs it quotes are README's."""
    import ast
    import runpy

    cells = _cells()
    code = [c for c in cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert "install" in code[1].metadata.get("tags", [])
    settings = [line for line in code[0].source.splitlines() if not line.startswith("#")]
    assert settings[0].startswith("REPO_URL = "), settings[0]
    for cell in code:
        if SKIPPED_TAGS & set(cell.metadata.get("tags", [])):
            continue
        for line in cell.source.splitlines():
            assert not line.lstrip().startswith(("!", "%")), f"magic in a CPU cell: {line}"

    comments = " ".join(
        line.lstrip("# ") for line in code[0].source.splitlines() if line.startswith("#")
    )
    example = ast.literal_eval(re.search(r"configs/demo\.py, e\.g\. (\{[^}]*\})", comments)[1])
    monkeypatch.syspath_prepend(str(REPO_ROOT))  # configs/demo.py imports configs.default
    config = runpy.run_path(str(REPO_ROOT / "configs" / "demo.py"))["get_config"]()
    for key in example:
        node = config
        for part in key.split("."):
            assert part in node, f"the DEMO_OVERRIDES example names {key}: configs/demo.py has none"
            node = node[part]

    readme = (REPO_ROOT / "README.md").read_text()
    dpm_text = next(c.source for c in cells if c.source.startswith("## 4. Fast sampling"))
    for sampler in ("DPM++(2M)-SDE-10 (x_0 clip)", "DPM++(2M)-SDE-20 (x_0 clip)", "DDPM-25"):
        row = re.search(
            rf"^\| conditional \| classifier \| {re.escape(sampler)} \| 1 \| ([0-9.]+) \|",
            readme,
            re.M,
        )
        assert row, f"README's demo table has no conditional {sampler} row at classifier scale 1"
        assert f"{float(row[1]):.1f}" in dpm_text, (sampler, row[1])


def test_gpu_bench_script_parses_and_runs_the_benchmark_through_gpu_sh():
    path = REPO_ROOT / "launch" / "gpu_bench.sh"
    assert os.access(path, os.X_OK), "gpu_bench.sh is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert "ADM_JAX_MODULE=adm_jax.bench bash launch/gpu.sh" in text
    assert 'python -m "${ADM_JAX_MODULE:-adm_jax.main}"' in (path.parent / "gpu.sh").read_text()
    for what in ("--what=maxbatch", "--what=train", "attention_impl=$impl", "--what=sample"):
        assert what in text, what


def test_gpu_bench_script_passes_only_flags_the_benchmark_defines():
    """A flag the benchmark lacks would stop the script on the GPU machine, minutes in."""
    # A fresh process: adm_jax.main, imported by other tests, defines some of the same names.
    code = "import json, adm_jax.bench; from absl import flags; print(json.dumps([*flags.FLAGS]))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    defined_flags = set(json.loads(run.stdout.strip().splitlines()[-1]))
    text = (REPO_ROOT / "launch" / "gpu_bench.sh").read_text().replace("\\\n", " ")
    used = set()
    for line in text.splitlines():
        if line.lstrip().startswith("bench "):
            used.update(re.findall(r"\s--([a-z_]+)", line))
    assert {"what", "json", "noforward"} <= used
    for name in used:
        defined = name in defined_flags or (name.startswith("no") and name[2:] in defined_flags)
        assert defined, f"launch/gpu_bench.sh passes --{name}: adm_jax.bench has no such flag"


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu.sh", "slurm_gpu.sh"])
def test_launch_scripts_parse(script):
    path = REPO_ROOT / "launch" / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert "python -m adm_jax.main" in text
    assert "requirements.txt" in text or "launch/install.sh" in text


@pytest.mark.parametrize("script", ["gpu.sh", "slurm_gpu.sh"])
def test_gpu_scripts_install_nothing_and_name_the_installer(script):
    """GPU hosts and SLURM jobs use the venv launch/install.sh made beforehand (compute nodes
    often have no internet); tests/test_launch_slurm.py runs both scripts."""
    text = (REPO_ROOT / "launch" / script).read_text()
    assert "pip install" not in text and "uv pip" not in text and "-m venv" not in text
    assert "bash launch/install.sh cuda12 $VENV" in text
    assert "ADM_JAX_VENV:-.venv" in text
