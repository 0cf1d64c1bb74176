"""JSON result with heatmaps -> DICOM Segmentation (FRACTIONAL, PROBABILITY) of the source image (highdicom).

Why a Segmentation: it is the DICOM object made for per-pixel values derived from an image; PACS store it like any
other instance, viewers that read segmentations (OHIF, 3D Slicer, most PACS viewers) draw it over the image it
references, and it keeps the values as data rather than burned-in pixels. A Parametric Map would hold the logits
as floats, but it needs a Frame of Reference, which CR/DX radiographs do not have; a Segmentation of an image
without one is defined on the source's own pixel grid (one frame per segment, same rows and columns, each frame
referencing the source image in its Derivation Image Sequence).

One segment per disease that has a heatmap: label = the disease name, property type = the disease's code (the
codes table the JSON and the SR use), category "Morphologically abnormal structure" (CID 7150), algorithm = the
model pack. Each frame is the disease's JSON heatmap resampled onto the image (viewer_outputs/heatmaps.on_image,
what a viewer drawing the PNG over its rectangle shows) times the disease's probability: the pixel where the
evidence is strongest carries the probability the answer reports for the disease, pixels without evidence above
the image's average 0, so FRACTIONAL with type PROBABILITY (the probability of the disease, placed where the
classifier found it). Frames are RLE Lossless compressed (smooth maps compress several-fold, and every DICOM
toolkit reads RLE); a map that is zero everywhere is left out (highdicom's omit_empty_frames).

UIDs come from uids.py like the SR's: the same image and pack give the same Segmentation.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import RLELossless

from service.viewer_outputs import MANUFACTURER, instance_number, reference_header, series_description
from service.viewer_outputs.codes import code_for
from service.viewer_outputs.heatmaps import on_image
from service.viewer_outputs.uids import result_uids

CATEGORY = codes.cid7150.MorphologicallyAbnormalStructure  # (49755003, SCT)
ALGORITHM_FAMILY = codes.cid7162.ArtificialIntelligence  # (123110, DCM)


def build_seg(source: pydicom.Dataset, result: dict) -> hd.seg.Segmentation:
    """The heatmaps of `result` (each disease's `heatmap`) as a Segmentation of the `source` image."""
    header = reference_header(source)
    diseases = [d for d in result.get("diseases") or [] if d.get("heatmap")]
    if not diseases:
        raise ValueError("the result has no disease heatmaps (ask for them with include=heatmaps)")
    model = result.get("model") or {}
    uids = result_uids(header, model, "seg")
    rows, columns = int(header.Rows), int(header.Columns)
    pack, version = str(model.get("pack") or "unknown"), str(model.get("version") or "unknown")
    algorithm = hd.AlgorithmIdentificationSequence(name=pack[:64], family=ALGORITHM_FAMILY, version=version[:64])
    # (1 frame, rows, columns, segments): the segments are the last axis.
    maps = np.stack([float(d["probability"]) * on_image(d["heatmap"], rows, columns) for d in diseases], axis=-1)[None]
    seg = hd.seg.Segmentation(
        source_images=[header],
        pixel_array=maps,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=255,
        segment_descriptions=[_segment(number, disease, algorithm) for number, disease in enumerate(diseases, 1)],
        series_instance_uid=uids.series_instance_uid,
        series_number=uids.series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=instance_number(header),
        manufacturer=MANUFACTURER,
        manufacturer_model_name=pack[:64],
        software_versions=version[:64],
        device_serial_number=str(model.get("classifier_sha256") or "unknown")[:64],
        content_description="Class activation maps of the classifier (not for diagnostic use)",
        content_label="HEATMAPS",
        series_description=series_description("SEG", model),
        transfer_syntax_uid=RLELossless,
    )
    # General Image, Type 2C: required when there is no plane orientation, as for a radiograph; the frames lie on
    # the source's pixel grid, so its orientation is theirs (empty when the source states none).
    seg.PatientOrientation = header.get("PatientOrientation", "")
    return seg


def _segment(number: int, disease: dict, algorithm: hd.AlgorithmIdentificationSequence) -> hd.seg.SegmentDescription:
    label = str(disease["label"])
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label[:64],
        segmented_property_category=CATEGORY,
        segmented_property_type=code_for(label),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
