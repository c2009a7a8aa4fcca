"""Sharded, jitted feature extraction over a stream of uint8 NHWC image batches.

Every batch is re-chunked to one fixed global batch size (the last one zero-padded and
trimmed afterwards) so a single compilation serves the whole stream; the batch axis is
sharded over the ``"data"`` axis of a ``jax.sharding.Mesh`` and the network weights are
replicated. The next batch is dispatched before the previous result is fetched, so host
reading overlaps device compute. With several processes (``jax.distributed``) every process
reads the same images, the batch is sharded over all devices of all processes, and every
process gets all features back (so metrics can be computed anywhere).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from adm_jax import mesh as mesh_lib
from adm_jax.evaluation import inception
from adm_jax.evaluation.metrics import global_array

# What the evaluator needs from the network: FID, sFID and Inception Score inputs.
EVAL_OUTPUTS = ("pool3", "spatial_features_2023", "softmax_nobias")


@functools.cache  # one function object per path: extractors share jit's compilation cache
def inception_fn(resize: str = "tf", outputs: tuple = EVAL_OUTPUTS) -> Callable:
    """``fn(variables, uint8 images) -> {name: (B, ...)}`` for the FID Inception network."""

    def fn(variables, images):
        out = inception.apply_inception(variables, inception.preprocess(images, resize))
        return {k: out[k] for k in outputs}

    return fn


def _rechunk(batches: Iterable[np.ndarray], batch_size: int):
    """Yields (batch of exactly batch_size rows, number of real rows)."""
    buf, n = [], 0
    for b in batches:
        b = np.asarray(b)
        while len(b):
            take = min(batch_size - n, len(b))
            buf.append(b[:take])
            n += take
            b = b[take:]
            if n == batch_size:
                yield np.concatenate(buf), n
                buf, n = [], 0
    if n:
        block = np.concatenate(buf)
        yield np.pad(block, [(0, batch_size - n)] + [(0, 0)] * (block.ndim - 1)), n


class FeatureExtractor:
    """Applies ``fn(variables, images)`` to image batches, sharded over a mesh's "data" axis.

    fn defaults to the FID Inception network (``variables`` from
    ``inception.load_inception_variables``) with the given ``resize`` path; any other
    ``fn(variables, uint8 NHWC) -> dict of (B, ...)`` works too. ``batch_size`` is the global
    batch, rounded up to a multiple of the number of devices on the data axis. The mesh
    defaults to all devices of all processes; every process must call with the same batches.
    """

    def __init__(
        self,
        variables,
        *,
        fn: Callable | None = None,
        resize: str = "tf",
        batch_size: int = 256,
        mesh: jax.sharding.Mesh | None = None,
    ):
        if mesh is None:
            mesh = mesh_lib.create_mesh()
        self.mesh = mesh
        n_data = mesh.shape["data"]
        self.batch_size = -(-batch_size // n_data) * n_data
        self._data = NamedSharding(mesh, P("data"))
        replicated = NamedSharding(mesh, P())
        put = lambda v: (
            v if getattr(v, "sharding", None) == replicated else global_array(v, replicated)
        )
        self.variables = jax.tree.map(put, variables)
        # Replicated outputs: every process can read every feature.
        self._fn = jax.jit(
            fn if fn is not None else inception_fn(resize),
            in_shardings=(replicated, self._data),
            out_shardings=replicated,
        )

    def __call__(
        self, batches: Iterable[np.ndarray], *, total: int | None = None, desc: str = "features"
    ) -> dict[str, np.ndarray]:
        """Features of all images in ``batches`` (uint8 NHWC), concatenated, padding dropped."""
        results: dict[str, list] = {}
        pending = None

        def collect(item):
            out, n = item
            for k, v in jax.device_get(out).items():
                results.setdefault(k, []).append(np.asarray(v)[:n])

        quiet = total == 0 or jax.process_index() != 0  # one progress bar per run
        with tqdm(total=total, desc=desc, unit="img", disable=quiet) as bar:
            for block, n in _rechunk(batches, self.batch_size):
                out = self._fn(self.variables, global_array(block, self._data))
                if pending is not None:
                    collect(pending)
                pending = (out, n)
                bar.update(n)
            if pending is not None:
                collect(pending)
        return {k: np.concatenate(v, axis=0) for k, v in results.items()}
