"""sample.batch_size / sample.num_samples: a bad count is one line naming the field, raised
before the checkpoint is even looked at."""

import ml_collections
import pytest

from adm_jax.sampling import sampler


@pytest.mark.parametrize(
    "overrides, field, expected",
    [
        ({"batch_size": 0}, "sample.batch_size", "expected an integer >= 1, got 0"),
        ({"batch_size": -4}, "sample.batch_size", "expected an integer >= 1, got -4"),
        ({"num_samples": -1}, "sample.num_samples", "expected an integer >= 0, got -1"),
        ({"num_samples": 0}, "sample.num_samples", "needs sample.base_samples"),
    ],
)
def test_bad_counts_fail_before_any_work(tmp_path, overrides, field, expected):
    missing = tmp_path / "no_checkpoint_here"  # would fail later, with another message
    config = ml_collections.ConfigDict(
        {"sample": {"checkpoint": str(missing), "num_samples": 8, "batch_size": 4, **overrides}}
    )
    with pytest.raises(ValueError) as err:
        sampler.sample(config, str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{field}: ") and expected in message
    assert not (tmp_path / "samples").exists()
