"""FID, sFID, Inception Score and improved precision/recall as the reference evaluator.

Everything here follows openai/guided-diffusion ``evaluations/evaluator.py`` step for step
(same numpy reductions, same ``scipy.linalg.sqrtm``, same k-NN radius convention), so numbers
agree with the reference to round-off, with one deliberate exception: the reference computes
precision/recall distances in float16 (falling back to float32 only on overflow), which
silently misplaces points on typical features. We compute them in float32 (jitted, blocked and
sharded over a device mesh) or float64 (numpy), matching the reference run with exact
distances (the golden ``*_f64dist`` values).

The functions take features from ANY extractor: ``metrics_from_features`` is the entry point.
In a multi-process run every process calls them with the same features (the blocked distance
computations span all devices of all processes) and gets the same numbers.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import linalg

from adm_jax import mesh as mesh_lib

# Reference defaults (evaluator.py).
SPLIT_SIZE = 5000
NHOOD_SIZE = 3
ROW_BATCH_SIZE = 10000
COL_BATCH_SIZE = 10000
FID_EPS = 1e-6
SOFTMAX_BATCH_SIZE = 512


# ----------------------------------------------------------------------------------------------
# Host <-> global arrays, valid in one process and in several.


def global_array(host, sharding: NamedSharding) -> jax.Array:
    """A global array laid out with ``sharding`` from a host array every process holds whole.

    Unlike ``jax.device_put``, works when ``sharding`` spans other processes' devices (each
    process fills only its own shards) and never compares the value across processes.
    """
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(x) -> np.ndarray:
    """The full value of ``x`` as numpy on every process (gathers what other processes hold)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# ----------------------------------------------------------------------------------------------
# FID / sFID.


def compute_statistics(activations):
    """(mu, sigma) exactly as Evaluator.compute_statistics (mean in the input dtype)."""
    activations = np.asarray(activations)
    return np.mean(activations, axis=0), np.cov(activations, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=FID_EPS):
    """FIDStatistics.frechet_distance: ``(mu1, sigma1)`` are the sample statistics in main()."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    # The product might be almost singular.
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates",
            stacklevel=2,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    # Numerical error might give a slight imaginary component.
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------------------------
# Inception Score.


@jax.jit
def _softmax_nobias(pool, weight):
    return jax.nn.softmax(jnp.dot(pool, weight, precision=jax.lax.Precision.HIGHEST), axis=-1)


def softmax_from_pool(pool, weight, batch_size=SOFTMAX_BATCH_SIZE):
    """softmax(pool3 @ W) WITHOUT the fc bias, as the evaluator's softmax graph (float32)."""
    pool = np.asarray(pool, np.float32)
    weight = jnp.asarray(weight, jnp.float32)
    out = []
    for i in range(0, len(pool), batch_size):
        block = pool[i : i + batch_size]
        pad = batch_size - len(block)  # fixed shape: one compile
        block = np.pad(block, ((0, pad), (0, 0))) if pad else block
        out.append(np.asarray(_softmax_nobias(block, weight))[: batch_size - pad])
    return np.concatenate(out, axis=0) if out else np.zeros((0, weight.shape[1]), np.float32)


def inception_score(preds, split_size=SPLIT_SIZE):
    """Evaluator.compute_inception_score on softmax predictions (runs in their dtype)."""
    preds = np.asarray(preds)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        kl = np.mean(np.sum(kl, 1))
        scores.append(np.exp(kl))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------
# Improved precision / recall (ManifoldEstimator, k-NN balls).


def _pairwise_sq_dists(u, v):
    # DistanceBlock's formula: max(|u|^2 - 2 u.v + |v|^2, 0), here in float32.
    norm_u = jnp.sum(jnp.square(u), axis=1)[:, None]
    norm_v = jnp.sum(jnp.square(v), axis=1)[None, :]
    uv = jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(norm_u - 2 * uv + norm_v, 0.0)


@functools.partial(jax.jit, static_argnames=("k",))
def _knn_block(rows, cols, col_valid, smallest, *, k):
    """Merges a distance block into the running k+1 smallest distances of every row."""
    d = jnp.where(col_valid[None, :], _pairwise_sq_dists(rows, cols), jnp.inf)
    neg, _ = jax.lax.top_k(-jnp.concatenate([smallest, d], axis=1), k + 1)
    return -neg


