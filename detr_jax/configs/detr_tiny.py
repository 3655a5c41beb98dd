"""A tiny panoptic DETR for tests and quick local runs (seconds on a CPU).

Same code paths as the released models: bottleneck ResNet (1 block per stage, width 8),
a 1+1-layer transformer and the full mask head (hidden 128 so that GroupNorm(8) fits the
narrowest FPN layer, 128 / 16 = 8 channels).
"""
from detr_jax.config import Config, DataConfig, LossConfig, ModelConfig


def get_config() -> Config:
    return Config(
        name="detr_tiny",
        model=ModelConfig(backbone="resnet_tiny", num_classes=10, masks=True, hidden_dim=128,
                          num_heads=8, dim_feedforward=256, enc_layers=1, dec_layers=2,
                          num_queries=12),
        loss=LossConfig(masks=True),
        data=DataConfig(short_side=96, max_size=128, train_scales=(64, 80, 96), train_max_size=128,
                        crop_resize_scales=(64, 80), crop_min_size=48, crop_max_size=80,
                        max_boxes=8, bucket_multiple=32),
    )
