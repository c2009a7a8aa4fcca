"""adm_jax.models: parity with the reference networks (golden vectors), configuration errors,
mixed precision, dropout and initialisation (rematerialisation and attention kernels:
test_models_kernels.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adm_jax.convert import reference_model
from adm_jax.models import (
    EncoderUNet,
    SuperResUNet,
    UNet,
    count_params,
    module_from_kwargs,
    reference_kwargs_from_flags,
    timestep_embedding,
)

KIND_OF_CLASS = {"UNetModel": "unet", "SuperResModel": "superres", "EncoderUNetModel": "classifier"}
NETWORK_CASES = [
    "unet_learnsigma",
    "unet_classcond_legacyattn",
    "unet_newattn_64",
    "classifier_encoder",
    "classifier_encoder_adaptive",
    "superres",
]


def nhwc(a):
    return np.transpose(a, (0, 2, 3, 1)) if a.ndim == 4 else a


def load_case(golden, case, **module_overrides):
    """(module, variables, args, kwargs, meta, arrays) for a golden network case."""
    meta, arrays = golden(case)
    kind = KIND_OF_CLASS[meta["constructor"]["class"].rsplit(".", 1)[-1]]
    state_dict = {k[len("sd/") :]: v for k, v in arrays.items() if k.startswith("sd/")}
    module, variables = reference_model(kind, meta["constructor"]["kwargs"], state_dict)
    if module_overrides:
        module = module_from_kwargs(kind, meta["constructor"]["kwargs"], **module_overrides)
    args = (jnp.asarray(nhwc(arrays["x"])), jnp.asarray(arrays["timesteps"]))
    kwargs = {}
    if "low_res" in arrays:
        kwargs["low_res"] = jnp.asarray(nhwc(arrays["low_res"]))
    if "y" in arrays:
        kwargs["y"] = jnp.asarray(arrays["y"])
    return module, variables, args, kwargs, meta, arrays


def assert_matches_reference(case, quantity, ours, ref, meta):
    """max|ours - ref| <= 1e-5 * max|ref|, and never looser than the case's tolerance hint."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, f"{case}/{quantity}: shape {ours.shape} != {ref.shape}"
    scale = float(np.abs(ref).max())
    tol = min(1e-5 * scale, meta["tolerance_hint"]["atol"])
    err = float(np.abs(ours.astype(np.float64) - ref).max())
    assert err <= tol, f"{case}/{quantity}: max abs error {err:.3g} > {tol:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("case", NETWORK_CASES)
def test_forward_matches_reference(golden, case):
    module, variables, args, kwargs, meta, arrays = load_case(golden, case)
    out = jax.jit(module.apply)(variables, *args, **kwargs)
    assert out.dtype == jnp.float32
    assert_matches_reference(case, "out", out, nhwc(arrays["out"]), meta)


def test_classifier_guidance_gradient_matches_reference(golden):
    """cond_fn of scripts/classifier_sample.py: scale * grad_x sum(log_softmax(logits)[y])."""
    module, variables, (x, t), _, meta, arrays = load_case(golden, "classifier_encoder")
    labels = jnp.asarray(meta["inputs"]["cond_y"])

    def selected_log_prob(x_in):
        log_probs = jax.nn.log_softmax(module.apply(variables, x_in, t), axis=-1)
        return log_probs[jnp.arange(x_in.shape[0]), labels].sum()

    grad = jax.jit(jax.grad(selected_log_prob))(x) * 2.5
    assert_matches_reference(
        "classifier_encoder", "cond_grad", grad, nhwc(arrays["cond_grad"]), meta
    )


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(jnp.array([0, 10]), 6)
    freqs = np.exp(-np.log(10000.0) * np.arange(3) / 3)
    expected = np.concatenate([np.cos(10 * freqs), np.sin(10 * freqs)])
    np.testing.assert_allclose(emb[1], expected, rtol=1e-6)
    np.testing.assert_array_equal(emb[0], [1, 1, 1, 0, 0, 0])
    assert timestep_embedding(jnp.array([3]), 7).shape == (1, 7)


