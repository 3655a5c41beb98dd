"""DETR R50-DC5 panoptic (COCO panoptic): box AP 40.2, segm AP 31.9, PQ 44.6.

Released weights: see `detr_jax.convert.RELEASES`; convert with
`python convert_weights.py SRC OUT --config detr_r50_dc5_panoptic`.
"""
from detr_jax.config import Config, DataConfig, LossConfig, ModelConfig


def get_config() -> Config:
    return Config(
        name="detr_r50_dc5_panoptic",
        model=ModelConfig(backbone="resnet50", dilation=True, num_classes=250, masks=True),
        loss=LossConfig(masks=True),
        data=DataConfig(),
    )
