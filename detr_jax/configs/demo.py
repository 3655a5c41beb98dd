"""The embedded default: a small panoptic DETR trained from scratch on the synthetic dataset
(`detr_jax.data.synthetic`: circles, squares, triangles over sky / grass / wall) on a 2-core CPU
(README.md gives the time and results).  Used by `detr-jax demo`, in the paper's two stages: `get_config()` is
stage 1, the detector trained on the panoptic boxes (no mask head); `MASK_STAGE` overrides its
train config for stage 2, the mask head alone on the frozen detector.

Choices for fast convergence from scratch (the released recipe fine-tunes a pretrained ResNet
for 300 epochs): a plain ConvNet backbone (32-64-128-128 channels, 8x8 tokens at 128 px; the
width-8 ResNet it replaced reached box AP 10.7 after 2000 detector steps, this one 24.1, at ~1.6x
the time per step), nothing frozen, pre-norm, 16 queries,
lr 5e-4 everywhere with warm-up, the class loss and the class matching cost doubled, and AdamW's
epsilon at 1e-12: clipping at 0.1 scales gradients down ~200x, which sinks the tiny gradients of
`bbox_attention` (attention maps of ~1e-3) below the default 1e-8; and `mask_attention_gain`
= 8 heads x 8 x 8 tokens, so that those attention maps weigh in the fresh mask head's first
convolution as much as its other inputs and the masks become query-specific in the first steps.
The detector trains with 4 parallel query groups (`TrainConfig.query_groups`, training only: the
exported model is a plain DETR with one group of 16 queries).  Side by side on the demo's data
(`bench/demo_convergence.py`, BENCHMARKS.md "The demo's convergence"), after the 1500 detector and
400 mask steps, mean of seeds 0 and 1: box AP 22.2 and PQ 50.3 with the groups, 14.9 and 39.7
without, at about the same training time per step.  Query denoising (5 groups) gave 18.5 and 46.5,
and cost more time per step; both together (seed 0 only) 21.2 and 51.7.
"""
from detr_jax.config import Config, DataConfig, LossConfig, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="demo",
        model=ModelConfig(backbone="convnet_small", dilation=False, num_classes=7, masks=True, hidden_dim=128,
                          num_heads=8, dim_feedforward=512, enc_layers=3, dec_layers=3, num_queries=16,
                          dropout=0.0, pre_norm=True),
        loss=LossConfig(masks=True, ce_weight=2.0, cost_class=2.0),
        data=DataConfig(short_side=128, max_size=128, train_scales=(128,), train_max_size=128, crop_prob=0.0,
                        max_boxes=8, bucket_multiple=32),
        train=TrainConfig(batch_size=16, max_steps=1500, lr=5e-4, lr_backbone=5e-4, frozen=(), warmup_steps=100,
                          adam_eps=1e-12, lr_drop_step=1300, log_every=25, save_every=250, keep_checkpoints=2,
                          num_workers=2, stage="detection", mask_attention_gain=512.0, query_groups=4),
    )


# Stage 2: only bbox_attention and the mask head train (TrainConfig.mask_trainable), mask losses on.
# The query groups train the detector: the "masks" stage builds none whatever its config says
# (`training_queries.build`, which warns when it is asked to), so this one says 1.
# With `mask_attention_gain` (above) the masks are query-specific within ~50 steps: on one detector
# (box AP 21.2), PQ 37.9 / 46.7 / 49.4 / 51.6 after 100 / 200 / 300 / 400 mask steps, where the
# original's init idled (dice flat at 0.81) and gave 0.4 / 2.1 / 4.8 / 20.8 (BENCHMARKS.md).
MASK_STAGE = dict(stage="masks", max_steps=400, warmup_steps=0, lr_drop_step=350, query_groups=1)

# `detr-jax demo --schedule NAME`: train steps and lr drops of each stage.  "default" is the config
# above; "long" trains the detector 4x longer and the masks 5x (about an hour): one run, before the
# mask-attention gain, reached box AP 53.3 and PQ 53.4 (README has the figures and times).
SCHEDULES = {
    "default": {},
    "long": dict(detection=dict(max_steps=6000, lr_drop_step=5400), masks=dict(max_steps=2000, lr_drop_step=1700)),
}
