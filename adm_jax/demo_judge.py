"""The demo's judge: an independent clean-digit CNN whose penultimate features are the feature
space of the demo's FID / precision / recall (its stand-in for Inception), and whose
predictions say whether a sample shows its target digit. It is not the guidance classifier,
so guidance cannot "fool" it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from adm_jax import paths


class DigitCNN(nn.Module):
    """The independent clean-digit classifier (the demo's stand-in for Inception).

    Returns ``(logits, features)``; ``features`` is the penultimate (ReLU) layer, the feature
    space of FID / precision / recall.
    """

    width: int = 32
    features: int = 128
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        for i, mult in enumerate((1, 2, 4)):
            x = nn.relu(nn.Conv(self.width * mult, (3, 3), name=f"conv{i}a")(x))
            x = nn.relu(nn.Conv(self.width * mult, (3, 3), name=f"conv{i}b")(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        feats = nn.relu(nn.Dense(self.features, name="penultimate")(x))
        return nn.Dense(self.num_classes, name="head")(feats), feats


def _to_gray(images: np.ndarray | jax.Array) -> jax.Array:
    """uint8 NHWC (1 or 3 channels) -> float32 NHW1 in [-1, 1] (the channel mean)."""
    x = jnp.asarray(images, jnp.float32)
    return jnp.mean(x, axis=-1, keepdims=True) / 127.5 - 1.0


@functools.partial(jax.jit, static_argnums=0)
def _judge_apply(module: DigitCNN, params, images):
    logits, feats = module.apply({"params": params}, _to_gray(images))
    return jax.nn.softmax(logits), feats


def classify_digits(
    module: DigitCNN, params, images: np.ndarray, batch_size: int = 500
) -> dict[str, np.ndarray]:
    """The judge on uint8 NHWC digits: ``{"features", "probs", "pred"}`` as numpy arrays."""
    feats, probs = [], []
    for i in range(0, len(images), batch_size):
        p, f = _judge_apply(module, params, np.asarray(images[i : i + batch_size]))
        probs.append(np.asarray(p))
        feats.append(np.asarray(f))
    probs = np.concatenate(probs)
    return {"features": np.concatenate(feats), "probs": probs, "pred": probs.argmax(-1)}


def target_accuracy(pred: np.ndarray, targets: np.ndarray) -> float:
    """Fraction of samples the judge reads as their target digit."""
    pred, targets = np.asarray(pred), np.asarray(targets)
    if pred.shape != targets.shape:
        raise ValueError(f"pred {pred.shape} and targets {targets.shape} differ in shape")
    return float(np.mean(pred == targets))


def _shift_batch(rng: np.random.Generator, images: np.ndarray, max_shift: int) -> np.ndarray:
    """Random translations by up to ``max_shift`` pixels (zero fill): cheap augmentation so
    the judge does not depend on the exact centring of real MNIST."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)))
    dy, dx = rng.integers(0, 2 * max_shift + 1, (2, n))
    return np.stack([padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def train_judge(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    width: int,
    features: int,
    num_classes: int,
    seed: int = 0,
    log_every: int = 100,
):
    """Trains ``DigitCNN`` on clean uint8 digits (Adam, cosine-decayed lr). Returns
    ``(module, params)``."""
    module = DigitCNN(width=width, features=features, num_classes=num_classes)
    rng = np.random.default_rng(seed)
    params = module.init(jax.random.PRNGKey(seed), _to_gray(images[:1]))["params"]
    tx = optax.adamw(optax.cosine_decay_schedule(lr, max(steps, 1)), weight_decay=1e-4)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits, _ = module.apply({"params": p}, _to_gray(x))
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for i in range(steps):
        idx = rng.integers(0, len(images), batch_size)
        x = _shift_batch(rng, images[idx], 2)
        params, opt_state, loss = step(params, opt_state, x, labels[idx])
        losses.append(loss)
        if log_every and ((i + 1) % log_every == 0 or i + 1 == steps):
            print(
                f"    judge step {i + 1}/{steps}: loss {float(np.mean(losses[-log_every:])):.3f}",
                flush=True,
            )
    return module, params


def save_judge(path: str, params, meta: Mapping[str, Any]) -> None:
    from flax import serialization

    path = paths.path(path)
    path.mkdir(parents=True, exist_ok=True)
    params_bytes = serialization.msgpack_serialize(jax.device_get(params))
    paths.write_bytes_atomic(path / "params.msgpack", params_bytes)
    # Written last: the "done" marker.
    paths.write_text_atomic(path / "judge.json", json.dumps(dict(meta), indent=2))


def load_judge(path: str):
    from flax import serialization

    path = paths.path(path)
    meta = json.loads((path / "judge.json").read_text())
    params = serialization.msgpack_restore((path / "params.msgpack").read_bytes())
    module = DigitCNN(meta["width"], meta["features"], meta["num_classes"])
    return module, params, meta
