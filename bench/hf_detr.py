"""Hugging Face's DETR (`transformers`' DetrForObjectDetection / DetrForSegmentation) built offline
from a state dict in the original's layout: what most PyTorch users run instead of the original.

    model = build_hf_detr(panoptic=True, num_classes=250)            # timm ResNet-50, DC5, random init
    load_original(model, state_dict)          # original keys (`detr.*` for panoptic), strict
    out = model(pixel_values=images, pixel_mask=valid)   # images [B,3,H,W]; valid [B,H,W], 1 on REAL pixels

The configuration is built without the network: `DetrConfig(backbone="resnet50",
use_timm_backbone=True, use_pretrained_backbone=False, dilation=...)` (a timm ResNet, as the hub's
facebook/detr-resnet-50 checkpoints).  `hf_state_dict` maps the original's keys to this layout,
written for transformers 5.x (the layout of its `state_dict()`: `model.backbone.model.*`,
`self_attn.{q,k,v,o}_proj`, `mlp.fc1/fc2`, `mask_head.fpn_stages.*`): q, k and v are the three
rows of the original's `in_proj_weight`.  Any key this mapping misses or invents makes
`load_original` fail, naming the keys.  `tests/test_bench_accelerator.py` (when transformers and
timm are importable) checks the outputs against `bench/torch_detr.py` on the same weights.
"""
from __future__ import annotations

import re
from typing import Dict, List, Tuple

import numpy as np

# (original, Hugging Face) key fragments, applied in order to the part after the model prefix
_RENAMES: List[Tuple[str, str]] = [
    (r"^backbone\.0\.body\.", "model.backbone.model."),
    (r"^input_proj\.", "model.input_projection."),
    (r"^query_embed\.", "model.query_position_embeddings."),
    (r"^transformer\.decoder\.norm\.", "model.decoder.layernorm."),
    (r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.", r"model.\1.layers.\2."),
    (r"\.multihead_attn\.", ".encoder_attn."),
    (r"\.out_proj\.", ".o_proj."),
    (r"\.linear1\.", ".mlp.fc1."),
    (r"\.linear2\.", ".mlp.fc2."),
    (r"^class_embed\.", "class_labels_classifier."),
    (r"^bbox_embed\.", "bbox_predictor."),
]
_LAYER_NORMS = {"encoder": {"norm1": "self_attn_layer_norm", "norm2": "final_layer_norm"},
                "decoder": {"norm1": "self_attn_layer_norm", "norm2": "encoder_attn_layer_norm",
                            "norm3": "final_layer_norm"}}
_MASK_HEAD = {"lay1": "conv1.conv", "gn1": "conv1.norm", "lay2": "conv2.conv", "gn2": "conv2.norm",
              "lay3": "fpn_stages.0.refine.conv", "gn3": "fpn_stages.0.refine.norm",
              "lay4": "fpn_stages.1.refine.conv", "gn4": "fpn_stages.1.refine.norm",
              "lay5": "fpn_stages.2.refine.conv", "gn5": "fpn_stages.2.refine.norm",
              "adapter1": "fpn_stages.0.fpn_adapter", "adapter2": "fpn_stages.1.fpn_adapter",
              "adapter3": "fpn_stages.2.fpn_adapter", "out_lay": "output_conv"}


def _detr_key(key: str) -> str:
    """One detection key (no `detr.` prefix) in Hugging Face's layout (in_proj excepted)."""
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key)
    match = re.match(r"^model\.(encoder|decoder)\.layers\.\d+\.(norm\d)\.", key)
    if match:
        key = key.replace(f".{match.group(2)}.", f".{_LAYER_NORMS[match.group(1)][match.group(2)]}.", 1)
    return key


def hf_state_dict(state_dict: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The original's state dict (DETR, or DETRsegm with `detr.` keys) -> Hugging Face's keys."""
    out: Dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        prefix, rest = ("detr.", key[len("detr."):]) if key.startswith("detr.") else ("", key)
        if key.startswith("bbox_attention."):
            out[key.replace("q_linear", "q_proj").replace("k_linear", "k_proj")] = value
        elif key.startswith("mask_head."):
            name, leaf = key[len("mask_head."):].split(".", 1)
            out[f"mask_head.{_MASK_HEAD[name]}.{leaf}"] = value
        elif rest.endswith(("in_proj_weight", "in_proj_bias")):
            base = prefix + _detr_key(rest.rsplit(".", 1)[0] + ".")
            leaf = "weight" if rest.endswith("weight") else "bias"
            for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(np.asarray(value), 3, axis=0)):
                out[f"{base}{name}.{leaf}"] = part
        else:
            out[prefix + _detr_key(rest)] = value
    return out


def build_hf_detr(panoptic: bool, num_classes: int, dilation: bool = None):
    """A random-init Hugging Face DETR with a timm ResNet-50 (DC5 when `dilation`, default: as
    panoptic), `num_classes` + 1 logits, eval mode; no download."""
    from transformers import DetrConfig, DetrForObjectDetection, DetrForSegmentation

    config = DetrConfig(backbone="resnet50", use_timm_backbone=True, use_pretrained_backbone=False,
                        dilation=panoptic if dilation is None else dilation, num_labels=num_classes)
    return (DetrForSegmentation if panoptic else DetrForObjectDetection)(config).eval()


def load_original(model, state_dict: Dict[str, np.ndarray]):
    """Load an original-layout state dict into a Hugging Face DETR, strictly: fails naming the
    missing, unexpected or mis-shaped keys."""
    import torch

    mapped = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hf_state_dict(state_dict).items()}
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(mapped)), sorted(set(mapped) - set(expected))
    shapes = [k for k in set(expected) & set(mapped) if tuple(expected[k].shape) != tuple(mapped[k].shape)]
    if missing or unexpected or shapes:
        raise KeyError(f"Hugging Face DETR layout mismatch: missing {missing[:6]} ({len(missing)}), unexpected "
                       f"{unexpected[:6]} ({len(unexpected)}), shapes differ {shapes[:6]}")
    model.load_state_dict(mapped, strict=True)
    return model
