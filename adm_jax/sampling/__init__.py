"""adm_jax.sampling."""
