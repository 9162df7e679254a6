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
# Limits, checked from the header before anything is decoded. The largest chest detectors are
# about 4,300 x 4,300 (18.5 Mpixel); at 25 Mpixel one decode stays under 300 MB over the idle
# process (measured: 260 MB for a 16-bit PNG, the costliest case; tests/test_hostile.py).
MAX_PIXELS = 25_000_000
# DICOM films larger than this on a side are subsampled by a whole stride before their lookup tables.
DICOM_WORKING_SIDE = 2048
# Pillow knows ~40 formats, some of which call external programs: only these are opened.
FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF")
# DICOM transfer syntaxes accepted: uncompressed, JPEG family, JPEG-LS, JPEG 2000, RLE. Deflate is
# refused: the whole data set is inflated before any size can be checked (7 KB became 168 MB).
DICOM_SYNTAXES = {
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",  # implicit/explicit VR, big endian
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",  # JPEG-LS
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE
}


def read_image(source, size: int | None = None, interpolation: str = "nearest", name: str | None = None,
               intensity: str = "none", crop: Callable[[Image.Image], tuple] | None = None) -> np.ndarray:
    """Decode `source` (a path or bytes) to a uint8 RGB array of shape (H, W, 3).

    `crop(image)`, when given, returns the box (left, top, right, bottom) of the decoded image to
    keep (e.g. `lungxray.model.lungs.LungCrop`). With `size`, the image is then resized to size x size as
    the reference did (aspect ratio squashed). `intensity` names a normalisation of INTENSITY,
    applied last. `name` is what errors call the image (default: the path, or "<bytes>").
    """
    return to_array(decode_image(source, name, crop), size, interpolation, intensity)


def decode_image(source, name: str | None = None, crop: Callable[[Image.Image], tuple] | None = None) -> Image.Image:
    """The first half of `read_image`: the file (a path, its bytes, or a DICOM data set that
    `read_dicom` parsed) decoded to an RGB image (and cropped), or an ImageError."""
    if name is None:
        name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        image = _decoded(source, name)
    except (ImageError, MemoryError):
        raise
    except Exception as error:  # a decoder's own exception must still name the file
        raise ImageError(name, f"cannot decode ({type(error).__name__}: {error})") from None
    return image.crop(crop(image)) if crop is not None else image


def _decoded(source, name: str) -> Image.Image:
    if not isinstance(source, (str, Path, bytes, bytearray)):  # a parsed DICOM data set
        return dicom_image(source, name)
    data = read_bytes(source, name)
    if not data:
        raise ImageError(name, "file is empty (0 bytes)")
    return dicom_image(read_dicom(data, name), name) if is_dicom(data) else _open(data, name)


def to_array(image: Image.Image, size: int | None = None, interpolation: str = "nearest", intensity: str = "none",
             variant: Callable[[Image.Image], Image.Image] | None = None) -> np.ndarray:
    """The second half of `read_image`: resized, then changed by `variant` (a training view's, see
    `lungxray.data.acquisition`), then normalised, as a uint8 array."""
    if size is not None:
        image = image.resize((size, size), RESAMPLING[interpolation])
    if variant is not None:
        image = variant(image)
    if INTENSITY[intensity] is not None:
        image = INTENSITY[intensity](image)
    return np.asarray(image, dtype=np.uint8)


def read_bytes(source, name: str) -> bytes:
    """The file's bytes (bytes pass through), or an ImageError naming `name` and why not."""
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
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageError(name, f"image too large ({width}x{height} pixels, limit {MAX_PIXELS})")
            image.load()
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(name, "image too large (decompression bomb protection)") from None
        except UnidentifiedImageError:
            raise ImageError(name, f"not a recognised image format (accepted: {', '.join(FORMATS)}, DICOM)") from None
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


