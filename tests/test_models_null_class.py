"""UNet's null-class embedding row for classifier-free guidance (label dropout): off by
default (reference checkpoints keep their shapes), one extra row at index num_classes when on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adm_jax.models import UNet, abstract_params, module_from_kwargs

SMALL = dict(
    image_size=8,
    in_channels=3,
    model_channels=32,
    out_channels=3,
    num_res_blocks=1,
    attention_resolutions=(),
    channel_mult=(1,),
    num_classes=10,
    # With one channel per GroupNorm group an additive embedding is normalised away.
    use_scale_shift_norm=True,
)


def test_reference_kwargs_keep_their_label_embedding(golden):
    meta, _ = golden("unet_classcond_legacyattn")
    kwargs = meta["constructor"]["kwargs"]
    width = 4 * kwargs["model_channels"]
    plain = module_from_kwargs("unet", kwargs)
    assert plain.null_label is None
    assert abstract_params(plain)["label_emb"]["embedding"].shape == (10, width)
    with_null = module_from_kwargs("unet", {**kwargs, "null_class_embedding": True})
    assert with_null.null_label == 10
    assert abstract_params(with_null)["label_emb"]["embedding"].shape == (11, width)


def test_null_label_reads_the_extra_row():
    module = UNet(**SMALL, null_class_embedding=True)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    t = jnp.array([3, 700])
    # Random values everywhere: the zero-initialised output convolutions would hide the labels.
    # (numpy draws: one jax.random call per parameter shape would compile 70 programs).
    rng = np.random.default_rng(2)
    params = jax.tree.map(
        lambda p: jnp.asarray(0.1 * rng.standard_normal(p.shape), jnp.float32),
        abstract_params(module),
    )
    y = jnp.array([module.null_label, 3])
    apply = jax.jit(lambda p: module.apply({"params": p}, x, t, y=y))
    out = apply(params)
    assert out.shape == (2, 8, 8, 3) and np.isfinite(out).all()
    emb = params["label_emb"]["embedding"]
    params["label_emb"]["embedding"] = emb.at[module.null_label].add(1.0)
    moved = apply(params)
    assert not np.allclose(moved[0], out[0]), "the null label does not read row num_classes"
    np.testing.assert_array_equal(moved[1], out[1])


def test_null_class_embedding_needs_classes():
    with pytest.raises(ValueError, match="null_class_embedding: needs a class-conditional"):
        UNet(**{**SMALL, "num_classes": None}, null_class_embedding=True)
