"""Metrics against the reference evaluator's golden numbers (eval_* cases)."""

import jax
import numpy as np
import pytest

from adm_jax.evaluation import metrics


def rel_err(got, want):
    return abs(float(got) / float(want) - 1.0)


def test_fid_components(golden):
    """The cheap parts of the 2048-d FID: means exactly, traces and |mu diff|^2."""
    meta, g = golden("eval_fid_prec_recall")
    comp = meta["outputs"]["fid_components"]
    mu_r, sigma_r = metrics.compute_statistics(g["acts_ref"])
    mu_s, sigma_s = metrics.compute_statistics(g["acts_sample"])
    np.testing.assert_array_equal(mu_r, g["mu_ref"], err_msg="eval_fid_prec_recall/mu_ref")
    np.testing.assert_array_equal(mu_s, g["mu_sample"], err_msg="eval_fid_prec_recall/mu_sample")
    diff = mu_s - mu_r
    for name, got in (
        ("diff_dot_diff", diff.dot(diff)),
        ("trace_sigma_self", np.trace(sigma_s)),
        ("trace_sigma_other", np.trace(sigma_r)),
    ):
        assert rel_err(got, comp[name]) < 1e-6, (
            f"eval_fid_prec_recall/{name}: {got} vs {comp[name]}"
        )


@pytest.mark.slow
def test_fid_2048(golden):
    """Full FID with scipy's sqrtm of a 2048x2048 product (~1 min on a loaded 2-core box)."""
    _, g = golden("eval_fid_prec_recall")
    mu_r, sigma_r = metrics.compute_statistics(g["acts_ref"])
    mu_s, sigma_s = metrics.compute_statistics(g["acts_sample"])
    fid = metrics.frechet_distance(mu_s, sigma_s, mu_r, sigma_r)
    err = rel_err(fid, g["fid"])
    assert err < 1e-6, f"eval_fid_prec_recall/fid: {fid} vs {float(g['fid'])} (rel err {err:.2g})"


