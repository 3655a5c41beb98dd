"""ResNet backbone with frozen BatchNorm, as DETR uses it (torchvision's ResNet v1.5 layout).

Input NHWC float images; output the four stage outputs (strides 4, 8, 16, 32, or 4, 8, 16, 16
with DC5 dilation).  Frozen BatchNorm statistics and affine parameters live in the `buffers`
collection (never trained); convolution kernels are HWIO in `params`.  Padding is PyTorch's
symmetric padding on every layer, so stride-2 layers line up with the original.

Submodule names mirror the PyTorch keys (`conv1`, `bn1`, `layer1_0/conv2`, `layer2_0/downsample_0`)
so that converting a checkpoint is a rename table.

`ConvNet` is a plain alternative for training from scratch on small images (the CPU demo): no
pretrained weights exist for it, and no normalization to freeze.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax.models.layers import Conv1x1, downsample_sizes, zero_outside

BN_EPS = 1e-5


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics: `y = x * s + (b - mean * s)`, `s = w * rsqrt(var + eps)`."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        weight = self.variable("buffers", "weight", jnp.ones, (self.features,)).value
        bias = self.variable("buffers", "bias", jnp.zeros, (self.features,)).value
        mean = self.variable("buffers", "running_mean", jnp.zeros, (self.features,)).value
        var = self.variable("buffers", "running_var", jnp.ones, (self.features,)).value
        scale = weight * jax.lax.rsqrt(var + BN_EPS)
        shift = bias - mean * scale
        return x * scale.astype(self.dtype) + shift.astype(self.dtype)


def conv(features: int, kernel: int, stride: int = 1, dilation: int = 1, name: Optional[str] = None,
         dtype: Any = jnp.float32) -> nn.Module:
    """A bias-free convolution with PyTorch's symmetric padding `dilation * (kernel - 1) // 2`
    (1x1 kernels as `Conv1x1`: a matrix product)."""
    if kernel == 1:
        return Conv1x1(features, stride, use_bias=False, dtype=dtype, name=name)
    pad = dilation * (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   kernel_dilation=(dilation, dilation), use_bias=False, dtype=dtype, name=name)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 with expansion 4 and an optional projection shortcut.

    `sizes` (int32 [B, 2], valid (h, w) of the OUTPUT) switches on padding invariance: activations
    outside each image's valid region are zeroed before every spatial convolution reads them.
    """

    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, in_sizes: Optional[jnp.ndarray] = None,
                 out_sizes: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        keep_in = (lambda y: zero_outside(y, in_sizes)) if in_sizes is not None else (lambda y: y)
        keep_out = (lambda y: zero_outside(y, out_sizes)) if out_sizes is not None else (lambda y: y)
        dt = self.dtype
        y = nn.relu(FrozenBatchNorm(self.planes, dt, name="bn1")(conv(self.planes, 1, name="conv1", dtype=dt)(x)))
        y = keep_in(y)
        y = conv(self.planes, 3, self.stride, self.dilation, name="conv2", dtype=dt)(y)
        y = keep_out(nn.relu(FrozenBatchNorm(self.planes, dt, name="bn2")(y)))
        y = FrozenBatchNorm(4 * self.planes, dt, name="bn3")(conv(4 * self.planes, 1, name="conv3", dtype=dt)(y))
        if self.downsample:
            x = conv(4 * self.planes, 1, self.stride, name="downsample_0", dtype=dt)(x)
            x = FrozenBatchNorm(4 * self.planes, dt, name="downsample_1")(x)
        return keep_out(nn.relu(y + x))


class ResNet(nn.Module):
    """ResNet body returning `[layer1, layer2, layer3, layer4]` (NHWC) and their valid sizes.

    Attributes:
      depths: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50, (3, 4, 23, 3) for ResNet-101.
      width: channels of the stem and of stage 1's bottleneck (64 for the released models).
      dilation: DC5 — the last stage keeps stride 16 and dilates its 3x3 convolutions by 2
        (its first block keeps dilation 1, as torchvision does).
    """

    depths: Tuple[int, int, int, int] = (3, 4, 6, 3)
    width: int = 64
    dilation: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, sizes: Optional[jnp.ndarray] = None
                 ) -> Tuple[List[jnp.ndarray], List[Optional[jnp.ndarray]]]:
        """x: [B, H, W, 3]; sizes: int32 [B, 2] valid image sizes, or None for the original semantics
        (padding treated as image content).  Returns (stage outputs, valid sizes of each stage)."""
        dt = self.dtype
        keep = (lambda y, s: zero_outside(y, s)) if sizes is not None else (lambda y, s: y)
        half = (lambda s: downsample_sizes(s)) if sizes is not None else (lambda s: None)
        x = conv(self.width, 7, 2, name="conv1", dtype=dt)(x.astype(dt))
        sizes = half(sizes)
        x = keep(nn.relu(FrozenBatchNorm(self.width, dt, name="bn1")(x)), sizes)
        # Max-pool pads with -inf like PyTorch; zeros outside the valid region are harmless
        # there because post-ReLU values are >= 0.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        sizes = half(sizes)
        features, feature_sizes = [], []
        dilation = 1
        for stage, blocks in enumerate(self.depths):
            planes = self.width * 2 ** stage
            stride = 1 if stage == 0 else 2
            previous_dilation = dilation
            if stage == 3 and self.dilation:
                dilation, stride = dilation * 2, 1
            for k in range(blocks):
                in_sizes = sizes
                if k == 0 and stride == 2:
                    sizes = half(sizes)
                block = Bottleneck(planes, stride if k == 0 else 1,
                                   previous_dilation if k == 0 else dilation,
                                   downsample=(k == 0), dtype=dt, name=f"layer{stage + 1}_{k}")
                x = block(x, in_sizes, sizes)
            features.append(x)
            feature_sizes.append(sizes)
        return features, feature_sizes


class ConvNet(nn.Module):
    """Four stages of two 3x3 convolutions + ReLU (the first of each at stride 2), He-initialized.

    Returns the ResNet-DC5 interface: `[stage 2, stage 3, stage 4, stage 4]` (strides 4, 8, 16,
    16; NHWC, channels `widths[1:] + widths[-1:]`) and their valid sizes, so that the transformer
    reads stride 16 and the mask head's FPN strides 16, 8, 4.  Stage 1 (stride 2) only feeds stage 2.
    """

    widths: Tuple[int, int, int, int] = (32, 64, 128, 128)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, sizes: Optional[jnp.ndarray] = None
                 ) -> Tuple[List[jnp.ndarray], List[Optional[jnp.ndarray]]]:
        """x: [B, H, W, 3]; sizes: int32 [B, 2] valid image sizes or None (see `ResNet`)."""
        init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
        x = x.astype(self.dtype)
        outputs, output_sizes = [], []
        for stage, width in enumerate(self.widths):
            sizes = downsample_sizes(sizes) if sizes is not None else None
            for k in range(2):
                x = nn.Conv(width, (3, 3), strides=(2, 2) if k == 0 else (1, 1), padding=((1, 1), (1, 1)),
                            kernel_init=init, dtype=self.dtype, name=f"stage{stage + 1}_conv{k + 1}")(x)
                x = nn.relu(x)
                x = zero_outside(x, sizes) if sizes is not None else x
            outputs.append(x)
            output_sizes.append(sizes)
        return outputs[1:] + outputs[-1:], output_sizes[1:] + output_sizes[-1:]
