"""`detr-jax demo`: the embedded default job, runnable offline on a fresh CPU machine.

Generates the synthetic COCO-panoptic dataset (`detr_jax.data.synthetic`) if absent, trains the
small panoptic DETR of `configs/demo.py` from scratch in the paper's two stages (the detector on
the panoptic boxes, then the mask head alone with the detector frozen), evaluates it on the
held-out images (box AP, segm AP, PQ), draws predictions next to the ground truth, and prints
where everything is.  Interrupted runs resume from the last checkpoint of the running stage.

WORKDIR/
    data/                      the synthetic dataset (COCO layout: train2017/, val2017/, annotations/)
    train/detection/           stage 1: orbax checkpoints, metrics.jsonl, model/ (the detector)
    train/masks/               stage 2: the same; model/ is the final panoptic model
    metrics.json               the evaluation (all COCO numbers and PQ)
    pictures/val_*.png         ground truth | prediction, for the first held-out images
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from detr_jax.config import Config, load_config_module

log = logging.getLogger(__name__)

# The demo's data: fresh images are cheap (about 5 ms each), and more of them keep the model from
# memorizing in the few thousand steps of the run.
DATASET = dict(num_train=4000, num_val=64, image_size=(128, 128), seed=0, max_rotation=15.0)
STAGES = ("detection", "masks")


def schedules() -> List[str]:
    """Names of the demo's training schedules (`SCHEDULES` of configs/demo.py)."""
    return list(load_config_module("demo").SCHEDULES)


def demo_stages(max_steps: Optional[int] = None, schedule: str = "default") -> List[Tuple[str, Config]]:
    """[(stage name, config)] of the two training stages of `configs/demo.py`: the detector
    (`get_config()` as it is), then the mask head with `MASK_STAGE`'s overrides of the train
    config; `schedule` (a key of its `SCHEDULES`) overrides the steps of each.  `max_steps` caps
    the steps of each stage (a shortened demo)."""
    module = load_config_module("demo")
    if schedule not in module.SCHEDULES:
        raise ValueError(f"unknown demo schedule {schedule!r}; known: {sorted(module.SCHEDULES)}")
    detection = module.get_config()
    masks = dataclasses.replace(detection, train=dataclasses.replace(detection.train, **module.MASK_STAGE))
    stages = []
    for name, config in zip(STAGES, (detection, masks)):
        overrides = module.SCHEDULES[schedule].get(name, {})
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, **overrides))
        if max_steps is not None:
            config = dataclasses.replace(config, train=dataclasses.replace(
                config.train, max_steps=min(max_steps, config.train.max_steps)))
        stages.append((name, config))
    return stages


PICTURE_SCALE = 3   # the 128-pixel images are drawn 3x larger, so labels stay legible


def upscale(image: np.ndarray, id_map: Optional[np.ndarray], boxes: np.ndarray, scale: int = PICTURE_SCALE):
    """Nearest upscaling of an image, its id map and its xyxy boxes."""
    big = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    big_ids = None if id_map is None else np.repeat(np.repeat(id_map, scale, axis=0), scale, axis=1)
    return big, big_ids, np.asarray(boxes, np.float32).reshape(-1, 4) * scale


def draw_ground_truth(record: Dict[str, Any], categories) -> np.ndarray:
    """The panoptic ground truth of a dataset record: segments and thing boxes."""
    from detr_jax.visualize import draw_predictions

    id_map = np.zeros(record["masks"].shape[1:], np.int64)
    for mask, segment_id in zip(record["masks"], record["segment_ids"]):
        id_map[mask] = segment_id
    things = record["isthing"]
    segments = [{"id": int(i), "category_id": int(c), "isthing": bool(t)}
                for i, c, t in zip(record["segment_ids"], record["labels"], things)]
    image, id_map, boxes = upscale(record["image"], id_map, record["boxes"][things])
    return draw_predictions(image, boxes, record["labels"][things], categories=categories, id_map=id_map,
                            segments_info=segments)


