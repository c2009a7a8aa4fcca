"""adm_jax.train."""
