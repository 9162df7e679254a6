"""A hostile-input corpus, built here: every file gets one ImageError naming it (or decodes), within
bounded time and memory, through read_image, `lungxray predict`, the API (single and batch) and
`lungxray data audit`. Memory and time are measured in a child process per file."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from lungxray.cli import main

MAX_SECONDS = 10.0
MAX_EXTRA_MB = 300  # over the idle process, for any single file


def dicom_bytes(pixels: np.ndarray, syntax=ExplicitVRLittleEndian, frames: int = 1, **header) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def pillow_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def corpus() -> dict[str, tuple[bytes, str | None]]:
    """name -> (content, expected reason or None when the file must decode)."""
    ramp = np.tile(np.linspace(0, 4095, 64), (64, 1))
    frames = np.zeros((16, 128, 128))
    for i in range(16):  # frame i is bright in band i only
        frames[i, 8 * i:8 * (i + 1)] = 4000
    return {
        "deflate_bomb.dcm": (dicom_bytes(np.zeros((4000, 4000)), DeflatedExplicitVRLittleEndian),
                             "transfer syntax 1.2.840.10008.1.2.1.99 is not accepted"),
        "huge_header.dcm": (dicom_bytes(ramp, Rows=60000, Columns=60000), "image too large (60000x60000"),
        "multiframe.dcm": (dicom_bytes(frames, frames=16), None),
        "zero_window.dcm": (dicom_bytes(ramp, WindowCenter=100, WindowWidth=0), "window"),
        "unknown_voi.dcm": (dicom_bytes(ramp, WindowCenter=100, WindowWidth=50, VOILUTFunction="BOGUS"), "window"),
        "colour_samples.dcm": (dicom_bytes(ramp, SamplesPerPixel=4), "SamplesPerPixel 4"),
        "no_pixels.dcm": (dicom_bytes(ramp)[:300], "no pixel data"),
        "image.pcx": (pillow_bytes(Image.new("L", (32, 32)), "PCX"), "not a recognised image format"),
        "image.tga": (pillow_bytes(Image.new("L", (32, 32)), "TGA"), "not a recognised image format"),
        "image.ico": (pillow_bytes(Image.new("RGB", (32, 32)), "ICO"), "not a recognised image format"),
        "sixteen_bit_near_cap.png": (pillow_bytes(Image.fromarray(np.zeros((4900, 5000), np.uint16)), "PNG"), None),
        "over_cap.png": (pillow_bytes(Image.new("L", (7000, 7000)), "PNG"), "image too large"),
        "truncated.png": (pillow_bytes(Image.new("L", (64, 64), 128), "PNG")[:60], "corrupt or truncated"),
        "empty.png": (b"", "empty"),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    for name, (content, _) in corpus().items():
        (folder / name).write_bytes(content)
    return folder


MEASURE = """
import json, sys, time
from lungxray.data.images import ImageError, read_image


def peak_mb():
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


# The peak is inherited across fork and exec (the parent here holds TensorFlow): reset it first.
open("/proc/self/clear_refs", "w").write("5")
before = peak_mb()
started = time.perf_counter()
try:
    read_image(sys.argv[1], 224)
    outcome = None
except ImageError as error:
    outcome = error.reason
print(json.dumps({"reason": outcome, "seconds": time.perf_counter() - started, "extra_mb": peak_mb() - before}))
"""


def measure(path) -> dict:
    result = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(corpus()))
def test_read_image_bounded_in_time_and_memory(files, name):
    expected = corpus()[name][1]
    measured = measure(files / name)
    if expected is None:
        assert measured["reason"] is None
    else:
        assert measured["reason"] and expected in measured["reason"], measured
    assert measured["seconds"] < MAX_SECONDS and measured["extra_mb"] < MAX_EXTRA_MB, measured


@pytest.mark.parametrize("header", [{}, {"RescaleSlope": 2, "RescaleIntercept": -1024, "WindowCenter": 40,
                                         "WindowWidth": 400}])
def test_a_dicom_film_near_the_pixel_cap_is_bounded(tmp_path, header):
    """49 MB of 16-bit pixels (24.5 Mpixel), raw and through rescale and window lookup tables."""
    path = tmp_path / "large.dcm"
    path.write_bytes(dicom_bytes(np.random.default_rng(0).integers(0, 4096, (4900, 5000)), **header))
    measured = measure(path)
    assert measured["reason"] is None
    assert measured["seconds"] < MAX_SECONDS and measured["extra_mb"] < MAX_EXTRA_MB, measured


def test_multiframe_decodes_the_first_frame_only(files):
    from lungxray.data.images import read_image

    image = read_image(files / "multiframe.dcm")
    assert image.shape == (128, 128, 3)
    assert image[:8].min() == 255 and image[8:].max() == 0  # frame 0's band, and nothing of the others


def test_predict_lists_every_file_with_its_reason(run, files, capsys):
    run_dir, _, cache = run
    capsys.readouterr()
    main(["predict", "--model", str(run_dir), "--cache", str(cache), "--format", "json", str(files)])
    out, err = capsys.readouterr()
    rows = {r["file"].rsplit("/", 1)[-1]: r for r in json.loads(out)}
    for name, (_, expected) in corpus().items():
        if name.endswith((".pcx", ".tga", ".ico")):
            assert name not in rows  # not an image suffix: a folder listing skips it
        elif expected is None:
            assert "predicted" in rows[name], rows[name]
        else:
            assert expected in rows[name]["error"], rows[name]
    assert "Traceback" not in err


def test_api_answers_each_file_with_json(client, files):
    for name, (content, expected) in corpus().items():
        response = client.post("/api/predict", files={"file": (name, content, "application/octet-stream")})
        if expected is None:
            assert response.status_code == 200, (name, response.text)
        else:
            assert response.status_code == 422 and expected in response.json()["error"], (name, response.text)
    batch = [("files", (name, content, "application/octet-stream")) for name, (content, _) in corpus().items()]
    results = client.post("/api/predict/batch", files=batch).json()["results"]
    assert [r["file"] for r in results] == list(corpus())
    assert all(("error" in r) == (corpus()[r["file"]][1] is not None) for r in results)


def test_audit_lists_every_bad_file(files, tmp_path):
    data = tmp_path / "data"
    for label in ("covid", "normal"):
        (data / label).mkdir(parents=True)
        Image.new("L", (64, 64), 90 if label == "covid" else 160).save(data / label / "fine.png")
    for name in corpus():
        if not name.endswith((".pcx", ".tga", ".ico")):
            (data / "normal" / name).write_bytes((files / name).read_bytes())
    assert main(["data", "audit", str(data), "--out", str(tmp_path / "audit")]) == 0
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    listed = {u["file"].rsplit("/", 1)[-1] for u in report["unreadable"]}
    assert listed == {n for n, (_, expected) in corpus().items() if expected and not n.endswith((".pcx", ".tga", ".ico"))}
