"""The embedded default: a small panoptic DETR trained from scratch on the synthetic dataset
(`detr_jax.data.synthetic`: circles, squares, triangles over sky / grass / wall) on a 2-core CPU
(README.md gives the time and results).  Used by `detr-jax demo`, in the paper's two stages:
`get_config()` is stage 1, the detector trained on the panoptic boxes (no mask head);
`MASK_STAGE` overrides its train config for stage 2, the mask head alone on the frozen detector.

Choices for fast convergence from scratch (the released recipe fine-tunes a pretrained ResNet
for 300 epochs): a plain ConvNet backbone (16-32-64-128 channels, 8x8 tokens at 128 px), nothing
frozen, pre-norm, one encoder and two decoder layers, 16 queries, batches of 8, lr 2e-3
everywhere with warm-up and cosine decay, the class loss and the class matching cost doubled,
the no-object class weighted 0.5 (`eos_coef`), and AdamW's epsilon at 1e-12: clipping at 0.1
scales gradients down ~200x, which sinks the tiny gradients of `bbox_attention` (attention maps
of ~1e-3) below the default 1e-8; and
`mask_attention_gain` = 16 x (8 heads x 8 x 8 tokens), so that those attention maps outweigh the
fresh mask head's other inputs to its first convolution and the masks become query-specific in
the first steps.

The detector trains with the encoder's dense supervision (`TrainConfig.encoder_supervision`)
and one group of query denoising (`TrainConfig.denoising`), both training only: the exported
model is a plain DETR.  It matches on the device (`LossConfig.matcher="device"`: an optimal
assignment of the same total cost as scipy's, without a host callback in the step).  What the detector-only runs of 2026-12-05
measured (`bench/demo_convergence.py --stages detection`, seed 0, one run at a time; BENCHMARKS.md
"The demo's detector in minutes"): the encoder loss doubled box AP after 900 steps (11.3 against
5.4); the 16-32-64-128 backbone costs a third of the 32-64-128-128 one's FLOPs; batches of 8
learn more per second than 16 (27.7 against 16.7 at 16000 images) or 4; and 4 query groups cost
44 % of this model's step (0.164 s against 0.092), more than they bring per second: without them
the detector reached 44.9 after 4500 steps (658 s of training), where with them it reached 36.6
after 3000 (580 s).

Then, after 3000 steps (the same runs): DETR's no-object weight of 0.1 is set for 100 queries
and ~7 objects; with 16 queries the no-object class weighed 1/6 of the objects, and the
detector kept duplicates (90 above a 0.5 score on the 157 things of the held-out images, box AP
34.4).  At 0.5: 21 duplicates, box AP 37.5 (0.3: 33.0, 1.0: 25.1, single runs).  With lr 2e-3
and the encoder loss weighted 2: 40.4.  On that detector, the mask head at the 16x gain reaches
PQ 57.0 after 200 steps and 63.0 after 400, against 42.4 and 55.7 at 1x.

Then query denoising on top (2026-12-05, an Intel Xeon, seed 0, detector-only runs of 1600
steps with cosine decay to 1600; BENCHMARKS.md "Query denoising on the encoder supervision"):
box AP 20.4 without it, 26.5 with 1 group, 27.6 with 2, 30.5 with 5 (seed 1: 21.9 without, 23.4
with 1 group); the step costs 10 %, 19 % and 35 % more (paired timings,
`bench/demo_step_variants.py`): one group is what the 10-minute budget leaves room for.  The
device matcher made the step 3-6 % shorter.  In the whole demo (3200 steps, one run each) box
AP was the same with one group as without (44.6), AP50 79.5 against 74.9, PQ 58.4 against 54.6.

Then fewer transformer layers (2026-12-06, the same Intel Xeon; BENCHMARKS.md "Fewer transformer
layers"): each encoder or decoder layer was 10-11 % of the step of three of each (paired timings),
and the shallower detectors learned more per second.  Detector-only runs of seed 0 of about the
same training time: box AP 27.4 with 3 + 3 layers (1600 steps, 256 s), 34.0 with 2 + 2 (2000 steps,
239 s), 31.1 with 1 + 3 (1800 steps, 222 s) and 37.9 with 1 + 2 (2300 steps, 224 s).  Whole demos:
2 + 2 layers and 4000 steps, box AP 46.6 in 9 min 41 s; 1 + 2 and 4600 steps, 49.4 (PQ 62.2) in
9 min 23 s; 1 + 2 with 5000 detector and 150 mask steps, 47.7 (PQ 58.5) in 9 min 58 s, too near the
10 minutes for no gain (one run each).  The detector stage keeps its decoded records in memory
(`cache_records`: 3.5 ms of loader CPU a batch instead of 13.6).

Then 250 more detector steps for 50 fewer mask steps (2026-12-06, the same Intel Xeon;
BENCHMARKS.md "250 detector steps for 50 mask steps"): 4850 + 150 steps, box AP 52.8 (PQ 59.4,
segm AP 21.3) in 9 min 9 s, one run.  Box AP depends only on the detector stage; the shorter mask
stage costs segm AP and PQ (30.2 and 62.2 after 200 steps on the 4600-step detector) and leaves
rounder, haloed masks, which PQ >= 50 still allows.
"""
from detr_jax.config import Config, DataConfig, DenoisingConfig, LossConfig, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="demo",
        model=ModelConfig(backbone="convnet_tiny", dilation=False, num_classes=7, masks=True, hidden_dim=128,
                          num_heads=8, dim_feedforward=512, enc_layers=1, dec_layers=2, num_queries=16,
                          dropout=0.0, pre_norm=True),
        loss=LossConfig(masks=True, ce_weight=2.0, cost_class=2.0, eos_coef=0.5, matcher="device"),
        data=DataConfig(short_side=128, max_size=128, train_scales=(128,), train_max_size=128, crop_prob=0.0,
                        max_boxes=8, bucket_multiple=32),
        train=TrainConfig(batch_size=8, max_steps=4850, lr=2e-3, lr_backbone=2e-3, frozen=(), warmup_steps=100,
                          lr_decay="cosine", adam_eps=1e-12, log_every=25, save_every=500, keep_checkpoints=2,
                          num_workers=2, cache_records=True, stage="detection", mask_attention_gain=8192.0,
                          encoder_supervision=2.0, denoising=DenoisingConfig(groups=1)),
    )


