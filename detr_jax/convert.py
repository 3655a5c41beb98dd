"""Port PyTorch DETR checkpoints to Flax variables, numerically identical to the original.

Sources:
  1. the original release files, `torch.save({'model': state_dict})`, keys such as
     `detr.backbone.0.body.layer1.0.conv1.weight` (panoptic) or `backbone.0.body...` (detection);
  2. the Hugging Face hub layout (`DetrForObjectDetection` / `DetrForSegmentation`:
     `model.safetensors` or `pytorch_model.bin` with `config.json`), timm-style backbone keys such as
     `detr.model.backbone.conv_encoder.model.layer1.0.conv1.weight`.

Both are renamed to one canonical layout (the original's names with attention in_proj split into
q/k/v), then mapped onto the Flax tree: OIHW -> HWIO for convolutions, Linear weights transposed,
LayerNorm/GroupNorm `weight` -> `scale`, frozen BatchNorm tensors into the `buffers` collection.
Nothing pickled is ever executed: `.pth`/`.bin` go through `torch.load(weights_only=True)`, and
safetensors files are read without torch.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
import urllib.request
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from detr_jax import checkpoint
from detr_jax.config import RESNET_DEPTHS, ModelConfig
from detr_jax.models import abstract_variables

log = logging.getLogger(__name__)

RELEASE_URL = "https://dl.fbaipublicfiles.com/detr/"
RELEASES = {  # model-zoo name -> (original release file, Hugging Face hub repository, config name)
    "detr_r50": ("detr-r50-e632da11.pth", "facebook/detr-resnet-50", "detr_r50"),
    "detr_r50_dc5": ("detr-r50-dc5-f0fb7ef5.pth", "facebook/detr-resnet-50-dc5", "detr_r50_dc5"),
    "detr_r101": ("detr-r101-2c7b67e5.pth", "facebook/detr-resnet-101", "detr_r101"),
    "detr_r101_dc5": ("detr-r101-dc5-a2e86def.pth", "facebook/detr-resnet-101-dc5", "detr_r101_dc5"),
    "detr_r50_panoptic": ("detr-r50-panoptic-00ce5173.pth", "facebook/detr-resnet-50-panoptic", "detr_r50_panoptic"),
    "detr_r50_dc5_panoptic": ("detr-r50-dc5-panoptic-da08f1b1.pth", "facebook/detr-resnet-50-dc5-panoptic",
                              "detr_r50_dc5_panoptic"),
    "detr_r101_panoptic": ("detr-r101-panoptic-40021d53.pth", "facebook/detr-resnet-101-panoptic",
                           "detr_r101_panoptic"),
}
IGNORED_SUFFIXES = ("num_batches_tracked",)  # BatchNorm step counters: no numbers the model uses

StateDict = Dict[str, np.ndarray]


class ConversionError(ValueError):
    """The checkpoint does not fit the model: lists missing, unexpected and mis-shaped tensors."""


# ------------------------------------------------------------------------------------------------
# Reading (never executes pickled code)
# ------------------------------------------------------------------------------------------------
def read_torch_file(path: pathlib.Path) -> StateDict:
    try:
        import torch
    except ImportError:
        raise SystemExit(f"reading {path.name} needs PyTorch: pip install 'detr-jax[torch]'") from None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a state dict or {{'model': state_dict}}, got {type(obj).__name__}")
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in obj.items()}


def read_checkpoint(src: str | os.PathLike) -> Tuple[StateDict, Dict[str, Any]]:
    """(state dict of numpy arrays, hints) from a .pth/.bin/.safetensors file or a hub folder.

    hints: `hf_config` (the hub's config.json, when present) and `name` (the file name, whose
    `dc5` tells dilation for release files, as the weights cannot).
    """
    path = pathlib.Path(src)
    hints: Dict[str, Any] = {"name": path.name}
    if path.is_dir():
        for candidate in ("model.safetensors", "pytorch_model.bin"):
            if (path / candidate).exists():
                break
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin in this folder")
        hints["name"] = path.name
        path = path / candidate
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    config_json = path.parent / "config.json"
    if config_json.exists():
        hints["hf_config"] = json.loads(config_json.read_text())
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path)), hints
    return read_torch_file(path), hints


# ------------------------------------------------------------------------------------------------
# Layouts -> canonical names (the original's, with attention in_proj split into q/k/v)
# ------------------------------------------------------------------------------------------------
HF_RENAMES = [  # applied in order, as regular expressions on the whole key
    (r"^detr\.model\.", ""), (r"^model\.", ""), (r"^detr\.class_labels_classifier\.", "class_embed."),
    (r"^detr\.bbox_predictor\.", "bbox_embed."), (r"^class_labels_classifier\.", "class_embed."),
    (r"^bbox_predictor\.", "bbox_embed."), (r"^backbone\.conv_encoder\.model\.", "backbone.0.body."),
    (r"^input_projection\.", "input_proj."), (r"^query_position_embeddings\.", "query_embed."),
    (r"^decoder\.layernorm\.", "transformer.decoder.norm."), (r"^encoder\.layernorm\.", "transformer.encoder.norm."),
    (r"^(encoder|decoder)\.layers\.", r"transformer.\1.layers."),
    (r"\.fc1\.", ".linear1."), (r"\.fc2\.", ".linear2."), (r"\.self_attn_layer_norm\.", ".norm1."),
    (r"(decoder\.layers\.\d+)\.encoder_attn_layer_norm\.", r"\1.norm2."),
    (r"(decoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm3."),
    (r"(encoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
    (r"\.encoder_attn\.", ".multihead_attn."),
]


def is_hf_layout(sd: StateDict) -> bool:
    return any("conv_encoder" in k or "class_labels_classifier" in k or "query_position_embeddings" in k
               for k in sd)


def canonical_state_dict(sd: StateDict) -> StateDict:
    """Either layout -> canonical keys; drops only IGNORED_SUFFIXES."""
    hf = is_hf_layout(sd)
    out: StateDict = {}
    for key, value in sd.items():
        if key.endswith(IGNORED_SUFFIXES):
            continue
        if hf:
            for pattern, repl in HF_RENAMES:
                key = re.sub(pattern, repl, key)
        elif key.startswith("detr."):
            key = key[len("detr."):]
        m = re.fullmatch(r"(.*)\.in_proj_(weight|bias)", key)
        if m:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
                out[f"{m.group(1)}.{name}.{m.group(2)}"] = part
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------------
# Canonical names -> Flax paths
# ------------------------------------------------------------------------------------------------
BN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def flax_path(key: str) -> Tuple[str, Tuple[str, ...]]:
    """(collection, path) of the Flax variable that canonical `key` fills."""
    parts = key.split(".")
    leaf = parts[-1]
    if key.startswith("backbone.0.body."):
        body = parts[3:-1]                        # e.g. ["layer1", "0", "downsample", "1"]
        if body[0].startswith("layer"):           # -> ["layer1_0", "downsample_1"]
            block, rest = f"{body[0]}_{body[1]}", body[2:]
            body = [block, "_".join(rest)]
        module = ("backbone", *body)
        is_bn = re.fullmatch(r"bn\d|downsample_1", module[-1]) is not None
        if is_bn:
            return "buffers", (*module, leaf)
        return "params", (*module, "kernel")
    m = re.fullmatch(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if m:
        module = ("transformer", m.group(1), f"layers_{m.group(2)}", *m.group(3).split("."))
    elif key.startswith("transformer."):
        module = tuple(parts[:-1])
    elif key.startswith("bbox_embed.layers."):
        module = ("bbox_embed", f"layers_{parts[2]}")
    elif key == "query_embed.weight":
        return "params", ("query_embed", "embedding")
    else:
        module = tuple(parts[:-1])
    is_norm = re.fullmatch(r"norm\d?|gn\d", module[-1]) is not None
    return "params", (*module, ("scale" if is_norm else "kernel") if leaf == "weight" else leaf)


def to_flax_layout(value: np.ndarray, path: Tuple[str, ...]) -> np.ndarray:
    if path[-1] != "kernel":
        return value
    if value.ndim == 4:                           # conv OIHW -> HWIO
        return np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 2:                           # Linear [out, in] -> Dense [in, out]
        return value.T
    return value


def infer_config(sd: StateDict, hints: Dict[str, Any]) -> ModelConfig:
    """The variant from canonical keys and shapes (plus the hub config / file name for DC5 and heads)."""
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"backbone\.0\.body\.layer3\.(\d+)\.", k))}
    depth3 = len(blocks)
    backbone = next((name for name, d in RESNET_DEPTHS.items() if d[2] == depth3), None)
    if backbone is None:
        raise ConversionError(f"cannot tell the ResNet from {depth3} blocks in layer3 (known: {RESNET_DEPTHS})")
    count = lambda prefix: len({k.split(".")[3] for k in sd if k.startswith(prefix)})  # noqa: E731
    hf = hints.get("hf_config") or {}
    if "dilation" in hf:
        dilation = bool(hf["dilation"])
    else:
        dilation = "dc5" in hints.get("name", "").lower()
        if not dilation:
            log.warning("DC5 dilation cannot be read from weights; assuming none (name the variant with --config)")
    return ModelConfig(
        backbone=backbone, dilation=dilation, num_classes=sd["class_embed.weight"].shape[0] - 1,
        masks=any(k.startswith("mask_head.") for k in sd), hidden_dim=sd["input_proj.weight"].shape[0],
        num_heads=int(hf.get("encoder_attention_heads", 8)),
        dim_feedforward=sd["transformer.encoder.layers.0.linear1.weight"].shape[0],
        enc_layers=count("transformer.encoder.layers."), dec_layers=count("transformer.decoder.layers."),
        num_queries=sd["query_embed.weight"].shape[0], pre_norm="transformer.encoder.norm.weight" in sd)


def expected_shapes(config: ModelConfig) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
    """{(collection, *path): shape} of every variable of the Flax model, without allocating it."""
    from flax.traverse_util import flatten_dict

    return {k: v.shape for k, v in flatten_dict(abstract_variables(config)).items()}


def convert_state_dict(sd: StateDict, config: ModelConfig) -> Dict[str, Any]:
    """Canonical or raw state dict -> Flax variables {'params': ..., 'buffers': ...} (numpy).

    Raises ConversionError naming every missing, unexpected and mis-shaped tensor.
    """
    from flax.traverse_util import unflatten_dict

    sd = canonical_state_dict(sd)
    expected = expected_shapes(config)
    flat: Dict[Tuple[str, ...], np.ndarray] = {}
    unexpected, mismatched, misshaped = [], [], set()
    for key, value in sd.items():
        collection, path = flax_path(key)
        target = (collection, *path)
        if target not in expected:
            unexpected.append(key)
            continue
        value = to_flax_layout(np.asarray(value, np.float32), target)
        if tuple(value.shape) != tuple(expected[target]):
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(expected[target])} "
                              f"at {'/'.join(target)}")
            misshaped.add(target)
            continue
        flat[target] = value
    missing = sorted("/".join(k) for k in expected if k not in flat and k not in misshaped)
    if unexpected or missing or mismatched:
        lines = [f"checkpoint does not match the model ({config.backbone}, dilation={config.dilation}, "
                 f"masks={config.masks}, num_classes={config.num_classes}):"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + "; ".join(items[:40]) + (" ..." if len(items) > 40 else ""))
        raise ConversionError("\n".join(lines))
    return unflatten_dict(flat)


# ------------------------------------------------------------------------------------------------
# Download (release URL or hub name), cached
# ------------------------------------------------------------------------------------------------
def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("DETR_JAX_CACHE", pathlib.Path.home() / ".cache" / "detr_jax"))


def download(url: str, dest: pathlib.Path) -> pathlib.Path:
    """Fetch `url` into `dest` once (atomic rename; a cached file is reused)."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    log.info("downloading %s", url)
    with urllib.request.urlopen(url) as response, open(tmp, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0)
        from tqdm import tqdm

        with tqdm(total=total or None, unit="B", unit_scale=True, desc=dest.name, disable=total < 2 ** 20) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    tmp.replace(dest)
    return dest


