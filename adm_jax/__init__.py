"""adm_jax: ADM ("Diffusion Models Beat GANs on Image Synthesis") in JAX/Flax.

Subpackages: ``models`` (UNet, SuperResUNet, EncoderUNet), ``diffusion`` (pure diffusion math,
losses and samplers with classifier guidance), ``data`` (TFDS + grain input), ``train``
(sharded train steps, loop, Orbax checkpoints), ``sampling`` (batch sampling to .npz/.png),
``evaluation`` (FID Inception, FID/sFID/IS/precision/recall), ``convert`` (reference
checkpoint import). None of them needs TensorFlow at import time.
"""

__version__ = "0.1.0"
