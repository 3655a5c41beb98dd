"""The one image decoder of detr-jax: training, evaluation and inference all read pixels here.

`decode_image(source)` turns a path, encoded bytes, a PIL image or an array into uint8 RGB
[H, W, 3]:
- every PIL mode is accepted (RGB, L, 1, P and PA, LA, RGBA, CMYK, YCbCr, I;16*, I, F, ...);
  16- and 32-bit grey is scaled to 8 bits (`convert("RGB")` would saturate every value >= 255);
  alpha is dropped (what the original's `convert("RGB")` does) or composited onto `background`;
- multi-frame files give their first frame;
- images of more than `max_pixels` pixels are refused from the header, before decoding.

EXIF orientation, the one place where the callers differ:
- inference (`annotated_size=None`) always shows the image upright, as a photo viewer does;
- a dataset reader passes the (height, width) its annotation file gives for the image.  The
  annotations refer to one frame of the image, and the decoder returns that frame: the stored
  pixels when the stored size matches (COCO's own files, read as the original DETR reads them),
  the upright pixels when only the upright size matches (annotation tools that display phone
  photos upright), and `ImageSizeError` naming the sizes when neither does.

Every failure raises `ImageLoadError` (an `OSError`) with the path and the reason.
"""
from __future__ import annotations

import io
import os
import warnings
from typing import Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

from detr_jax.config import DataConfig

ImageLike = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]
EXIF_ORIENTATION = 0x0112          # the EXIF tag; values 5-8 swap width and height
_SIXTEEN_BIT_SCALE = 257.0         # 65535 / 255: 16-bit grey -> 8 bits


class ImageLoadError(OSError):
    """An image that cannot be used: missing, not an image, truncated, empty or too large."""

    def __init__(self, path, reason: str):
        super().__init__(f"cannot load image {path}: {reason}")
        self.path, self.reason = path, reason


class ImageSizeError(ImageLoadError):
    """The image's size (stored or upright) is not the size its annotation gives."""


def decode_image(image: ImageLike, *, annotated_size: Optional[Tuple[int, int]] = None,
                 max_pixels: Optional[int] = DataConfig.max_image_pixels,
                 background: Optional[Tuple[int, int, int]] = None) -> np.ndarray:
    """A path, encoded bytes, PIL image or array -> uint8 RGB [H, W, 3].

    Args:
      image: a file path, the bytes of an encoded image, a PIL image, or a uint8 array
        [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (taken as it is: no EXIF, alpha dropped).
      annotated_size: None for inference (EXIF orientation applied); a dataset reader's (h, w)
        from its annotation file, which chooses the frame (module docstring).
      max_pixels: refuse larger images (decompression bombs); None: no limit of ours.
      background: (r, g, b) to composite transparent pixels onto; None drops the alpha channel.
    Returns:
      uint8 [H, W, 3]; with `annotated_size`, H, W equal it.
    Raises:
      ImageLoadError for a missing, unreadable, truncated or empty image or one of more than
      `max_pixels` pixels; ImageSizeError when neither frame has the annotated size.
    """
    if isinstance(image, np.ndarray):
        pixels = _array_to_rgb(image, "<array>", max_pixels)
        if annotated_size is not None and pixels.shape[:2] != tuple(annotated_size):
            raise ImageSizeError("<array>", f"it is {_hw(pixels.shape[:2])}, its annotation says "
                                            f"{_hw(annotated_size)}")
        return pixels
    name = "<PIL image>" if isinstance(image, Image.Image) else "<bytes>" if isinstance(image, (bytes, bytearray)) \
        else os.fspath(image)
    if isinstance(image, (str, os.PathLike)) and not os.path.isfile(name):
        raise ImageLoadError(name, "no such file")
    try:
        with warnings.catch_warnings():  # our own max_pixels replaces PIL's bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(image, Image.Image):
                return _decode(image, name, annotated_size, max_pixels, background)
            with Image.open(io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else name) as opened:
                return _decode(opened, name, annotated_size, max_pixels, background)
    except Image.DecompressionBombError as error:
        raise ImageLoadError(name, f"PIL refuses it as a decompression bomb ({error})") from None
    except ImageLoadError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageLoadError(name, "not an image file that PIL can read") from None
    except (OSError, ValueError, SyntaxError) as error:  # truncated, corrupt, unsupported mode
        raise ImageLoadError(name, f"truncated, corrupt or unsupported ({error})") from None


def upright_size(image: Image.Image) -> Tuple[int, int]:
    """(h, w) of the image as displayed: EXIF orientations 5-8 swap the stored height and width."""
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    return (image.width, image.height) if orientation in (5, 6, 7, 8) else (image.height, image.width)


def _hw(size) -> str:
    return f"{int(size[0])}x{int(size[1])} (h x w)"


def _decode(image: Image.Image, name, annotated_size, max_pixels, background) -> np.ndarray:
    _check_size(name, image.width, image.height, max_pixels)
    image.load()  # before reading the EXIF: a PNG may store it after the pixels
    stored, upright = (image.height, image.width), upright_size(image)
    if annotated_size is None or tuple(annotated_size) != stored:
        if annotated_size is not None and tuple(annotated_size) != upright:
            sizes = f"stored {_hw(stored)}" + (f", upright {_hw(upright)}" if upright != stored else "")
            raise ImageSizeError(name, f"its annotation says {_hw(annotated_size)}, the image is {sizes}")
        image = ImageOps.exif_transpose(image)
    return _to_rgb(image, background)


def _check_size(path, width: int, height: int, max_pixels: Optional[int]) -> None:
    if width <= 0 or height <= 0:
        raise ImageLoadError(path, f"it has zero size ({width} x {height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(path, f"{width} x {height} = {width * height} pixels is more than "
                                   f"max_image_pixels = {max_pixels} (a decompression bomb?)")


def _to_rgb(image: Image.Image, background: Optional[Tuple[int, int, int]]) -> np.ndarray:
    """Any PIL mode -> uint8 [H, W, 3].  16/32-bit grey is scaled to 8 bits (PIL would clip it);
    transparency is dropped (as `convert("RGB")`, what the original's data loader does) or, with
    `background`, composited onto that colour."""
    if image.mode.startswith("I"):  # I;16* and I: 16-bit range (I holding only 0..255 kept as is)
        grey = np.asarray(image, dtype=np.float64)
        if image.mode != "I" or grey.max(initial=0) > 255:
            grey = grey / _SIXTEEN_BIT_SCALE
        grey = np.clip(np.round(grey), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if image.mode == "F":  # float images: [0, 1] if they fit, else taken as 0..255
        grey = np.asarray(image, dtype=np.float64)
        grey = grey * 255.0 if np.nanmax(grey, initial=0) <= 1.0 else grey
        grey = np.clip(np.round(np.nan_to_num(grey)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        image = image.convert("RGBA")
        if background is not None:
            canvas = Image.new("RGBA", image.size, tuple(background) + (255,))
            image = Image.alpha_composite(canvas, image)
    return np.asarray(image.convert("RGB"))


def _array_to_rgb(array: np.ndarray, name, max_pixels) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ImageLoadError(name, f"expected uint8 [H, W], [H, W, 1|3|4]; got {array.dtype} {array.shape}")
    _check_size(name, array.shape[1], array.shape[0], max_pixels)
    if array.ndim == 2 or array.shape[2] == 1:
        return np.repeat(array.reshape(array.shape[:2] + (1,)), 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])
