"""adm_jax.evaluation."""
