"""The heat map a node returns with `--heatmap`: a Secondary Capture in the film's study showing the
image the model saw with its Grad-CAM overlay, and the decision and the research-use notice burned
into the pixels (a viewer that hides every text attribute still shows them)."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from lungxray.dicom.sr import derived_uid, identity_digest
from lungxray.infer.explain import Explainer, overlay
from lungxray.infer.identity import ModelIdentity

SERIES_NUMBER = 9902
SIDE = 512  # pixels of the capture's side: the model's input (224) is too small to read the notice on
LINE = 18  # pixels of a line of text, font size 14


def wrapped(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """`text` in lines no wider than `width` pixels, broken between words."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def burned_in(picture: np.ndarray, texts: list[str]) -> np.ndarray:
    """`picture` (RGB) enlarged to SIDE pixels a side, with `texts` written on a black band below it."""
    font = ImageFont.load_default(size=14)
    lines = [line for text in texts for line in wrapped(text, font, SIDE - 12)]
    canvas = Image.new("RGB", (SIDE, SIDE + LINE * len(lines) + 8))
    canvas.paste(Image.fromarray(picture).resize((SIDE, SIDE), Image.Resampling.BILINEAR))
    draw = ImageDraw.Draw(canvas)
    for row, line in enumerate(lines):
        draw.text((6, SIDE + 4 + LINE * row), line, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def orientation(source: Dataset) -> tuple[str, str]:
    """The film's patient orientation, or a chest film's usual one (rows to the patient's left,
    columns to the feet)."""
    given = source.get("PatientOrientation")
    return (str(given[0]), str(given[1])) if given is not None and len(given) == 2 else ("L", "F")


def heatmap_capture(source: Dataset, image: np.ndarray, heat: np.ndarray, decision: str, probability: float,
                    model: ModelIdentity, series_uid: str) -> hd.sc.SCImage:
    """The Secondary Capture for `source` (the received film's dataset, pixels not needed), in the
    series `series_uid`: `image` (what the model saw, uint8 RGB) under `heat` (Grad-CAM of the decided
    class). Its UID is derived as the report's is (`lungxray.dicom.sr.result_report`)."""
    pixels = burned_in(overlay(image, heat), [f"lungxray Grad-CAM: {decision} (p = {probability:.2f}), {model.name}",
                                              model.notice])
    capture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=SERIES_NUMBER,
        sop_instance_uid=derived_uid(source, model, "heatmap", identity_digest(source)), instance_number=1,
        manufacturer="lungxray", patient_orientation=orientation(source), transfer_syntax_uid=ExplicitVRLittleEndian)
    capture.BurnedInAnnotation = "YES"
    # Laterality (General Series, type 2C) is for paired body parts: saying the chest, as a film given a
    # class is (its header passed lungxray's chest rules), is what lets validators leave it out.
    capture.BodyPartExamined = "CHEST"
    capture.SeriesDescription = "lungxray Grad-CAM (research use only)"
    return capture


class HeatmapMaker:
    """Grad-CAM captures for a predictor that can explain (`Explainer`)."""

    def __init__(self, predictor):
        self.predictor, self.explainer = predictor, Explainer(predictor)

    def __call__(self, source: Dataset, image: np.ndarray, decision: str, probability: float,
                 series_uid: str) -> hd.sc.SCImage:
        """The capture for the film `source`, whose decoded `image` the model answered with `decision`,
        in the series `series_uid`."""
        heat = self.explainer.heatmap(image, decision)
        return heatmap_capture(source, image, heat, decision, probability, self.predictor.identity, series_uid)
