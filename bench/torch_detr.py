"""A bench-only PyTorch DETR (torch.nn only, no torchvision) with the original's state-dict keys.

Written from the architecture documented in the reference fixtures' README (Carion et al. 2020,
facebookresearch/detr), to time the original's arithmetic beside detr-jax with the same weights:

    model = build_detr(backbone="resnet50", dilation=True, masks=True, num_classes=250).eval()
    model.load_state_dict(state_dict, strict=True)     # original key layout (`detr.*` when masks)
    out = model(images, mask)     # images [B,3,H,W] normalized; mask [B,H,W] bool, True on PADDING

`out` is the original's dict: pred_logits [B,Q,C+1], pred_boxes [B,Q,4] (cx,cy,w,h), aux_outputs
(one dict per decoder layer but the last) and, with masks, pred_masks [B,Q,H/4,W/4].
`tests/test_torch_reference.py` proves it reproduces the fixtures of the original within 1e-4.
Not part of the package: nothing in `detr_jax` imports it.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

BN_EPS = 1e-5
LN_EPS = 1e-5           # nn.LayerNorm's default, as the original
GN_GROUPS = 8


# ---------------------------------------------------------------------------------------------
# Backbone: ResNet-50/101 with frozen batch norm (torchvision's layout and names)
# ---------------------------------------------------------------------------------------------
class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics: y = x * s + (b - rm * s), s = w * rsqrt(rv + eps)."""

    def __init__(self, n: int):
        super().__init__()
        for name, init in (("weight", torch.ones), ("bias", torch.zeros),
                           ("running_mean", torch.zeros), ("running_var", torch.ones)):
            self.register_buffer(name, init(n))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)   # absent from DETR's checkpoints
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + BN_EPS).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + bias[None, :, None, None]


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv); conv2 padding = dilation."""
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1, downsample: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(planes * 4)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride=stride, bias=False),
                                         FrozenBatchNorm2d(planes * 4)) if downsample else None)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + identity)


class ResNetBody(nn.Module):
    """conv1/bn1/maxpool and layer1..4 (no avgpool/fc, as DETR's IntermediateLayerGetter).

    DC5 (`dilation`): layer4 has stride 1; its block 0 keeps dilation 1 (with a 1x1 stride-1
    downsample), blocks 1.. use dilation 2.  Returns the four layer outputs (strides 4, 8, 16, 32|16).
    """
    BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}

    def __init__(self, name: str = "resnet50", dilation: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(64)
        cin, current_dilation = 64, 1
        for index, (blocks, planes) in enumerate(zip(self.BLOCKS[name], (64, 128, 256, 512))):
            stride, block_dilation = (1 if index == 0 else 2), current_dilation
            if index == 3 and dilation:
                current_dilation, stride = current_dilation * stride, 1
            layer = [Bottleneck(cin, planes, stride, block_dilation, downsample=True)]
            cin = planes * 4
            layer += [Bottleneck(cin, planes, 1, current_dilation) for _ in range(1, blocks)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*layer))

    def forward(self, x: Tensor) -> List[Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        features = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            features.append(x)
        return features


class Backbone(nn.Module):
    def __init__(self, name: str, dilation: bool):
        super().__init__()
        self.body = ResNetBody(name, dilation)
        self.num_channels = 2048


def sine_position_embedding(mask: Tensor, num_pos_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """[B,2*F,h,w] from mask [B,h,w] (True on padding): normalized cumsums times 2*pi, [y, x]."""
    not_mask = ~mask
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    eps, scale = 1e-6, 2 * math.pi
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos_x, pos_y = x_embed[..., None] / dim_t, y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def resize_mask(mask: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest resize of the padding mask to a feature map (source index floor(i * in / out))."""
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


# ---------------------------------------------------------------------------------------------
# Transformer (post-norm, sequence-first [L, B, C] as the original)
# ---------------------------------------------------------------------------------------------
class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=LN_EPS), nn.LayerNorm(d, eps=LN_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor, key_padding_mask: Tensor, pos: Tensor) -> Tensor:
        q = k = src + pos
        src = self.norm1(src + self.dropout(self.self_attn(q, k, src, key_padding_mask=key_padding_mask)[0]))
        return self.norm2(src + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(src))))))


class DecoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d, heads, dropout=dropout)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d, eps=LN_EPS) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, key_padding_mask: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout(self.self_attn(q, k, tgt)[0]))
        cross = self.multihead_attn(tgt + query_pos, memory + pos, memory, key_padding_mask=key_padding_mask)[0]
        tgt = self.norm2(tgt + self.dropout(cross))
        return self.norm3(tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))


class _Layers(nn.Module):
    def __init__(self, layers: List[nn.Module], norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        if norm is not None:
            self.norm = norm


class Transformer(nn.Module):
    """Returns (hs [layers, B, Q, C], each decoder output after the final norm; memory [B, C, h, w])."""

    def __init__(self, d: int = 256, heads: int = 8, encoder_layers: int = 6, decoder_layers: int = 6,
                 ffn: int = 2048, dropout: float = 0.1):
        super().__init__()
        self.encoder = _Layers([EncoderLayer(d, heads, ffn, dropout) for _ in range(encoder_layers)])
        self.decoder = _Layers([DecoderLayer(d, heads, ffn, dropout) for _ in range(decoder_layers)],
                               nn.LayerNorm(d, eps=LN_EPS))

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor) -> Tuple[Tensor, Tensor]:
        b, c, h, w = src.shape
        memory = src.flatten(2).permute(2, 0, 1)              # [hw, B, C], row-major tokens
        pos = pos_embed.flatten(2).permute(2, 0, 1)
        query_pos = query_embed.unsqueeze(1).repeat(1, b, 1)   # [Q, B, C]
        key_padding_mask = mask.flatten(1)
        for layer in self.encoder.layers:
            memory = layer(memory, key_padding_mask, pos)
        tgt, states = torch.zeros_like(query_pos), []
        for layer in self.decoder.layers:
            tgt = layer(tgt, memory, key_padding_mask, pos, query_pos)
            states.append(self.decoder.norm(tgt))
        return torch.stack(states).transpose(1, 2), memory.permute(1, 2, 0).view(b, c, h, w)


