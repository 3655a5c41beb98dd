"""Evaluation: COCO box and mask AP (`coco`), panoptic quality (`pq`), and the runner that drives a
model over a dataset (`runner`).

    from detr_jax.evaluation import evaluate_model, load_dataset
    results = evaluate_model("checkpoints/detr_r50_dc5_panoptic", load_dataset("coco", "val2017"))

The names below are imported on first use, so that `detr_jax.evaluation.pq` alone stays free of
JAX.
"""
_LAZY = {
    "evaluate_model": "detr_jax.evaluation.runner",
    "evaluate_predictions": "detr_jax.evaluation.runner",
    "load_dataset": "detr_jax.evaluation.runner",
    "make_eval_fn": "detr_jax.evaluation.runner",
    "summary_metrics": "detr_jax.evaluation.runner",
    "coco_evaluate": "detr_jax.evaluation.coco",
    "evaluate": "detr_jax.evaluation.coco",
    "format_results": "detr_jax.evaluation.coco",
    "write_results_json": "detr_jax.evaluation.coco",
    "pq_compute": "detr_jax.evaluation.pq",
    "pq_stats_from_arrays": "detr_jax.evaluation.pq",
    "pq_average": "detr_jax.evaluation.pq",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'detr_jax.evaluation' has no attribute {name!r}")


__all__ = list(_LAZY)