def fetch_from_hub(repo: str) -> pathlib.Path:
    """Download a hub repository's config.json and weights (safetensors, else pytorch_model.bin)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    folder = cache_dir() / "hub" / repo.replace("/", "--")
    download(f"{endpoint}/{repo}/resolve/main/config.json", folder / "config.json")
    errors = []
    for name in ("model.safetensors", "pytorch_model.bin"):
        try:
            download(f"{endpoint}/{repo}/resolve/main/{name}", folder / name)
            return folder
        except OSError as e:  # urllib's HTTPError / URLError are OSErrors
            errors.append(f"{name}: {e}")
    raise FileNotFoundError(f"{repo}: no weights found ({'; '.join(errors)})")


def fetch_release(name_or_url: str) -> pathlib.Path:
    """A model-zoo name (`detr_r50_dc5_panoptic`) or a URL of an original release file."""
    url = RELEASE_URL + RELEASES[name_or_url][0] if name_or_url in RELEASES else name_or_url
    return download(url, cache_dir() / "releases" / url.rsplit("/", 1)[-1])


# ------------------------------------------------------------------------------------------------
# The whole conversion
# ------------------------------------------------------------------------------------------------
def convert(src: str | os.PathLike, out: str | os.PathLike, config: Optional[ModelConfig] = None) -> ModelConfig:
    """Read `src`, convert, and write an orbax checkpoint with config.json to `out`."""
    sd, hints = read_checkpoint(src)
    canonical = canonical_state_dict(sd)
    config = config or infer_config(canonical, hints)
    variables = convert_state_dict(canonical, config)
    checkpoint.save(out, config, variables, source=str(src))
    return config


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    from detr_jax.config import load_config

    parser = argparse.ArgumentParser(prog="convert_weights.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", nargs="?", help=".pth / .bin / .safetensors file, or a hub folder with config.json")
    parser.add_argument("out", help="output folder (orbax checkpoint + config.json)")
    parser.add_argument("--config", help="model config name in configs/ (default: inferred from the weights)")
    parser.add_argument("--from-hub", metavar="REPO", help="download from the Hugging Face hub, e.g. "
                        "facebook/detr-resnet-50-dc5-panoptic (cached under $DETR_JAX_CACHE)")
    parser.add_argument("--from-release", metavar="NAME_OR_URL", help=f"download an original release file: "
                        f"one of {', '.join(RELEASES)} or its URL")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("detr_jax").setLevel(logging.INFO)
    if sum(x is not None for x in (args.src, args.from_hub, args.from_release)) != 1:
        parser.error("give exactly one of SRC, --from-hub or --from-release")
    src = args.src or (fetch_from_hub(args.from_hub) if args.from_hub else fetch_release(args.from_release))
    config = load_config(args.config).model if args.config else None
    try:
        config = convert(src, args.out, config)
    except ConversionError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {args.out}: {json.dumps(dataclasses.asdict(config))}")
    return 0
