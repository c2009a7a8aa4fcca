"""Every expected failure of the entry point ends with exit code EXIT_USAGE / EXIT_FAILED /
EXIT_LOCKED and ONE line ``adm_jax: ...`` naming the field or file (no traceback), or recovers.

One test per row of issue 10 item 5. They run the whole command in this process through
``adm_jax.main.run(argv)`` (a subprocess start costs ~10 s on 2 cores); two run the real
``python -m adm_jax.main``. Faults are real: a file as workdir, an unwritable directory, a
file-size limit (RLIMIT_FSIZE: writes fail with EFBIG like a full disk, root included),
undecodable images, a second process holding the lock.
"""

import json
import os
import pathlib
import resource
import signal
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adm_jax import main as cli  # noqa: E402
from adm_jax import workdir as workdir_lib  # noqa: E402
from adm_jax.data import build_image_folder_dataset  # noqa: E402

TINY = str(REPO / "configs" / "tiny.py")
# One resolution level and no periodic extras: these tests are about failures, not the model.
FAST = [
    "--config.model.channel_mult=1", "--config.model.attention_resolutions=16",
    "--config.train.eval_every=0", "--config.train.sample_every=0",
    "--config.train.tensorboard=False",
]  # fmt: skip


def run_cli(capsys, workdir, *flags, config=TINY, mode="train"):
    """(exit code, the one ``adm_jax:`` line) of the command; fails on a traceback or on
    anything but exactly one such line."""
    argv = ["adm_jax", f"--config={config}", f"--workdir={workdir}", f"--mode={mode}", *flags]
    code = cli.run(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("adm_jax")]
    assert "Traceback" not in err, err[-4000:]
    assert len(lines) == 1, f"expected one 'adm_jax:' line, got {lines}\n{err[-4000:]}"
    return code, lines[0]


def test_misspelled_override(capsys, tmp_path):
    code, line = run_cli(capsys, tmp_path, "--config.train.batch_sise=8")
    assert code == cli.EXIT_USAGE
    assert line == (
        'adm_jax: --config.train.batch_sise: no such config field; did you mean "batch_size"?'
    )


def test_unknown_mode(capsys, tmp_path):
    code, line = run_cli(capsys, tmp_path, mode="trian")
    assert code == cli.EXIT_USAGE
    assert "--mode=trian" in line and "train_classifier" in line


def test_other_mode_with_the_demo_config(capsys, tmp_path):
    """configs/demo.py always runs the whole demo: another --mode is refused, not ignored."""
    demo = str(REPO / "configs" / "demo.py")
    code, line = run_cli(capsys, tmp_path, config=demo, mode="sweep")
    assert code == cli.EXIT_USAGE
    assert line == (
        f"adm_jax: --mode=sweep: --config={demo} is the demo's config (config.mode='demo'), "
        "which runs the whole demo; leave out --mode"
    )
    assert not any(tmp_path.iterdir())  # nothing started


def test_missing_config_file(capsys, tmp_path):
    code, line = run_cli(capsys, tmp_path, config=str(tmp_path / "nope.py"))
    assert code == cli.EXIT_USAGE
    assert f"--config={tmp_path / 'nope.py'}: cannot load the config file" in line
    assert "No such file" in line


def test_invalid_config_value_names_the_field(capsys, tmp_path):
    code, line = run_cli(capsys, tmp_path, "--config.train.batch_size=12")
    assert code == cli.EXIT_USAGE
    assert "train.batch_size: 12" in line and "divisible by the 8 devices" in line


@pytest.mark.parametrize("case", ["missing_dir", "not_prepared"])
def test_missing_data(capsys, tmp_path, case):
    data_dir = tmp_path / "tfds"
    if case == "not_prepared":
        data_dir.mkdir()
    code, line = run_cli(capsys, tmp_path / "wd", f"--config.data.data_dir={data_dir}", *FAST)
    assert code == cli.EXIT_FAILED
    assert str(data_dir) in line and "'tiny_images'" in line
    assert ("no such directory" if case == "missing_dir" else "is not prepared") in line
    assert not (tmp_path / "wd" / workdir_lib.LOCK_NAME).exists()  # released after the error


def test_workdir_is_a_file(capsys, tmp_path):
    wd = tmp_path / "wd"
    wd.write_text("not a directory")
    code, line = run_cli(capsys, wd, *FAST)
    assert code == cli.EXIT_FAILED
    assert line == f"adm_jax: --workdir {wd}: is a file; expected a directory (or a new path)"


