"""Result files of `detr-jax predict`: what `predict_to_folder` writes for a `Predictor`'s results.

Per image `STEM.json` (`result_to_json`), `STEM_vis.png` (`visualize`) and, for panoptic models,
`STEM_panoptic.png`; for the whole set `detections.json` (COCO results), `images.json` and
`panoptic.json` (COCO panoptic predictions).  The files use the COCO panoptic ids (0 = VOID,
segment k of a result has id k + 1: `panoptic_format.coco_panoptic_ids`).  An image's files are
written atomically: a failure leaves none of them.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from detr_jax.evaluation.coco import boxes_to_coco_results
from detr_jax.labels import panoptic_categories, panoptic_is_thing
from detr_jax.panoptic_format import coco_panoptic_ids, id_to_rgb
from detr_jax.predict import Predictor
from detr_jax.visualize import draw_predictions


def image_ids(paths: Sequence[str]) -> List[int]:
    """COCO image ids of files: int(stem) when every stem is a distinct number (COCO's
    '000000000139.jpg' -> 139, so results match COCO annotations), else the running index 1, 2, ..."""
    stems = [pathlib.Path(p).stem for p in paths]
    if stems and all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(paths) + 1))


def output_stems(paths: Sequence[str]) -> List[str]:
    """File stems for the outputs, made unique ('a', 'a_2', ...) when two inputs share a stem."""
    seen: set = set()
    stems = []
    for p in paths:
        stem = candidate = pathlib.Path(p).stem or "image"
        k = 2
        while candidate in seen:
            candidate, k = f"{stem}_{k}", k + 1
        seen.add(candidate)
        stems.append(candidate)
    return stems


def _write_atomically(files: Dict[pathlib.Path, Any]) -> None:
    """Write {path: bytes or a function(tmp_path)} to temporary names, then rename them all; on
    any error remove the temporaries, so that no file of a half-written image is left."""
    temps = {}
    try:
        for path, content in files.items():
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            temps[tmp] = path
            if callable(content):
                content(tmp)
            else:
                tmp.write_bytes(content)
        for tmp, path in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps:
            if tmp.exists():
                tmp.unlink()


def _save_png(array: np.ndarray):
    return lambda path: Image.fromarray(array).save(path, format="PNG")


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()


def result_to_json(result: Mapping[str, Any], *, file_name: str, image_id: int,
                   png_name: Optional[str] = None) -> Dict[str, Any]:
    """The per-image JSON of a good result (numbers as JSON lists); segments_info is taken as given
    (pass it through `coco_panoptic_ids` first for the files' ids)."""
    out = {"file_name": file_name, "image_id": int(image_id), "height": result["height"], "width": result["width"],
           "boxes": np.asarray(result["boxes"], np.float64).round(3).tolist(),
           "scores": [round(float(s), 6) for s in result["scores"]],
           "labels": [int(v) for v in result["labels"]], "label_names": list(result["label_names"])}
    if "segments_info" in result:
        out["panoptic_png"] = png_name
        out["segments_info"] = [{"id": int(s["id"]), "category_id": int(s["category_id"]),
                                 "isthing": bool(s["isthing"]), "area": int(s["area"]),
                                 "label_name": s["label_name"], "score": round(float(s["score"]), 6)}
                                for s in result["segments_info"]]
    return out


def visualize(result: Mapping[str, Any], dataset: str) -> np.ndarray:
    """The `_vis.png` image: panoptic segments (if any) and the reported boxes with names and scores;
    on panoptic models only thing boxes are drawn (stuff is named on its segment)."""
    keep = np.ones(len(result["labels"]), bool)
    if "segments_info" in result and dataset == "coco_panoptic":
        keep = np.array([panoptic_is_thing(int(label)) for label in result["labels"]], bool).reshape(-1)
    return draw_predictions(result["image"], np.asarray(result["boxes"])[keep], np.asarray(result["labels"])[keep],
                            np.asarray(result["scores"])[keep],
                            names=[n for n, k in zip(result["label_names"], keep) if k], dataset=dataset,
                            id_map=result.get("id_map"), segments_info=result.get("segments_info"))


def predict_to_folder(predictor: Predictor, paths: Sequence[Union[str, os.PathLike]], out_dir: Union[str, os.PathLike],
                      *, progress: bool = True, vis: bool = True, log=sys.stderr) -> Dict[str, Any]:
    """Run `predictor` over image files and write, per image, `STEM.json`, `STEM_vis.png` and
    (panoptic) `STEM_panoptic.png` (ids: COCO convention, 0 = VOID, segment k of the result has
    id k + 1 in the PNG and the JSONs); then for the whole set `detections.json` (COCO results: image_id,
    category_id = label, bbox [x, y, w, h], score; every reported detection), `images.json` (id,
    file_name, height, width: the image ids used, see `image_ids`) and (panoptic) `panoptic.json`
    (COCO panoptic predictions: `annotations` with image_id, file_name, segments_info; the PNGs lie
    in `out_dir`, so `pq_compute(gt_json, out_dir/panoptic.json, gt_folder, out_dir)`).

    A failed image is reported on `log` with its path and reason and leaves no file.  Returns
    {"written": n, "failed": [(path, reason)], "seconds": s, "compilations": c}.
    """
    paths = [os.fspath(p) for p in paths]
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems, ids = output_stems(paths), image_ids(paths)
    detections: List[Dict[str, Any]] = []
    images: Dict[int, Dict[str, Any]] = {}
    annotations: Dict[int, Dict[str, Any]] = {}
    failed: List[Tuple[str, str]] = []
    start = time.perf_counter()
    for result in predictor.predict_iter(paths, keep_images=vis, progress=progress):
        i = result["index"]
        if result["error"]:
            failed.append((paths[i], result["error"]))
            print(f"detr-jax predict: failed: {paths[i]}: {result['error']}", file=log)
            continue
        stem, file_name = stems[i], os.path.basename(paths[i])
        png_name = f"{stem}_panoptic.png" if "id_map" in result else None
        coco_ids = None
        if png_name:
            coco_ids, segments = coco_panoptic_ids(result["id_map"], result["segments_info"])
            result = dict(result, id_map=coco_ids, segments_info=segments)
        record = result_to_json(result, file_name=file_name, image_id=ids[i], png_name=png_name)
        files: Dict[pathlib.Path, Any] = {out_dir / f"{stem}.json": _json_bytes(record)}
        if png_name:
            files[out_dir / png_name] = _save_png(id_to_rgb(coco_ids))
        if vis:
            files[out_dir / f"{stem}_vis.png"] = _save_png(visualize(result, predictor.dataset))
        try:
            _write_atomically(files)
        except OSError as error:
            failed.append((paths[i], f"cannot write its outputs: {error}"))
            print(f"detr-jax predict: failed: {paths[i]}: cannot write its outputs: {error}", file=log)
            continue
        images[i] = {"id": ids[i], "file_name": file_name, "height": result["height"], "width": result["width"]}
        detections += [(i, d) for d in boxes_to_coco_results(ids[i], result["boxes"], result["scores"],
                                                              result["labels"])]
        if png_name:
            annotations[i] = {"image_id": ids[i], "file_name": png_name, "segments_info": record["segments_info"]}
    order = sorted(images)  # input order, whatever order the buckets finished in
    summary = {out_dir / "images.json": _json_bytes([images[i] for i in order]),
               out_dir / "detections.json": _json_bytes([d for _, d in sorted(detections, key=lambda x: x[0])])}
    if predictor.panoptic:
        categories = panoptic_categories() if predictor.dataset == "coco_panoptic" else []
        summary[out_dir / "panoptic.json"] = _json_bytes({
            "images": [images[i] for i in order], "annotations": [annotations[i] for i in order],
            "categories": categories})
    _write_atomically(summary)
    return {"written": len(images), "failed": failed, "seconds": time.perf_counter() - start,
            "compilations": predictor.num_compilations}
