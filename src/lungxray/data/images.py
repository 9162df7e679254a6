"""Pixels: the one place where a file (JPEG, PNG of any mode, DICOM...) becomes the array the model sees.

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
from typing import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lungxray.errors import ImageError

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
# Intensity normalisation, against acquisition style (exposure, processing, contrast of each hospital):
# global histogram equalisation, or a robust window stretching the 1st..99th percentiles to 0..255.
INTENSITY = {
    "none": None,
    "equalize": ImageOps.equalize,
    "autocontrast": lambda image: ImageOps.autocontrast(image, cutoff=1),
}
# Pillow warns above ~89 Mpixel and refuses above twice that; we refuse at the warning level.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS


def read_image(source, size: int | None = None, interpolation: str = "nearest", name: str | None = None,
               intensity: str = "none", crop: Callable[[Image.Image], tuple] | None = None) -> np.ndarray:
    """Decode `source` (a path or bytes) to a uint8 RGB array of shape (H, W, 3).

    `crop(image)`, when given, returns the box (left, top, right, bottom) of the decoded image to
    keep (e.g. `lungxray.lungs.LungCrop`). With `size`, the image is then resized to size x size as
    the reference did (aspect ratio squashed). `intensity` names a normalisation of INTENSITY,
    applied last. `name` is what errors call the image (default: the path, or "<bytes>").
    """
    if name is None:
        name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    data = _read_bytes(source, name)
    if not data:
        raise ImageError(name, "file is empty (0 bytes)")
    image = _open_dicom(data, name) if is_dicom(data) else _open(data, name)
    if crop is not None:
        image = image.crop(crop(image))
    if size is not None:
        image = image.resize((size, size), RESAMPLING[interpolation])
    if INTENSITY[intensity] is not None:
        image = INTENSITY[intensity](image)
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


def is_dicom(data: bytes) -> bool:
    """DICOM Part 10 files carry "DICM" after a 128-byte preamble, whatever their name; older writers
    leave out the preamble and file meta, and start straight with a group 0002 or 0008 element
    (little endian), which no other image format does."""
    return (len(data) >= 132 and data[128:132] == b"DICM") or data[:2] in (b"\x02\x00", b"\x08\x00")


# What a DICOM header must say, when it says it, for the pixels to be a frontal chest radiograph.
RADIOGRAPHY_MODALITIES = {"CR", "DX", "RG", "OT"}  # OT: secondary captures of films
CHEST_BODY_PARTS = {"CHEST", "THORAX", "LUNG", "LUNGS"}
LATERAL_VIEWS = {"LL", "RL", "LATERAL", "LAT", "LLD", "RLD"}
MODALITY_NAMES = {"CT": "CT", "MR": "MR", "US": "ultrasound", "NM": "nuclear medicine", "PT": "PET",
                  "RTDOSE": "RT dose", "RTSTRUCT": "RT structure set", "SEG": "segmentation", "MG": "mammography",
                  "XA": "angiography", "RF": "fluoroscopy", "PX": "panoramic dental", "IO": "intra-oral", "OP": "ophthalmic"}


def check_chest_radiograph(dataset, name: str) -> None:
    """An ImageError when the header says the file is not a frontal chest radiograph."""
    modality = str(dataset.get("Modality", "") or "").upper()
    if modality and modality not in RADIOGRAPHY_MODALITIES:
        kind = MODALITY_NAMES.get(modality, f"Modality {modality}")
        raise ImageError(name, f"{kind} image (DICOM Modality {modality}), not a chest radiograph")
    body_part = str(dataset.get("BodyPartExamined", "") or "").upper()
    if body_part and body_part not in CHEST_BODY_PARTS:
        raise ImageError(name, f"DICOM BodyPartExamined is {body_part}, not the chest")
    view = str(dataset.get("ViewPosition", "") or "").upper()
    if view in LATERAL_VIEWS:
        raise ImageError(name, f"lateral view (DICOM ViewPosition {view}); the model reads frontal (PA/AP) films")


def _open_dicom(data: bytes, name: str) -> Image.Image:
    """A DICOM image as a radiologist's viewer shows it: modality LUT (rescale slope/intercept),
    VOI LUT or window centre/width, MONOCHROME1 inverted, then scaled to 8 bits."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
    except Exception as error:  # pydicom raises many types for broken or unsupported files
        raise ImageError(name, f"unreadable DICOM ({type(error).__name__}: {error})") from None
    check_chest_radiograph(dataset, name)  # before the pixels are decoded, let alone trusted
    if "TransferSyntaxUID" not in dataset.get("file_meta", {}):  # written without file meta: as read
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit, little = dataset.original_encoding
        dataset.file_meta = dataset.get("file_meta") or FileMetaDataset()
        dataset.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                               ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    try:
        pixels = dataset.pixel_array
    except Exception as error:
        raise ImageError(name, f"unreadable DICOM pixels ({type(error).__name__}: {error})") from None
    if getattr(dataset, "NumberOfFrames", 1) not in (None, 1, "1") and pixels.ndim >= 3 and pixels.shape[0] > 1:
        pixels = pixels[0]  # multi-frame: the first frame
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    if pixels.ndim == 3:  # colour: pydicom already converted YBR to RGB
        return Image.fromarray(_scale_to_uint8(pixels.astype(np.float64))).convert("RGB")
    if pixels.shape[0] * pixels.shape[1] > MAX_PIXELS:
        raise ImageError(name, f"image too large ({pixels.shape[1]}x{pixels.shape[0]} pixels)")
    values = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset).astype(np.float64)
    gray = _scale_to_uint8(values)
    if photometric == "MONOCHROME1":  # low values are bright
        gray = 255 - gray
    return Image.fromarray(gray, mode="L").convert("RGB")


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.round((values - low) / (high - low) * 255.0).astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, scaling high-bit-depth images instead of clipping them."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        # 16-bit PNGs decode to "I" or "I;16"; their full range is 0..65535.
        pixels = np.clip(pixels, 0, 65535) / 65535.0 * 255.0
        image = Image.fromarray(np.round(pixels).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(_scale_to_uint8(np.asarray(image, dtype=np.float64)), mode="L")
    if image.mode == "RGB":
        return image
    # As Keras' load_img: convert("RGB"); alpha is dropped, palettes and CMYK are expanded.
    return image.convert("RGB")
