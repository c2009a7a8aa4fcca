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
from adm_jax.diffusion import classifier_free_model_fn, editing, methods
from adm_jax.images import to_uint8
from adm_jax.models import SuperResUNet


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

    Editing: each batch may also take ``x_init`` (x_0 images in [-1, 1]) with ``strength``
    (SDEdit, one per example or one for the batch) and ``x_T`` (given initial noise, e.g.
    ``ddim_invert``'s), host arrays of the global batch laid out like the labels; see
    ``methods.sample_images``. They are traced: one program serves every batch that passes
    the same of them (passing x_init or x_T, or not, is a different program).

    ``edit`` (an ``EditSpec``): each batch edits given images by ``editing.edit_images``
    (inpaint, sdedit or class_swap): ``x_known`` (uint8, or float in [-1, 1]), ``mask``
    (inpaint: 1 = keep) and ``source_labels`` (class_swap with a class-conditional model: the
    labels the inversion runs under; ``needs_source_labels``) per batch, traced.
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
        edit: editing.EditSpec | None = None,
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
        self.diffusion = diffusion
        self.method = method if diffusion is None else method.with_nfe(diffusion)
        self.batch_size = int(batch_size)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.model_apply, self.classifier_apply = model_apply, classifier_apply
        self.clip_denoised = clip_denoised
        self.class_cond, self.superres = class_cond, superres
        self.guided = classifier_apply is not None
        self.null_label = null_label
        self.edit = edit
        self.batch_sharding = NamedSharding(self.mesh, P(axes))
        self.replicated = NamedSharding(self.mesh, P())
        self.trace_count = 0
        b, r = self.batch_sharding, self.replicated
        shardings = (r, r, r, r, b, r, r, b)
        self.program = jax.jit(self._run, in_shardings=shardings, out_shardings=r)
        # The same with a dict of per-batch editing inputs appended (laid out like the labels):
        # x_init / strength / x_T (sample_images' starts) or x_known / mask / source_labels
        # (an EditSpec's edit).
        self.edit_program = jax.jit(self._run, in_shardings=(*shardings, b), out_shardings=r)

    @classmethod
    def for_networks(
        cls,
        diffusion: Any,
        module: Any,
        *,
        classifier: Any = None,
        cfg: bool = False,
        unconditional: bool = False,
        model_options: dict[str, Any] | None = None,
        source: str = "the model",
        **options,
    ) -> BatchSampler:
        """The program for linen networks: ``module`` the diffusion model (``UNet`` or
        ``SuperResUNet``: labels when it has classes, ``low_res`` when it upsamples),
        ``classifier`` the noisy classifier that guides it (``EncoderUNet``, or None); ``cfg``
        classifier-free guidance with the model's null label (``unconditional``: scale 0, one
        pass with the null label). ``model_options`` go to every call of the model (e.g.
        ``train=False``); ``source`` names the model in errors (its checkpoint path);
        ``options`` are ``BatchSampler``'s (image_shape, batch_size, mesh,
        method, clip_denoised, edit)."""
        fixed = dict(model_options or {})
        superres = isinstance(module, SuperResUNet)
        if superres:
            model_apply = lambda p, x, t, y=None, low_res=None: module.apply(
                {"params": p}, x, t, low_res=low_res, y=y, **fixed
            )
        else:
            model_apply = lambda p, x, t, y=None: module.apply({"params": p}, x, t, y=y, **fixed)
        classifier_apply = None
        if classifier is not None:
            classifier_apply = lambda p, x, t: classifier.apply({"params": p}, x, t)
        null_label = None
        if cfg or unconditional:
            null_label = getattr(module, "null_label", None)
            if null_label is None:
                raise ValueError(
                    f"sample.cfg_scale: {source} has no null label; classifier-free guidance "
                    "needs a class-conditional model trained with model.class_dropout_prob > 0"
                )
        return cls(
            diffusion,
            model_apply,
            classifier_apply=classifier_apply,
            class_cond=getattr(module, "num_classes", None) is not None,
            superres=superres,
            null_label=null_label,
            unconditional=unconditional,
            **options,
        )

    def _constrain(self, array: jax.Array) -> jax.Array:
        return jax.lax.with_sharding_constraint(array, self.batch_sharding)

    def _model_fns(self, model_params, labels, cfg_scale, low_res):
        """``(model_fn, unguided_model_fn, net)``: the model as the samplers call it (with
        classifier-free guidance when built with a null label), the conditional model used
        outside sample.guidance_interval (or None), and the raw ``net(x, t, y)``."""
        constrain = self._constrain

        def net(x, t, y):
            # Without the constraints, an unconditional model has no sharded input and XLA
            # could replicate the whole batch on every device.
            kwargs = {} if y is None else {"y": y}
            if self.superres:  # classifier-free guidance doubles the batch: tile low_res
                kwargs["low_res"] = jnp.tile(low_res, (x.shape[0] // low_res.shape[0], 1, 1, 1))
            return constrain(self.model_apply(model_params, constrain(x), t, **kwargs))

        null_label = self.null_label
        if self.unconditional:
            return lambda x, t: net(x, t, jnp.full_like(labels, null_label)), None, net
        if null_label is not None:
            model_fn = classifier_free_model_fn(net, labels, null_label, cfg_scale)
            return model_fn, (lambda x, t: net(x, t, labels)), net
        return (lambda x, t: net(x, t, labels if self.class_cond else None)), None, net

    def _run(
        self,
        model_params,
        classifier_params,
        seed,
        batch_index,
        labels,
        classifier_scale,
        cfg_scale,
        low_res,
        extra=None,
    ):
        """The traced program: one global batch, uint8 NHWC."""
        self.trace_count += 1
        extra = extra or {}
        key = jax.random.fold_in(jax.random.PRNGKey(seed), batch_index)
        model_fn, unguided_model_fn, net = self._model_fns(model_params, labels, cfg_scale, low_res)
        classifier_fn = None
        if self.classifier_apply is not None:
            classifier_fn = lambda x, t: self.classifier_apply(classifier_params, x, t)
        guidance = dict(
            classifier_fn=classifier_fn,
            y=labels,
            classifier_scale=classifier_scale,
            unguided_model_fn=unguided_model_fn,
        )
        if "x_known" in extra:  # an EditSpec's edit
            source_labels = extra.get("source_labels")
            source_model_fn = None
            if source_labels is not None:
                source_model_fn = lambda x, t: net(x, t, source_labels)
            x = editing.edit_images(
                self.edit,
                self.method,
                self.diffusion,
                model_fn,
                key,
                self._constrain(extra["x_known"]),
                mask=extra.get("mask"),
                source_model_fn=source_model_fn,
                **guidance,
            )
            return to_uint8(x)
        x_init, x_T = extra.get("x_init"), extra.get("x_T")
        x = methods.sample_images(
            self.method,
            self.diffusion,
            model_fn,
            key,
            (self.batch_size, *self.image_shape),
            clip_denoised=self.clip_denoised,
            x_init=None if x_init is None else self._constrain(x_init),
            strength=extra.get("strength", 1.0),
            x_T=None if x_T is None else self._constrain(x_T),
            **guidance,
        )
        return to_uint8(x)

    @property
    def needs_labels(self) -> bool:
        return self.class_cond or self.guided

    @property
    def needs_source_labels(self) -> bool:
        """Whether each batch needs ``source_labels`` (a class swap on a class-conditional
        model: the inversion runs under the images' own labels)."""
        return self.edit is not None and self.edit.kind == "class_swap" and self.class_cond

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
        classifier_scale: float = 0.0,
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
            np.float32(classifier_scale),
            np.float32(0.0 if cfg_scale is None else cfg_scale),
            low_res,
        )

    def edit_arguments(
        self,
        *,
        x_init: np.ndarray | None = None,
        strength: float | np.ndarray | None = None,
        x_T: np.ndarray | None = None,
        x_known: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        source_labels: np.ndarray | None = None,
    ) -> dict:
        """The editing inputs ``self.edit_program`` takes after ``arguments``'s, laid out like
        the labels. x_init and x_T: (batch_size, *image_shape) float; strength: a number or
        (batch_size,) in (0, 1], only with x_init (default 1). With an ``EditSpec``: x_known
        (uint8, or float in [-1, 1]), mask (inpaint) and source_labels (when
        ``needs_source_labels``)."""
        shape = (self.batch_size, *self.image_shape)
        if self.edit is not None:
            return self._edit_inputs(shape, x_known, mask, source_labels, x_init, strength, x_T)
        if x_known is not None or mask is not None or source_labels is not None:
            raise ValueError(
                "x_known, mask, source_labels: only for a BatchSampler built with edit=EditSpec"
            )
        if strength is not None and x_init is None:
            raise ValueError("strength: only used with x_init (the images to start from)")
        if x_init is not None:
            x_init = self._images("x_init", x_init, shape)
            strength = np.broadcast_to(
                np.asarray(1.0 if strength is None else strength, np.float32), shape[:1]
            )
            if not np.all((strength > 0) & (strength <= 1)):
                raise ValueError(f"strength: expected values in (0, 1], got {strength}")
            strength = global_array(strength, self.batch_sharding)
        if x_T is not None:
            x_T = self._images("x_T", x_T, shape)
        inputs = dict(x_init=x_init, strength=strength, x_T=x_T)
        return {name: value for name, value in inputs.items() if value is not None}

    def _edit_inputs(self, shape, x_known, mask, source_labels, *starts) -> dict:
        if any(a is not None for a in starts):
            raise ValueError(
                "x_init, strength, x_T: a BatchSampler built with edit=EditSpec takes x_known"
            )
        if x_known is None:
            raise ValueError(f"x_known: edit.kind={self.edit.kind} needs the images to edit")
        x_known = np.asarray(x_known)
        if x_known.dtype == np.uint8:
            x_known = x_known.astype(np.float32) / 127.5 - 1.0
        inputs = {"x_known": self._images("x_known", x_known, shape)}
        if self.edit.uses_mask != (mask is not None):
            raise ValueError(f"mask: required exactly for inpainting, edit.kind={self.edit.kind}")
        if mask is not None:
            mask = np.broadcast_to(np.asarray(mask, np.float32), shape[:-1] + (1,))
            inputs["mask"] = global_array(np.ascontiguousarray(mask), self.batch_sharding)
        if self.needs_source_labels != (source_labels is not None):
            raise ValueError(
                "source_labels: required exactly for a class swap on a class-conditional model"
            )
        if source_labels is not None:
            source_labels = np.asarray(source_labels, np.int32)
            inputs["source_labels"] = global_array(source_labels, self.batch_sharding)
        return inputs

    def _images(self, name: str, images: np.ndarray, shape: tuple[int, ...]) -> jax.Array:
        images = np.asarray(images, np.float32)
        if images.shape != shape:
            raise ValueError(
                f"{name}: expected shape {shape} (the global batch), got {images.shape}"
            )
        return global_array(images, self.batch_sharding)

    def dispatch(self, model_params: Any, **kwargs) -> jax.Array:
        """Starts the batch and returns at once (a replicated uint8 array, still computing).
        Keyword arguments: those of ``arguments`` and ``edit_arguments`` (with an EditSpec,
        or any of the latter, ``edit_program`` runs)."""
        names = ("x_init", "strength", "x_T", "x_known", "mask", "source_labels")
        edit_kwargs = {name: kwargs.pop(name) for name in names if name in kwargs}
        args = self.arguments(model_params, **kwargs)
        if self.edit is None and all(v is None for v in edit_kwargs.values()):
            return self.program(*args)
        return self.edit_program(*args, self.edit_arguments(**edit_kwargs))