def draw_prediction(image: np.ndarray, result: Dict[str, Any], categories) -> np.ndarray:
    """Predicted panoptic segments and thing boxes with scores."""
    from detr_jax.visualize import draw_predictions

    things = np.array([categories.get(int(c), {}).get("isthing", True) for c in result["labels"]], bool).reshape(-1)
    image, id_map, boxes = upscale(image, result.get("id_map"), np.asarray(result["boxes"])[things])
    return draw_predictions(image, boxes, np.asarray(result["labels"])[things], np.asarray(result["scores"])[things],
                            categories=categories, id_map=id_map, segments_info=result.get("segments_info"))


def write_pictures(model, dataset, folder: pathlib.Path, count: int, config: Config, categories) -> list:
    """Ground truth | prediction for the first `count` images of `dataset`, as PNGs."""
    from PIL import Image

    from detr_jax.predict import Predictor
    from detr_jax.visualize import side_by_side

    folder.mkdir(parents=True, exist_ok=True)
    isthing = {c: v["isthing"] for c, v in categories.items()}
    predictor = Predictor(model, short_side=config.data.short_side, max_size=config.data.max_size,
                          bucket_multiple=config.data.bucket_multiple, threshold=0.5,
                          label_names={c: v["name"] for c, v in categories.items()},
                          is_thing_map=lambda c: isthing.get(int(c), True))
    records = [dataset[i] for i in range(count)]
    paths = []
    for record, result in zip(records, predictor.predict([r["image"] for r in records])):
        picture = side_by_side(draw_ground_truth(record, categories),
                               draw_prediction(record["image"], result, categories),
                               titles=("ground truth", "prediction"))
        path = folder / f"val_{len(paths):02d}.png"
        Image.fromarray(picture).save(path)
        paths.append(path)
    return paths


def run_demo(workdir="demo", *, max_steps: Optional[int] = None, num_pictures: int = 8,
             dataset_args: Optional[Dict[str, Any]] = None, progress: bool = True,
             schedule: str = "default") -> Dict[str, Any]:
    """Generate (if absent), train both stages (resuming), evaluate and draw; returns the metrics dict.

    `max_steps` caps the steps of each training stage; `schedule` names the steps of both (see
    `demo_stages`); a schedule other than "default" trains in train/SCHEDULE_detection/ and
    train/SCHEDULE_masks/."""
    from detr_jax.runtime import load
    from detr_jax.data.coco import CocoPanoptic
    from detr_jax.data.synthetic import ensure_synthetic
    from detr_jax.eval_runner import evaluate_model
    from detr_jax.evaluate import format_results
    from detr_jax.train import train

    workdir = pathlib.Path(workdir).absolute()
    stages = demo_stages(max_steps, schedule)   # an unknown schedule fails before any work
    root = ensure_synthetic(workdir / "data", **(dataset_args or DATASET))
    train_set, val_set = CocoPanoptic(root, "train2017"), CocoPanoptic(root, "val2017")
    init_from, steps = None, {}
    for name, config in stages:
        stage_dir = workdir / "train" / (name if schedule == "default" else f"{schedule}_{name}")
        train(config, stage_dir, train_set, resume=True, init_from=init_from, progress=progress)
        init_from, steps[name] = stage_dir / "model", config.train.max_steps
    model = load(init_from)
    categories = {c["id"]: {"name": c["name"], "color": c.get("color", (255, 200, 0)), "isthing": bool(c["isthing"])}
                  for c in val_set.categories}
    data = config.data
    metrics = evaluate_model(model, val_set, short_side=data.short_side, max_size=data.max_size,
                             bucket_multiple=data.bucket_multiple, batch_size=8, progress=progress)
    metrics["train_steps"], metrics["schedule"] = steps, schedule
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    pictures = write_pictures(model, val_set, workdir / "pictures", min(num_pictures, len(val_set)), config,
                              categories)
    print(format_results(metrics))
    print(f"\nmetrics: {workdir / 'metrics.json'}\npictures: {pictures[0].parent}/val_*.png "
          f"({len(pictures)} images: ground truth | prediction)\nmodel: {init_from}")
    return metrics
