"""npz streaming, reference batches, sharded feature extraction and evaluate_npz end to end."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from adm_jax.evaluation import features, inception, metrics, run
from adm_jax.evaluation import reference_batch as rb


@pytest.mark.parametrize("fmt", ["savez", "savez_compressed", "npy"])
def test_streaming_reader_equals_np_load(tmp_path, fmt):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (37, 5, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, (37,), dtype=np.int32)
    if fmt == "npy":
        path = tmp_path / "a.npy"
        np.save(path, arr)
    else:
        path = tmp_path / "a.npz"
        getattr(np, fmt)(path, arr, labels)  # arr_0, arr_1
    for batch_size in (1, 8, 37, 100):
        reader = rb.open_npz_array(path, "arr_0")
        assert (len(reader), reader.shape, reader.dtype) == (37, arr.shape, arr.dtype)
        batches = list(reader.read_batches(batch_size))
        assert [len(b) for b in batches][:-1] == [batch_size] * (len(batches) - 1)
        np.testing.assert_array_equal(
            np.concatenate(batches), np.load(path)["arr_0"] if fmt != "npy" else np.load(path)
        )
    if fmt != "npy":
        np.testing.assert_array_equal(rb.open_npz_array(path, "arr_1").read(), labels)
        with pytest.raises(KeyError, match="arr_7"):
            rb.open_npz_array(path, "arr_7")


def test_reference_batch_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8) for n in (4, 3, 5)]
    mu, sigma = rng.normal(size=6).astype(np.float32), rng.normal(size=(6, 6))
    mu_s, sigma_s = rng.normal(size=4).astype(np.float32), rng.normal(size=(4, 4))
    path = tmp_path / "ref" / "VIRTUAL_test.npz"
    with rb.ImageSpool() as spool:
        assert sum(len(b) for b in spool.tee(batches)) == 12
        rb.write_reference_batch(path, mu, sigma, mu_s, sigma_s, images=spool)
    with np.load(path) as f:  # readable exactly like a published VIRTUAL_*.npz
        assert set(f.files) == {"arr_0", "mu", "sigma", "mu_s", "sigma_s"}
        np.testing.assert_array_equal(f["arr_0"], np.concatenate(batches))
        np.testing.assert_array_equal(f["sigma_s"], sigma_s)
    ref = rb.load_reference_batch(path)
    assert ref.has_stats and ref.resize == "tf"
    np.testing.assert_array_equal(ref.mu, mu)
    np.testing.assert_array_equal(ref.sigma, sigma)
    np.testing.assert_array_equal(ref.images.read(), np.concatenate(batches))
    # Statistics only (no images) and images only are both valid reference batches.
    rb.write_reference_batch(tmp_path / "stats.npz", mu, sigma)
    assert rb.load_reference_batch(tmp_path / "stats.npz").images is None
    np.savez(tmp_path / "imgs.npz", np.concatenate(batches))
    assert not rb.load_reference_batch(tmp_path / "imgs.npz").has_stats


def test_image_folder_iterator(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    for i, size in enumerate([(40, 30), (16, 16), (64, 20)]):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    batches = list(rb.iterate_image_folder(tmp_path, 16, batch_size=2))
    assert [b.shape for b in batches] == [(2, 16, 16, 3), (1, 16, 16, 3)]
    assert batches[0].dtype == np.uint8


@pytest.fixture(scope="module")
def inception_vars(golden):
    _, arrays = golden("fid_inception_299")
    return inception.variables_from_state_dict(
        {k: v for k, v in arrays.items() if k.startswith("sd/")}
    )


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(3).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)


def test_sharded_extraction_matches_single_device(inception_vars, images):
    assert jax.device_count() == 8
    ex8 = features.FeatureExtractor(inception_vars, batch_size=8)  # one padded batch
    mesh1 = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    ex1 = features.FeatureExtractor(inception_vars, batch_size=2, mesh=mesh1)  # 2 + 1 (padded)
    # Uneven source batches are re-chunked to the fixed global batch.
    f8 = ex8([images[:1], images[1:3]], total=3)
    f1 = ex1(iter([images[:3]]), total=3)
    assert set(f8) == set(features.EVAL_OUTPUTS)
    assert f8["pool3"].shape == (3, 2048) and f8["spatial_features_2023"].shape == (3, 2023)
    for k in f8:
        np.testing.assert_allclose(f8[k], f1[k], rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
def test_evaluate_end_to_end(tmp_path, inception_vars, images, monkeypatch):
    """create_reference_batch -> evaluate(config) on tiny batches with the golden random net.

    The 2048-d sqrtm would dominate the runtime (and is singular for 6 images), so the Frechet
    distance is replaced by a recorder; its math is tested against the goldens elsewhere.
    """
    calls = []

    def fake_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
        calls.append((mu1, sigma1, mu2, sigma2))
        return float(len(calls))

    monkeypatch.setattr(metrics, "frechet_distance", fake_frechet)
    ref_path = tmp_path / "ref.npz"
    ref = run.create_reference_batch(
        ref_path, iter([images[:4], images[4:]]), inception_params=inception_vars, batch_size=8
    )
    np.testing.assert_array_equal(ref.images.read(), images)
    sample_path = tmp_path / "samples_5x32x32x3.npz"
    samples = images[::-1][:5]
    np.savez(sample_path, samples, np.arange(5))
    feats_ref = features.FeatureExtractor(inception_vars, batch_size=8)(iter([images]))
    feats_s = features.FeatureExtractor(inception_vars, batch_size=8)(iter([samples]))
    np.testing.assert_allclose(ref.mu, feats_ref["pool3"].mean(0), rtol=1e-5, atol=1e-6)

    weights = tmp_path / "w.npz"
    np.savez(weights, **{"Conv2d_1a_3x3.conv.weight": np.zeros(1)})  # never read: see patch
    monkeypatch.setattr(inception, "load_inception_variables", lambda path, sha256: inception_vars)
    config = ml_collections.ConfigDict(
        {
            "evaluate": {
                "sample_npz": str(sample_path),
                "reference_batch": str(ref_path),
                "inception_weights": str(weights),
                "batch_size": 8,
                "resize": "tf",
            }
        }
    )
    record = run.evaluate(config, tmp_path / "workdir")
    saved = json.loads((tmp_path / "workdir/evaluation/samples_5x32x32x3.json").read_text())
    assert saved.keys() == record.keys() and saved["precision"] == record["precision"]
    assert (record["fid"], record["sfid"]) == (1.0, 2.0)
    # FID used the STORED reference statistics, sample statistics from the samples' features.
    np.testing.assert_array_equal(calls[0][2], ref.mu)
    np.testing.assert_array_equal(calls[1][3], ref.sigma_s)
    np.testing.assert_allclose(calls[0][0], feats_s["pool3"].mean(0), rtol=1e-5, atol=1e-6)
    # NaN here, as the reference formula gives when random weights underflow a softmax to 0.
    np.testing.assert_allclose(
        record["inception_score"], metrics.inception_score(feats_s["softmax_nobias"]), rtol=1e-5
    )
    p, r = metrics.precision_recall(feats_ref["pool3"], feats_s["pool3"])
    assert (record["precision"], record["recall"]) == (p, r)
    assert (record["num_samples"], record["num_reference"]) == (5, 6)


def _cheap_features(resize="tf", outputs=features.EVAL_OUTPUTS):
    """A stand-in for the Inception network with the evaluator's output keys (tiny dims)."""
    import jax.numpy as jnp

    def fn(variables, images):
        x = images.astype(jnp.float32) / 255.0
        pool = jnp.concatenate([x.mean((1, 2)), x.std((1, 2))], axis=-1)  # (B, 6)
        return {
            "pool3": pool,
            "spatial_features_2023": x[:, ::8, ::8, 0].reshape(len(x), -1),  # (B, 16)
            "softmax_nobias": jax.nn.softmax(pool[:, :4] * 10.0, axis=-1),
        }

    return fn


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
def test_evaluate_with_every_path_in_gcs(tmp_path, images, golden, gcs_bucket, monkeypatch):  # noqa: F811
    """Reference batch, samples, Inception weights and the JSON record all in gs://."""
    from etils import epath

    from adm_jax.sampling import io

    monkeypatch.setattr(features, "inception_fn", _cheap_features)
    bucket = epath.Path(gcs_bucket)
    # Streaming reads of every npy/npz layout (seeks into the object for stored members).
    arr = images[:5]
    for name, save in [("a.npy", np.save), ("b.npz", np.savez), ("c.npz", np.savez_compressed)]:
        with (bucket / "arrays" / name).open("wb") as f:
            save(f, arr)
        reader = rb.open_npz_array(f"{gcs_bucket}/arrays/{name}")
        np.testing.assert_array_equal(np.concatenate(list(reader.read_batches(2))), arr)

    weights = {k: v for k, v in golden("fid_inception_299")[1].items() if k.startswith("sd/")}
    with (bucket / "w" / "inception.npz").open("wb") as f:
        np.savez(f, **weights)
    variables = inception.load_inception_variables(f"{gcs_bucket}/w/inception.npz", sha256=None)
    ref = run.create_reference_batch(
        bucket / "ref" / "VIRTUAL_test.npz",
        iter([images[:4], images[4:]]),
        inception_params=variables,
        batch_size=8,
    )
    np.testing.assert_array_equal(ref.images.read(), images)
    samples = images[::-1][:5]
    io.save_samples_npz(bucket / "s" / "samples_5x32x32x3.npz", samples, np.arange(5))
    config = ml_collections.ConfigDict(
        {
            "evaluate": {
                "sample_npz": f"{gcs_bucket}/s/samples_5x32x32x3.npz",
                "reference_batch": f"{gcs_bucket}/ref/VIRTUAL_test.npz",
                "inception_weights": f"{gcs_bucket}/w/inception.npz",
                "inception_sha256": "none",
                "batch_size": 8,
            }
        }
    )
    record = run.evaluate(config, f"{gcs_bucket}/work")
    saved = json.loads((bucket / "work/evaluation/samples_5x32x32x3.json").read_text())
    assert saved == json.loads(json.dumps(record))
    # The same numbers as from local copies of the files.
    for name, src in [("ref.npz", "ref/VIRTUAL_test.npz"), ("s.npz", "s/samples_5x32x32x3.npz")]:
        (tmp_path / name).write_bytes((bucket / src).read_bytes())
    local = run.evaluate_npz(
        tmp_path / "s.npz", tmp_path / "ref.npz", inception_params=variables, batch_size=8
    )
    assert {k: record[k] for k in local} == local
    assert record["fid"] > 0 and record["num_reference"] == 6