# ---------------------------------------------------------------------------------------------
# Heads, DETR, panoptic mask head
# ---------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, din: int, hidden: int, dout: int, num_layers: int):
        super().__init__()
        dims = [din] + [hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [dout]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class DETR(nn.Module):
    """Detection DETR: backbone.0.body (ResNet), input_proj, transformer, query_embed, heads."""

    def __init__(self, backbone: str = "resnet50", dilation: bool = False, num_classes: int = 91,
                 num_queries: int = 100, hidden_dim: int = 256, **transformer_kwargs):
        super().__init__()
        self.num_queries = num_queries
        self.transformer = Transformer(hidden_dim, **transformer_kwargs)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(2048, hidden_dim, 1)
        self.backbone = nn.Sequential(Backbone(backbone, dilation))   # the original's Joiner: index 0

    def features(self, images: Tensor, mask: Tensor) -> Tuple[List[Tensor], List[Tensor]]:
        feats = self.backbone[0].body(images)
        return feats, [resize_mask(mask, f.shape[-2:]) for f in feats]

    def heads(self, hs: Tensor) -> Dict[str, object]:
        logits, boxes = self.class_embed(hs), self.bbox_embed(hs).sigmoid()
        return {"pred_logits": logits[-1], "pred_boxes": boxes[-1],
                "aux_outputs": [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]}

    def forward(self, images: Tensor, mask: Tensor) -> Dict[str, object]:
        feats, masks = self.features(images, mask)
        hs, _ = self.transformer(self.input_proj(feats[-1]), masks[-1], self.query_embed.weight,
                                 sine_position_embedding(masks[-1]))
        return self.heads(hs)


class MHAttentionMap(nn.Module):
    """Attention logits of each query over memory per head; ONE softmax over heads x h x w."""

    def __init__(self, dim: int, hidden_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.hidden_dim = num_heads, hidden_dim
        self.q_linear, self.k_linear = nn.Linear(dim, hidden_dim), nn.Linear(dim, hidden_dim)
        self.scale = float(hidden_dim / num_heads) ** -0.5

    def forward(self, q: Tensor, k: Tensor, mask: Tensor) -> Tensor:
        q = self.q_linear(q)
        k = F.conv2d(k, self.k_linear.weight[:, :, None, None], self.k_linear.bias)
        c = self.hidden_dim // self.num_heads
        qh = q.view(q.shape[0], q.shape[1], self.num_heads, c)
        kh = k.view(k.shape[0], self.num_heads, c, k.shape[-2], k.shape[-1])
        weights = torch.einsum("bqnc,bnchw->bqnhw", qh * self.scale, kh)
        weights = weights.masked_fill(mask[:, None, None], float("-inf"))
        return F.softmax(weights.flatten(2), dim=-1).view(weights.shape)


def _expand(x: Tensor, n: int) -> Tensor:
    """[B, ...] -> [B*n, ...], each item repeated n times consecutively."""
    return x.unsqueeze(1).repeat(1, n, *([1] * (x.dim() - 1))).flatten(0, 1)


class MaskHeadSmallConv(nn.Module):
    """FPN-style conv head: per query, cat(projected features, attention maps) -> stride-4 logits."""

    def __init__(self, dim: int, fpn_dims: Sequence[int], context_dim: int):
        super().__init__()
        inter = [dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16]
        for j, (a, b) in enumerate(zip([dim] + inter[:-1], inter), start=1):
            setattr(self, f"lay{j}", nn.Conv2d(a, b, 3, padding=1))
            setattr(self, f"gn{j}", nn.GroupNorm(GN_GROUPS, b))
        self.out_lay = nn.Conv2d(inter[-1], 1, 3, padding=1)
        for j, (fpn, out) in enumerate(zip(fpn_dims, inter[1:4]), start=1):
            setattr(self, f"adapter{j}", nn.Conv2d(fpn, out, 1))

    def _block(self, j: int, x: Tensor) -> Tensor:
        return F.relu(getattr(self, f"gn{j}")(getattr(self, f"lay{j}")(x)))

    def forward(self, x: Tensor, bbox_mask: Tensor, fpns: Sequence[Tensor]) -> Tensor:
        x = torch.cat([_expand(x, bbox_mask.shape[1]), bbox_mask.flatten(0, 1)], 1)
        x = self._block(2, self._block(1, x))
        for j, fpn in enumerate(fpns, start=1):
            fpn = getattr(self, f"adapter{j}")(fpn)
            if fpn.shape[0] != x.shape[0]:
                fpn = _expand(fpn, x.shape[0] // fpn.shape[0])
            x = self._block(j + 2, fpn + F.interpolate(x, size=fpn.shape[-2:], mode="nearest"))
        return self.out_lay(x)


class DETRsegm(nn.Module):
    """Panoptic DETR: `detr` plus bbox_attention and mask_head; adds pred_masks [B, Q, H/4, W/4]."""

    def __init__(self, detr: DETR):
        super().__init__()
        self.detr = detr
        hidden, heads = detr.class_embed.in_features, detr.transformer.encoder.layers[0].self_attn.num_heads
        self.bbox_attention = MHAttentionMap(hidden, hidden, heads)
        self.mask_head = MaskHeadSmallConv(hidden + heads, [1024, 512, 256], hidden)

    def forward(self, images: Tensor, mask: Tensor) -> Dict[str, object]:
        feats, masks = self.detr.features(images, mask)
        src_proj = self.detr.input_proj(feats[-1])
        hs, memory = self.detr.transformer(src_proj, masks[-1], self.detr.query_embed.weight,
                                           sine_position_embedding(masks[-1]))
        out = self.detr.heads(hs)
        bbox_mask = self.bbox_attention(hs[-1], memory, masks[-1])
        seg = self.mask_head(src_proj, bbox_mask, [feats[2], feats[1], feats[0]])
        out["pred_masks"] = seg.view(images.shape[0], self.detr.num_queries, *seg.shape[-2:])
        return out


# ---------------------------------------------------------------------------------------------
# The original's PostProcessPanoptic, in torch (what the original's evaluation runs after the model)
# ---------------------------------------------------------------------------------------------
MIN_SEGMENT_AREA = 4        # segments of this many pixels or fewer are dropped


def _segment_map(masks: Tensor, merge: List[List[int]], size: Tuple[int, int], final: Tuple[int, int]):
    """masks [K, h*w] -> (id map [H0, W0] int64 tensor, PIL image of the PNG), as the original:
    per-pixel argmax of the softmax over the kept queries, stuff duplicates merged into the first,
    resized to the original size with PIL NEAREST through the RGB encoding (panopticapi's
    id2rgb / rgb2id, as detr_jax.evaluation.pq has them)."""
    from detr_jax.panoptic_format import id_to_rgb, rgb_to_id

    h, w = size
    if masks.shape[0] == 0:
        ids = torch.zeros((h, w), dtype=torch.long)
    else:
        ids = masks.transpose(0, 1).softmax(-1).argmax(-1).view(h, w)
    for equiv in merge:
        for other in equiv:
            ids.masked_fill_(ids.eq(other), equiv[0])
    image = Image.fromarray(id_to_rgb(ids.numpy())).resize((final[1], final[0]), Image.NEAREST)
    return torch.from_numpy(rgb_to_id(np.asarray(image))), image


def postprocess_panoptic(pred_logits: Tensor, pred_masks: Tensor, processed_sizes, target_sizes,
                         is_thing, threshold: float = 0.85) -> List[Dict[str, object]]:
    """The original `PostProcessPanoptic` (facebookresearch/detr, models/segmentation.py) on a
    batch: per image the PNG bytes and segments_info [{id, isthing, category_id, area}].

    Keeps queries whose max softmax (no-object included) is over `threshold` and whose argmax is
    not no-object; upsamples their masks bilinearly from the PADDED grid to the processed size;
    per-pixel argmax of the softmax over them; stuff duplicates merged; resized to `target_sizes`
    with PIL NEAREST; then, while a segment has <= 4 pixels, drops those and redoes the map without
    the merge.  `is_thing`: {category_id: bool}.  tests/test_torch_reference.py checks it against
    the original's post-processing fixtures.
    """
    import io

    results = []
    for logits, masks, size, final in zip(pred_logits, pred_masks, processed_sizes, target_sizes):
        size, final = (int(size[0]), int(size[1])), (int(final[0]), int(final[1]))
        scores, labels = logits.softmax(-1).max(-1)
        keep = labels.ne(logits.shape[-1] - 1) & (scores > threshold)
        classes = labels[keep]
        kept = F.interpolate(masks[keep][:, None], size=size, mode="bilinear").squeeze(1).flatten(1)
        stuff: Dict[int, List[int]] = {}
        for k, label in enumerate(classes.tolist()):
            if not is_thing[label]:
                stuff.setdefault(label, []).append(k)
        ids, image = _segment_map(kept, [e for e in stuff.values() if len(e) > 1], size, final)
        area = [int(ids.eq(i).sum()) for i in range(len(classes))]
        while area and min(area) <= MIN_SEGMENT_AREA:
            big = torch.tensor([a > MIN_SEGMENT_AREA for a in area])
            classes, kept = classes[big], kept[big]
            ids, image = _segment_map(kept, [], size, final)
            area = [int(ids.eq(i).sum()) for i in range(len(classes))]
        segments = [{"id": i, "isthing": bool(is_thing[int(c)]), "category_id": int(c), "area": a}
                    for i, (c, a) in enumerate(zip(classes.tolist(), area))]
        with io.BytesIO() as png:
            image.save(png, format="PNG")
            results.append({"png_string": png.getvalue(), "segments_info": segments})
    return results


def build_detr(backbone: str = "resnet50", dilation: bool = False, masks: bool = False,
               num_classes: int = 91, num_queries: int = 100) -> nn.Module:
    """The original's model for a release: DETR, or DETRsegm(DETR) with `masks` (keys `detr.*`)."""
    detr = DETR(backbone, dilation, num_classes, num_queries)
    return DETRsegm(detr) if masks else detr


def load_state_dict(model: nn.Module, state_dict) -> nn.Module:
    """Load numpy or torch tensors in the original key layout, strictly (lists mismatches)."""
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
               for k, v in state_dict.items()}
    model.load_state_dict(tensors, strict=True)
    return model
