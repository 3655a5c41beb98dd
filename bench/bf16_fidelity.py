"""bf16 against float32: the reference R50-DC5 panoptic model on the reference photos.

The model is the fixture recipe (`tests/data/make_checkpoint.py`, seed 20: the weights the
original's fixtures were computed with) converted to detr-jax, run by `DETRModel` twice, in float32
and with `dtype="bfloat16"` (bf16 compute, float32 parameters and outputs), on each photo of the
fixture folder (`../shared/fixtures/detr_reference/photos`, or DETR_REFERENCE_DIR) resized as for
evaluation (short side 800, max 1333: `resize_for_eval`) and unpadded.  Every query's mask is
computed (no mask-query selection), so both runs post-process the same kind of output.

    python bench/bf16_fidelity.py [--short-side 800] [--max-size 1333] [--policy auto] [--out FILE.json]

Reported per photo and over all photos:
  max_box_error        max |box_bf16 - box_f32| over every query and coordinate (cx, cy, w, h in
                       [0, 1] of the image), and the same over the queries that the panoptic
                       post-processor keeps in float32 (`kept_max_box_error`);
  class_agreement      the fraction of queries whose best class (argmax over all C+1 logits, "no
                       object" included) is the same;
  kept_agreement       whether the panoptic post-processor keeps the same queries with the same classes;
  panoptic_pixels_same_query     the fraction of pixels of the post-processed panoptic maps
                       (`postprocess_panoptic`, threshold 0.85, at the photo's size) whose segment
                       belongs to the same query (segments are matched by the query that owns them);
  panoptic_pixels_same_category  ... whose segment has the same category (0 = no segment).
The same figures for float32 against float32 under the other execution policy (`--baseline`, on
by default: blocked vs dense attention, image programs split differently, so only the order of
float32 roundings differs) give the floor that rounding alone reaches on these weights: the
recipe's random weights leave many queries near the 0.85 threshold and many pixels with nearly
equal mask logits, so a tiny change flips them.
bf16 on a CPU is emulated and slow: the figures, not the times, are the point.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np

BENCH = pathlib.Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
FIXTURES = pathlib.Path(os.environ.get("DETR_REFERENCE_DIR", str(REPO.parent / "shared" / "fixtures" / "detr_reference")))
RECIPE_SEED = 20


def recipe_state_dict() -> Dict[str, np.ndarray]:
    """The 490 recipe tensors (original DETRsegm keys) from the repository's copy of the recipe."""
    spec = importlib.util.spec_from_file_location("detr_recipe", REPO / "tests" / "data" / "make_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_state_dict(RECIPE_SEED)


def owner_query_map(result: Dict[str, object]) -> np.ndarray:
    """int [H, W]: the query that owns each pixel's segment, -1 where no segment (empty result)."""
    queries = np.asarray(result["query_indices"], np.int64)
    if not len(queries):
        return np.full(result["id_map"].shape, -1, np.int64)
    return queries[result["id_map"]]


def category_map(result: Dict[str, object]) -> np.ndarray:
    """int [H, W]: 1 + the category of each pixel's segment, 0 where no segment."""
    categories = np.array([s["category_id"] + 1 for s in result["segments_info"]], np.int64)
    if not len(categories):
        return np.zeros(result["id_map"].shape, np.int64)
    return categories[result["id_map"]]


def compare(f32: Dict[str, np.ndarray], bf16: Dict[str, np.ndarray], pan32, pan16) -> Dict[str, object]:
    """The figures of one photo (see the module docstring) from two runs' outputs and panoptic
    results: the reference run (f32, pan32) and the one compared with it (bf16, pan16)."""
    box_error = np.abs(bf16["pred_boxes"] - f32["pred_boxes"])[0]          # [Q, 4]
    kept = pan32["query_indices"]
    owners32, owners16 = owner_query_map(pan32), owner_query_map(pan16)
    kept_classes = lambda pan: [(int(q), s["category_id"]) for q, s in zip(pan["query_indices"], pan["segments_info"])]  # noqa: E731
    return {
        "max_box_error": float(box_error.max()),
        "kept_max_box_error": float(box_error[kept].max()) if len(kept) else None,
        "max_logit_error": float(np.abs(bf16["pred_logits"] - f32["pred_logits"]).max()),
        "class_agreement": float((bf16["pred_logits"].argmax(-1) == f32["pred_logits"].argmax(-1)).mean()),
        "segments": [len(pan32["segments_info"]), len(pan16["segments_info"])],
        "kept_agreement": kept_classes(pan32) == kept_classes(pan16),
        "panoptic_pixels_same_query": float((owners32 == owners16).mean()),
        "panoptic_pixels_same_category": float((category_map(pan32) == category_map(pan16)).mean()),
        "pixels": int(owners32.size),
    }


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short-side", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--policy", default="auto", help="the runtime's execution policy (auto, cpu, accelerator)")
    parser.add_argument("--photos", default=str(FIXTURES / "photos"), help="folder of the photos (*.png)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="leave out float32 under the other policy (the rounding floor)")
    parser.add_argument("--out", help="JSON file for every figure")
    args = parser.parse_args(argv)

    import jax

    from detr_jax import convert
    from detr_jax.data.preprocess import load_image, normalize, resize_for_eval
    from detr_jax.postprocess import postprocess_panoptic
    from detr_jax.runtime import DETRModel

    photos = sorted(pathlib.Path(args.photos).glob("*.png"))
    if not photos:
        parser.error(f"no photos in {args.photos} (set DETR_REFERENCE_DIR or --photos)")
    sd = recipe_state_dict()
    config = convert.infer_config(convert.canonical_state_dict(sd), {"name": "dc5"})
    variables = jax.device_put(convert.convert_state_dict(sd, config))
    del sd
    models = {dtype: DETRModel(config, variables, policy=args.policy, dtype=dtype) for dtype in ("float32", "bfloat16")}
    other = "accelerator" if models["float32"].policy.name == "cpu" else "cpu"
    if args.baseline:
        models["float32_" + other] = DETRModel(config, variables, policy=other, dtype="float32")
    rows = []
    for path in photos:
        original = load_image(path)
        image = resize_for_eval(original, args.short_side, args.max_size)
        x, valid = normalize(image)[None], np.ones((1, *image.shape[:2]), bool)
        outputs, panoptic, seconds = {}, {}, {}
        for dtype, model in models.items():
            start = time.perf_counter()
            out = jax.device_get(model(x, valid))
            seconds[dtype] = time.perf_counter() - start
            outputs[dtype] = {k: np.asarray(out[k], np.float32) for k in ("pred_logits", "pred_boxes", "pred_masks")}
            panoptic[dtype] = postprocess_panoptic(outputs[dtype]["pred_logits"], outputs[dtype]["pred_masks"],
                                                   np.array([image.shape[:2]]), np.array([original.shape[:2]]))[0]
        row = dict(photo=path.stem, input_hw=list(image.shape[:2]), **compare(
            outputs["float32"], outputs["bfloat16"], panoptic["float32"], panoptic["bfloat16"]),
            first_call_s={k: round(v, 1) for k, v in seconds.items()})
        if args.baseline:
            baseline = "float32_" + other
            row["float32_vs_" + other] = compare(outputs["float32"], outputs[baseline], panoptic["float32"],
                                                 panoptic[baseline])
        rows.append(row)
        print(json.dumps(row), flush=True)

    overall = summary(rows)
    if args.baseline:
        overall["float32_vs_" + other] = summary([dict(r["float32_vs_" + other], photo=r["photo"]) for r in rows])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
              "backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "policy": args.policy,
              "short_side": args.short_side, "max_size": args.max_size, "photos": rows, "overall": overall}
    print(f"\nbfloat16 against float32 (policy {models['float32'].policy.name}):")
    print_table(rows, overall)
    if args.baseline:
        print(f"\nthe rounding floor: float32 (policy {models['float32'].policy.name}) against float32 (policy {other}):")
        print_table([dict(r["float32_vs_" + other], photo=r["photo"], input_hw=r["input_hw"]) for r in rows],
                    overall["float32_vs_" + other])
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"written: {args.out}")
    return 0


