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
    {"paths", "mesh", "xla_cpu", "images", "workdir", "cli_flags", "posthoc_ema",
     "reference_defaults", "models", "diffusion", "data"},
    {"recipe"},  # config -> typed settings
    {"checkpoints", "batch_sampler", "convert"},  # every checkpoint format; the sampling program
    {"train"},
    {"sampling"},
    {"evaluation"},
    {"demo", "demo_judge"},
    {"benchmark", "bench", "main", "cli", "modes"},
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


def test_no_import_is_guarded_to_dodge_a_layer():
    """``try: from adm_jax.X import ... except ImportError`` hides a layering problem: an
    adm_jax module is always importable, only optional third-party packages may be missing."""
    root = pathlib.Path(__file__).resolve().parents[1] / "adm_jax"
    guarded = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Try):
                continue
            catches_import_error = any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers
            )
            inner = {
                n.module
                for stmt in node.body
                for n in ast.walk(stmt)
                if isinstance(n, ast.ImportFrom) and n.module
            }
            if catches_import_error and any(m.startswith("adm_jax") for m in inner):
                guarded.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not guarded, "imports of adm_jax guarded by ImportError: " + ", ".join(guarded)


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 800, 120


def test_modules_and_functions_stay_readable():
    """No module over 800 lines, no function over 120: each reads in one sitting."""
    root = pathlib.Path(__file__).resolve().parents[1] / "adm_jax"
    too_long = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(root)} ({text.count(chr(10))} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(root)}:{node.name} ({length} lines)")
    assert not too_long, "too long: " + ", ".join(too_long)
