"""The library (models, diffusion, sampling, evaluation, data reading, conversion) imports
without TensorFlow; only the training entry points' TensorBoard writers may pull it in."""

import ast
import pathlib
import subprocess
import sys

LIBRARY_MODULES = [
    "adm_jax",
    "adm_jax.checkpoints",
    "adm_jax.models",
    "adm_jax.diffusion",
    "adm_jax.sampling",
    "adm_jax.evaluation",
    "adm_jax.data",
    "adm_jax.convert",
]


def test_library_imports_without_tensorflow():
    code = (
        "import sys; sys.modules['tensorflow'] = None\n"
        + "".join(f"import {m}\n" for m in LIBRARY_MODULES)
        + "assert sys.modules['tensorflow'] is None\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


# Imports flow one way, bottom to top; a module may import its own layer and those below.
LAYERS = [
    {"paths", "mesh", "xla_cpu", "images", "workdir", "batch_sampler", "cli_flags", "models",
     "diffusion", "data", "posthoc_ema"},
    {"recipe"},
    {"checkpoints", "convert"},
    {"train"},
    {"sampling"},
    {"evaluation"},
    {"demo", "demo_judge"},
    {"benchmark", "bench", "main"},
]  # fmt: skip


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    found = [i for i, names in enumerate(LAYERS) if top in names]
    assert found, f"{module}: not in LAYERS (add it to the layer it belongs to)"
    return found[0]


def _imported_modules(path: pathlib.Path) -> set[str]:
    """Every adm_jax module ``path`` imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("adm_jax."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "adm_jax":
                out.update(f"adm_jax.{a.name}" for a in node.names)
            elif node.module.startswith("adm_jax."):
                out.add(node.module)
    return out


def test_imports_flow_one_way():
    """models/diffusion/data -> recipe -> checkpoints -> train -> sampling -> evaluation ->
    entry points: no module imports one of a higher layer, not even inside a function (the
    way cycles get hidden)."""
    root = pathlib.Path(__file__).resolve().parents[1] / "adm_jax"
    upward = []
    for path in sorted(root.rglob("*.py")):
        module = "adm_jax." + ".".join(path.relative_to(root).with_suffix("").parts)
        if module.endswith(".__init__"):
            module = module[: -len(".__init__")]
        if module == "adm_jax":
            continue
        for imported in sorted(_imported_modules(path)):
            if _layer(imported) > _layer(module):
                upward.append(f"{module} -> {imported}")
    assert not upward, "imports that run back up: " + ", ".join(upward)
