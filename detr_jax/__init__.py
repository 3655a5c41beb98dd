"""detr-jax: DETR (End-to-End Object Detection with Transformers) in JAX/Flax.

    import detr_jax
    model = detr_jax.load("checkpoints/detr_r50_dc5_panoptic")   # converted with convert_weights.py
    outputs = model(pixel_values, pixel_mask)                    # NHWC, pixel_mask True on real pixels
    model = detr_jax.load(path, dtype="bfloat16", policy="accelerator")   # see detr_jax.runtime
"""
__version__ = "0.1.0"

_LAZY = {
    "load": ("detr_jax.runtime", "load"),
    "save": ("detr_jax.checkpoint", "save"),
    "DETRModel": ("detr_jax.runtime", "DETRModel"),
    "Predictor": ("detr_jax.predict", "Predictor"),
    "ModelConfig": ("detr_jax.config", "ModelConfig"),
    "load_config": ("detr_jax.config", "load_config"),
}


def __getattr__(name):  # imported on first use: `import detr_jax` stays cheap
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'detr_jax' has no attribute {name!r}")


__all__ = list(_LAZY) + ["__version__"]
