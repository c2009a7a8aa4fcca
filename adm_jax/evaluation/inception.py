"""FID Inception-v3 in Flax (NHWC): pytorch-fid's port of the 2015 TF graph the evaluator uses.

The layer names mirror pytorch-fid's ``fid_inception_v3()`` state dict (``Mixed_6d.branch1x1``
-> ``Mixed_6d/branch1x1``), so the official ``pt_inception-2015-12-05-6726825d.pth`` (or an
``.npz`` of the same state dict) loads by name. Quirks kept on purpose because FID depends on
them: BatchNorm eps 1e-3 with running statistics, average pools that exclude padding in the
FID blocks (A, C, E_1), a max pool in the last block (E_2), 1008 classes, and an Inception
Score softmax over ``pool3 @ W`` WITHOUT the fc bias (what the reference evaluator builds).

Two input paths (both take uint8-range NHWC images of any size):
  * ``"tf"``: the reference evaluator's TF graph: legacy bilinear resize to 299 without half-pixel
    centres on 0..255 values, then ``(x - 128) / 128``. Numbers comparable with the paper.
  * ``"torch"``: pytorch-fid: ``x / 255``, bilinear resize with half-pixel centres
    (``align_corners=False``), then ``2x - 1``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adm_jax import paths

INCEPTION_SIZE = 299
NUM_CLASSES = 1008
WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
)
# SHA-256 of the official pytorch-fid release file (95,628,359 bytes); its first 8 hex digits
# are the "6726825d" in the file name (torch.hub convention).
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
# Key written by convert_inception into a converted .npz: the SHA-256 of the source .pth.
SOURCE_SHA256_KEY = "__source_sha256__"
WEIGHTS_ENV = "ADM_JAX_INCEPTION_WEIGHTS"
DEFAULT_WEIGHTS_DIR = pathlib.Path("~/.cache/adm_jax").expanduser()

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# Network.


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm(eps 1e-3, running stats) -> ReLU, as torchvision's."""

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=_HIGHEST,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _conv(features, k, *, strides=1, name):
    """BasicConv2d with 'same' padding for stride 1 and no padding for stride 2 (as the port)."""
    kh, kw = (k, k) if isinstance(k, int) else k
    pad = ((kh - 1) // 2, (kw - 1) // 2) if strides == 1 else (0, 0)
    return BasicConv2d(features, (kh, kw), strides=strides, padding=pad, name=name)


def _avg_pool_3x3(x):
    # FID blocks: avg_pool2d(3, 1, 1, count_include_pad=False).
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), (2, 2))


