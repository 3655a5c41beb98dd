#!/usr/bin/env python3
"""Convert a PyTorch DETR checkpoint to a detr-jax (orbax) checkpoint.

    python convert_weights.py detr-r50-dc5-panoptic-da08f1b1.pth checkpoints/detr_r50_dc5_panoptic
    python convert_weights.py path/to/hf-snapshot-folder OUT          # model.safetensors + config.json
    python convert_weights.py --from-hub facebook/detr-resnet-50-dc5-panoptic OUT
    python convert_weights.py --from-release detr_r50_dc5_panoptic OUT

See `detr_jax/convert.py` for what is accepted and how the variant is detected.
"""
import sys

from detr_jax.convert import main

if __name__ == "__main__":
    sys.exit(main())
