"""Orbax checkpoints: restore onto a different mesh, and a SIGKILL in the middle of an async
save leaves the previous checkpoint intact and restorable."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adm_jax.checkpoints import training as checkpointing  # noqa: E402
from adm_jax.recipe import config as config_lib  # noqa: E402
from adm_jax.train import sharding  # noqa: E402
from adm_jax.train import state as state_lib  # noqa: E402
from configs import tiny  # noqa: E402


def test_restore_onto_a_different_mesh(tmp_path):
    """Saved from (data 4, fsdp 2) with FSDP-sharded params, restored onto 2 devices and onto
    1 device: same values, target shardings."""
    config = tiny.get_config()
    config.train.fsdp_min_size = 256
    module = config_lib.build_model(config)
    tx = state_lib.make_optimizer(config.train)
    state, _ = state_lib.create_train_state(module, config, tx, sharding.create_mesh(fsdp=2))
    ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=2)
    ckpt.save(7, state, config={"note": "x"})
    ckpt.close()
    expected = jax.device_get(state)
    for devices, fsdp in ((jax.devices()[:2], 2), (jax.devices()[:1], 1)):
        mesh = sharding.create_mesh(fsdp=fsdp, devices=devices)
        abstract, _ = state_lib.abstract_train_state(module, config, tx, mesh)
        ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=2)
        restored, cfg = ckpt.restore(abstract)
        ckpt.close()
        assert cfg == {"note": "x"}
        leaf = jax.tree.leaves(restored.params)[0]
        assert set(leaf.sharding.device_set) <= set(devices)
        jax.tree.map(np.testing.assert_array_equal, expected, jax.device_get(restored))


_KILL_MID_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import jax, jax.numpy as jnp
    from adm_jax.checkpoints import training as checkpointing
    ckpt = checkpointing.Checkpointer({workdir!r}, max_to_keep=3)
    small = {{"w": jnp.full((4,), 1.0)}}
    ckpt.save(1, small, config={{"step": 1}})
    ckpt.wait()
    big = {{"w": jnp.full((4,), 2.0), "pad": jnp.ones((64, 1024, 1024), jnp.float32)}}
    ckpt.save(2, big, config={{"step": 2}})  # returns after the blocking part
    print("SAVE2_STARTED", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_sigkill_during_async_save_keeps_previous_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    script = _KILL_MID_SAVE.format(repo=str(REPO), workdir=workdir)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "SAVE2_STARTED" in proc.stdout
    ckdir = pathlib.Path(checkpointing.checkpoint_dir(workdir))
    ckpt = checkpointing.Checkpointer(workdir, max_to_keep=3)
    # Step 2 never finalized (its 256 MiB were still being written): only step 1 counts.
    assert ckpt.latest_step() == 1, sorted(os.listdir(ckdir))
    abstract = {
        "w": jax.ShapeDtypeStruct(
            (4,),
            np.float32,
            sharding=sharding.replicated(sharding.create_mesh(devices=jax.devices()[:1])),
        )
    }
    restored, cfg = ckpt.restore(abstract)
    ckpt.close()
    np.testing.assert_array_equal(restored["w"], np.ones(4))
    assert cfg == {"step": 1}
    # The interrupted save's temporary directory is cleaned up at the next start (Orbax does it
    # in a background future, so give it a moment).
    deadline = time.monotonic() + 30
    while [p for p in os.listdir(ckdir) if "tmp" in p] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in os.listdir(ckdir) if "tmp" in p]


def test_damaged_newest_checkpoint_is_set_aside(tmp_path, caplog):
    """A newest step with a lost file: resume restores the previous step (with a warning), the
    damaged one is kept as <step>.damaged, and that step can be saved again."""
    import jax.numpy as jnp

    ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=5, async_save=False)
    for step in (1, 2):
        ckpt.save(step, {"w": jnp.full((8,), float(step))}, config={"step": step})
    ckpt.close()
    state_dir = tmp_path / "checkpoints" / "2" / "state"
    victims = [p for p in state_dir.rglob("*") if p.is_file() and "ocdbt" in str(p)]
    assert victims, sorted(state_dir.rglob("*"))
    for p in victims:
        p.unlink()

    abstract = {"w": jax.ShapeDtypeStruct((8,), jnp.float32)}
    ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=5, async_save=False)
    with caplog.at_level("WARNING"):
        state, step = ckpt.restore_latest_intact(abstract)
    assert step == 1 and float(state["w"][0]) == 1.0
    assert "cannot be restored" in caplog.text
    assert (tmp_path / "checkpoints" / "2.damaged").is_dir()
    assert ckpt.all_steps() == [1]
    ckpt.save(2, {"w": jnp.full((8,), 3.0)}, config={"step": 2})
    ckpt.close()
    ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=5, async_save=False)
    state, step = ckpt.restore_latest_intact(abstract)
    assert step == 2 and float(state["w"][0]) == 3.0
    ckpt.close()