class InceptionA(nn.Module):  # FIDInceptionA
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = _conv(64, 1, name="branch1x1")(x)
        b5 = _conv(48, 1, name="branch5x5_1")(x)
        b5 = _conv(64, 5, name="branch5x5_2")(b5)
        b3 = _conv(64, 1, name="branch3x3dbl_1")(x)
        b3 = _conv(96, 3, name="branch3x3dbl_2")(b3)
        b3 = _conv(96, 3, name="branch3x3dbl_3")(b3)
        bp = _conv(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):  # torchvision InceptionB (Mixed_6a)
    @nn.compact
    def __call__(self, x):
        b3 = _conv(384, 3, strides=2, name="branch3x3")(x)
        bd = _conv(64, 1, name="branch3x3dbl_1")(x)
        bd = _conv(96, 3, name="branch3x3dbl_2")(bd)
        bd = _conv(96, 3, strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):  # FIDInceptionC
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = _conv(192, 1, name="branch1x1")(x)
        b7 = _conv(c7, 1, name="branch7x7_1")(x)
        b7 = _conv(c7, (1, 7), name="branch7x7_2")(b7)
        b7 = _conv(192, (7, 1), name="branch7x7_3")(b7)
        bd = _conv(c7, 1, name="branch7x7dbl_1")(x)
        bd = _conv(c7, (7, 1), name="branch7x7dbl_2")(bd)
        bd = _conv(c7, (1, 7), name="branch7x7dbl_3")(bd)
        bd = _conv(c7, (7, 1), name="branch7x7dbl_4")(bd)
        bd = _conv(192, (1, 7), name="branch7x7dbl_5")(bd)
        bp = _conv(192, 1, name="branch_pool")(_avg_pool_3x3(x))
        # b1 is the TF graph's mixed_N/conv; Mixed_6d's is the sFID tensor mixed_6/conv:0.
        return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):  # torchvision InceptionD (Mixed_7a)
    @nn.compact
    def __call__(self, x):
        b3 = _conv(192, 1, name="branch3x3_1")(x)
        b3 = _conv(320, 3, strides=2, name="branch3x3_2")(b3)
        b7 = _conv(192, 1, name="branch7x7x3_1")(x)
        b7 = _conv(192, (1, 7), name="branch7x7x3_2")(b7)
        b7 = _conv(192, (7, 1), name="branch7x7x3_3")(b7)
        b7 = _conv(192, 3, strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):  # FIDInceptionE_1 (avg pool) / FIDInceptionE_2 (max pool)
    pool: str  # "avg" | "max"

    @nn.compact
    def __call__(self, x):
        b1 = _conv(320, 1, name="branch1x1")(x)
        b3 = _conv(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                _conv(384, (1, 3), name="branch3x3_2a")(b3),
                _conv(384, (3, 1), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = _conv(448, 1, name="branch3x3dbl_1")(x)
        bd = _conv(384, 3, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                _conv(384, (1, 3), name="branch3x3dbl_3a")(bd),
                _conv(384, (3, 1), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.pool == "avg":
            p = _avg_pool_3x3(x)
        else:  # The TF graph's last block max-pools here (pytorch-fid's E_2 quirk).
            p = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
        bp = _conv(192, 1, name="branch_pool")(p)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """FID Inception-v3 on inputs already in [-1, 1], NHWC (normally 299x299).

    Returns a dict: ``pool3`` (N, 2048), ``logits`` (fc with bias), ``logits_nobias``,
    ``softmax_nobias`` (the evaluator's Inception Score predictions), ``mixed_6_conv``
    (N, 17, 17, 192: Mixed_6d.branch1x1 = TF mixed_6/conv:0) and ``spatial_features_2023``
    (its first 7 channels flattened in (h, w, c) order: the evaluator's sFID vector).
    The spatial mean of every top-level block is sown into "intermediates" as ``stage_mean``.
    """

    @nn.compact
    def __call__(self, x):
        def stage(name, module, h):
            h = module(h)
            if isinstance(module, InceptionC):
                h, branch1x1[name] = h
            self.sow("intermediates", f"stage_mean/{name}", jnp.mean(h, axis=(1, 2)))
            return h

        branch1x1 = {}

        x = stage("Conv2d_1a_3x3", _conv(32, 3, strides=2, name="Conv2d_1a_3x3"), x)
        # Conv2d_2a has no padding although stride 1; Conv2d_2b pads 1.
        x = stage("Conv2d_2a_3x3", BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3"), x)
        x = stage("Conv2d_2b_3x3", _conv(64, 3, name="Conv2d_2b_3x3"), x)
        x = _max_pool_3x3_s2(x)
        x = stage("Conv2d_3b_1x1", _conv(80, 1, name="Conv2d_3b_1x1"), x)
        x = stage("Conv2d_4a_3x3", BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3"), x)
        x = _max_pool_3x3_s2(x)
        x = stage("Mixed_5b", InceptionA(32, name="Mixed_5b"), x)
        x = stage("Mixed_5c", InceptionA(64, name="Mixed_5c"), x)
        x = stage("Mixed_5d", InceptionA(64, name="Mixed_5d"), x)
        x = stage("Mixed_6a", InceptionB(name="Mixed_6a"), x)
        x = stage("Mixed_6b", InceptionC(128, name="Mixed_6b"), x)
        x = stage("Mixed_6c", InceptionC(160, name="Mixed_6c"), x)
        x = stage("Mixed_6d", InceptionC(160, name="Mixed_6d"), x)
        x = stage("Mixed_6e", InceptionC(192, name="Mixed_6e"), x)
        x = stage("Mixed_7a", InceptionD(name="Mixed_7a"), x)
        x = stage("Mixed_7b", InceptionE("avg", name="Mixed_7b"), x)
        x = stage("Mixed_7c", InceptionE("max", name="Mixed_7c"), x)
        pool3 = jnp.mean(x, axis=(1, 2))
        mixed_6_conv = branch1x1["Mixed_6d"]
        fc = nn.Dense(NUM_CLASSES, precision=_HIGHEST, name="fc")
        logits = fc(pool3)
        logits_nobias = jnp.dot(pool3, fc.variables["params"]["kernel"], precision=_HIGHEST)
        n = mixed_6_conv.shape[0]
        return {
            "pool3": pool3,
            "logits": logits,
            "logits_nobias": logits_nobias,
            "softmax_nobias": jax.nn.softmax(logits_nobias, axis=-1),
            "mixed_6_conv": mixed_6_conv,
            "spatial_features_2023": mixed_6_conv[..., :7].reshape(n, -1),
        }


def apply_inception(variables, x, *, capture_stages=False):
    """Runs the network on [-1, 1] NHWC input; with capture_stages also returns stage means."""
    model = FIDInceptionV3()
    if not capture_stages:
        return model.apply(variables, x)
    out, state = model.apply(variables, x, mutable=["intermediates"])
    return out, {k: v[0] for k, v in state["intermediates"].items()}


# ----------------------------------------------------------------------------------------------
# Input preprocessing.


def _lerp_axis(x, axis, lo, hi, frac, form):
    a = jnp.take(x, lo, axis=axis)
    b = jnp.take(x, hi, axis=axis)
    shape = [1] * x.ndim
    shape[axis] = -1
    frac = frac.reshape(shape)
    if form == "tf":  # TF: a + (b - a) * t
        return a + (b - a) * frac
    return (1.0 - frac) * a + frac * b  # torch: w0 * a + w1 * b


def _tf_legacy_coords(in_size, out_size):
    # TF ResizeBilinear, align_corners=False, half_pixel_centers=False (LegacyScaler):
    # src = dst * (in / out) in float32; lower = floor(src), upper = min(ceil(src), in - 1).
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    lo = np.floor(src)
    hi = np.minimum(np.ceil(src), in_size - 1)
    return lo.astype(np.int32), hi.astype(np.int32), (src - lo).astype(np.float32)


def _torch_coords(in_size, out_size):
    # torch upsample_bilinear2d, align_corners=False: src = (dst + 0.5) * (in / out) - 0.5,
    # clamped at 0; idx1 = idx0 + (idx0 < in - 1).
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    lo = src.astype(np.int32)
    hi = lo + (lo < in_size - 1)
    return lo, hi.astype(np.int32), (src - lo).astype(np.float32)


def resize_bilinear_tf(x, size=INCEPTION_SIZE):
    """TF1 legacy ``resize_bilinear`` (no half-pixel centres) of float NHWC images."""
    x = x.astype(jnp.float32)
    for axis, form_size in ((2, size), (1, size)):  # along width first, then height (as TF)
        lo, hi, frac = _tf_legacy_coords(x.shape[axis], form_size)
        x = _lerp_axis(x, axis, lo, hi, frac, "tf")
    return x


def resize_bilinear_torch(x, size=INCEPTION_SIZE):
    """torch ``F.interpolate(mode="bilinear", align_corners=False)`` of float NHWC images."""
    x = x.astype(jnp.float32)
    for axis in (2, 1):
        lo, hi, frac = _torch_coords(x.shape[axis], size)
        x = _lerp_axis(x, axis, lo, hi, frac, "torch")
    return x


def preprocess(images, resize="tf"):
    """uint8-range NHWC images (0..255, any size) -> 299x299 network input in [-1, 1].

    Grey images (C = 1) become the same grey image on all three channels: the network takes
    RGB, and a grey pixel is R = G = B. Tiled after the per-channel resize (the same numbers,
    a third of the work).
    """
    channels = images.shape[-1]
    if images.ndim != 4 or channels not in (1, 3):
        raise ValueError(
            f"images: expected NHWC with 3 (RGB) or 1 (grey) channels, got shape {images.shape}"
        )
    x = images.astype(jnp.float32)
    if resize == "tf":
        x = (resize_bilinear_tf(x) - 128.0) * (1.0 / 128.0)
    elif resize == "torch":
        x = 2.0 * resize_bilinear_torch(x / 255.0) - 1.0
    else:
        raise ValueError(
            f"resize must be 'tf' (reference evaluator) or 'torch' (pytorch-fid): {resize!r}"
        )
    return jnp.repeat(x, 3, axis=-1) if channels == 1 else x


@functools.partial(jax.jit, static_argnames=("resize",))
def inception_features(variables, images, resize="tf"):
    """uint8 NHWC images -> the network's output dict (see FIDInceptionV3)."""
    return apply_inception(variables, preprocess(images, resize))


# ----------------------------------------------------------------------------------------------
# Weights.


def variables_from_state_dict(state_dict: Mapping[str, Any]) -> dict:
    """pytorch-fid state dict (torch keys, OIHW) -> Flax variables {"params", "batch_stats"}.

    Keys may carry a namespace prefix ending in "/" (e.g. the golden vectors' ``sd/``).
    """
    params: dict = {}
    stats: dict = {}

    def put(tree, path, value):
        for p in path[:-1]:
            tree = tree.setdefault(p, {})
        tree[path[-1]] = jnp.asarray(value, jnp.float32)

    for key, value in state_dict.items():
        key = key.rsplit("/", 1)[-1]
        if key.startswith("__") or key.endswith("num_batches_tracked"):
            continue
        value = np.asarray(value)
        *mods, kind, name = key.split(".")
        if kind == "fc" and not mods:
            put(
                params,
                ["fc", "kernel" if name == "weight" else "bias"],
                value.T if name == "weight" else value,
            )
        elif kind == "conv" and name == "weight":
            put(params, [*mods, "conv", "kernel"], value.transpose(2, 3, 1, 0))  # OIHW -> HWIO
        elif kind == "bn":
            if name in ("weight", "bias"):
                put(params, [*mods, "bn", "scale" if name == "weight" else "bias"], value)
            elif name in ("running_mean", "running_var"):
                put(stats, [*mods, "bn", "mean" if name == "running_mean" else "var"], value)
            else:
                raise KeyError(f"unexpected Inception state-dict key {key!r}")
        else:
            raise KeyError(f"unexpected Inception state-dict key {key!r}")
    variables = {"params": params, "batch_stats": stats}
    _check_structure(variables)
    return variables


@functools.cache
def _expected_shapes():
    shapes = jax.eval_shape(
        FIDInceptionV3().init, jax.random.key(0), jnp.zeros((1, 75, 75, 3), jnp.float32)
    )
    return jax.tree.map(lambda s: s.shape, {k: shapes[k] for k in ("params", "batch_stats")})


def _check_structure(variables):
    expected = _expected_shapes()
    got = jax.tree.map(lambda a: tuple(a.shape), variables)
    if got != expected:
        exp_flat = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
        got_flat = dict(jax.tree_util.tree_flatten_with_path(got)[0])
        missing = [jax.tree_util.keystr(k) for k in exp_flat.keys() - got_flat.keys()]
        extra = [jax.tree_util.keystr(k) for k in got_flat.keys() - exp_flat.keys()]
        raise ValueError(
            "Inception weights do not match the FID Inception-v3 structure: "
            f"missing {missing[:5]}, "
            f"unexpected {extra[:5]} (or shape mismatch); expected pytorch-fid's state dict"
        )


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with paths.path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_torch_state_dict(path) -> dict:
    """Reads a .pth with torch (optional dependency) into numpy arrays."""
    try:
        import torch  # noqa: PLC0415  (optional)
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs torch, which is optional and not installed; convert the .pth "
            "to .npz once where torch is available: python -m adm_jax.evaluation.convert_inception "
            f"--pth {path} --out {DEFAULT_WEIGHTS_DIR / 'pt_inception-2015-12-05.npz'}"
        ) from e
    with paths.path(path).open("rb") as f:  # a file object: local or gs://
        sd = torch.load(f, map_location="cpu", weights_only=True)
    return {k: v.detach().cpu().numpy() for k, v in sd.items()}


def default_weights_candidates() -> list:
    """Where load_inception_variables looks when no path is given, in order."""
    out = []
    if os.environ.get(WEIGHTS_ENV):
        out.append(paths.path(os.environ[WEIGHTS_ENV]))
    out += [
        DEFAULT_WEIGHTS_DIR / "pt_inception-2015-12-05.npz",
        DEFAULT_WEIGHTS_DIR / WEIGHTS_FILENAME,
        pathlib.Path("~/.cache/torch/hub/checkpoints").expanduser() / WEIGHTS_FILENAME,
    ]
    return out


def _missing_weights_error(tried) -> FileNotFoundError:
    return FileNotFoundError(
        "FID Inception weights not found (tried: "
        + ", ".join(str(p) for p in tried)
        + f"). Download pytorch-fid's {WEIGHTS_FILENAME} from {WEIGHTS_URL} and put it at "
        f"{DEFAULT_WEIGHTS_DIR / WEIGHTS_FILENAME} (read with torch), or convert it once with "
        "`python -m adm_jax.evaluation.convert_inception --pth <file> --out "
        f"{DEFAULT_WEIGHTS_DIR / 'pt_inception-2015-12-05.npz'}` (no torch needed afterwards); "
        f"or pass the path (config.evaluate.inception_weights / ${WEIGHTS_ENV})."
    )


def load_inception_variables(path=None, *, sha256: str | None = WEIGHTS_SHA256) -> dict:
    """Loads and verifies the FID Inception weights; never downloads.

    ``path``: a pytorch-fid ``.pth`` (needs torch) or an ``.npz`` of the same state dict
    (``convert_inception``), local or ``gs://``; None searches ``default_weights_candidates()``.
    An ``.npz`` whose keys are namespaced like the golden vectors (``sd/<torch key>``, e.g.
    the seeded random network ``golden/fid_inception_299.npz``) contributes only those keys.
    ``sha256``: expected SHA-256 of the ORIGINAL .pth: checked against the file itself for a
    .pth and against the source hash the converter recorded for an .npz. None skips the check
    (e.g. random test weights).
    """
    if path is None:
        tried = default_weights_candidates()
        found = [p for p in tried if p.exists()]
        if not found:
            raise _missing_weights_error(tried)
        path = found[0]
    path = paths.path(path)
    if not path.exists():
        raise _missing_weights_error([path])
    if path.suffix == ".npz":
        with path.open("rb") as raw, np.load(raw) as f:
            state_dict = {k: f[k] for k in f.files}
        recorded = state_dict.pop(SOURCE_SHA256_KEY, None)
        if any(k.startswith("sd/") for k in state_dict):  # golden-style: "sd/<torch key>"
            state_dict = {k: v for k, v in state_dict.items() if k.startswith("sd/")}
        recorded = None if recorded is None else str(recorded)
        if sha256 is not None and recorded != sha256.lower():
            raise ValueError(
                f"{path}: recorded source SHA-256 {recorded} != expected {sha256}; "
                "the .npz must be "
                f"converted from the official {WEIGHTS_FILENAME} ({WEIGHTS_URL}) with "
                "adm_jax.evaluation.convert_inception (or pass a different expected hash)"
            )
    else:
        if sha256 is not None:
            got = file_sha256(path)
            if got != sha256.lower():
                raise ValueError(
                    f"{path}: SHA-256 {got} != expected {sha256} (the official {WEIGHTS_FILENAME} "
                    f"from {WEIGHTS_URL}); re-download it or pass the expected hash explicitly"
                )
        state_dict = load_torch_state_dict(path)
    return variables_from_state_dict(state_dict)
