"""The model zoo's configs, one small file per model, each with `get_config() -> Config`.

Load them by name with `detr_jax.config.load_config("detr_r50")` (or `--config detr_r50`);
they live inside the package so that an installed wheel has them.
"""
