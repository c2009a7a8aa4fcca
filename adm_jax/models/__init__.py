"""adm_jax.models."""
