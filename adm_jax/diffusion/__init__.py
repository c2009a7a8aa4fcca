"""adm_jax.diffusion."""
