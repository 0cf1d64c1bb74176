"""Serialise one prediction as the representation the client asked for (SR, GSPS, burned-in image, heatmap
Segmentation or PNG)."""

from __future__ import annotations

import io

from pydicom.filewriter import dcmwrite

from service.dicom.pipeline import PreparedImage
from service.viewer_outputs.gsps import build_gsps
from service.viewer_outputs.png import render_heatmap_png, render_png
from service.viewer_outputs.sc import build_sc
from service.viewer_outputs.seg import build_seg
from service.viewer_outputs.sr import build_sr

DICOM_MEDIA_TYPE = "application/dicom"
# The DICOM objects `render` makes, each referencing the source image (the DICOM node's destinations may
# ask for any of them), and the outputs drawn on the display image (decode must keep it for them).
DICOM_OUTPUTS = ("sr", "gsps", "sc", "seg")
NEEDS_DISPLAY = ("png", "sc")
NEEDS_HEATMAPS = ("seg",)  # drawn from the diseases' heatmaps: the prediction must include them


def _part10(dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def render(output: str, prepared: PreparedImage, prediction: dict, overlay: str | None = None) -> tuple[bytes, str]:
    """(body, media type) for output "sr", "gsps", "sc", "seg" or "png" (with `overlay="heatmaps"`: the heatmap
    mosaic)."""
    if output == "sr":
        return _part10(build_sr(prepared.header, prediction)), DICOM_MEDIA_TYPE
    if output == "gsps":
        return _part10(build_gsps(prepared.header, prediction, prepared.display_range)), DICOM_MEDIA_TYPE
    if output == "seg":
        return _part10(build_seg(prepared.header, prediction)), DICOM_MEDIA_TYPE
    if output in NEEDS_DISPLAY and prepared.display is None:
        raise ValueError(f"output {output!r} needs the display image: prepare with keep_display=True")
    if output == "sc":
        return _part10(build_sc(prepared.header, prepared.display, prediction)), DICOM_MEDIA_TYPE
    if output == "png":
        if overlay == "heatmaps":
            return render_heatmap_png(prepared.display, prediction), "image/png"
        return render_png(prepared.display, prediction), "image/png"
    raise ValueError(f"unknown output {output!r}")
