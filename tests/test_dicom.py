"""DICOM files built with pydicom: the pixels the model sees."""

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, SecondaryCaptureImageStorage, generate_uid

from lungxray.data.images import ImageError, read_image


def make_dicom(path, pixels: np.ndarray, photometric="MONOCHROME2", bits=16, window=None, rescale=None,
               header: dict | None = None, file_format: bool = True):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = pixels.astype(np.uint16 if bits == 16 else np.uint8).tobytes()
    for keyword, value in (header or {}).items():
        setattr(ds, keyword, value)
    if file_format:
        ds.save_as(path, enforce_file_format=True)
    else:  # as older writers did: no preamble, no file meta, implicit VR little endian
        del ds.file_meta
        ds.save_as(path, implicit_vr=True, little_endian=True)
    return path


@pytest.fixture
def ramp():
    return np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (32, 1))  # 12-bit values, dark left


def test_monochrome2_16_bit_is_scaled_to_8_bits(tmp_path, ramp):
    out = read_image(make_dicom(tmp_path / "a.dcm", ramp))
    assert out.shape == (32, 64, 3) and out.dtype == np.uint8
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255 and np.all(np.diff(out[0, :, 0].astype(int)) >= 0)


def test_monochrome1_is_inverted(tmp_path, ramp):
    out = read_image(make_dicom(tmp_path / "m1.dcm", ramp, photometric="MONOCHROME1"))
    assert out[0, 0, 0] == 255 and out[0, -1, 0] == 0


def test_window_is_applied(tmp_path, ramp):
    out = read_image(make_dicom(tmp_path / "w.dcm", ramp, window=(1024, 512)))
    # Values below 768 are black, above 1280 white: most of the ramp saturates.
    assert (out[0, :, 0] == 0).sum() >= 10 and (out[0, :, 0] == 255).sum() >= 40


def test_dicom_is_sniffed_not_named(tmp_path, ramp):
    path = make_dicom(tmp_path / "image.png", ramp)  # wrong extension
    assert read_image(path, size=16).shape == (16, 16, 3)


def test_broken_dicom_names_the_file(tmp_path, ramp):
    path = make_dicom(tmp_path / "cut.dcm", ramp)
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(ImageError, match=r"cut.dcm: DICOM file holds no pixel data \(truncated"):
        read_image(path)


def test_compressed_dicom(tmp_path, ramp):
    """JPEG 2000 lossless, decoded by the pylibjpeg-openjpeg handler."""
    import pydicom

    path = make_dicom(tmp_path / "plain.dcm", ramp)
    ds = pydicom.dcmread(path)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds.save_as(tmp_path / "j2k.dcm")
    np.testing.assert_array_equal(read_image(tmp_path / "j2k.dcm"), read_image(path))


@pytest.mark.parametrize("header,reason", [
    ({"Modality": "MR"}, "MR image (DICOM Modality MR), not a chest radiograph"),
    ({"Modality": "CT"}, "CT image (DICOM Modality CT), not a chest radiograph"),
    ({"Modality": "US"}, "ultrasound image (DICOM Modality US), not a chest radiograph"),
    ({"Modality": "NM"}, "nuclear medicine image"),
    ({"Modality": "RTDOSE"}, "RT dose image"),
    ({"Modality": "SEG"}, "segmentation image"),
    ({"BodyPartExamined": "HAND"}, "DICOM BodyPartExamined is HAND, not the chest"),
    ({"ViewPosition": "LL"}, "lateral view (DICOM ViewPosition LL)"),
])
def test_the_header_is_checked_before_the_pixels(tmp_path, ramp, header, reason):
    with pytest.raises(ImageError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        read_image(make_dicom(tmp_path / "a.dcm", ramp, header=header))


@pytest.mark.parametrize("header", [{"Modality": "CR"}, {"BodyPartExamined": "CHEST", "ViewPosition": "PA"},
                                    {"Modality": "OT", "ViewPosition": "AP"}])
def test_frontal_chest_radiographs_pass(tmp_path, ramp, header):
    assert read_image(make_dicom(tmp_path / "a.dcm", ramp, header=header)).shape == (32, 64, 3)


def test_dicom_without_preamble_is_read(tmp_path, ramp):
    path = make_dicom(tmp_path / "old.dcm", ramp, file_format=False)
    assert path.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(read_image(path), read_image(make_dicom(tmp_path / "new.dcm", ramp)))
