"""The embedded default: a small panoptic DETR trained from scratch on the synthetic dataset
(`detr_jax.data.synthetic`: circles, squares, triangles over sky / grass / wall) on a 2-core CPU
(the whole demo: 13 min 43 s on a quiet machine).  Used by `detr-jax demo`, in the paper's two stages: `get_config()` is
stage 1, the detector trained on the panoptic boxes (no mask head); `MASK_STAGE` overrides its
train config for stage 2, the mask head alone on the frozen detector.

Choices for fast convergence from scratch (the released recipe fine-tunes a pretrained ResNet
for 300 epochs): DC5 tiny ResNet (8x8 tokens at 128 px), nothing frozen, pre-norm, 16 queries,
lr 5e-4 everywhere with warm-up, the class loss and the class matching cost doubled, and AdamW's
epsilon at 1e-12: clipping at 0.1 scales gradients down ~200x, which sinks the tiny gradients of
`bbox_attention` (attention maps of ~1e-3) below the default 1e-8 and keeps the masks from
becoming query-specific.
"""
from detr_jax.config import Config, DataConfig, LossConfig, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="demo",
        model=ModelConfig(backbone="resnet_tiny", dilation=True, num_classes=7, masks=True, hidden_dim=128,
                          num_heads=8, dim_feedforward=512, enc_layers=3, dec_layers=3, num_queries=16,
                          dropout=0.0, pre_norm=True),
        loss=LossConfig(masks=True, ce_weight=2.0, cost_class=2.0),
        data=DataConfig(short_side=128, max_size=128, train_scales=(128,), train_max_size=128, crop_prob=0.0,
                        max_boxes=8, bucket_multiple=32),
        train=TrainConfig(batch_size=16, max_steps=1800, lr=5e-4, lr_backbone=5e-4, frozen=(), warmup_steps=100,
                          adam_eps=1e-12, lr_drop_step=1500, log_every=25, save_every=250, keep_checkpoints=2,
                          num_workers=2, stage="detection"),
    )


# Stage 2: only bbox_attention and the mask head train (TrainConfig.mask_trainable), mask losses on.
MASK_STAGE = dict(stage="masks", max_steps=600, warmup_steps=0, lr_drop_step=500)

# `detr-jax demo --schedule NAME`: train steps and lr drops of each stage.  "default" is the config
# above (about 14 minutes on 2 cores); "long" trains 4.4x / 2x longer: one run reached box AP 46.8
# and PQ 58.2 (the targets: box AP and PQ >= 50; README has the figures and times).
SCHEDULES = {
    "default": {},
    "long": dict(detection=dict(max_steps=8000, lr_drop_step=7000), masks=dict(max_steps=1200, lr_drop_step=1000)),
}
