"""Every released ADM checkpoint (golden/published_models.json): our network built from its
README flags has the reference's constructor arguments, exactly its parameter count, and the
converter maps every listed state_dict key and shape. Nothing is allocated at full size:
parameter shapes come from ``jax.eval_shape`` and checkpoint tensors are zero-stride views,
converted one at a time."""

import json

import numpy as np
import pytest
from conftest import GOLDEN_DIR

from adm_jax.convert import check_state_dict, iter_converted, state_dict_spec
from adm_jax.models import (
    abstract_params,
    count_params,
    module_from_kwargs,
    reference_kwargs_from_flags,
)

KIND = {"diffusion": "unet", "super_resolution": "superres", "classifier": "classifier"}


def published_models():
    with open(GOLDEN_DIR / "published_models.json") as f:
        return json.load(f)["models"]


def readme_flags(model):
    if model["kind"] == "classifier":
        # classifier_sample.py gets MODEL_FLAGS (image_size) plus any classifier flags.
        return f"--image_size {model['resolved_args']['image_size']} {model['extra_flags']}"
    return model["readme_model_flags"]


def as_reference_attributes(kind, kwargs):
    """Our kwargs as the reference model object records them (what the JSON lists)."""
    attrs = dict(kwargs)
    if attrs["num_heads_upsample"] == -1:
        attrs["num_heads_upsample"] = attrs["num_heads"]
    if kind == "superres":  # SuperResModel passes 2 * in_channels to UNetModel
        attrs["in_channels"] *= 2
    return {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()}


@pytest.fixture(scope="module")
def models():
    return {m["name"]: m for m in published_models()}


@pytest.mark.parametrize("name", [m["name"] for m in published_models()])
def test_published_model_architecture_and_checkpoint_keys(models, name):
    model = models[name]
    kind = KIND[model["kind"]]
    kwargs = reference_kwargs_from_flags(kind, readme_flags(model))

    recorded = model.get("unet_constructor_args") or model["encoder_constructor_args"]
    ours = as_reference_attributes(kind, kwargs)
    differing = {k: (ours.get(k), v) for k, v in recorded.items() if ours.get(k) != v}
    assert not differing, f"{name}: constructor args (ours, reference) differ: {differing}"

    num_params = count_params(abstract_params(module_from_kwargs(kind, kwargs)))
    assert num_params == model["total_params"], f"{name}: {num_params} parameters"

    spec = state_dict_spec(kind, kwargs)
    zero = np.zeros((), np.float32)
    state_dict = {key: np.broadcast_to(zero, shape) for key, shape in model["state_dict"]}
    check_state_dict(spec, state_dict, context=f" ({name})")
    converted = 0
    for _, param, value in iter_converted(spec, state_dict):
        assert value.shape == param.flax_shape and value.dtype == np.float32
        converted += value.size
    assert converted == model["total_params"]
    assert len(spec) == model["num_state_dict_tensors"]
