"""Training views of a film: itself, its mirror image, and variants of what a scanner or a hospital changes.

A model that may lean on one site's look (its exposure curve, its contrast, its sharpness, its noise,
its JPEG settings, how it frames the chest) learns the site. Each training film therefore has
`count` views: view 0 is the film as the model reads it, view 1 its mirror image (the reference's
flip), and each view from 2 on a variant with its own gamma, contrast, blur, noise, JPEG quality,
small rotation and scale, mirrored or not. A variant's settings are drawn from the film's content
hash and the view's number, so one film's view k is the same image in every run and on every
machine, and can be cached like the film's own features.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from lungxray.data.images import decode_image, to_array

VERSION = 1  # bump when a variant's settings or their order change: cached variants are then made anew
# Ranges of each setting, wide enough to span the public collections' looks, narrow enough to stay a chest film.
GAMMA = (2 / 3, 3 / 2)  # log-uniform
CONTRAST = (0.7, 1.3)
BLUR_RADIUS = (0.0, 1.2)  # pixels at the model's input size
NOISE_STD = (0.0, 6.0)  # grey levels
JPEG_QUALITY = (30, 95)
ROTATION_DEGREES = 7.0
SCALE = (0.9, 1.1)


def view_names(count: int) -> tuple[str, ...]:
    """What the feature cache calls views 0..count-1 (a variant's name carries VERSION)."""
    return ("orig", "flip", *(f"acq{VERSION}-{k}" for k in range(2, count)))[:count]


def variant(content_hash: str, view: int) -> Callable[[Image.Image], Image.Image]:
    """View `view` (>= 2) of the film whose content hash is `content_hash`: a function of its resized image."""
    rng = np.random.default_rng([int(content_hash[:16], 16), view])
    angle = rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES)
    scale = rng.uniform(*SCALE)
    gamma = float(np.exp(rng.uniform(np.log(GAMMA[0]), np.log(GAMMA[1]))))
    contrast = rng.uniform(*CONTRAST)
    blur = rng.uniform(*BLUR_RADIUS)
    noise_std = rng.uniform(*NOISE_STD)
    quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    mirror = bool(rng.random() < 0.5)
    noise_seed = int(rng.integers(2**32))

    def apply(image: Image.Image) -> Image.Image:
        image = _rotate_and_scale(image, angle, scale)
        image = image.point([round(255 * (v / 255) ** gamma) for v in range(256)] * len(image.getbands()))
        image = ImageEnhance.Contrast(image).enhance(contrast)
        image = image.filter(ImageFilter.GaussianBlur(blur))
        pixels = np.asarray(image, np.float32)
        noise = np.random.default_rng(noise_seed).normal(0.0, noise_std, pixels.shape[:2])[..., None]
        image = Image.fromarray(np.clip(pixels + noise, 0, 255).round().astype(np.uint8))
        encoded = io.BytesIO()
        image.save(encoded, format="JPEG", quality=quality)
        image = Image.open(encoded).convert("RGB")
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else image

    return apply


def _rotate_and_scale(image: Image.Image, degrees: float, scale: float) -> Image.Image:
    """Turned by `degrees` and zoomed by `scale` about the centre; what comes into the frame is black."""
    radians = np.deg2rad(degrees)
    cos, sin = np.cos(radians) / scale, np.sin(radians) / scale
    cx, cy = image.width / 2, image.height / 2
    # Pillow maps each output pixel back to the input: (x, y) -> (a x + b y + c, d x + e y + f).
    coefficients = (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)
    return image.transform(image.size, Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR,
                           fillcolor=(0,) * len(image.getbands()))


def read_views(source, views: list[int], content_hash: str, size: int, interpolation: str = "nearest",
               name: str | None = None, intensity: str = "none", crop=None) -> list[np.ndarray]:
    """Views `views` of one film, decoded once: uint8 RGB arrays as `read_image` makes them."""
    image = decode_image(source, name, crop)
    made = {}
    for view in views:
        if view in (0, 1):
            if 0 not in made:
                made[0] = to_array(image, size, interpolation, intensity)
            made[view] = made[0] if view == 0 else np.ascontiguousarray(made[0][:, ::-1])
        else:
            made[view] = to_array(image, size, interpolation, intensity, variant(content_hash, view))
    return [made[view] for view in views]
