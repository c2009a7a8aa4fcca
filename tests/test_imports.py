"""The library (models, diffusion, sampling, evaluation, data reading, conversion) imports
without TensorFlow; only the training entry points' TensorBoard writers may pull it in."""

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
