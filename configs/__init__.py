"""ml_collections configs, one ``get_config()`` per file; see docs/training.md."""