def tiny_unet_kwargs(**overrides):
    """Two levels at 8x8: every kind of block, compiled in a few seconds."""
    kwargs = dict(
        image_size=8,
        in_channels=3,
        model_channels=32,
        out_channels=3,
        num_res_blocks=1,
        attention_resolutions=(2,),
        channel_mult=(1, 2),
        num_head_channels=16,
        use_scale_shift_norm=True,
        resblock_updown=True,
    )
    kwargs.update(overrides)
    return kwargs


TINY_X = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
TINY_T = jnp.array([3, 700])


def random_params(module, **kwargs):
    """Random, fan-in scaled parameters of the right shapes (no zero layers), drawn on the host:
    ``module.init`` would spend seconds compiling one threefry RNG per parameter."""
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), TINY_X, TINY_T, **kwargs))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        z = rng.standard_normal(leaf.shape).astype(np.float32)
        if leaf.ndim >= 2:
            return z / np.sqrt(np.prod(leaf.shape[:-1]))
        return 0.1 * z + (1.0 if path[-1].key == "scale" else 0.0)

    return jax.tree_util.tree_map_with_path(draw, abstract["params"])


# Cheap-to-compile PRNG for tests that need module.init or dropout masks.
def rbg_key(seed):
    return jax.random.key(seed, impl="rbg")


def test_output_layers_start_at_zero_and_params_are_float32():
    """Zero-initialised output convolutions (ResBlock out conv, attention proj_out, final conv):
    a fresh UNet predicts exactly 0 and every residual branch starts as the identity."""
    module = UNet(
        **tiny_unet_kwargs(channel_mult=(1,), attention_resolutions=(1,)), dtype=jnp.bfloat16
    )
    variables = jax.jit(module.init)(rbg_key(0), TINY_X, TINY_T)
    assert set(variables) == {"params"}
    params = variables["params"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    zero_layers = {"out_2", "out_layers_3", "proj_out"}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = {p.key for p in path}
        if names & zero_layers:
            assert not np.any(leaf), names
        elif path[-1].key == "kernel":
            assert np.any(leaf), names


@pytest.mark.parametrize("case", ["unet_learnsigma"])
def test_bfloat16_compute_stays_close_to_float32(golden, case):
    module, variables, args, kwargs, meta, arrays = load_case(golden, case, dtype=jnp.bfloat16)
    out = jax.jit(module.apply)(variables, *args, **kwargs)
    assert out.dtype == jnp.float32
    ref = nhwc(arrays["out"])
    rel = float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())
    assert 0 < rel < 0.1, f"{case}: bfloat16 relative error {rel:.3g}"


def test_dropout_uses_the_dropout_rng_only_in_training():
    module = UNet(**tiny_unet_kwargs(dropout=0.5))
    variables = {"params": random_params(module)}

    @jax.jit
    def run(variables):
        apply = lambda **kw: module.apply(variables, TINY_X, TINY_T, **kw)
        return (
            apply(),
            apply(train=False),
            apply(train=True, rngs={"dropout": rbg_key(3)}),
            apply(train=True, rngs={"dropout": rbg_key(4)}),
        )

    eval_out, eval_again, train_a, train_b = run(variables)
    np.testing.assert_array_equal(eval_again, eval_out)
    assert not np.allclose(train_a, eval_out)
    assert not np.allclose(train_a, train_b)
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda v: module.apply(v, TINY_X, TINY_T, train=True), variables)


def test_encoder_pools_and_superres_shapes():
    for pool in ("adaptive", "attention", "spatial", "spatial_v2"):
        classifier = EncoderUNet(**tiny_unet_kwargs(out_channels=7), pool=pool)
        logits, _ = jax.eval_shape(classifier.init_with_output, jax.random.key(0), TINY_X, TINY_T)
        assert logits.shape == (2, 7) and logits.dtype == jnp.float32, pool
    superres = SuperResUNet(**tiny_unet_kwargs(num_classes=4))
    low_res, y = jnp.ones((2, 4, 4, 3)), jnp.array([0, 3])
    out, variables = jax.eval_shape(
        lambda: superres.init_with_output(jax.random.key(0), TINY_X, TINY_T, low_res=low_res, y=y)
    )
    assert variables["params"]["input_blocks_0_0"]["kernel"].shape == (3, 3, 6, 32)
    assert out.shape == (2, 8, 8, 3)
    assert count_params(variables["params"]) > 0


