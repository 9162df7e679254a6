"""Pixels: the one place where a file becomes the array the model sees.

The reference pipeline was Keras' `load_img(path, color_mode="rgb", target_size=(224, 224),
interpolation="nearest")`: Pillow decodes, `convert("RGB")`, `resize(NEAREST)`, float32 in
[0, 255], RGB order. `read_image` does the same, and also handles what `load_img` got wrong or
refused: EXIF orientation, 16-bit and float images (scaled, not clipped), decompression bombs,
and files that are not images (one `ImageError` naming the file and the reason).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
# Pillow warns above ~89 Mpixel and refuses above twice that; we refuse at the warning level.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS


class ImageError(ValueError):
    """A file that cannot be turned into pixels. `str()` names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def read_image(source, size: int | None = None, interpolation: str = "nearest", name: str | None = None) -> np.ndarray:
    """Decode `source` (a path or bytes) to a uint8 RGB array of shape (H, W, 3).

    With `size`, the image is resized to size x size as the reference did (aspect ratio squashed).
    `name` is what errors call the image (default: the path, or "<bytes>").
    """
    if name is None:
        name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    data = _read_bytes(source, name)
    if not data:
        raise ImageError(name, "file is empty (0 bytes)")
    image = _open(data, name)
    if size is not None:
        image = image.resize((size, size), RESAMPLING[interpolation])
    return np.asarray(image, dtype=np.uint8)


def _read_bytes(source, name: str) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    try:
        return Path(source).read_bytes()
    except FileNotFoundError:
        raise ImageError(name, "file not found") from None
    except IsADirectoryError:
        raise ImageError(name, "is a directory, not an image file") from None
    except OSError as error:
        raise ImageError(name, f"cannot read file ({error.strerror or error})") from None


def _open(data: bytes, name: str) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageError(name, f"image too large ({width}x{height} pixels, limit {MAX_PIXELS})")
            image.load()
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(name, "image too large (decompression bomb protection)") from None
        except UnidentifiedImageError:
            raise ImageError(name, "not a recognised image format") from None
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageError(name, f"corrupt or truncated image ({error})") from None
    image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, scaling high-bit-depth images instead of clipping them."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        # 16-bit PNGs decode to "I" or "I;16"; their full range is 0..65535.
        pixels = np.clip(pixels, 0, 65535) / 65535.0 * 255.0
        image = Image.fromarray(np.round(pixels).astype(np.uint8), mode="L")
    elif image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        low, high = np.nanmin(pixels), np.nanmax(pixels)
        scaled = (pixels - low) / (high - low) * 255.0 if high > low else np.zeros_like(pixels)
        image = Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
    if image.mode == "RGB":
        return image
    # As Keras' load_img: convert("RGB"); alpha is dropped, palettes and CMYK are expanded.
    return image.convert("RGB")
