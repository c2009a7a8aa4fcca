"""Device mesh and sharding rules: a ("data", "fsdp") mesh; batches split over both axes,
large arrays (parameters, Adam moments, EMAs) split over "fsdp" by a shape rule.

The rule looks only at shapes, so one function shards params, optimizer state and EMA
consistently (Adam's mu/nu have the params' shapes), and a checkpoint written on one mesh
restores onto another: Orbax reshards to whatever target shardings we pass.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# The mesh builder lives below train and sampling; train code and users keep these names here.
from adm_jax.mesh import AXES, BATCH_AXES, create_mesh  # noqa: F401


def fsdp_spec(shape, fsdp_size: int, min_size: int) -> P:
    """PartitionSpec for one array: its largest dimension divisible by ``fsdp_size`` goes on
    "fsdp" when the array has at least ``min_size`` elements; everything else is replicated
    (small arrays are cheaper to replicate than to gather)."""
    if fsdp_size <= 1 or not shape or math.prod(shape) < min_size:
        return P()
    order = sorted(range(len(shape)), key=lambda i: (-shape[i], i))
    for i in order:
        if shape[i] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[i] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(abstract_tree, mesh, *, min_size: int):
    """NamedShardings for every leaf of an (abstract) pytree by the FSDP rule."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(tuple(np.shape(x)), fsdp_size, min_size)),
        abstract_tree,
    )


def batch_sharding(mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
