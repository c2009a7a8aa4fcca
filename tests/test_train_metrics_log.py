"""metrics.jsonl across a kill and a resume: every step once, locally and in a bucket (the
GCS emulator), where rows are rewritten in one object and must be flushed at checkpoints."""

import json

import pytest

from adm_jax.train import metrics


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_resume_drops_the_rows_past_the_checkpoint(where, tmp_path, request):
    if where == "bucket":
        from etils import epath

        root = epath.Path(request.getfixturevalue("gcs_bucket")) / "run"
    else:
        root = tmp_path
    path = root / "metrics.jsonl"
    first = metrics.JsonlWriter(path, remote_flush_seconds=1e9)
    for step in range(1, 5):
        first.write_scalars(step, {"train/loss": 1.0 / step})
    first.flush()  # the loop flushes at its checkpoint, here at step 4
    for step in range(5, 8):  # logged past the checkpoint, then killed: never closed
        first.write_scalars(step, {"train/loss": 1.0 / step})
    assert _steps(path) == (list(range(1, 8)) if where == "local" else [1, 2, 3, 4])

    resumed = metrics.JsonlWriter(path, remote_flush_seconds=1e9, resume_step=4)
    assert _steps(path) == [1, 2, 3, 4]
    for step in range(5, 10):
        resumed.write_scalars(step, {"train/loss": 1.0 / step})
    resumed.close()
    assert _steps(path) == list(range(1, 10))