def dicom_image(dataset, name: str) -> Image.Image:
    """A DICOM image (a data set `read_dicom` parsed) as a radiologist's viewer shows it: modality
    LUT (rescale slope/intercept), VOI LUT or window centre/width, MONOCHROME1 inverted, then scaled
    to 8 bits. The header is checked (what the image is, its size) before any pixel is decoded, and
    only the first frame is."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

    check_chest_radiograph(dataset, name)
    _check_dicom_size(dataset, name)
    try:
        pixels = pixel_array(dataset, index=0 if int(dataset.get("NumberOfFrames", 1) or 1) > 1 else None)
    except Exception as error:
        raise ImageError(name, f"unreadable DICOM pixels ({type(error).__name__}: {error})") from None
    # The lookup tables work in float64: on a large film, subsample first (the model sees 224 px).
    stride = -(-max(pixels.shape[:2]) // DICOM_WORKING_SIDE)
    pixels = pixels[::stride, ::stride]
    if pixels.ndim == 3:  # colour: pydicom already converted YBR to RGB
        return Image.fromarray(_scale_to_uint8(pixels)).convert("RGB")
    try:
        values = apply_modality_lut(pixels, dataset)
        if dataset.get("VOILUTSequence") and values.dtype.kind == "f":  # a LUT is indexed by whole numbers
            values = np.rint(values).astype(np.int64)
        values = apply_voi_lut(values, dataset)
    except Exception as error:  # zero window width, unknown VOI function, odd LUT depth...
        raise ImageError(name, f"unusable DICOM lookup table or window ({type(error).__name__}: {error})") from None
    gray = _scale_to_uint8(values)
    if str(dataset.get("PhotometricInterpretation", "MONOCHROME2")) == "MONOCHROME1":  # low values are bright
        gray = 255 - gray
    return Image.fromarray(gray, mode="L").convert("RGB")


def read_dicom(data: bytes, name: str):
    """A DICOM file's data set, parsed once, its pixels not yet decoded; deflated files refused
    before inflating. An ImageError naming `name` when it cannot be parsed."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        if data[128:132] == b"DICM":
            syntax = _transfer_syntax(data)
            if syntax not in DICOM_SYNTAXES:
                raise ImageError(name, f"DICOM transfer syntax {syntax or '(none)'} is not accepted (deflated or "
                                       "unknown encodings cannot be size-checked before decoding)")
        dataset = pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
    except ImageError:
        raise
    except Exception as error:  # pydicom raises many types for broken or unsupported files
        raise ImageError(name, f"unreadable DICOM ({type(error).__name__}: {error})") from None
    if "TransferSyntaxUID" not in dataset.get("file_meta", {}):  # written without file meta: as read
        implicit, little = dataset.original_encoding
        dataset.file_meta = dataset.get("file_meta") or FileMetaDataset()
        dataset.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                               ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    dataset.filename = name  # pydicom's messages name the file by it (else "<_io.BytesIO object at 0x...>")
    return dataset


def _transfer_syntax(data: bytes) -> str:
    """The Transfer Syntax UID of a Part 10 file, read from its file meta (always explicit VR little
    endian) without letting pydicom touch the rest, which may be deflated."""
    at = data.find(b"\x02\x00\x10\x00UI", 132, 132 + 8192)
    if at < 0:
        return ""
    length = int.from_bytes(data[at + 6:at + 8], "little")
    return data[at + 8:at + 8 + length].rstrip(b"\x00 ").decode("ascii", "replace")


def _check_dicom_size(dataset, name: str) -> None:
    if "PixelData" not in dataset:
        raise ImageError(name, "DICOM file holds no pixel data (truncated, or not an image)")
    rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    if not rows or not columns:
        raise ImageError(name, f"DICOM image has no size (Rows {rows}, Columns {columns})")
    if rows * columns > MAX_PIXELS:
        raise ImageError(name, f"image too large ({columns}x{rows} pixels, limit {MAX_PIXELS})")
    if samples not in (1, 3):
        raise ImageError(name, f"DICOM SamplesPerPixel {samples} is not grey (1) or colour (3)")


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Stretch any numeric array's range to 0..255 (in float32: a large image's float64 copy is twice the memory)."""
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    scaled = values.astype(np.float32)
    scaled -= low
    scaled *= 255.0 / (high - low)
    return np.round(scaled, out=scaled).astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, scaling high-bit-depth images instead of clipping them."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit PNGs decode to "I" or "I;16"; their full range 0..65535 maps to 0..255, rounded,
        # in integers (a float64 copy of a large image is 8 bytes a pixel).
        pixels = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
        pixels *= 255
        pixels += 32767
        pixels //= 65535
        image = Image.fromarray(pixels.astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(_scale_to_uint8(np.asarray(image)), mode="L")
    if image.mode == "RGB":
        return image
    # As Keras' load_img: convert("RGB"); alpha is dropped, palettes and CMYK are expanded.
    return image.convert("RGB")
