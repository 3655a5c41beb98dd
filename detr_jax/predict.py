"""Inference on photos: `Predictor(checkpoint).predict(images)` -> boxes, labels and panoptic segments.

    predictor = detr_jax.Predictor("checkpoints/detr_r50_dc5_panoptic", batch_size=4)
    for r in predictor.predict(["a.jpg", "b.png", pil_image, uint8_array]):
        if r["error"]:
            print(r["source"], r["error"])          # bad input: reported, the others still run
            continue
        r["boxes"], r["scores"], r["labels"], r["label_names"]   # detections over `threshold`
        r["id_map"], r["segments_info"]                          # panoptic models only

Pipeline (each step is the library's one implementation of it): `preprocess.load_image` (any PIL
mode, EXIF orientation applied, pixel limit) -> `resize_for_eval` -> `normalize` -> padded at the
bottom/right to the image's bucket shape (`bucket_shape`, sides rounded up to `bucket_multiple`)
-> the model in its padding-invariant mode -> `postprocess_boxes` / `postprocess_panoptic`
(crop=True) at the original photo size.  Images are sorted into batches by bucket as they arrive,
so a folder of mixed sizes compiles once per bucket (a few shapes, see `preprocess`); a partial
batch is filled with copies of its first image, so every batch of a bucket has one shape.  With
`padding_invariant=True` an image's results do not depend on its bucket or its batch mates.

Results are plain dicts of Python / numpy values, one per input, in input order (see
`Predictor.predict`).  `predict_to_folder` writes them as files (what `detr-jax predict` does).

Panoptic segment ids.  `Predictor` results keep the original's: 0, 1, ... in `segments_info` order
(as PostProcessPanoptic returns them); an image with no kept query gives an all-zero map and no
segments.  The FILES (`STEM_panoptic.png`, the JSONs) follow the COCO panoptic format, where id 0 is
VOID: there every id is shifted by one (`coco_panoptic_ids`), so segment k has id k + 1.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from PIL import Image

from detr_jax.config import DataConfig
from detr_jax.data.preprocess import (ImageLike, ImageLoadError, bucket_shape, load_image, normalize, pad_batch,
                                      resize_for_eval, resized_size)
from detr_jax.labels import label_name, panoptic_is_thing
from detr_jax.postprocess import (PANOPTIC_THRESHOLD, postprocess_boxes, postprocess_instance_masks,
                                  postprocess_panoptic, panoptic_to_png)

DETECTION_THRESHOLD = 0.7  # reported detections: PostProcess score (max softmax over the real classes) above this
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif")
MASK_QUERIES = "auto"  # mask-head queries at inference (see `mask_queries`)
OUTPUT_KEYS = ("pred_logits", "pred_boxes", "pred_masks")  # what leaves the device (no aux outputs)


@dataclasses.dataclass
class _Item:
    """One loaded image waiting for its batch."""
    index: int
    source: str
    original: np.ndarray  # uint8 [H0, W0, 3]
    resized: np.ndarray   # uint8 [h, w, 3]
    bucket: Tuple[int, int]


def source_name(image: Any, index: int) -> str:
    """How a result names its input: the path, or '<array 3>' / '<PIL image 3>' / '<bytes 3>'."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    kind = "array" if isinstance(image, np.ndarray) else "PIL image" if isinstance(image, Image.Image) else \
        "bytes" if isinstance(image, (bytes, bytearray)) else type(image).__name__
    return f"<{kind} {index}>"


def _as_model(model):
    from detr_jax.runtime import DETRModel, load

    if isinstance(model, DETRModel) or (callable(model) and hasattr(model, "config")):
        return model  # a DETRModel, or anything with its `config` and call signature
    if isinstance(model, tuple) and len(model) == 2:  # (ModelConfig, variables), e.g. from training
        return DETRModel(*model)
    return load(model)