@pytest.fixture
def unwritable_dir(tmp_path):
    """A directory this process cannot create files in: chmod 555, or (root ignores modes)
    sysfs, which refuses new files to everyone."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    for candidate in (d, pathlib.Path("/sys")):
        try:
            (candidate / "probe").touch()
        except OSError:
            yield candidate
            break
        (candidate / "probe").unlink()
    else:
        pytest.skip("no unwritable directory available to this user")
    d.chmod(0o755)


def test_workdir_not_writable(capsys, unwritable_dir):
    code, line = run_cli(capsys, unwritable_dir, *FAST)
    assert code == cli.EXIT_FAILED
    assert line.startswith(f"adm_jax: --workdir {unwritable_dir}: not writable (")
    assert "expected a directory this user can write" in line


@pytest.mark.parametrize(
    "config, mode", [(TINY, "train"), (f"{TINY}:classifier", "train_classifier")]
)
def test_labels_beyond_model_classes(capsys, tmp_path, tiny_tfds_dir, config, mode):
    code, line = run_cli(
        capsys, tmp_path, f"--config.data.data_dir={tiny_tfds_dir}", "--config.model.num_classes=3",
        "--config.train.eval_every=0", "--config.train.sample_every=0", config=config, mode=mode,
    )  # fmt: skip
    assert code == cli.EXIT_FAILED
    assert "dataset 'tiny_images' has 4 classes" in line and "model.num_classes is 3" in line


@pytest.fixture(scope="module")
def corrupt_tfds_dir(tmp_path_factory):
    """'broken_images': 6 labelled files that are not images."""
    root = tmp_path_factory.mktemp("broken")
    for i in range(6):
        d = root / "png" / f"class_{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"bad_{i}.png").write_bytes(b"\x89PNG not really %d" % i)
    build_image_folder_dataset(str(root / "png"), str(root / "tfds"), "broken_images")
    return str(root / "tfds")


def test_corrupt_images_logged_by_name(capsys, caplog, tmp_path, corrupt_tfds_dir):
    caplog.set_level("WARNING")
    code, line = run_cli(
        capsys, tmp_path, f"--config.data.data_dir={corrupt_tfds_dir}",
        "--config.data.name=broken_images", *FAST,
    )  # fmt: skip
    assert code == cli.EXIT_FAILED
    assert "could not be decoded, more than data.max_skipped_fraction=0.001" in line
    assert "last skipped: class_" in line and "/bad_" in line
    skipped = [r.getMessage() for r in caplog.records if "skipping undecodable image" in r.message]
    assert len(skipped) >= 100  # every skip, by name, with the decoder's reason
    assert {m.split("image ")[1].split(" ")[0] for m in skipped} == {
        f"class_{i % 2}/bad_{i}.png" for i in range(6)
    }
    assert "UnidentifiedImageError" in skipped[0]


@pytest.mark.slow
def test_failed_checkpoint_save_stops_the_run(capsys, tmp_path, tiny_tfds_dir):
    """Writes over 128 KiB fail (EFBIG), as on a full disk: the first checkpoint (about 2 MB)
    cannot be written and the run stops right after it instead of training on."""
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (128 * 1024, hard))
    try:
        code, line = run_cli(
            capsys, tmp_path, f"--config.data.data_dir={tiny_tfds_dir}", *FAST,
            "--config.train.num_steps=40", "--config.train.checkpoint_every=2",
            "--config.train.log_every=1",
        )  # fmt: skip
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert code == cli.EXIT_FAILED
    assert f"checkpoint: saving step 2 to {tmp_path / 'checkpoints'} failed" in line
    assert "File too large" in line and "last good checkpoint: none" in line
    from adm_jax.train.metrics import read_metrics

    logged = sorted(read_metrics(str(tmp_path)))
    assert logged and logged[-1] < 10, f"trained on to step {logged[-1]} after the failed save"
    assert not (tmp_path / workdir_lib.LOCK_NAME).exists()


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(proc.stdout)


def test_stale_lock_on_this_machine_is_taken_over(capsys, tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    holder = {
        "host": "h",
        "pid": _dead_pid(),
        "started": "t",
        "machine": workdir_lib.this_machine(),
    }
    (wd / workdir_lib.LOCK_NAME).write_text(json.dumps(holder))
    # The run gets past the lock and fails on the (missing) data, releasing the lock.
    code, line = run_cli(capsys, wd, f"--config.data.data_dir={tmp_path / 'nope'}", *FAST)
    assert code == cli.EXIT_FAILED and "data.data_dir" in line
    assert not (wd / workdir_lib.LOCK_NAME).exists()


def test_lock_from_another_machine_needs_break_lock(capsys, tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    holder = {"host": "other-host", "pid": 1234, "started": "2024-01-01T00:00:00+00:00",
              "machine": "other-host/boot/pid:[1]"}  # fmt: skip
    lock = wd / workdir_lib.LOCK_NAME
    lock.write_text(json.dumps(holder))
    code, line = run_cli(capsys, wd, *FAST)
    assert code == cli.EXIT_LOCKED
    assert line == (
        f"adm_jax: --workdir {wd}: in use by another run (pid 1234 on other-host since "
        "2024-01-01T00:00:00+00:00; cannot tell from here whether it still runs); if that run "
        f"is gone, rerun with --break_lock or delete {lock}"
    )
    assert json.loads(lock.read_text()) == holder  # left alone
    # --break_lock removes it: the run then fails on its (missing) data, not on the lock.
    code, line = run_cli(capsys, wd, "--break_lock", f"--config.data.data_dir={tmp_path}/x", *FAST)
    assert code == cli.EXIT_FAILED and "data.data_dir" in line
    assert not lock.exists()


def test_verbose_shows_the_traceback(capsys, tmp_path, monkeypatch):
    wd = tmp_path / "wd"
    wd.write_text("")
    for how in ("flag", "env"):
        if how == "env":
            monkeypatch.setenv("ADM_JAX_VERBOSE", "1")
        argv = ["adm_jax", f"--config={TINY}", f"--workdir={wd}", *FAST]
        code = cli.run(argv + (["--verbose"] if how == "flag" else []))
        err = capsys.readouterr().err
        assert code == cli.EXIT_FAILED
        assert "Traceback" in err and "NotADirectoryError" in err
        assert err.strip().splitlines()[-1].startswith(f"adm_jax: --workdir {wd}: is a file")


# ------------------------------------------------------------------ the real command

ENV = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    PYTHONPATH=str(REPO),
)


def real_command(workdir, *flags):
    argv = [sys.executable, "-m", "adm_jax.main", f"--config={TINY}", f"--workdir={workdir}"]
    return subprocess.run(
        [*argv, *flags], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300
    )


def test_real_command_prints_one_line(tmp_path):
    proc = real_command(tmp_path, "--config.train.batch_sise=8")
    assert proc.returncode == cli.EXIT_USAGE
    assert proc.stderr.strip().splitlines() == [
        'adm_jax: --config.train.batch_sise: no such config field; did you mean "batch_size"?'
    ]


def test_second_run_on_a_locked_workdir(tmp_path):
    """This process holds the lock (a live pid on this machine); the real command, a second
    process, stops at once naming it."""
    with workdir_lib.WorkdirLock(tmp_path) as lock:
        holder = dict(lock.info)
        proc = real_command(tmp_path, *FAST)
    assert proc.returncode == cli.EXIT_LOCKED, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("adm_jax")]
    assert lines == [
        f"adm_jax: --workdir {tmp_path}: in use by another run (pid {os.getpid()} on "
        f"{holder['host']} since {holder['started']}; still running); "
        f"if that run is gone, rerun with --break_lock or delete {lock.path}"
    ], proc.stderr[-3000:]
    assert "Compiled" not in proc.stderr
    assert not lock.path.exists()  # released on exit


def test_lock_in_a_bucket(gcs_bucket):
    """gs:// workdirs: no exclusive create, but the lock is written, read back and honoured."""
    wd = workdir_lib.prepare(f"{gcs_bucket}/run")
    with workdir_lib.WorkdirLock(wd) as lock:
        assert workdir_lib.read_lock(wd)["token"] == lock.info["token"]
        with pytest.raises(workdir_lib.WorkdirLockedError, match="still running"):
            workdir_lib.WorkdirLock(wd).acquire()
    assert workdir_lib.read_lock(wd) is None
    workdir_lib.WorkdirLock(wd).acquire()
    assert workdir_lib.break_lock(wd)["pid"] == os.getpid() and workdir_lib.read_lock(wd) is None
