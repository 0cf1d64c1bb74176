"""JSON result -> DICOM Grayscale Softcopy Presentation State (built with highdicom).

A viewer that loads the GSPS with the image shows it as before (the image's own rescale, window
and polarity) with graphic layers on top, each with a recommended display colour
(RecommendedDisplayCIELabValue, the colour the PNG and the burned-in image use for that label):
  AI FINDING <n>  one layer per finding label, in order of first appearance: a closed POLYLINE per
                  box (PIXEL units) and a "label score" caption anchored to the box's top left
                  corner (anchor point shown), placed by layout.place_caption: above the box, and
                  stacked, never overprinted, when boxes coincide;
  AI SUMMARY      the disclaimer and one line per disease probability, top left of the display
                  (DISPLAY units, so it stays readable whatever the zoom), in white.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
from highdicom.color import CIELabColor
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

from service.dicom.charsets import output_character_set
from service.dicom.preprocess import PixelParams
from service.viewer_outputs import (
    DISCLAIMER,
    box_polygon,
    disease_text,
    finding_text,
    instance_number,
    reference_header,
    series_description,
)
from service.viewer_outputs.identity import device, stamp
from service.viewer_outputs.layout import Rect, label_colour, place_caption
from service.viewer_outputs.uids import result_uids

CONTENT_LABEL = "AI_FINDINGS"
FINDINGS_LAYER = "AI FINDING {}"  # numbered per label; Graphic Layer is CS, at most 16 characters
SUMMARY_LAYER = "AI SUMMARY"
SUMMARY_COLOUR = (255, 255, 255)
_LINE_HEIGHT = 0.03  # summary line height, fraction of the displayed area
_CHAR_WIDTH = 0.55  # rough glyph width / height, to size text bounding boxes


def build_gsps(
    source: pydicom.Dataset, result: dict, value_range: tuple[float, float] | None = None
) -> pydicom.Dataset:
    """A GSPS that overlays the boxes, their labels and the disease summary on the `source` image.

    `value_range`: the range of the image's modality values the service scaled to when the image has no VOI
    of its own (PreparedImage.display_range).

    Its UIDs derive from the source and the pack (uids.py): the same image and pack give the same GSPS."""
    header = reference_header(source)
    model = result.get("model") or {}
    uids = result_uids(header, model, "gsps")
    findings, diseases = result.get("findings") or [], result.get("diseases") or []

    layers, annotations = _layers(header, findings, diseases)
    made_by = device(model)
    voi, shape = _voi_and_polarity(header, value_range)

    gsps = GrayscaleSoftcopyPresentationState(
        referenced_images=[header],
        specific_character_set=output_character_set(header),
        series_instance_uid=uids.series_instance_uid,
        series_number=uids.series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=instance_number(header),
        manufacturer=made_by.manufacturer,
        manufacturer_model_name=made_by.model_name,
        software_versions=list(made_by.software_versions),
        device_serial_number=made_by.serial_number,
        content_label=CONTENT_LABEL,
        content_description=f"AI findings - {DISCLAIMER}"[:64],
        graphic_layers=layers,
        graphic_annotations=annotations,
        series_description=series_description("GSPS", model),
        voi_lut_transformations=voi,
        presentation_lut_transformation=hd.PresentationLUTTransformation(presentation_lut_shape=shape),
    )
    # Laterality (General Series, Type 2C) is needed only for a paired body part: say which part
    # the image shows when the source does, otherwise leave it empty ("unknown", PS3.3 C.7.3.1).
    if header.get("BodyPartExamined"):
        gsps.BodyPartExamined = header.BodyPartExamined
    else:
        gsps.Laterality = ""
    return stamp(gsps, model)


def _layers(
    header: pydicom.Dataset, findings: list[dict], diseases: list[dict]
) -> tuple[list[GraphicLayer], list[GraphicAnnotation]]:
    """One layer per finding label (boxes and captions) and the summary layer (always), each with its colour."""
    labels = list(dict.fromkeys(str(f["label"]) for f in findings))  # first-appearance order
    captions = _caption_rects(header, findings)
    layers: list[GraphicLayer] = []
    annotations: list[GraphicAnnotation] = []
    for order, label in enumerate(labels, 1):
        layer = GraphicLayer(
            FINDINGS_LAYER.format(order),
            order=order,
            description=f"{label} - AI findings"[:64],
            display_color=CIELabColor.from_rgb(*label_colour(label)),
        )
        mine = [i for i, f in enumerate(findings) if str(f["label"]) == label]
        layers.append(layer)
        annotations.append(
            GraphicAnnotation(
                referenced_images=[header],
                graphic_layer=layer,
                graphic_objects=[
                    GraphicObject(
                        GraphicTypeValues.POLYLINE, box_polygon(findings[i]["box"]), AnnotationUnitsValues.PIXEL
                    )
                    for i in mine
                ],
                text_objects=[_box_caption(findings[i], captions[i]) for i in mine],
            )
        )
    # The summary layer always exists: it carries the disclaimer even when nothing was found.
    summary = GraphicLayer(
        SUMMARY_LAYER,
        order=len(labels) + 1,
        description=f"AI disease probabilities - {DISCLAIMER}"[:64],
        display_color=CIELabColor.from_rgb(*SUMMARY_COLOUR),
    )
    layers.append(summary)
    lines = [DISCLAIMER] + [disease_text(d) for d in diseases]
    annotations.append(
        GraphicAnnotation(referenced_images=[header], graphic_layer=summary, text_objects=_summary_lines(lines))
    )
    return layers, annotations


def _voi_and_polarity(
    header: pydicom.Dataset, value_range: tuple[float, float] | None
) -> tuple[list[hd.pr.SoftcopyVOILUTTransformation], hd.PresentationLUTShapeValues]:
    """The VOI and the presentation LUT shape the service displayed the image with (service.dicom.preprocess),
    so that a viewer shows what the model saw.

    A presentation state replaces the image's own VOI and polarity handling (PS3.4 N.2), so both are always
    given: the VOI LUT Sequence, else the window with its VOI LUT Function, else a window over the range of the
    non-padding modality values (`value_range`; a 12- or 16-bit image through an identity VOI would look
    almost flat); and INVERSE exactly when the service inverted the image (a MONOCHROME1 image, or a
    Presentation LUT Shape saying so). Never copied from the image: highdicom would copy whatever the header
    holds, an unusable window included.
    """
    params = PixelParams.from_dataset(header)
    shape = hd.PresentationLUTShapeValues.INVERSE if params.inverted else hd.PresentationLUTShapeValues.IDENTITY
    if params.voi_lut is not None:
        lut = params.voi_lut
        # As 16-bit entries scaled from the table's own range (VoiLut.output_max), which a viewer then maps to
        # its full display range exactly as the service does.
        data = np.rint(lut.data.astype(np.float64) * 65535.0 / lut.output_max).astype(np.uint16)
        voi = hd.pr.SoftcopyVOILUTTransformation(voi_luts=[hd.VOILUT(lut.first_mapped, data, "VOI LUT of the image")])
        return [voi], shape
    if params.window_center is not None and params.window_width is not None:
        voi = hd.pr.SoftcopyVOILUTTransformation(
            window_center=params.window_center,
            window_width=params.window_width,
            window_explanation="WINDOW OF THE IMAGE",
            # LINEAR is the default when absent; left out so that viewers that mishandle the attribute (OHIF 3.13,
            # README) show the usual case unaffected.
            voi_lut_function=None if params.voi_function == "LINEAR" else params.voi_function,
        )
        return [voi], shape
    low, high = value_range if value_range is not None else _stored_range(header, params)
    # PS3.3 C.11.2.1.2.1: this center/width maps `low` to the darkest and `high` to the brightest.
    voi = hd.pr.SoftcopyVOILUTTransformation(
        window_center=(low + high) / 2 + 0.5,
        window_width=max(high - low, 0.0) + 1,
        window_explanation="MIN-MAX (no window in image)",
    )
    return [voi], shape


def _stored_range(header: pydicom.Dataset, params: PixelParams) -> tuple[float, float]:
    """Modality values of the Smallest/Largest Image Pixel Value, else of every value BitsStored allows (used
    only when the image's own range is not known: a GSPS built without a prepared image)."""
    ends = [header.get("SmallestImagePixelValue"), header.get("LargestImagePixelValue")]
    if not all(isinstance(end, int) for end in ends):
        bits, signed = int(header.get("BitsStored") or 16), int(header.get("PixelRepresentation") or 0) == 1
        ends = [-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1]
    values = [params.rescale_slope * float(end) + params.rescale_intercept for end in ends]
    return min(values), max(values)


def _caption_rects(header: pydicom.Dataset, findings: list[dict]) -> list[Rect]:
    """Each caption's bounding box (image pixels), placed in order so that none overlaps an earlier one."""
    rows, columns = int(header.Rows), int(header.Columns)
    height = max(8.0, 0.025 * rows)  # the viewer fits the text into this box
    placed: list[Rect] = []
    for finding in findings:
        width = min(float(columns), height * _CHAR_WIDTH * len(finding_text(finding)))
        anchor = (max(0.0, float(finding["box"]["x_min"])), max(0.0, float(finding["box"]["y_min"])))
        placed.append(place_caption(anchor, (width, height), (columns, rows), taken=placed))
    return placed


def _box_caption(finding: dict, rect: Rect) -> TextObject:
    """ "label score" in `rect`, tied to the box's top left corner by a visible anchor line, so a
    caption moved away from a coinciding box still points at its own box."""
    return TextObject(
        finding_text(finding),
        AnnotationUnitsValues.PIXEL,
        bounding_box=rect,
        anchor_point=(max(0.0, float(finding["box"]["x_min"])), max(0.0, float(finding["box"]["y_min"]))),
        anchor_point_visible=True,
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