class Predictor:
    """Batched, bucketed inference with a DETR checkpoint.

    Args:
      model: a checkpoint folder, a loaded `DETRModel`, or a (ModelConfig, variables) pair.
      short_side, max_size: the eval resize (the original's val transform at 800 / 1333).
      batch_size: images per model call; a batch only holds images of one bucket shape.
      threshold: reported detections are the queries whose score (max softmax over the real
        classes, the original's PostProcess) exceeds it; 0 reports all queries.
      panoptic_threshold: the panoptic post-processor's own (the original's 0.85).
      bucket_multiple: padded sides are rounded up to a multiple of it (None: each batch's exact
        max size, i.e. one compilation per distinct resized size).
      padding_invariant: the model mode in which padding and batch mates do not change results.
      dataset: the label space for names, "coco" or "coco_panoptic" (default: "coco_panoptic" for
        panoptic models, else "coco"); `label_names` (a sequence indexed by label, or a mapping)
        overrides it, e.g. for a model trained on other categories.
      is_thing_map: {category_id: bool} or a callable for the panoptic post-processor (default: COCO
        panoptic's `isthing`; labels not listed count as things if <= 90).
      max_pixels: larger images are refused (from the header, before decoding).
      return_masks: also return each reported detection's binary mask at the original size
        (PostProcessSegm, crop=True), e.g. for mask AP.
      mask_queries: which queries the mask head (most of a panoptic model's time) runs on; the
        results are the same either way.  "auto" (default): those whose score passes the lowest
        threshold in use, their count rounded up to a multiple of 8 (the model runs in two calls,
        see `DETRModel.__call__`'s `mask_threshold`).  An int K: the K best (the runtime reruns the
        mask head on all queries when a skipped query could pass).  None: always all queries.
    """

    def __init__(self, model, *, short_side: int = DataConfig.short_side, max_size: Optional[int] = DataConfig.max_size,
                 batch_size: int = 1, threshold: float = DETECTION_THRESHOLD,
                 panoptic_threshold: float = PANOPTIC_THRESHOLD,
                 bucket_multiple: Optional[int] = DataConfig.bucket_multiple, padding_invariant: bool = True,
                 dataset: Optional[str] = None, label_names: Union[Sequence[str], Mapping[int, str], None] = None,
                 is_thing_map=None, max_pixels: Optional[int] = DataConfig.max_image_pixels,
                 return_masks: bool = False, mask_queries: Union[int, str, None] = MASK_QUERIES):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = _as_model(model)
        self.short_side, self.max_size, self.batch_size = short_side, max_size, batch_size
        self.threshold, self.panoptic_threshold = threshold, panoptic_threshold
        self.bucket_multiple, self.padding_invariant = bucket_multiple, padding_invariant
        self.dataset = dataset or ("coco_panoptic" if self.panoptic else "coco")
        self.label_names = label_names
        self.is_thing_map = is_thing_map
        self.max_pixels, self.return_masks = max_pixels, return_masks
        if not (mask_queries is None or mask_queries == "auto" or (isinstance(mask_queries, int) and mask_queries > 0)):
            raise ValueError(f'mask_queries must be "auto", a positive int or None, got {mask_queries!r}')
        self.mask_queries = mask_queries
        # (B, H, W) -> {"calls", "first_s" (the first call: compilation + one run), "total_s"}
        self.shape_stats: Dict[Tuple[int, int, int], Dict[str, float]] = {}

    @property
    def panoptic(self) -> bool:
        return bool(self.model.config.masks)

    @property
    def num_compilations(self) -> int:
        """Distinct input shapes run so far (each compiled once; shapes compiled earlier by another
        user of the same `DETRModel` are counted too)."""
        return len(self.shape_stats)

    # ------------------------------------------------------------------------------------------
    # Public API

    def predict(self, images: Sequence[ImageLike], *, progress: bool = False) -> List[Dict[str, Any]]:
        """One result per input, in input order.

        A successful result: `source` (the path, or '<array i>' ...), `index`, `error` None,
        `height`, `width` (original size), `boxes` float32 [N, 4] (x0, y0, x1, y1 in original
        pixels), `scores` float32 [N], `labels` int32 [N], `label_names` [N] and `query_indices`
        int32 [N] for the N queries over `threshold` (query order); panoptic models add `id_map`
        int32 [H, W] and `segments_info` [{id, category_id, isthing, area, label_name, score}];
        `return_masks` adds `masks` bool [N, H, W].  A failed one: `source`, `index` and `error`
        (the reason), nothing else.
        """
        images = list(images)
        results: List[Optional[Dict[str, Any]]] = [None] * len(images)
        for result in self.predict_iter(images, progress=progress):
            results[result["index"]] = result
        return results

    def predict_iter(self, images: Iterable[ImageLike], *, keep_images: bool = False,
                     progress: bool = False) -> Iterator[Dict[str, Any]]:
        """Results as soon as they are ready (bucket batches complete out of input order; use
        `result["index"]`).  At most `batch_size` images per bucket wait in memory.
        `keep_images` adds `image`, the loaded uint8 [H, W, 3] original, to each good result."""
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(images) if hasattr(images, "__len__") else None, unit="img", desc="predict")
        try:
            for result in self._results(images, keep_images):
                if bar is not None:
                    bar.update(1)
                yield result
        finally:
            if bar is not None:
                bar.close()

    # ------------------------------------------------------------------------------------------
    # Steps

    def _results(self, images: Iterable[ImageLike], keep_images: bool) -> Iterator[Dict[str, Any]]:
        pending: Dict[Tuple[int, int], List[_Item]] = {}
        for index, image in enumerate(images):
            source = source_name(image, index)
            try:
                item = self._load(index, source, image)
            except ImageLoadError as error:
                yield {"source": source, "index": index, "error": error.reason}
                continue
            waiting = pending.setdefault(item.bucket, [])
            waiting.append(item)
            if len(waiting) == self.batch_size:
                yield from self._run(pending.pop(item.bucket), keep_images)
        for items in pending.values():
            yield from self._run(items, keep_images)

    def _load(self, index: int, source: str, image: ImageLike) -> _Item:
        original = load_image(image, max_pixels=self.max_pixels)
        h, w = original.shape[:2]
        rh, rw = resized_size(h, w, self.short_side, self.max_size)
        if rh < 1 or rw < 1:
            raise ImageLoadError(source, f"its aspect ratio is too extreme: {w} x {h} would be resized to "
                                         f"{rw} x {rh} (short side {self.short_side}, max size {self.max_size})")
        resized = resize_for_eval(original, self.short_side, self.max_size)
        return _Item(index, source, original, resized, bucket_shape(*resized.shape[:2], self.bucket_multiple))

    def forward(self, pixel_values: np.ndarray, pixel_mask: np.ndarray) -> Dict[str, np.ndarray]:
        """The model on one padded batch -> numpy pred_logits, pred_boxes (and pred_masks)."""
        shape = pixel_values.shape[:3]
        start = time.perf_counter()
        needed = min(self.panoptic_threshold, self.threshold if self.return_masks else 1.0)
        chosen = {}     # the runtime's mask-query policy: masks for the queries that can be kept
        if self.panoptic and needed > 0 and self.mask_queries is not None:
            chosen = dict(mask_threshold=needed, mask_queries=None if self.mask_queries == "auto" else self.mask_queries)
        out = self.model(pixel_values, pixel_mask, padding_invariant=self.padding_invariant, **chosen)
        out = jax.device_get({k: out[k] for k in OUTPUT_KEYS if k in out})
        seconds = time.perf_counter() - start
        stats = self.shape_stats.setdefault(shape, {"calls": 0, "first_s": seconds, "total_s": 0.0})
        stats["calls"] += 1
        stats["total_s"] += seconds
        return {k: np.asarray(v) for k, v in out.items()}

    def _run(self, items: List[_Item], keep_images: bool) -> Iterator[Dict[str, Any]]:
        n = len(items)
        normalized = [normalize(it.resized) for it in items]
        normalized += normalized[:1] * (self.batch_size - n)  # one shape per bucket: fill with copies
        pixel_values, pixel_mask = pad_batch(normalized, items[0].bucket)
        out = {k: v[:n] for k, v in self.forward(pixel_values, pixel_mask).items()}
        image_sizes = np.array([it.resized.shape[:2] for it in items], np.int32)
        orig_sizes = np.array([it.original.shape[:2] for it in items], np.int32)
        detections = postprocess_boxes(out["pred_logits"], out["pred_boxes"], orig_sizes)
        panoptic = masks = None
        if self.panoptic:
            panoptic = postprocess_panoptic(out["pred_logits"], out["pred_masks"], image_sizes, orig_sizes,
                                            is_thing_map=self.is_thing_map, threshold=self.panoptic_threshold)
            if self.return_masks:
                masks = postprocess_instance_masks(out["pred_masks"], image_sizes, orig_sizes)
        for b, item in enumerate(items):
            yield self._result(item, detections[b], panoptic[b] if panoptic else None,
                               masks[b] if masks is not None else None, keep_images)

    def _name(self, label: int) -> str:
        if self.label_names is not None:
            names = self.label_names
            if isinstance(names, Mapping):
                return str(names.get(int(label), "N/A"))
            return str(names[int(label)]) if 0 <= int(label) < len(names) else "N/A"
        return label_name(int(label), self.dataset)

    def _result(self, item: _Item, det: Dict[str, np.ndarray], pan: Optional[Dict[str, Any]],
                masks: Optional[np.ndarray], keep_images: bool) -> Dict[str, Any]:
        keep = np.flatnonzero(det["scores"] > self.threshold).astype(np.int32)
        labels = det["labels"][keep].astype(np.int32)
        result: Dict[str, Any] = {
            "source": item.source, "index": item.index, "error": None,
            "height": int(item.original.shape[0]), "width": int(item.original.shape[1]),
            "boxes": det["boxes"][keep].astype(np.float32), "scores": det["scores"][keep].astype(np.float32),
            "labels": labels, "label_names": [self._name(label) for label in labels], "query_indices": keep}
        if pan is not None:
            result["id_map"] = pan["id_map"]
            result["segments_info"] = [dict(seg, label_name=self._name(seg["category_id"]), score=float(score))
                                       for seg, score in zip(pan["segments_info"], pan["scores"])]
        if masks is not None:
            result["masks"] = masks[keep]
        if keep_images:
            result["image"] = item.original
        return result


