"""What an exported DETR computes: the serving function and its input/output contract.

`ExportSpec` fixes what the artifact takes and returns; `serving_function(config, variables,
spec)` builds the pure function `(pixel_values, pixel_mask[, orig_sizes]) -> tuple of outputs`
that both formats export, and `contract(config, spec)` describes it as JSON-ready data (names,
shapes, dtypes, mask polarity, normalization) written beside every artifact.

Inputs (the model's contract, see `detr_jax.models.detr`):
  pixel_values  float32 [B, H, W, 3]  RGB in [0, 1] normalized by the ImageNet mean/std,
                                      zero-padded at the bottom/right
  pixel_mask    bool [B, H, W]        True on real pixels, False on padding
  orig_sizes    int32 [B, 2]          (h, w) of the original photos (`postprocess="boxes"` only)
Outputs, in this order:
  postprocess="none":  pred_logits float32 [B, Q, C+1], pred_boxes float32 [B, Q, 4] (cx, cy, w,
                       h in [0, 1] of the unpadded image)
  postprocess="boxes": scores float32 [B, Q], labels int32 [B, Q], boxes float32 [B, Q, 4] (x0,
                       y0, x1, y1 in pixels of `orig_sizes`), as `postprocess.box_predictions`
  panoptic models, then: pred_masks float32 [B, Q, H/4, W/4] mask logits; or, with
                       `mask_queries=K`, pred_masks [B, K, H/4, W/4] of the K queries with the best
                       real-class probability and mask_query_indices int32 [B, K] (their indices)
The earlier decoder layers' outputs (aux_outputs) are a training aid and are not exported.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax.numpy as jnp

from detr_jax.config import ModelConfig
from detr_jax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from detr_jax.models.detr import DETR
from detr_jax.postprocess import MASK_STRIDE, box_predictions
from detr_jax.runtime import top_queries

FORMATS = ("stablehlo", "onnx")
POSTPROCESS = ("none", "boxes")
DTYPES = ("float32", "bfloat16")
CONTRACT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    """What an exported model takes and returns.

    batch: images per call, or None for a symbolic batch dimension (StableHLO; ONNX: fixed).
    height, width: the padded input size, a multiple of the model's output stride.
    dtype: compute dtype of the model ("float32" or "bfloat16"); inputs and outputs stay float32.
    postprocess: "none" (the model's logits and boxes) or "boxes" (scores, labels, pixel boxes).
    mask_queries: panoptic models: None for every query's mask, or K for the mask head over the
      K best queries only (K < num_queries, fixed at export).
    """

    height: int
    width: int
    batch: Optional[int] = 1
    dtype: str = "float32"
    postprocess: str = "none"
    mask_queries: Optional[int] = None


def output_stride(config: ModelConfig) -> int:
    """The stride of the model's last feature map: 32 for a ResNet, 16 for DC5 and the ConvNets."""
    return 16 if config.is_convnet or config.dilation else 32


def check_spec(config: ModelConfig, spec: ExportSpec) -> None:
    """Raise ValueError naming the problem when `spec` cannot be exported for `config`."""
    stride = output_stride(config)
    for name, size in (("height", spec.height), ("width", spec.width)):
        if size <= 0 or size % stride:
            nearest = max(stride, -(-size // stride) * stride)
            raise ValueError(f"{name} {size} is not a positive multiple of {stride}, the output stride of "
                             f"{config.backbone}{'-DC5' if config.dilation else ''}: pad the images to a multiple "
                             f"of {stride} (e.g. {nearest}); pixel_mask marks the padding")
    if spec.batch is not None and spec.batch <= 0:
        raise ValueError(f"batch must be a positive number of images or None (dynamic), not {spec.batch}")
    if spec.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {spec.dtype!r}; known: {list(DTYPES)}")
    if spec.postprocess not in POSTPROCESS:
        raise ValueError(f"unknown postprocess {spec.postprocess!r}; known: {list(POSTPROCESS)}")
    if spec.mask_queries is not None:
        if not config.masks:
            raise ValueError("mask_queries applies to panoptic models only; this model has no mask head")
        if not 0 < spec.mask_queries < config.num_queries:
            raise ValueError(f"mask_queries must be between 1 and {config.num_queries - 1} (the model has "
                             f"{config.num_queries} queries; leave it out for every query's mask), "
                             f"not {spec.mask_queries}")


def export_config(config: ModelConfig, spec: ExportSpec) -> ModelConfig:
    """The model config as exported: the requested dtype, dense attention (one program without
    loops, for every backend and converter) and no auxiliary outputs."""
    return dataclasses.replace(config, dtype=spec.dtype, aux_loss=False, attention="dense")


def serving_function(config: ModelConfig, variables: Dict[str, Any], spec: ExportSpec
                     ) -> Callable[..., Tuple[jnp.ndarray, ...]]:
    """The function exported: inputs and outputs in `contract`'s order (see the module docstring).

    The model runs in its default, padding-invariant mode (every image of a batch gives what it
    gives alone) with dense attention; `mask_queries=K` selects queries as the runtime does
    (`runtime.top_queries`) and runs the mask head on them alone (`DETR.masks_of_queries`).
    """
    check_spec(config, spec)
    model = DETR(export_config(config, spec))

    def forward(pixel_values, pixel_mask, *orig_sizes):
        if config.masks and spec.mask_queries is not None:
            out, features = model.apply(variables, pixel_values, pixel_mask, method=DETR.detect)
            indices, _ = top_queries(out["pred_logits"], spec.mask_queries)
            masks = model.apply(variables, features, indices, method=DETR.masks_of_queries)
            extra = (masks, indices.astype(jnp.int32))
        else:
            out = model.apply(variables, pixel_values, pixel_mask)
            extra = (out["pred_masks"],) if config.masks else ()
        if spec.postprocess == "boxes":
            boxes = box_predictions(out["pred_logits"], out["pred_boxes"], orig_sizes[0])
            head = (boxes["scores"], boxes["labels"], boxes["boxes"])
        else:
            head = (out["pred_logits"], out["pred_boxes"])
        return head + extra

    return forward


def _tensor(name: str, shape: List[Any], dtype: str, doc: str) -> Dict[str, Any]:
    return {"name": name, "shape": shape, "dtype": dtype, "doc": doc}


def contract(config: ModelConfig, spec: ExportSpec) -> Dict[str, Any]:
    """The input/output contract of the exported model as JSON-ready data ("B" where the batch is
    dynamic)."""
    b: Any = "B" if spec.batch is None else spec.batch
    h, w, q, c = spec.height, spec.width, config.num_queries, config.num_logits
    inputs = [
        _tensor("pixel_values", [b, h, w, 3], "float32",
                "RGB scaled to [0, 1], minus mean, divided by std (per channel); images zero-padded at the "
                "bottom/right to height x width"),
        _tensor("pixel_mask", [b, h, w], "bool", "True on real pixels, False on padding"),
    ]
    if spec.postprocess == "boxes":
        inputs.append(_tensor("orig_sizes", [b, 2], "int32", "(height, width) of each original photo: boxes "
                                                              "are scaled to it"))
        outputs = [
            _tensor("scores", [b, q], "float32", "best real-class probability of each query (softmax over all "
                                                 "classes and no-object)"),
            _tensor("labels", [b, q], "int32", "its class index"),
            _tensor("boxes", [b, q, 4], "float32", "(x0, y0, x1, y1) in pixels of orig_sizes"),
        ]
    else:
        outputs = [
            _tensor("pred_logits", [b, q, c], "float32", f"class logits; index {c - 1} is 'no object'"),
            _tensor("pred_boxes", [b, q, 4], "float32", "(cx, cy, w, h) in [0, 1] of the unpadded image"),
        ]
    if config.masks:
        hm, wm = h // MASK_STRIDE, w // MASK_STRIDE
        if spec.mask_queries is None:
            outputs.append(_tensor("pred_masks", [b, q, hm, wm], "float32",
                                   "mask logits of every query on the stride-4 grid of the padded input"))
        else:
            k = spec.mask_queries
            outputs += [_tensor("pred_masks", [b, k, hm, wm], "float32",
                                "mask logits of the queries in mask_query_indices, on the stride-4 grid of "
                                "the padded input"),
                        _tensor("mask_query_indices", [b, k], "int32",
                                f"the {k} queries with the best real-class probability, best first")]
    return {
        "contract_version": CONTRACT_VERSION,
        "model": export_config(config, spec).to_dict(),
        "export": dataclasses.asdict(spec),
        "inputs": inputs,
        "outputs": outputs,
        "pixel_mask_polarity": "True = valid pixel",
        "normalization": {"mean": [float(v) for v in IMAGENET_MEAN], "std": [float(v) for v in IMAGENET_STD],
                          "scale": "pixel / 255 before subtracting the mean"},
        "layout": "NHWC",
    }
