"""The soak (tests/soak.py) shortened to three kill cycles: 4 real JAX processes all killed
inside a checkpoint save, then all SIGTERMed at staggered times, then an export of the newest
step SIGKILLed while it writes and run again (equal to an export nobody killed); restarted,
run to the end, and bitwise equal to an uninterrupted run, with metrics.jsonl holding every
step once and no half-written checkpoint left. (SIGKILL of one process:
tests/test_multiprocess.py and the long soak.) ``python tests/soak.py --cycles 20`` is the
long version (docs/robustness.md)."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import soak  # noqa: E402


@pytest.mark.slow
def test_short_soak_kill_in_save_staggered_sigterm_and_kill_in_export(tmp_path):
    """Every launch has a deadline (soak.LAUNCH_DEADLINE, soak.EXIT_BOUND), so a hang fails
    the test; a failed check raises soak.SoakFailure."""
    kinds = ("kill_in_save", "sigterm_all", "kill_in_export")
    figures = soak.soak(cycles=3, seed=1, root=tmp_path, num_steps=8, kinds=kinds)
    print(figures)
    assert figures["kills"] == 3, figures
    assert figures["kinds"]["kill_in_export"] == 1, figures
    assert figures["bitwise_equal"]


def test_an_export_killed_before_its_model_json_is_written_again(tmp_path):
    """The window of ``kill_in_export`` the soak rarely hits: Orbax finished the arrays
    (``params/`` complete) but the process died before ``model.json``. A rerun writes the
    export again; over a complete export it refuses in one line."""
    import jax.numpy as jnp
    import numpy as np

    from adm_jax import checkpoints

    out = tmp_path / "export" / "step_00000004"
    kwargs = dict(kind="unet", model_kwargs={"image_size": 8}, extra={"step": 4})
    checkpoints.save_inference_checkpoint(out, {"w": jnp.ones((2, 3))}, **kwargs)
    (out / checkpoints.MODEL_JSON).unlink()  # killed between the arrays and model.json
    checkpoints.save_inference_checkpoint(out, {"w": jnp.full((2, 3), 2.0)}, **kwargs)
    restored = checkpoints.load_inference_checkpoint(out)
    np.testing.assert_array_equal(restored.params["w"], np.full((2, 3), 2.0))
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "params"]
    with pytest.raises(ValueError, match=r"params already exists; choose an empty directory$"):
        checkpoints.save_inference_checkpoint(out, {"w": jnp.ones((2, 3))}, **kwargs)
