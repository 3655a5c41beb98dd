"""DETR R101 (COCO detection): box AP 43.5.

Released weights: see `detr_jax.convert.RELEASES`; convert with
`python convert_weights.py SRC OUT --config detr_r101`.
"""
from detr_jax.config import Config, DataConfig, LossConfig, ModelConfig


def get_config() -> Config:
    return Config(
        name="detr_r101",
        model=ModelConfig(backbone="resnet101", dilation=False, num_classes=91, masks=False),
        loss=LossConfig(masks=False),
        data=DataConfig(),
    )