# ----------------------------------------------------------------------------------------------
# Files: what `detr-jax predict` writes

def list_images(paths: Sequence[Union[str, os.PathLike]]) -> List[str]:
    """Files named on the command line as they are (even if missing or not images: the Predictor
    reports them), and the image files (by extension, sorted by name) of each folder, not recursive."""
    out: List[str] = []
    for path in paths:
        path = pathlib.Path(path)
        if path.is_dir():
            out += sorted(str(p) for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            out.append(str(path))
    return out


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


def coco_panoptic_ids(id_map: np.ndarray, segments_info: Sequence[Mapping[str, Any]]):
    """(ids, segments) in the COCO panoptic convention (0 = VOID): a Predictor's 0-based segment ids
    shifted by one; a map without segments stays all VOID."""
    if not segments_info:
        return np.zeros_like(id_map, dtype=np.int32), []
    return (np.asarray(id_map) + 1).astype(np.int32), [dict(s, id=int(s["id"]) + 1) for s in segments_info]


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
    from detr_jax.visualize import draw_predictions

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
    from detr_jax.evaluate import boxes_to_coco_results

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
            files[out_dir / png_name] = _save_png(panoptic_to_png(coco_ids))
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
        from detr_jax.labels import panoptic_categories

        categories = panoptic_categories() if predictor.dataset == "coco_panoptic" else []
        summary[out_dir / "panoptic.json"] = _json_bytes({
            "images": [images[i] for i in order], "annotations": [annotations[i] for i in order],
            "categories": categories})
    _write_atomically(summary)
    return {"written": len(images), "failed": failed, "seconds": time.perf_counter() - start,
            "compilations": predictor.num_compilations}
