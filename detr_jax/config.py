"""Typed configuration of detr-jax.  Every default lives here, once.

Configs are frozen dataclasses grouped by concern (model, loss, data, train).  The files in
`detr_jax/configs/` (inside the package, so an installed wheel has them) build them with
`get_config()`; `load_config` takes such a name or the path to a config file of one's own.
Checkpoints store `ModelConfig` as JSON beside the parameters (`to_dict` / `from_dict`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
from typing import Any, Dict, List, Optional, Tuple, Type, TypeVar, Union

T = TypeVar("T")

# ResNet variants: blocks per stage and the width of the stem / first stage.
RESNET_DEPTHS: Dict[str, Tuple[int, int, int, int]] = {
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet_tiny": (1, 1, 1, 1),  # for tests and the CPU demo
}
RESNET_WIDTHS: Dict[str, int] = {"resnet50": 64, "resnet101": 64, "resnet_tiny": 8}
# Plain convolutional backbones for training from scratch (`models.backbone.ConvNet`): the
# channels of their four stride-2 stages.
CONVNET_WIDTHS: Dict[str, Tuple[int, int, int, int]] = {"convnet_small": (32, 64, 128, 128),
                                                        "convnet_tiny": (16, 32, 64, 128)}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The DETR architecture.  Defaults are the original DETR R50 (COCO detection)."""

    backbone: str = "resnet50"      # a key of RESNET_DEPTHS, or of CONVNET_WIDTHS (no dilation)
    dilation: bool = False          # DC5: last stage at stride 16 with dilation 2
    num_classes: int = 91           # logits = num_classes + 1 (the last one is "no object")
    masks: bool = False             # panoptic mask head (DETRsegm)
    hidden_dim: int = 256
    num_heads: int = 8
    dim_feedforward: int = 2048
    enc_layers: int = 6
    dec_layers: int = 6
    num_queries: int = 100
    dropout: float = 0.1            # active in training only
    pre_norm: bool = False          # the released models are post-norm
    aux_loss: bool = True           # also return the outputs of the earlier decoder layers
    dtype: str = "float32"          # compute dtype ("bfloat16" for mixed precision); params stay float32
    attention: str = "dense"        # "dense": the whole batch and all heads in one expression (GPU/TPU);
                                    # "blocked": a loop over blocks of one head's queries (low memory on
                                    # a CPU).  The same values; the runtime's policy sets it per backend

    @property
    def num_logits(self) -> int:
        return self.num_classes + 1

    @property
    def resnet_depths(self) -> Tuple[int, int, int, int]:
        if self.backbone not in RESNET_DEPTHS:
            raise ValueError(f"unknown backbone {self.backbone!r}; known: {sorted(RESNET_DEPTHS)}")
        return RESNET_DEPTHS[self.backbone]

    @property
    def is_convnet(self) -> bool:
        """A plain ConvNet backbone (CONVNET_WIDTHS) rather than a ResNet."""
        if self.backbone in CONVNET_WIDTHS:
            if self.dilation:
                raise ValueError(f"backbone {self.backbone!r} has no dilated (DC5) variant: set dilation=False")
            return True
        if self.backbone not in RESNET_DEPTHS:
            raise ValueError(f"unknown backbone {self.backbone!r}; known: {sorted(RESNET_DEPTHS) + sorted(CONVNET_WIDTHS)}")
        return False

    @property
    def resnet_width(self) -> int:
        return RESNET_WIDTHS[self.backbone]

    @property
    def backbone_channels(self) -> Tuple[int, int, int, int]:
        """Output channels of ResNet stages 1..4 (bottleneck expansion 4)."""
        w = self.resnet_width
        return (4 * w, 8 * w, 16 * w, 32 * w)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        return from_dict(cls, d)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Hungarian matcher costs and SetCriterion weights (the original's defaults)."""

    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    ce_weight: float = 1.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    mask_weight: float = 1.0
    dice_weight: float = 1.0
    eos_coef: float = 0.1           # weight of the no-object class in the cross-entropy
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    masks: bool = False             # add the focal and dice mask losses
    aux_loss: bool = True           # losses on every earlier decoder layer, each matched anew
    matcher: str = "scipy"          # "scipy" (host callback) or "device" (jittable, no callback)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Image sizes, augmentation and padding.  Eval sizes follow the original val transform."""

    short_side: int = 800           # eval: resize the short side to this ...
    max_size: int = 1333            # ... unless the long side would exceed this
    train_scales: Tuple[int, ...] = tuple(range(480, 801, 32))
    train_max_size: int = 1333
    crop_resize_scales: Tuple[int, ...] = (400, 500, 600)
    crop_min_size: int = 384
    crop_max_size: int = 600
    max_boxes: int = 100            # targets are padded (or truncated) to this many boxes ...
    box_bucket: Optional[int] = None  # ... or, one host only, to the batch's largest count rounded up to
                                    # a multiple of this (at most max_boxes): with fewer slots than
                                    # queries the train step runs the mask head on the matched queries
                                    # only; each slot count compiles the step once
    bucket_multiple: int = 128      # padded image sides are rounded up to a multiple of this
    max_image_pixels: int = 150_000_000  # refuse larger images (decompression bombs); PIL's own hard limit is ~179M
    hflip_prob: float = 0.5         # train: probability of the random horizontal flip
    crop_prob: float = 0.5          # train: probability of the resize-crop-resize branch (else resize only)


@dataclasses.dataclass(frozen=True)
class DenoisingConfig:
    """Query denoising (DN-DETR), a training-only accelerator (`detr_jax.training_queries`): each
    image's ground-truth boxes and labels, noised, are decoded as extra queries that learn to
    reconstruct them.  Off (`groups=0`) in the paper recipes."""

    groups: int = 0                 # noised copies of the ground truth per image (DN-DETR: 5); 0 disables
    box_noise: float = 0.4          # box centers move by up to box_noise * (w, h) / 2, sides scale by
                                    # a factor in [1 - box_noise, 1 + box_noise] (DN-DETR's lambda)
    label_noise: float = 0.2        # probability that a query's label is replaced by a random class


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimization and the training loop.  Defaults are the original DETR recipe (300 epochs,
    lr drop at 200, AdamW 1e-4 / backbone 1e-5, weight decay 1e-4, clipping at 0.1)."""

    batch_size: int = 64            # global images per step over all devices and hosts (paper: 4 x 16 GPUs)
    epochs: int = 300
    max_steps: Optional[int] = None  # stop after this many steps (overrides `epochs`)
    lr: float = 1e-4
    lr_backbone: float = 1e-5       # parameters under `backbone/`
    weight_decay: float = 1e-4      # decoupled (AdamW), on every trainable parameter
    adam_eps: float = 1e-8          # AdamW epsilon (PyTorch's default); small-gradient parameters such as
                                    # bbox_attention need less under strong clipping (see detr_jax/configs/demo.py)
    clip_max_norm: float = 0.1      # global norm of the trainable gradients; 0 disables
    lr_drop_epochs: int = 200       # the lr is multiplied by lr_drop_factor from this epoch on ...
    lr_drop_step: Optional[int] = None  # ... or from this step, when given
    lr_drop_factor: float = 0.1
    warmup_steps: int = 0           # linear warm-up (the original has none)
    lr_decay: str = "step"          # "step": the drop above (the original); "cosine": after warm-up,
                                    # cosine from lr down to 0 at the last step (max_steps or epochs)
    seed: int = 42
    # Frozen: these parameter prefixes never change (the original freezes the stem and layer1; the
    # frozen-BatchNorm `buffers` collection is never trained at all).
    frozen: Tuple[str, ...] = ("backbone/conv1/", "backbone/layer1_")
    # "all": the model and losses as configured; the panoptic recipe in two stages: "detection"
    # (no mask head, box losses only), then "masks" (only `mask_trainable` trains, mask losses on).
    stage: str = "all"
    mask_trainable: Tuple[str, ...] = ("bbox_attention/", "mask_head/")
    # The first mask-head convolution's kernel on its attention-map channels (`bbox_attention`'s
    # maps, which sum to 1 over heads x h x w, so each is ~1 / (heads h w) where its fan-in init
    # expects ~1) starts multiplied by this, when the mask head starts fresh; 1: the original's init.
    # heads x h x w at the training size (`mask_attention_positions`) gives the maps the weight
    # of unit inputs: the masks become query-specific in tens of steps instead of idling (dice
    # flat at 0.81) for hundreds; a multiple of it, sooner still (the demo's: 16x).  A
    # training-only choice: the model is unchanged.
    mask_attention_gain: float = 1.0
    mixed_precision: bool = False   # model compute in bfloat16; parameters and losses stay float32
    padding_invariant: bool = True  # the model mode (see models/detr.py); False: the original's
    log_every: int = 50             # steps between logged metrics (the only host syncs)
    save_every: int = 1000          # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3       # the last N checkpoints are kept
    num_workers: int = 4            # data-loading threads per host
    cache_records: bool = False     # keep the decoded training records in memory, each read from disk
                                    # once (`data.loader.Loader`): small datasets over many epochs
    # Training-only convergence accelerators (`detr_jax.training_queries`); the trained model is
    # plain DETR.  Both off in the paper recipes.
    denoising: DenoisingConfig = DenoisingConfig()
    query_groups: int = 1           # parallel query groups, each matched one-to-one (Group DETR); 1 disables
    encoder_supervision: float = 0.0  # weight of the encoder tokens' dense one-to-many detection loss
                                    # (`detr_jax.encoder_supervision`, after Co-DETR); 0 disables


def to_json(cfg: Any) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)


def from_dict(cls: Type[T], d: Dict[str, Any]) -> T:
    """Build a dataclass from a dict, turning lists back into tuples and naming unknown keys."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class Config:
    """One experiment: what `detr_jax/configs/NAME.py:get_config()` returns."""

    name: str
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()


CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "configs"   # the package's own configs


def known_configs() -> List[str]:
    """Names of the configs shipped in `detr_jax/configs/`."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


def load_config_module(name_or_path: Union[str, os.PathLike]):
    """The module of `detr_jax/configs/NAME.py` by name, or of any path to a config file (its
    `get_config()` and whatever else it defines, such as the demo's `MASK_STAGE`)."""
    path = pathlib.Path(name_or_path)
    if path.suffix != ".py":
        path = CONFIG_DIR / f"{name_or_path}.py"
        if not path.is_file():
            raise FileNotFoundError(f"no config named {str(name_or_path)!r}; known: {known_configs()} "
                                    f"(or give the path to a .py file with get_config())")
    elif not path.is_file():
        raise FileNotFoundError(f"no config file {path}")
    spec = importlib.util.spec_from_file_location(f"detr_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(name_or_path: Union[str, os.PathLike]) -> Config:
    """`detr_jax/configs/NAME.py` by name (e.g. "detr_r50_dc5_panoptic") or a path to a config file."""
    return load_config_module(name_or_path).get_config()
