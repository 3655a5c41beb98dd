"""DETR R50 panoptic (COCO panoptic): PQ 43.4.

Released weights: see `detr_jax.convert.RELEASES`; convert with
`python convert_weights.py SRC OUT --config detr_r50_panoptic`.
"""
from detr_jax.config import Config, DataConfig, LossConfig, ModelConfig


def get_config() -> Config:
    return Config(
        name="detr_r50_panoptic",
        model=ModelConfig(backbone="resnet50", dilation=False, num_classes=250, masks=True),
        loss=LossConfig(masks=True),
        data=DataConfig(),
    )