@jax.jit
def _pr_block(rows, row_radii, row_valid, cols, col_radii, col_valid):
    """Which rows lie in some column ball, and which columns lie in some row ball."""
    d = _pairwise_sq_dists(rows, cols)
    rows_in = jnp.any((d <= col_radii[None, :]) & col_valid[None, :], axis=1)
    cols_in = jnp.any((d <= row_radii[:, None]) & row_valid[:, None], axis=0)
    return rows_in, cols_in


def _np_pairwise_sq_dists(u, v):
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    d = (u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None, :]
    return np.maximum(d, 0).astype(np.float32)


def _mesh_or_default(mesh):
    if mesh is None:
        mesh = mesh_lib.create_mesh()
    return mesh


def _block_size(requested, n, mesh):
    # Never larger than needed (small sets compile small blocks); a multiple of the data axis.
    per = mesh.shape["data"]
    size = min(requested, max(n, 1))
    return -(-size // per) * per


def _padded_blocks(x, size):
    """Yields (start, padded block, valid mask) over the rows of x."""
    for start in range(0, len(x), size):
        block = np.asarray(x[start : start + size], np.float32)
        n = len(block)
        valid = np.arange(size) < n
        if n < size:
            block = np.pad(block, ((0, size - n), (0, 0)))
        yield start, n, block, valid


def manifold_radii(
    features,
    *,
    nhood_size=NHOOD_SIZE,
    row_batch_size=ROW_BATCH_SIZE,
    col_batch_size=COL_BATCH_SIZE,
    distance="float32",
    mesh=None,
):
    """(N, 1) float32 squared distance to the k-th nearest neighbour (the point itself is 0th).

    Same values as ManifoldEstimator.manifold_radii (column k of a partition of the full row)
    but found with a running top-(k+1) merge, so no N-wide row is ever materialised.
    """
    features = np.asarray(features, np.float32)
    n = len(features)
    if distance == "float64":
        radii = np.zeros([n, 1], np.float32)
        for b in range(0, n, row_batch_size):
            rows = features[b : b + row_batch_size]
            d = np.concatenate(
                [
                    _np_pairwise_sq_dists(rows, features[c : c + col_batch_size])
                    for c in range(0, n, col_batch_size)
                ],
                axis=1,
            )
            radii[b : b + len(rows), 0] = np.partition(d, nhood_size, axis=1)[:, nhood_size]
        return radii
    if distance != "float32":
        raise ValueError(f"distance must be 'float32' or 'float64', got {distance!r}")
    mesh = _mesh_or_default(mesh)
    row_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    rsize, csize = _block_size(row_batch_size, n, mesh), _block_size(col_batch_size, n, mesh)
    cols = [
        (global_array(block, replicated), global_array(valid, replicated))
        for _, _, block, valid in _padded_blocks(features, csize)
    ]
    radii = np.zeros([n, 1], np.float32)
    for start, count, block, _ in _padded_blocks(features, rsize):
        rows = global_array(block, row_sharding)
        smallest = global_array(np.full((rsize, nhood_size + 1), np.inf, np.float32), row_sharding)
        for col_block, col_valid in cols:
            smallest = _knn_block(rows, col_block, col_valid, smallest, k=nhood_size)
        radii[start : start + count, 0] = to_host(smallest)[:count, nhood_size]
    return radii


def precision_recall(
    ref_features,
    sample_features,
    *,
    ref_radii=None,
    sample_radii=None,
    nhood_size=NHOOD_SIZE,
    row_batch_size=ROW_BATCH_SIZE,
    col_batch_size=COL_BATCH_SIZE,
    distance="float32",
    mesh=None,
):
    """Improved precision and recall (Kynkaanniemi et al.) as Evaluator.compute_prec_recall.

    precision: fraction of samples inside some reference k-NN ball; recall: fraction of
    reference points inside some sample ball (``d <= radius``, squared distances).
    """
    kw = dict(
        nhood_size=nhood_size,
        row_batch_size=row_batch_size,
        col_batch_size=col_batch_size,
        distance=distance,
        mesh=mesh,
    )
    ref = np.asarray(ref_features, np.float32)
    sample = np.asarray(sample_features, np.float32)
    ref_radii = manifold_radii(ref, **kw) if ref_radii is None else ref_radii
    sample_radii = manifold_radii(sample, **kw) if sample_radii is None else sample_radii
    ref_radii = np.asarray(ref_radii, np.float32).reshape(-1)
    sample_radii = np.asarray(sample_radii, np.float32).reshape(-1)
    ref_in = np.zeros(len(ref), bool)
    sample_in = np.zeros(len(sample), bool)
    if distance == "float64":
        for b in range(0, len(ref), row_batch_size):
            for c in range(0, len(sample), col_batch_size):
                d = _np_pairwise_sq_dists(
                    ref[b : b + row_batch_size], sample[c : c + col_batch_size]
                )
                rr, sr = ref_radii[b : b + row_batch_size], sample_radii[c : c + col_batch_size]
                ref_in[b : b + len(d)] |= np.any(d <= sr[None, :], axis=1)
                sample_in[c : c + d.shape[1]] |= np.any(d <= rr[:, None], axis=0)
    else:
        mesh = _mesh_or_default(mesh)
        row_sharding = NamedSharding(mesh, P("data"))
        replicated = NamedSharding(mesh, P())
        rsize = _block_size(row_batch_size, len(ref), mesh)
        csize = _block_size(col_batch_size, len(sample), mesh)
        ref_r = np.pad(ref_radii, (0, -len(ref) % rsize))
        sample_r = np.pad(sample_radii, (0, -len(sample) % csize))
        for b, nb, rows, row_valid in _padded_blocks(ref, rsize):
            rows = global_array(rows, row_sharding)
            rr = global_array(ref_r[b : b + rsize], row_sharding)
            row_valid = global_array(row_valid, row_sharding)
            for c, nc, cols, col_valid in _padded_blocks(sample, csize):
                rows_in, cols_in = _pr_block(
                    rows,
                    rr,
                    row_valid,
                    global_array(cols, replicated),
                    global_array(sample_r[c : c + csize], replicated),
                    global_array(col_valid, replicated),
                )
                ref_in[b : b + nb] |= to_host(rows_in)[:nb]
                sample_in[c : c + nc] |= to_host(cols_in)[:nc]
    return float(np.mean(sample_in.astype(np.float64))), float(np.mean(ref_in.astype(np.float64)))


# ----------------------------------------------------------------------------------------------
# Everything at once.


def metrics_from_features(
    ref_pool,
    sample_pool,
    *,
    ref_spatial=None,
    sample_spatial=None,
    sample_probs=None,
    ref_stats=None,
    ref_spatial_stats=None,
    split_size=SPLIT_SIZE,
    nhood_size=NHOOD_SIZE,
    row_batch_size=ROW_BATCH_SIZE,
    col_batch_size=COL_BATCH_SIZE,
    distance="float32",
    mesh=None,
) -> dict:
    """The evaluator's metrics from precomputed features of any extractor.

    ref_pool / sample_pool: (N, D) global features (Inception pool3 for FID proper).
    ref_spatial / sample_spatial: optional (N, D') spatial features -> "sfid".
    sample_probs: optional (N, C) class probabilities -> "inception_score".
    ref_stats / ref_spatial_stats: optional (mu, sigma) used instead of statistics of the
      reference features (the evaluator prefers the reference batch's stored mu/sigma);
      ref_pool may then be None, and precision/recall are None.
    Missing inputs give None entries. FID/sFID are sample-vs-reference, as in evaluator.main().
    """
    out = {"fid": None, "sfid": None, "inception_score": None, "precision": None, "recall": None}
    if ref_stats is None and ref_pool is None:
        raise ValueError("need ref_pool or ref_stats")
    mu_r, sigma_r = compute_statistics(ref_pool) if ref_stats is None else ref_stats
    out["fid"] = frechet_distance(*compute_statistics(sample_pool), mu_r, sigma_r)
    if sample_spatial is not None and (ref_spatial is not None or ref_spatial_stats is not None):
        if ref_spatial_stats is None:
            ref_spatial_stats = compute_statistics(ref_spatial)
        out["sfid"] = frechet_distance(*compute_statistics(sample_spatial), *ref_spatial_stats)
    if sample_probs is not None:
        out["inception_score"] = inception_score(sample_probs, split_size)
    if ref_pool is not None:
        out["precision"], out["recall"] = precision_recall(
            ref_pool,
            sample_pool,
            nhood_size=nhood_size,
            row_batch_size=row_batch_size,
            col_batch_size=col_batch_size,
            distance=distance,
            mesh=mesh,
        )
    return out