# Stage 2: only bbox_attention and the mask head train (TrainConfig.mask_trainable), mask losses on,
# in batches of 16 at lr 5e-4 with a step drop, for 150 steps (2400 images: the first epoch never
# ends, so the records are not cached).  The encoder loss trains the detector: the "masks"
# stage builds none whatever its config says (`encoder_supervision.build` warns when asked to),
# so this one says 0.
# With `mask_attention_gain` (above) the masks are query-specific within ~50 steps: on one detector
# (box AP 21.2), PQ 37.9 / 46.7 / 49.4 / 51.6 after 100 / 200 / 300 / 400 mask steps at 1x, where
# the original's init idled (dice flat at 0.81) and gave 0.4 / 2.1 / 4.8 / 20.8 (BENCHMARKS.md);
# on the detector of box AP 40.4, 48.5 / 57.0 / 61.3 / 63.0 at 16x.
MASK_STAGE = dict(stage="masks", max_steps=150, batch_size=16, lr=5e-4, lr_backbone=5e-4, warmup_steps=0,
                  lr_decay="step", lr_drop_step=130, encoder_supervision=0.0,
                  denoising=DenoisingConfig(groups=0), cache_records=False)

# `detr-jax demo --schedule NAME`: train steps and lr drops of each stage.  "default" is the config
# above; "long" trains the detector about 2x longer and the masks 2x (README has its figures and times).
SCHEDULES = {
    "default": {},
    "long": dict(detection=dict(max_steps=9200), masks=dict(max_steps=400, lr_drop_step=350)),
}
