"""Post-processing of DETR outputs: scored boxes, instance masks and panoptic segments, as the
original's PostProcess, PostProcessSegm and PostProcessPanoptic.

Modules: `detection` (boxes, instance masks), `panoptic` (segment maps; what counts as a tie
pixel), `resample` (the original's bilinear and nearest resampling, on the device or the host),
and the opt-in `torch_softmax` (PyTorch's CPU softmax replayed bit for bit on tie pixels).

Inputs follow the model contract: `pred_logits` [B, Q, C+1] (the last logit is "no object"),
`pred_boxes` [B, Q, 4] (cx, cy, w, h) in [0, 1] of the UNPADDED image, `pred_masks`
[B, Q, Hp/4, Wp/4] mask logits on the stride-4 grid of the PADDED batch; `image_sizes` [B, 2]
(h, w) after resize and before padding; `orig_sizes` [B, 2] (h, w) of the original photos.

On a single unpadded image every function equals the original DETR's `PostProcess`,
`PostProcessSegm` and `PostProcessPanoptic` (panoptic: on every pixel that is not a float-rounding
tie of the original's softmax, `panoptic`'s docstring; same float32 bilinear taps as `F.interpolate(...,
align_corners=False)`, same nearest rule, same PIL NEAREST resize of the segment map).  On a padded
batch the original resamples the whole padded mask grid, so an image's masks depend on its batch
mates.  By default (`crop=True`) we first crop each image's own region of the grid,
`ceil(h / 4) x ceil(w / 4)` (conv1 and the max-pool each halve with ceiling), so an image gives
the same masks in any batch as alone; `crop=False` reproduces the original's padded-batch results.

Split between device and host:
- jittable `jnp` (static shapes; per-image sizes may be traced): `class_scores`, `box_predictions`,
  `resize_bilinear`, `instance_masks`;
- host `numpy`: everything with data-dependent shapes: per-image cropping and nearest resizing to
  the original size (`postprocess_instance_masks`), the panoptic bookkeeping (kept queries, stuff
  merging, the small-segment loop, the PIL resize, `postprocess_panoptic`) and PNG encoding.
`resize_bilinear` runs on numpy arrays too (same arithmetic).  The panoptic path resamples the
kept masks and takes the per-pixel argmax in jitted programs (`_KeptMasks`), its shapes bucketed (kept queries to a multiple of 8,
output to a multiple of 128) so that few shapes compile.
"""
from detr_jax.postprocess.detection import (MASK_STRIDE, MASK_THRESHOLD, MIN_SEGMENT_AREA, PANOPTIC_THRESHOLD,
                                            box_predictions, class_scores, instance_masks, mask_grid_size,
                                            postprocess_boxes, postprocess_instance_masks)
from detr_jax.postprocess.panoptic import (NEAR_TIE_GAP, IsThing, TieBreak, default_is_thing, panoptic_to_png,
                                           png_to_ids, postprocess_panoptic)
from detr_jax.postprocess.resample import pil_nearest_indices, resize_bilinear, resize_nearest

__all__ = ["MASK_STRIDE", "MASK_THRESHOLD", "MIN_SEGMENT_AREA", "PANOPTIC_THRESHOLD", "NEAR_TIE_GAP", "IsThing",
           "TieBreak", "box_predictions", "class_scores", "instance_masks", "mask_grid_size", "postprocess_boxes",
           "postprocess_instance_masks", "default_is_thing", "panoptic_to_png", "png_to_ids", "postprocess_panoptic",
           "pil_nearest_indices", "resize_bilinear", "resize_nearest"]
