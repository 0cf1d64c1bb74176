"""JSON result -> DICOM Grayscale Softcopy Presentation State (built with highdicom).

A viewer that loads the GSPS with the image shows it as before (the image's own rescale, window
and polarity) with two graphic layers on top:
  AI FINDINGS  one closed POLYLINE per box (PIXEL units) and a "label score" text anchored at
               the box's top left corner;
  AI SUMMARY   the disclaimer and one line per disease probability, top left of the display
               (DISPLAY units, so it stays readable whatever the zoom).
"""

from __future__ import annotations

import highdicom as hd
import pydicom
from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicLayer,
    GraphicObject,
    GraphicTypeValues,
    GrayscaleSoftcopyPresentationState,
    TextJustificationValues,
    TextObject,
)

from service.viewer_outputs import (
    DISCLAIMER,
    MANUFACTURER,
    box_polygon,
    disease_text,
    finding_text,
    instance_number,
    reference_header,
    series_description,
)
from service.viewer_outputs.uids import result_uids

CONTENT_LABEL = "AI_FINDINGS"
FINDINGS_LAYER = "AI FINDINGS"
SUMMARY_LAYER = "AI SUMMARY"
_LINE_HEIGHT = 0.03  # summary line height, fraction of the displayed area
_CHAR_WIDTH = 0.55  # rough glyph width / height, to size text bounding boxes


def build_gsps(source: pydicom.Dataset, result: dict) -> pydicom.Dataset:
    """A GSPS that overlays the boxes, their labels and the disease summary on the `source` image.

    Its UIDs derive from the source and the pack (uids.py): the same image and pack give the same GSPS."""
    header = reference_header(source)
    model = result.get("model") or {}
    uids = result_uids(header, model, "gsps")
    findings, diseases = result.get("findings") or [], result.get("diseases") or []

    layers, annotations = _layers(header, findings, diseases)

    gsps = GrayscaleSoftcopyPresentationState(
        referenced_images=[header],
        series_instance_uid=uids.series_instance_uid,
        series_number=uids.series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=instance_number(header),
        manufacturer=MANUFACTURER,
        manufacturer_model_name=str(model.get("pack") or "unknown")[:64],
        software_versions=str(model.get("version") or "unknown")[:64],
        device_serial_number=str(model.get("detector_sha256") or "unknown")[:16],
        content_label=CONTENT_LABEL,
        content_description=f"AI findings - {DISCLAIMER}"[:64],
        graphic_layers=layers,
        graphic_annotations=annotations,
        series_description=series_description("GSPS", model),
        voi_lut_transformations=_min_max_window(header),
        # A presentation state replaces the image's own polarity handling: a MONOCHROME1 image is
        # shown as intended only through an INVERSE presentation LUT (PS3.3 C.11.6.1).
        presentation_lut_transformation=hd.PresentationLUTTransformation(
            presentation_lut_shape=hd.PresentationLUTShapeValues.INVERSE
            if str(header.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
            else hd.PresentationLUTShapeValues.IDENTITY
        ),
    )
    # Laterality (General Series, Type 2C) is needed only for a paired body part: say which part
    # the image shows when the source does, otherwise leave it empty ("unknown", PS3.3 C.7.3.1).
    if header.get("BodyPartExamined"):
        gsps.BodyPartExamined = header.BodyPartExamined
    else:
        gsps.Laterality = ""
    return gsps


def _layers(
    header: pydicom.Dataset, findings: list[dict], diseases: list[dict]
) -> tuple[list[GraphicLayer], list[GraphicAnnotation]]:
    """The findings layer (boxes and captions, when there are findings) and the summary layer (always)."""
    layers: list[GraphicLayer] = []
    annotations: list[GraphicAnnotation] = []
    if findings:
        layer = GraphicLayer(FINDINGS_LAYER, order=1, description=f"AI findings - {DISCLAIMER}")
        layers.append(layer)
        annotations.append(
            GraphicAnnotation(
                referenced_images=[header],
                graphic_layer=layer,
                graphic_objects=[
                    GraphicObject(GraphicTypeValues.POLYLINE, box_polygon(f["box"]), AnnotationUnitsValues.PIXEL)
                    for f in findings
                ],
                text_objects=[_box_caption(f, header) for f in findings],
            )
        )
    # The summary layer always exists: it carries the disclaimer even when nothing was found.
    summary = GraphicLayer(SUMMARY_LAYER, order=2, description="AI disease probabilities")
    layers.append(summary)
    lines = [DISCLAIMER] + [disease_text(d) for d in diseases]
    annotations.append(
        GraphicAnnotation(referenced_images=[header], graphic_layer=summary, text_objects=_summary_lines(lines))
    )
    return layers, annotations


def _min_max_window(header: pydicom.Dataset) -> list[hd.pr.SoftcopyVOILUTTransformation] | None:
    """A window over the stored pixel range when the image has no VOI of its own.

    Without a Softcopy VOI LUT a presentation state displays modality values through an identity
    VOI (PS3.4 N.2), so a 12- or 16-bit image without a window would look almost flat; readers
    show such images min-max, as the service's preprocessing does. None: keep the image's own
    window or VOI LUT (highdicom copies it), or nothing to derive one from.
    """
    if "WindowCenter" in header or "VOILUTSequence" in header:
        return None
    if "SmallestImagePixelValue" not in header or "LargestImagePixelValue" not in header:
        return None
    slope = float(header.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(header.get("RescaleIntercept", 0.0) or 0.0)
    ends = [slope * float(header[k].value) + intercept for k in ("SmallestImagePixelValue", "LargestImagePixelValue")]
    low, high = min(ends), max(ends)
    # PS3.3 C.11.2.1.2.1: this center/width maps `low` to the darkest and `high` to the brightest.
    return [
        hd.pr.SoftcopyVOILUTTransformation(
            window_center=(low + high) / 2 + 0.5,
            window_width=high - low + 1,
            window_explanation="MIN-MAX (no window in image)",
        )
    ]


def _box_caption(finding: dict, header: pydicom.Dataset) -> TextObject:
    """ "label score" anchored at the box's top left; its bounding box sits just above the box
    (inside it when the box touches the top edge) and is kept within the image."""
    text = finding_text(finding)
    rows, columns = int(header.Rows), int(header.Columns)
    height = max(8.0, 0.025 * rows)
    width = min(float(columns), height * _CHAR_WIDTH * len(text))
    x0 = min(max(0.0, float(finding["box"]["x_min"])), columns - width)
    y_top = float(finding["box"]["y_min"])
    y0 = y_top - height if y_top - height >= 0 else min(max(0.0, y_top), rows - height)
    anchor = (max(0.0, float(finding["box"]["x_min"])), max(0.0, y_top))
    return TextObject(
        text,
        AnnotationUnitsValues.PIXEL,
        bounding_box=(x0, y0, x0 + width, y0 + height),
        anchor_point=anchor,
        anchor_point_visible=False,
        text_justification=TextJustificationValues.LEFT,
    )


def _summary_lines(lines: list[str]) -> list[TextObject]:
    step = min(_LINE_HEIGHT, 0.96 / len(lines))  # everything fits even with many diseases
    objects = []
    for i, line in enumerate(lines):
        top = 0.01 + i * step
        right = min(0.99, 0.01 + step * _CHAR_WIDTH * len(line))
        objects.append(
            TextObject(
                line,
                AnnotationUnitsValues.DISPLAY,
                bounding_box=(0.01, top, right, top + step),
                text_justification=TextJustificationValues.LEFT,
            )
        )
    return objects
