"""Kernels of adm_jax.models: attention through jax.nn.dot_product_attention (both head layouts,
float32 softmax, implementation choice), GroupNorm's custom gradient (equal to autodiff of its
definition) and rematerialisation policies (same parameters, outputs and gradients as without,
less compiled memory)."""

import functools

import jax
import jax.extend
import jax.flatten_util
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_models import (
    TINY_T,
    TINY_X,
    load_case,
    nhwc,
    one_line_value_error,
    random_params,
    tiny_unet_kwargs,
)

from adm_jax.models import ATTENTION_IMPLS, REMAT_POLICIES, EncoderUNet, UNet
from adm_jax.models.layers import GroupNorm32, attention_implementation, qkv_attention
from adm_jax.train import ConfigError, build_model, validate_config
from configs import tiny

POLICIES = tuple(REMAT_POLICIES)


def all_equations(jaxpr):
    """Every equation of a jaxpr, nested jaxprs (jit, remat, custom_vjp) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from all_equations(sub)


def reference_attention(qkv, num_heads, legacy):
    """QKVAttentionLegacy / QKVAttention of guided_diffusion/unet.py in float64 numpy, on
    (B, T, 3 * H * C) tokens: the reference's own packing, ch**-0.25 scaling of q and k, and
    softmax over keys."""
    qkv = np.asarray(qkv, np.float64).transpose(0, 2, 1)  # (B, width, T) as torch's NCL
    bs, width, length = qkv.shape
    ch = width // (3 * num_heads)
    if legacy:
        q, k, v = np.split(qkv.reshape(bs * num_heads, 3 * ch, length), 3, axis=1)
    else:
        q, k, v = (a.reshape(bs * num_heads, ch, length) for a in np.split(qkv, 3, axis=1))
    scale = 1 / np.sqrt(np.sqrt(ch))
    weight = np.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = np.exp(weight - weight.max(-1, keepdims=True))
    weight /= weight.sum(-1, keepdims=True)
    out = np.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)
    return out.transpose(0, 2, 1)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "new_order"])
def test_attention_matches_the_reference_head_layouts(legacy):
    heads, ch, length = 3, 8, 20
    qkv = jax.random.normal(jax.random.key(0), (2, length, 3 * heads * ch)) * 2.0
    ours = jax.jit(lambda a: qkv_attention(a, heads, legacy=legacy, implementation="xla"))(qkv)
    expected = reference_attention(qkv, heads, legacy)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    # The two layouts read different channels as q, k and v: not interchangeable.
    other = reference_attention(qkv, heads, not legacy)
    assert np.abs(np.asarray(ours) - other).max() > 0.1


def test_bfloat16_attention_keeps_logits_and_softmax_in_float32():
    qkv = jnp.ones((1, 16, 3 * 2 * 8), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda a: qkv_attention(a, 2, legacy=False))(qkv).jaxpr
    eqns = list(all_equations(jaxpr))
    exps = [e for e in eqns if e.primitive.name == "exp"]
    assert exps and all(e.outvars[0].aval.dtype == jnp.float32 for e in exps)
    logits = [e for e in eqns if e.primitive.name == "dot_general"][0]
    assert logits.outvars[0].aval.dtype == jnp.float32
    out = qkv_attention(qkv, 2, legacy=False)
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 16, 16)


def test_attention_implementation_choice_and_errors():
    assert ATTENTION_IMPLS == ("auto", "xla", "cudnn")
    gpu = jax.default_backend() == "gpu"
    assert attention_implementation("auto", jnp.float32, 64) == "xla"
    assert attention_implementation("auto", jnp.bfloat16, 64) == ("cudnn" if gpu else "xla")
    assert attention_implementation("auto", jnp.bfloat16, 12) == "xla"  # not a multiple of 8
    assert attention_implementation("xla", jnp.bfloat16, 64) == "xla"
    one_line_value_error(
        "attention_impl", lambda: attention_implementation("cudnn", jnp.float32, 64)
    )
    if not gpu:
        one_line_value_error(
            "attention_impl", lambda: attention_implementation("cudnn", jnp.bfloat16, 64)
        )
    one_line_value_error("attention_impl", lambda: UNet(**tiny_unet_kwargs(), attention_impl="x"))
    one_line_value_error("remat", lambda: UNet(**tiny_unet_kwargs(), remat="partial"))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "new_order"])
def test_cudnn_attention_matches_xla_on_gpu(legacy):
    qkv = jax.random.normal(jax.random.key(0), (2, 256, 3 * 4 * 64), jnp.bfloat16)

    def run(impl):
        fn = lambda a: qkv_attention(a, 4, legacy=legacy, implementation=impl).astype(jnp.float32)
        out, pullback = jax.vjp(fn, qkv)
        return out, pullback(out)[0].astype(jnp.float32)

    (out, grad), (out_x, grad_x) = jax.jit(lambda: (run("cudnn"), run("xla")))()
    np.testing.assert_allclose(out, out_x, atol=2e-2 * float(jnp.abs(out_x).max()))
    np.testing.assert_allclose(grad, grad_x, atol=2e-2 * float(jnp.abs(grad_x).max()))


def group_norm_definition(x, scale, bias, groups=32, eps=1e-5):
    """torch.nn.GroupNorm as written in its documentation, on the 5-D [B, S, G, C/G] view."""
    h = x.astype(jnp.float32)
    v = h.reshape(h.shape[0], -1, groups, h.shape[-1] // groups)
    mean = v.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(v - mean).mean(axis=(1, 3), keepdims=True)
    out = ((v - mean) / jnp.sqrt(var + eps)).reshape(h.shape) * scale + bias
    return out.astype(x.dtype)


@pytest.mark.parametrize(
    "shape,dtype,tol",
    [
        ((4, 8, 8, 64), jnp.float32, 1e-5),  # images, two channels per group
        ((3, 16, 128), jnp.float32, 1e-5),  # attention tokens
        ((2, 4, 4, 96), jnp.bfloat16, 2e-2),  # bfloat16 compute, float32 statistics
    ],
)
def test_group_norm_custom_gradient_equals_autodiff_of_the_definition(shape, dtype, tol):
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    x = (jax.random.normal(keys[0], shape) * 3 + 1.5).astype(dtype)
    params = {
        "scale": jax.random.normal(keys[1], shape[-1:]),
        "bias": jax.random.normal(keys[2], shape[-1:]),
    }
    cotangent = jax.random.normal(keys[3], shape)
    norm = GroupNorm32()

    def loss(fn, params, x):  # a nonlinearity after the norm, as in the networks
        return jnp.sum(jnp.sin(fn(params, x).astype(jnp.float32)) * cotangent)

    ours = functools.partial(loss, lambda p, x: norm.apply({"params": p}, x))
    definition = functools.partial(
        loss, lambda p, x: group_norm_definition(x, p["scale"], p["bias"])
    )
    np.testing.assert_allclose(
        np.asarray(norm.apply({"params": params}, x), np.float32),
        np.asarray(group_norm_definition(x, params["scale"], params["bias"]), np.float32),
        rtol=tol, atol=tol,
    )  # fmt: skip
    got = jax.grad(ours, argnums=(0, 1))(params, x)
    want = jax.grad(definition, argnums=(0, 1))(params, x)
    assert got[1].dtype == x.dtype
    for name, g, w in (
        ("scale", got[0]["scale"], want[0]["scale"]),
        ("bias", got[0]["bias"], want[0]["bias"]),
        ("x", got[1], want[1]),
    ):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        scale = np.abs(w).max()
        np.testing.assert_allclose(g, w, rtol=0, atol=tol * scale, err_msg=f"d{name}")


def test_remat_policies_keep_the_parameter_tree():
    """Converted reference checkpoints and Orbax checkpoints load whatever the policy."""
    cases = (
        (UNet(**tiny_unet_kwargs(num_classes=5)), {"y": TINY_T}),
        (EncoderUNet(**tiny_unet_kwargs(), pool="attention"), {}),
    )
    for module, kwargs in cases:
        trees = {}
        for policy in POLICIES:
            init = functools.partial(module.clone(remat=policy).init, **kwargs)
            shapes = jax.eval_shape(init, jax.random.key(0), TINY_X, TINY_T)
            trees[policy] = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), shapes)
        for policy in POLICIES[1:]:
            assert trees[policy] == trees["none"], (type(module).__name__, policy)


def test_converted_reference_weights_run_under_remat(golden):
    """The golden legacy-attention UNet's converted state_dict under dots-saveable remat gives
    the reference output to the golden tolerance."""
    case = "unet_classcond_legacyattn"
    module, variables, args, kwargs, meta, arrays = load_case(golden, case, remat="dots-saveable")
    assert module.remat == "dots-saveable"
    out = jax.jit(module.apply)(variables, *args, **kwargs)
    ref = nhwc(arrays["out"])
    tol = min(1e-5 * float(np.abs(ref).max()), meta["tolerance_hint"]["atol"])
    assert float(np.abs(np.asarray(out, np.float64) - ref).max()) <= tol


@pytest.mark.parametrize("kind", ["unet", "classifier"])
def test_remat_policies_give_the_same_outputs_and_gradients(kind):
    # One level (no resampling) keeps the differentiated graphs quick to compile.
    base = tiny_unet_kwargs(channel_mult=(1,), attention_resolutions=(1,))
    if kind == "unet":
        module, kwargs = UNet(**base, num_classes=5), {"y": jnp.array([4, 1])}
    else:
        module, kwargs = EncoderUNet(**{**base, "out_channels": 7}, pool="attention"), {}
    params = random_params(module, **kwargs)
    modules = {p: module.clone(remat=p) for p in POLICIES}

    @jax.jit
    def outputs_and_grads(params):
        results = {}
        for policy, m in modules.items():
            fn = lambda p, m=m: m.apply({"params": p}, TINY_X, TINY_T, **kwargs)
            out, pullback = jax.vjp(fn, params)
            results[policy] = (out, pullback(out)[0])  # gradient of |out|^2 / 2
        return results

    results = outputs_and_grads(params)
    out, grads = results["none"]
    assert float(jnp.abs(out).max()) > 0.1
    flat = jax.flatten_util.ravel_pytree(grads)[0]
    for policy in POLICIES[1:]:
        out_p, grads_p = results[policy]
        # XLA fuses the rematerialised graphs differently: equal up to float32 round-off.
        np.testing.assert_allclose(out_p, out, rtol=1e-5, atol=1e-5, err_msg=policy)
        # Some biases feed a GroupNorm and get (round-off sized) zero gradients: compare
        # against the overall gradient scale.
        flat_p = jax.flatten_util.ravel_pytree(grads_p)[0]
        err = float(jnp.abs(flat_p - flat).max())
        assert err <= 1e-5 * float(jnp.abs(flat).max()), (policy, err)
        # Every ResBlock and AttentionBlock is one rematerialised region with the policy.
        forward = lambda p, m=modules[policy]: m.apply({"params": p}, TINY_X, TINY_T, **kwargs)
        eqns = all_equations(jax.make_jaxpr(forward)(params).jaxpr)
        regions = [e for e in eqns if "remat" in e.primitive.name]  # jax.checkpoint's
        blocks = 9 if kind == "unet" else 5  # ResBlock + AttentionBlock: UNet 5 + 4, encoder 3 + 2
        assert len(regions) == blocks, (policy, len(regions))
        assert {e.params["policy"] for e in regions} == {REMAT_POLICIES[policy]}


def test_train_remat_config_field():
    config = tiny.get_config()
    config.train.fsdp = 1
    assert config.train.remat == "none" and build_model(config).remat == "none"
    for policy in POLICIES:
        config.train.remat = policy
        validate_config(config)
        assert build_model(config).remat == policy
    config.train.remat = "dots_saveable"  # jax's spelling
    validate_config(config)
    assert build_model(config).remat == "dots-saveable"
    config.train.remat = "partial"
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    message = str(info.value)
    assert message.startswith("train.remat:") and "'dots-saveable'" in message, message
    assert "\n" not in message
    # Configs stored before the policies existed hold a boolean.
    stored = config.to_dict()
    stored["train"]["remat"] = True
    assert build_model(ml_collections.ConfigDict(stored)).remat == "full"