# ----------------------------------------------------------------------------------------------
# Input checks: one line naming the file, before any feature is computed.


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize(
    "case, arrays, expected",
    [
        ("no_arr_0", {"images": np.zeros((2, 8, 8, 3), np.uint8)}, "it holds ['images']"),
        ("float01", {"arr_0": np.random.default_rng(0).random((2, 8, 8, 3))}, "uint8 0..255 NHWC"),
        ("nchw", {"arr_0": np.zeros((2, 3, 8, 8), np.uint8)}, "(2, 3, 8, 8) is channels-first"),
        ("rgba", {"arr_0": np.zeros((2, 8, 8, 4), np.uint8)}, "4 channels"),
    ],
)
def test_evaluate_refuses_bad_sample_files(tmp_path, images, case, arrays, expected):
    ref = tmp_path / "ref.npz"
    np.savez(ref, images)
    bad = tmp_path / f"{case}.npz"
    np.savez(bad, **arrays)
    # inception_params=None: the check must come before the network is even set up.
    with pytest.raises(ValueError) as err:
        run.evaluate_npz(bad, ref, inception_params=None)
    message = _one_line(err)
    assert str(bad) in message and expected in message, message
    # The same file as a reference batch.
    with pytest.raises(ValueError) as err:
        run.evaluate_npz(ref, bad, inception_params=None)
    if case == "no_arr_0":  # a reference batch may hold statistics instead of images
        assert "neither images (arr_0) nor statistics" in _one_line(err)
    else:
        assert str(bad) in _one_line(err) and expected in str(err.value)


