"""DETR R101-DC5 (COCO detection): box AP 44.9.

Released weights: see `detr_jax.convert.RELEASES`; convert with
`python convert_weights.py SRC OUT --config detr_r101_dc5`.
"""
from detr_jax.config import Config, DataConfig, LossConfig, ModelConfig


def get_config() -> Config:
    return Config(
        name="detr_r101_dc5",
        model=ModelConfig(backbone="resnet101", dilation=True, num_classes=91, masks=False),
        loss=LossConfig(masks=False),
        data=DataConfig(),
    )