def one_line_value_error(field, build):
    with pytest.raises(ValueError) as info:
        build()
    message = str(info.value)
    assert message.startswith(f"{field}:"), message
    assert "\n" not in message, message


@pytest.mark.parametrize(
    "field, overrides",
    [
        ("num_heads", dict(num_head_channels=-1, num_heads=3)),
        ("num_head_channels", dict(num_head_channels=24)),
        ("num_heads_upsample", dict(num_head_channels=-1, num_heads=2, num_heads_upsample=5)),
        ("attention_resolutions", dict(attention_resolutions=(4,))),
        ("attention_resolutions", dict(attention_resolutions=(16, 8))),
        ("image_size", dict(image_size=15)),
        ("channel_mult", dict(channel_mult=(1, 1.5))),
        ("channel_mult", dict(channel_mult=())),
        ("dropout", dict(dropout=1.0)),
        ("num_classes", dict(num_classes=0)),
    ],
)
def test_unet_config_errors_name_the_field(field, overrides):
    one_line_value_error(field, lambda: UNet(**tiny_unet_kwargs(**overrides)))


@pytest.mark.parametrize(
    "field, overrides",
    [
        ("pool", dict(pool="max")),
        ("num_head_channels", dict(pool="attention", num_head_channels=-1)),
        (
            "num_head_channels",
            dict(pool="attention", num_head_channels=48, attention_resolutions=()),
        ),
    ],
)
def test_classifier_config_errors_name_the_field(field, overrides):
    kwargs = tiny_unet_kwargs()
    kwargs.update(overrides)
    one_line_value_error(field, lambda: EncoderUNet(**kwargs))


def test_factory_and_call_errors_name_the_field():
    one_line_value_error("kind", lambda: module_from_kwargs("vae", tiny_unet_kwargs()))
    one_line_value_error("dims", lambda: module_from_kwargs("unet", tiny_unet_kwargs(dims=3)))
    one_line_value_error(
        "learn_sigma", lambda: module_from_kwargs("unet", tiny_unet_kwargs(learn_sigma=True))
    )
    one_line_value_error(
        "image_size", lambda: reference_kwargs_from_flags("unet", "--image_size 48")
    )
    one_line_value_error(
        "large_size", lambda: reference_kwargs_from_flags("superres", "--large_size 128")
    )
    one_line_value_error(
        "image_sise", lambda: reference_kwargs_from_flags("unet", "--image_sise 64")
    )
    one_line_value_error(
        "class_cond", lambda: reference_kwargs_from_flags("unet", "--class_cond maybe")
    )

    module = UNet(**tiny_unet_kwargs(num_classes=3))
    init = lambda x, **kw: jax.eval_shape(lambda: module.init(jax.random.key(0), x, TINY_T, **kw))
    one_line_value_error("y", lambda: init(TINY_X))
    one_line_value_error("x", lambda: init(TINY_X[..., :2], y=TINY_T))
    one_line_value_error("x", lambda: init(TINY_X[:, :5, :5], y=TINY_T))
    one_line_value_error("low_res", lambda: SuperResUNet(**tiny_unet_kwargs())(TINY_X, TINY_T))


def test_module_from_kwargs_ignores_reference_only_kwargs():
    kwargs = tiny_unet_kwargs(use_fp16=True, use_checkpoint=True, dims=2)
    module = module_from_kwargs("unet", kwargs, dtype=jnp.bfloat16, remat=True)
    assert isinstance(module, UNet) and module.dtype == jnp.bfloat16
    assert module.remat == "full"  # the boolean of older callers
    assert module.attention_resolutions == (2,)
    assert isinstance(module_from_kwargs("superres", tiny_unet_kwargs()), SuperResUNet)
    assert isinstance(module_from_kwargs("classifier", tiny_unet_kwargs()), EncoderUNet)
