"""``--mode=checkpoints`` and ``--mode=verify`` (adm_jax.checkpoints.tools): on a local
workdir and in a bucket (the GCS emulator), a good checkpoint passes and each kind of damage is
one line naming the checkpoint and what is wrong."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest
from etils import epath

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adm_jax import main as main_lib  # noqa: E402
from adm_jax.checkpoints import tools as checkpoint_tools  # noqa: E402
from adm_jax.checkpoints import training as checkpointing  # noqa: E402
from adm_jax.recipe import config as config_lib  # noqa: E402
from adm_jax.train import sharding  # noqa: E402
from adm_jax.train import state as state_lib  # noqa: E402
from configs import tiny  # noqa: E402

TINY = str(REPO / "configs" / "tiny.py")


@pytest.fixture(scope="module")
def tiny_state():
    config = tiny.get_config()
    module = config_lib.build_model(config)
    tx = state_lib.make_optimizer(config.train)
    state, _ = state_lib.create_train_state(module, config, tx, sharding.create_mesh(fsdp=2))
    return config, state


def _save(workdir, config, state, steps):
    ckpt = checkpointing.Checkpointer(str(workdir), max_to_keep=None)
    for step in steps:
        ckpt.save(step, state, config=config_lib.config_to_dict(config))
    ckpt.close()


def _cli(capsys, mode, workdir, *args):
    code = main_lib.run(["adm_jax", f"--mode={mode}", f"--config={TINY}", f"--workdir={workdir}",
                         *args])  # fmt: skip
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()[-1] if err.strip() else ""


def test_list_and_verify_a_local_workdir(tmp_path, tiny_state, capsys):
    config, state = tiny_state
    _save(tmp_path, config, state, [2, 4])
    # What a save killed half-way leaves behind (Orbax's temporary name), and a step the
    # resume logic set aside: both listed, never complete.
    (tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-123").mkdir()
    (tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-123" / "x").write_bytes(b"0" * 10)
    entries = checkpoint_tools.list_checkpoints(tmp_path)
    assert [(e.step, e.complete) for e in entries] == [(2, True), (4, True), (6, False)]
    assert all(e.size_bytes > 0 and e.modified for e in entries)

    code, out, _ = _cli(capsys, "checkpoints", tmp_path)
    assert code == 0
    assert "   4  complete" in out and "   6  INCOMPLETE" in out, out

    code, out, _ = _cli(capsys, "verify", tmp_path)
    assert code == 0 and "checkpoints/4: OK" in out, out
    code, out, _ = _cli(capsys, "verify", tmp_path, "--step=2")
    assert code == 0 and "checkpoints/2: OK" in out, out

    code, _, line = _cli(capsys, "verify", tmp_path, "--step=6")
    assert code == main_lib.EXIT_FAILED
    assert line.endswith("checkpoints/6: no such complete checkpoint (complete: 2, 4)"), line

    code, _, line = _cli(capsys, "verify", tmp_path, "--config.model.num_channels=64")
    assert code == main_lib.EXIT_FAILED
    assert "checkpoints/4: does not match --config: model.num_channels: 32 in the checkpoint, " \
        "64 in --config" in line, line  # fmt: skip


def test_verify_names_nonfinite_and_unreadable_checkpoints(tmp_path, tiny_state, capsys):
    config, state = tiny_state
    poisoned = state.replace(
        ema_params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), state.ema_params)
    )
    _save(tmp_path, config, poisoned, [3])
    code, _, line = _cli(capsys, "verify", tmp_path)
    assert code == main_lib.EXIT_FAILED
    assert "checkpoints/3: " in line and "leaves hold NaN/Inf, first .ema_params[0]" in line, line

    _save(tmp_path, config, state, [5])
    for f in (tmp_path / "checkpoints" / "5" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(f.read_bytes()[:100])  # truncated by a crash outside Orbax
    code, _, line = _cli(capsys, "verify", tmp_path)
    assert code == main_lib.EXIT_FAILED
    assert "checkpoints/5: cannot be restored (" in line, line

    code, _, line = _cli(capsys, "checkpoints", tmp_path / "nothing_here")
    assert code == main_lib.EXIT_FAILED and "no checkpoint directory" in line, line


@pytest.mark.slow
def test_list_and_verify_in_a_bucket(gcs_bucket, tiny_state, capsys):
    config, state = tiny_state
    workdir = f"{gcs_bucket}/tools/run"
    _save(workdir, config, state, [2])
    # A bucket has no rename: Orbax writes the step in place and marks it complete with
    # commit_success.txt; a step without it is a save that stopped half-way.
    (epath.Path(workdir) / "checkpoints" / "4" / "state").mkdir(parents=True)
    (epath.Path(workdir) / "checkpoints" / "4" / "state" / "x").write_bytes(b"0" * 10)
    entries = checkpoint_tools.list_checkpoints(workdir)
    assert [(e.step, e.complete) for e in entries] == [(2, True), (4, False)]
    code, out, _ = _cli(capsys, "verify", workdir)
    assert code == 0 and "gs://bkt/tools/run/checkpoints/2: OK" in out, out