def test_sfid_small(golden):
    _, g = golden("eval_sfid_small")
    mu_r, sigma_r = metrics.compute_statistics(g["acts_ref"])
    mu_s, sigma_s = metrics.compute_statistics(g["acts_sample"])
    np.testing.assert_array_equal(mu_r, g["mu_ref"], err_msg="eval_sfid_small/mu_ref")
    np.testing.assert_allclose(sigma_r, g["sigma_ref"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma_s, g["sigma_sample"], rtol=1e-12, atol=1e-12)
    for name, got in (
        ("fid", metrics.frechet_distance(mu_s, sigma_s, mu_r, sigma_r)),
        ("fid_ref_vs_sample", metrics.frechet_distance(mu_r, sigma_r, mu_s, sigma_s)),
    ):
        err = rel_err(got, g[name])
        assert err < 1e-5, f"eval_sfid_small/{name}: {got} vs {float(g[name])} (rel err {err:.2g})"


@pytest.mark.parametrize(
    "key,split",
    [
        ("inception_score", 5000),
        ("inception_score_split3000", 3000),
        ("inception_score_split10000", 10000),
    ],
)
def test_inception_score(golden, key, split):
    _, g = golden("eval_inception_score")
    got = metrics.inception_score(g["preds"], split)
    err = rel_err(got, g[key])
    assert err < 5e-6, f"eval_inception_score/{key}: {got} vs {float(g[key])} (rel err {err:.2g})"


def test_inception_score_from_pool(golden):
    _, g = golden("eval_fid_prec_recall")
    probs = metrics.softmax_from_pool(g["acts_sample"], g["softmax_weight"])
    got = metrics.inception_score(probs)
    want = g["inception_score_from_pool"]
    err = rel_err(got, want)
    assert err < 1e-5, (
        f"eval_fid_prec_recall/inception_score_from_pool: {got} vs {want} ({err:.2g})"
    )


def test_precision_recall_exact_float32(golden):
    """Activations are multiples of 1/8: float32 distances are exact, so *_f64dist bit for bit.

    Runs sharded over all (8 simulated) devices with several row/column blocks, so the running
    k-NN merge and the padding of partial blocks are exercised.
    """
    _, g = golden("eval_fid_prec_recall")
    assert jax.device_count() == 8
    kw = dict(row_batch_size=1600, col_batch_size=1800)
    for which in ("ref", "sample"):
        radii = metrics.manifold_radii(g[f"acts_{which}"], **kw)
        want = g[f"radii_{which}_f64dist"]
        n_bad = int((radii != want).sum())
        assert n_bad == 0, f"eval_fid_prec_recall/radii_{which}_f64dist: {n_bad} radii differ"
    p, r = metrics.precision_recall(g["acts_ref"], g["acts_sample"], **kw)
    assert p == g["precision_f64dist"], f"eval_fid_prec_recall/precision_f64dist: {p}"
    assert r == g["recall_f64dist"], f"eval_fid_prec_recall/recall_f64dist: {r}"
    # The evaluator's own float16 numbers differ by a few borderline points only.
    assert abs(p - g["precision"]) < 0.005 and abs(r - g["recall"]) < 0.005


@pytest.mark.parametrize("distance", ["float32", "float64"])
def test_precision_recall_fp32_fallback(golden, distance):
    """Large-norm features: the evaluator fell back to float32 distances itself."""
    case = f"eval_prec_recall_fp32_fallback[{distance}]"
    _, g = golden("eval_prec_recall_fp32_fallback")
    kw = dict(distance=distance, row_batch_size=512, col_batch_size=384)
    radii = {w: metrics.manifold_radii(g[f"acts_{w}"], **kw) for w in ("ref", "sample")}
    for w, r in radii.items():
        for suffix in ("", "_f64dist"):
            want = g[f"radii_{w}{suffix}"]
            err = np.max(np.abs(r / want - 1))
            assert err < 1e-5, f"{case}/radii_{w}{suffix}: max rel err {err:.2g} (rtol 1e-5)"
    p, r = metrics.precision_recall(
        g["acts_ref"], g["acts_sample"], ref_radii=radii["ref"], sample_radii=radii["sample"], **kw
    )
    if distance == "float64":
        assert (p, r) == (g["precision_f64dist"], g["recall_f64dist"]), f"{case}: {(p, r)}"
    # "exact or within a couple of borderline points"
    for name, got, n in (("precision", p, 800), ("recall", r, 900)):
        for suffix in ("", "_f64dist"):
            diff = abs(got - g[name + suffix])
            assert diff <= 2 / n + 1e-12, f"{case}/{name}{suffix}: {got} vs {g[name + suffix]}"


def test_single_device_mesh_matches(golden):
    _, g = golden("eval_prec_recall_fp32_fallback")
    mesh1 = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    a = metrics.precision_recall(g["acts_ref"], g["acts_sample"], mesh=mesh1)
    b = metrics.precision_recall(g["acts_ref"], g["acts_sample"])
    assert a == b


def test_metrics_from_features(golden):
    _, g = golden("eval_sfid_small")
    ref, sample = g["acts_ref"], g["acts_sample"]
    probs = np.full((len(sample), 4), 0.25, np.float32)
    out = metrics.metrics_from_features(
        ref, sample, ref_spatial=ref[:, :64], sample_spatial=sample[:, :64], sample_probs=probs
    )
    assert rel_err(out["fid"], g["fid"]) < 1e-5
    mu_r, s_r = metrics.compute_statistics(ref[:, :64])
    mu_s, s_s = metrics.compute_statistics(sample[:, :64])
    assert out["sfid"] == metrics.frechet_distance(mu_s, s_s, mu_r, s_r)
    assert out["inception_score"] == pytest.approx(1.0)
    assert (out["precision"], out["recall"]) == metrics.precision_recall(ref, sample)
    # Stored reference statistics instead of reference features: no precision/recall.
    out2 = metrics.metrics_from_features(None, sample, ref_stats=(g["mu_ref"], g["sigma_ref"]))
    assert rel_err(out2["fid"], g["fid"]) < 1e-5
    assert out2["precision"] is None and out2["sfid"] is None and out2["inception_score"] is None
