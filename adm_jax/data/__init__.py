"""adm_jax.data."""
