"""ADM networks in Flax linen (NHWC), mirroring openai/guided-diffusion's unet.py.

``UNet`` (UNetModel), ``SuperResUNet`` (SuperResModel) and ``EncoderUNet`` (EncoderUNetModel,
the noisy classifier) take the reference constructor kwargs as fields, plus the compute
``dtype``, ``remat`` (policy) and ``attention_impl``. ``module_from_kwargs`` /
``reference_kwargs_from_flags`` reproduce script_util's builders; ``adm_jax.convert`` loads
released PyTorch checkpoints into them.
"""

from adm_jax.models.classifier import POOLS, EncoderUNet
from adm_jax.models.factory import (
    KINDS,
    NUM_CLASSES,
    abstract_params,
    count_params,
    example_inputs,
    module_from_kwargs,
    parse_flags,
    reference_kwargs_from_flags,
    with_shape,
)
from adm_jax.models.layers import ATTENTION_IMPLS, timestep_embedding
from adm_jax.models.unet import REMAT_POLICIES, SuperResUNet, UNet, remat_policy_name

__all__ = [
    "ATTENTION_IMPLS",
    "REMAT_POLICIES",
    "remat_policy_name",
    "KINDS",
    "NUM_CLASSES",
    "POOLS",
    "EncoderUNet",
    "SuperResUNet",
    "UNet",
    "abstract_params",
    "count_params",
    "example_inputs",
    "module_from_kwargs",
    "with_shape",
    "parse_flags",
    "reference_kwargs_from_flags",
    "timestep_embedding",
]