def summary(rows: List[Dict[str, object]]) -> Dict[str, object]:
    """The figures over all photos (max errors, mean class agreement, pixel-weighted agreements)."""
    pixels = sum(r["pixels"] for r in rows)
    return {
        "max_box_error": max(r["max_box_error"] for r in rows),
        "kept_max_box_error": max((r["kept_max_box_error"] for r in rows if r["kept_max_box_error"] is not None),
                                  default=None),
        "max_logit_error": max(r["max_logit_error"] for r in rows),
        "class_agreement": float(np.mean([r["class_agreement"] for r in rows])),
        "photos_with_the_same_kept_queries": sum(r["kept_agreement"] for r in rows),
        "panoptic_pixels_same_query": sum(r["panoptic_pixels_same_query"] * r["pixels"] for r in rows) / pixels,
        "panoptic_pixels_same_category": sum(r["panoptic_pixels_same_category"] * r["pixels"] for r in rows) / pixels,
    }


def print_table(rows: List[Dict[str, object]], o: Dict[str, object]) -> None:
    """A markdown table of the figures per photo and over all photos."""
    print("| photo | input | max box error (all; kept) | best class agrees | kept queries same | "
          "panoptic pixels: same query; same category |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        kept = "-" if r["kept_max_box_error"] is None else f"{r['kept_max_box_error']:.2e}"
        print(f"| {r['photo']} | {r['input_hw'][0]}x{r['input_hw'][1]} | {r['max_box_error']:.2e}; {kept} "
              f"| {100 * r['class_agreement']:.1f}% | {'yes' if r['kept_agreement'] else 'no'} "
              f"({r['segments'][0]} / {r['segments'][1]} segments) "
              f"| {100 * r['panoptic_pixels_same_query']:.3f}%; {100 * r['panoptic_pixels_same_category']:.3f}% |")
    print(f"| all {len(rows)} | | {o['max_box_error']:.2e}; {o['kept_max_box_error'] or float('nan'):.2e} "
          f"| {100 * o['class_agreement']:.1f}% | {o['photos_with_the_same_kept_queries']} of {len(rows)} "
          f"| {100 * o['panoptic_pixels_same_query']:.3f}%; {100 * o['panoptic_pixels_same_category']:.3f}% |")


if __name__ == "__main__":
    sys.exit(main())
