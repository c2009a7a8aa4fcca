"""The one sampling program: ``BatchSampler`` compiles a reverse-diffusion ``lax.scan`` once
and samples one global batch per call.

``--mode=sample`` (``adm_jax.sampling``), the guidance sweep, the training loop's sample grid and
the benchmark all build it, so what ships is what is timed and what training shows. It sits
below ``train`` and ``sampling`` (it needs only the diffusion math, the mesh and image
conversion), which is what lets the training loop use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from adm_jax import mesh as mesh_lib
from adm_jax.diffusion import classifier_free_model_fn, methods
from adm_jax.images import to_uint8


def global_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds in full."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree: Any, sharding: NamedSharding) -> Any:
    """Lays every leaf of ``tree`` out with ``sharding`` (a replicated one), keeping no copy."""

    def put(leaf):
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            return leaf
        return global_array(np.asarray(leaf), sharding)

    return jax.tree.map(put, tree)


class BatchSampler:
    """Samples one global batch per call with a single compiled program.

    ``method`` (a ``SamplerSpec``; default DDPM, or DDIM with ``use_ddim``) picks the reverse
    process. ``model_apply(params, x, t, **kw)`` gets ``y=labels`` when ``class_cond`` and
    ``low_res=...`` when ``superres``; ``classifier_apply(params, x, t) -> logits`` enables
    classifier guidance and ``null_label`` classifier-free guidance, each with a traced scale.
    ``trace_count`` counts traces: anything above one means a batch or a scale recompiled,
    which at pod scale costs minutes.
    """

    def __init__(
        self,
        diffusion: Any,
        model_apply: Callable[..., jax.Array],
        *,
        image_shape: Sequence[int],
        batch_size: int,
        mesh: Mesh | None = None,
        use_ddim: bool = False,
        eta: float = 0.0,
        clip_denoised: bool = True,
        classifier_apply: Callable[..., jax.Array] | None = None,
        class_cond: bool = False,
        superres: bool = False,
        method: methods.SamplerSpec | None = None,
        null_label: int | None = None,
        unconditional: bool = False,
    ):
        self.mesh = mesh if mesh is not None else mesh_lib.batch_mesh(batch_size)
        axes = mesh_lib.batch_axes(self.mesh)
        num_shards = math.prod(self.mesh.shape[a] for a in axes)
        if batch_size % num_shards:
            raise ValueError(
                f"sample.batch_size: the global batch ({batch_size}) must be a multiple of the "
                f"{num_shards} devices it is sharded over"
            )
        if method is None:
            method = methods.SamplerSpec("ddim" if use_ddim else "ddpm", eta=float(eta))
        if null_label is not None and not class_cond:
            raise ValueError("sample.cfg_scale: classifier-free guidance needs class labels")
        if unconditional and null_label is None:
            raise ValueError("sample.cfg_scale: 0 (unconditional) needs a model with a null label")
        # cfg_scale 0 is the unconditional model: one pass with the null label, not the doubled
        # batch of eps_u + 0 * (eps_c - eps_u).
        self.unconditional = bool(unconditional)
        self.method = method if diffusion is None else method.with_nfe(diffusion)
        self.batch_size = int(batch_size)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.class_cond, self.superres = class_cond, superres
        self.guided = classifier_apply is not None
        self.null_label = null_label
        self.batch_sharding = NamedSharding(self.mesh, P(axes))
        self.replicated = NamedSharding(self.mesh, P())
        self.trace_count = 0
        constrain = lambda a: jax.lax.with_sharding_constraint(a, self.batch_sharding)
        spec = self.method

        def run(model_params, classifier_params, seed, batch_index, labels, scale, cfg, low_res):
            self.trace_count += 1
            key = jax.random.fold_in(jax.random.PRNGKey(seed), batch_index)

            def net(x, t, y):
                # Without the constraints, an unconditional model has no sharded input and XLA
                # could replicate the whole batch on every device.
                kwargs = {} if y is None else {"y": y}
                if superres:  # classifier-free guidance doubles the batch: tile low_res
                    kwargs["low_res"] = jnp.tile(low_res, (x.shape[0] // low_res.shape[0], 1, 1, 1))
                return constrain(model_apply(model_params, constrain(x), t, **kwargs))

            unguided_model_fn = None
            if unconditional:
                model_fn = lambda x, t: net(x, t, jnp.full_like(labels, null_label))
            elif null_label is not None:
                model_fn = classifier_free_model_fn(net, labels, null_label, cfg)
                # Outside sample.guidance_interval: the conditional model, one pass.
                unguided_model_fn = lambda x, t: net(x, t, labels)
            else:
                model_fn = lambda x, t: net(x, t, labels if class_cond else None)
            classifier_fn = None
            if classifier_apply is not None:
                classifier_fn = lambda x, t: classifier_apply(classifier_params, x, t)
            x = methods.sample_images(
                spec,
                diffusion,
                model_fn,
                key,
                (self.batch_size, *self.image_shape),
                clip_denoised=clip_denoised,
                classifier_fn=classifier_fn,
                y=labels,
                classifier_scale=scale,
                unguided_model_fn=unguided_model_fn,
            )
            return to_uint8(x)

        b, r = self.batch_sharding, self.replicated
        self.program = jax.jit(run, in_shardings=(r, r, r, r, b, r, r, b), out_shardings=r)

    @property
    def needs_labels(self) -> bool:
        return self.class_cond or self.guided

    @property
    def cfg(self) -> bool:
        """Whether classifier-free guidance is on (its scale is an argument of each batch)."""
        return self.null_label is not None

    def __call__(self, model_params: Any, **kwargs) -> np.ndarray:
        """Returns the batch as uint8 NHWC numpy (identical on every process)."""
        return np.asarray(self.dispatch(model_params, **kwargs))

    def arguments(
        self,
        model_params: Any,
        *,
        seed: int,
        batch_index: int,
        labels: np.ndarray | None = None,
        classifier_params: Any = None,
        scale: float = 0.0,
        cfg_scale: float | None = None,
        low_res: np.ndarray | None = None,
    ) -> tuple:
        """The arguments of ``self.program`` for one batch (checked, laid out on the mesh)."""
        if self.needs_labels != (labels is not None):
            raise ValueError("labels: required exactly for class-conditional or guided sampling")
        if self.superres != (low_res is not None):
            raise ValueError("low_res: required exactly for a super-resolution model")
        if self.cfg != (cfg_scale is not None):
            raise ValueError(
                "sample.cfg_scale: give a scale exactly when the sampler was built with "
                "classifier-free guidance (a null label)"
            )
        if self.unconditional and cfg_scale != 0:
            raise ValueError(
                f"sample.cfg_scale={cfg_scale:g}: this sampler runs the unconditional model "
                "(built with scale 0); build one with a non-zero scale to guide"
            )
        if labels is not None:
            labels = global_array(np.asarray(labels, np.int32), self.batch_sharding)
        if low_res is not None:
            low_res = global_array(np.asarray(low_res, np.float32), self.batch_sharding)
        return (
            model_params,
            classifier_params,
            np.uint32(seed % 2**32),
            np.int32(batch_index),
            labels,
            np.float32(scale),
            np.float32(0.0 if cfg_scale is None else cfg_scale),
            low_res,
        )

    def dispatch(self, model_params: Any, **kwargs) -> jax.Array:
        """Starts the batch and returns at once (a replicated uint8 array, still computing).
        Keyword arguments: those of ``arguments``."""
        return self.program(*self.arguments(model_params, **kwargs))