def test_evaluate_refuses_files_that_are_not_npz(tmp_path, images):
    good = tmp_path / "good.npz"
    np.savez(good, images)
    text = tmp_path / "samples.npz"
    text.write_text("arr_0 = ...")
    for sample, ref in ((text, good), (good, text)):
        with pytest.raises(ValueError) as err:
            run.evaluate_npz(sample, ref, inception_params=None)
        assert str(text) in _one_line(err) and "not an .npz" in str(err.value)
    config = ml_collections.ConfigDict(
        {"evaluate": {"sample_npz": str(tmp_path / "absent.npz"), "reference_batch": str(good)}}
    )
    with pytest.raises(ValueError) as err:
        run.evaluate(config, tmp_path / "work")
    assert _one_line(err) == f"evaluate.sample_npz: {tmp_path / 'absent.npz'}: no such file"


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_grey_images_are_scored_as_grey_rgb(tmp_path, images):
    """(N, H, W, 1) samples pass, and are what the same grey image on three channels gives."""
    import jax.numpy as jnp

    grey = images[..., :1]
    preprocess = jax.jit(inception.preprocess, static_argnames="resize")
    for resize in ("tf", "torch"):
        np.testing.assert_array_equal(
            np.asarray(preprocess(grey[:2], resize=resize)),
            np.asarray(preprocess(np.repeat(grey[:2], 3, -1), resize=resize)),
        )
    with pytest.raises(ValueError, match="3 \\(RGB\\) or 1 \\(grey\\)"):
        inception.preprocess(jnp.zeros((1, 8, 8, 2), jnp.uint8))

    def features_after_preprocess(resize="tf", outputs=features.EVAL_OUTPUTS):
        def fn(variables, x):  # the real input path, then a cheap stand-in for the network
            x = inception.preprocess(x, resize)[:, ::100, ::100, :]  # (B, 3, 3, 3)
            pool = jnp.concatenate([x.mean((1, 2)), x.std((1, 2))], axis=-1)
            spatial = x.reshape(len(x), -1)
            return {
                "pool3": pool,
                "spatial_features_2023": spatial,
                "softmax_nobias": jax.nn.softmax(pool[:, :4], axis=-1),
            }

        return fn

    ref = tmp_path / "ref.npz"
    np.savez(ref, images)
    np.savez(tmp_path / "grey.npz", grey)
    np.savez(tmp_path / "rgb.npz", np.repeat(grey, 3, -1))
    patched = pytest.MonkeyPatch()
    with patched.context() as mp:
        mp.setattr(features, "inception_fn", features_after_preprocess)
        got = run.evaluate_npz(tmp_path / "grey.npz", ref, inception_params={}, batch_size=8)
        want = run.evaluate_npz(tmp_path / "rgb.npz", ref, inception_params={}, batch_size=8)
    assert got == want and got["num_samples"] == 6
