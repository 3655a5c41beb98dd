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
`Predictor.predict`).  `detr_jax.results_io.predict_to_folder` writes them as files (what
`detr-jax predict` does).

Panoptic segment ids.  `Predictor` results keep the original's: 0, 1, ... in `segments_info` order
(as PostProcessPanoptic returns them); an image with no kept query gives an all-zero map and no
segments.  The FILES (`STEM_panoptic.png`, the JSONs) follow the COCO panoptic format, where id 0 is
VOID: there every id is shifted by one (`panoptic_format.coco_panoptic_ids`), so segment k has id k + 1.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import pathlib
import time
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from PIL import Image

from detr_jax.config import DataConfig
from detr_jax.data.preprocess import (ImageLike, ImageLoadError, bucket_shape, load_image, normalize, pad_batch,
                                      resize_for_eval, resized_size)
from detr_jax.labels import label_name
from detr_jax.postprocess import (PANOPTIC_THRESHOLD, TieBreak, postprocess_boxes, postprocess_instance_masks,
                                  postprocess_panoptic)

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
      tie_break: how the panoptic post-processor decides the pixels that are float-rounding ties
        of the original's softmax (`postprocess.panoptic`); default: the first tied query.  The
        opt-in `postprocess.torch_softmax.torch_softmax_argmax` replays PyTorch's CPU kernel.
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
                 is_thing_map=None, tie_break: Optional[TieBreak] = None,
                 max_pixels: Optional[int] = DataConfig.max_image_pixels,
                 return_masks: bool = False, mask_queries: Union[int, str, None] = MASK_QUERIES):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = _as_model(model)
        self.short_side, self.max_size, self.batch_size = short_side, max_size, batch_size
        self.threshold, self.panoptic_threshold = threshold, panoptic_threshold
        self.bucket_multiple, self.padding_invariant = bucket_multiple, padding_invariant
        self.dataset = dataset or ("coco_panoptic" if self.panoptic else "coco")
        self.label_names = label_names
        self.is_thing_map, self.tie_break = is_thing_map, tie_break
        self.max_pixels, self.return_masks = max_pixels, return_masks
        if not (mask_queries is None or mask_queries == "auto" or (isinstance(mask_queries, int) and mask_queries > 0)):
            raise ValueError(f'mask_queries must be "auto", a positive int or None, got {mask_queries!r}')
        self.mask_queries = mask_queries
        # (B, H, W) -> {"calls", "first_s" (the first call: compilation + one run), "total_s"}
        self.shape_stats: Dict[Tuple[int, int, int], Dict[str, float]] = {}

    @property
    def panoptic(self) -> bool:
        return bool(self.model.config.masks)

    def with_options(self, **changes) -> "Predictor":
        """A new Predictor with some settings changed (e.g. `return_masks=True`), sharing this one's
        model and so its compiled programs; this one is left as it is."""
        unknown = sorted(set(changes) - set(vars(self)) - {"model"})
        if unknown:
            raise TypeError(f"not a Predictor setting: {unknown}")
        other = copy.copy(self)
        other.__dict__.update(changes)
        other.shape_stats = {}
        return other

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
                                            is_thing_map=self.is_thing_map, threshold=self.panoptic_threshold,
                                            tie_break=self.tie_break)
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
# Inputs

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
