"""FID Inception parity with the golden pytorch-fid vectors (fid_inception_299 / _resize64)."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close as golden_assert_close

from adm_jax.evaluation import inception

# Golden tolerance hints (fid_inception_299.json "tolerance_hint"); the float32 round-off of
# the reference itself is of this order. Softmax values are < 1, so a tight absolute bound.
TOL = {
    "pool3": (1e-4, 1e-4),
    "logits": (1e-3, 1e-4),
    "logits_nobias": (1e-3, 1e-4),
    "softmax_nobias": (1e-6, 1e-4),
    "mixed_6_conv": (1e-4, 1e-4),
    "spatial_features_2023": (1e-4, 1e-4),
    "stage_mean": (1e-4, 1e-4),
    "resized": (1e-5, 0.0),  # fid_inception_resize64 "resized_atol" (also used on 0..255)
}
OUTPUTS = ("pool3", "logits", "logits_nobias", "softmax_nobias", "spatial_features_2023")


def assert_close(case, quantity, got, want, tol_key):
    atol, rtol = TOL[tol_key]
    golden_assert_close(got, want, case=case, quantity=quantity, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def net(golden):
    """Golden random weights and ONE compiled network for (2, 299, 299, 3) inputs."""
    _, arrays = golden("fid_inception_299")
    variables = inception.variables_from_state_dict(
        {k: v for k, v in arrays.items() if k.startswith("sd/")}
    )
    x = jnp.zeros((2, 299, 299, 3), jnp.float32)
    fn = jax.jit(lambda v, x: inception.apply_inception(v, x, capture_stages=True))
    return variables, fn.lower(variables, x).compile()


def _check_outputs(case, out, stages, arrays, prefix=""):
    for name in OUTPUTS:
        if prefix + name not in arrays:  # tfstyle/ has no logits-with-bias
            continue
        assert_close(case, prefix + name, out[name], arrays[prefix + name], name)
    if prefix + "mixed_6_conv" in arrays:
        got = np.asarray(out["mixed_6_conv"]).transpose(0, 3, 1, 2)  # NHWC -> golden NCHW
        assert_close(case, "mixed_6_conv", got, arrays["mixed_6_conv"], "mixed_6_conv")
    if stages is not None:
        for key in (k for k in arrays if k.startswith("stage_mean/")):
            assert_close(case, key, stages[key], arrays[key], "stage_mean")


def test_inception_299_parity(golden, net):
    _, arrays = golden("fid_inception_299")
    variables, fn = net
    out, stages = fn(variables, jnp.asarray(arrays["x"].transpose(0, 2, 3, 1)))
    assert set(stages) == {k for k in arrays if k.startswith("stage_mean/")}
    _check_outputs("fid_inception_299", out, stages, arrays)
    # The sFID vector is mixed_6/conv's first 7 channels in (h, w, c) order.
    np.testing.assert_array_equal(
        np.asarray(out["spatial_features_2023"]),
        np.asarray(out["mixed_6_conv"])[..., :7].reshape(2, -1),
    )


@pytest.mark.parametrize("resize", ["torch", "tf"])
def test_inception_resize64_parity(golden, net, resize):
    case = f"fid_inception_resize64[{resize}]"
    _, arrays = golden("fid_inception_resize64")
    images = arrays["images_uint8_nhwc"]
    variables, fn = net
    if resize == "torch":
        resized = inception.resize_bilinear_torch(jnp.asarray(images, jnp.float32) / 255.0)
        prefix = ""
    else:
        resized = inception.resize_bilinear_tf(jnp.asarray(images))
        prefix = "tfstyle/"
    resized_nchw = np.asarray(resized).transpose(0, 3, 1, 2)
    assert resized_nchw.shape == (2, 3, 299, 299)
    for corner, sl in (("top_left", np.s_[:32, :32]), ("bottom_right", np.s_[-32:, -32:])):
        key = f"{prefix}resized_crop_{corner}"
        assert_close(case, key, resized_nchw[(..., *sl)], arrays[key], "resized")
    if resize == "torch":
        key = "resized_row_means"
        assert_close(case, key, resized_nchw.mean(-1), arrays[key], "resized")
    # The network runs on the same compiled executable as the 299 case.
    x = inception.preprocess(jnp.asarray(images), resize)
    out, stages = fn(variables, x)
    _check_outputs(case, out, stages if resize == "torch" else None, arrays, prefix)


def test_preprocess_identity_at_299():
    # Both resize paths leave a 299x299 image unchanged (only the scaling differs).
    img = np.random.default_rng(0).integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
    tf_x = np.asarray(inception.preprocess(jnp.asarray(img), "tf"))
    torch_x = np.asarray(inception.preprocess(jnp.asarray(img), "torch"))
    np.testing.assert_allclose(tf_x, (img.astype(np.float32) - 128) / 128, atol=1e-6)
    np.testing.assert_allclose(torch_x, img / 255.0 * 2 - 1, atol=1e-6)
    with pytest.raises(ValueError, match="resize"):
        inception.preprocess(jnp.asarray(img), "bicubic")


def test_weights_npz_sha_and_errors(golden, tmp_path):
    _, arrays = golden("fid_inception_299")
    sd = {k[3:]: v for k, v in arrays.items() if k.startswith("sd/")}
    good = tmp_path / "w.npz"
    np.savez(good, **sd, __source_sha256__=np.array(inception.WEIGHTS_SHA256))
    variables = inception.load_inception_variables(good)  # default: the official hash
    np.testing.assert_array_equal(
        variables["params"]["Mixed_6d"]["branch1x1"]["conv"]["kernel"],
        sd["Mixed_6d.branch1x1.conv.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["Conv2d_1a_3x3"]["bn"]["var"], sd["Conv2d_1a_3x3.bn.running_var"]
    )
    unverified = tmp_path / "unverified.npz"
    np.savez(unverified, **{k: v for k, v in sd.items() if "Mixed" not in k or "7c" not in k})
    with pytest.raises(ValueError, match="SHA-256"):
        inception.load_inception_variables(unverified)
    with pytest.raises(ValueError, match="missing"):  # structure check (Mixed_7c dropped)
        inception.load_inception_variables(unverified, sha256=None)
    pth = tmp_path / inception.WEIGHTS_FILENAME
    pth.write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="SHA-256"):
        inception.load_inception_variables(pth)
    with pytest.raises(FileNotFoundError, match="pytorch-fid/releases"):
        inception.load_inception_variables(tmp_path / "nowhere.npz")


def test_import_without_tensorflow():
    code = (
        "import sys; sys.modules['tensorflow'] = None; "
        "import adm_jax.evaluation, adm_jax.evaluation.convert_inception; "
        "assert sys.modules['tensorflow'] is None; print('ok')"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root, env=env
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
