"""JSON result -> DICOM Comprehensive SR, a TID 1500 measurement report (built with highdicom).

Written for TID 1500 readers in general and for OHIF 3.x in particular, which draws a report's
boxes only if every measurement group under "Imaging Measurements" has image coordinates (it reads
the first coordinate of each group) and labels a box "<NUM concept meaning>: <value> <unit code>":

  <title> (TID 1500), observer = the model pack as a device
  ├─ Language, Procedure reported (Chest imaging)
  ├─ Image Library (TID 1600): the source image and its descriptors
  ├─ Imaging Measurements (only when there are boxes)
  │  └─ one Planar ROI group (TID 1410) per box: tracking id + UID, Finding = label code,
  │     algorithm (TID 4019), "<finding> detection score" = JSON score (UCUM {score}),
  │     closed 5-point POLYLINE on the source image
  └─ Qualitative Evaluations
     ├─ (a pack with a triage operating point) "Triage priority = Routine/Expedite", with the abnormality
     │  probability (1 - P(No finding)) and the operating point as an algorithm parameter
     ├─ one "<disease> = Present/Absent" per disease, with its Probability and algorithm (threshold
     │  as a parameter): image-level results carry no coordinates, so they are not measurement groups
     └─ Comment: "RESEARCH - NOT FOR DIAGNOSTIC USE", how many boxes, or that there are none.

The title is "Imaging Measurement Report" (126000, DCM) when there are boxes. A report without any
box has no Imaging Measurements (TID 1500 allows that when Qualitative Evaluations are present) and
the title "Chest CAD Report" (112000, DCM), declared as an extension of the extensible CID 7021:
OHIF 3.x opens a 126000 report without a drawable group in its measurement viewport and fails,
while it shows any other title in its text viewport, which lists the evaluations and the comment.
The header names the pack as the device (identity.stamp) and qualifies the content as RESEARCH.
"""

from __future__ import annotations

import highdicom as hd
import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    ComprehensiveSR,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    ImageLibrary,
    ImageRegion,
    LanguageOfContentItemAndDescendants,
    Measurement,
    NumContentItem,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    RelationshipTypeValues,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from highdicom.sr.templates import DEFAULT_LANGUAGE
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from service.dicom.charsets import output_character_set
from service.viewer_outputs import (
    DISCLAIMER,
    box_polygon,
    instance_number,
    reference_header,
    series_description,
)
from service.viewer_outputs.codes import (
    ABNORMALITY_PROBABILITY,
    ABSENT,
    COMMENT,
    DISEASE_PROBABILITY,
    NO_FINDINGS_TITLE,
    PRESENT,
    PRIORITY_VALUES,
    PROCEDURE_REPORTED,
    QUALITATIVE_EVALUATIONS,
    REPORT_TITLE,
    SCORE_UNIT,
    TRIAGE_PRIORITY,
    UNITLESS,
    code_for,
    coding_scheme_items,
    score_code,
)
from service.viewer_outputs.identity import device, stamp
from service.viewer_outputs.uids import NAMESPACE_UID, result_uids, tracking_uid

# CID 7021 as published (PS3.16); the no-findings title extends it (ContextGroupExtensionFlag Y).
CID_7021_VERSION = "20141110"
CID_7021_LOCAL_VERSION = "20250101000000"  # our extension's version (DT): bump it if the title changes
_PROJECTION_MODALITIES = {"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"}


def build_sr(source: pydicom.Dataset, result: dict) -> pydicom.Dataset:
    """A Comprehensive SR measurement report of `result` that references the `source` image.

    Its UIDs derive from the source and the pack (uids.py): the same image and pack give the same SR."""
    header = reference_header(source)
    model = result.get("model") or {}
    findings, diseases = result.get("findings") or [], result.get("diseases") or []
    uids = result_uids(header, model, "sr")

    root = _report_root(header, model, findings)
    if findings:
        root.ContentSequence.append(_imaging_measurements(header, model, findings))
    triage = result.get("triage")
    root.ContentSequence.append(_qualitative_evaluations(model, findings, diseases, triage))

    used = [code_for(str(f["label"])) for f in findings] + [score_code(str(f["label"])) for f in findings]
    used += [code_for(str(d["label"])) for d in diseases]
    used += [TRIAGE_PRIORITY, ABNORMALITY_PROBABILITY] if triage else []
    sr = ComprehensiveSR(
        evidence=[header],
        specific_character_set=output_character_set(header),
        content=root,
        series_instance_uid=uids.series_instance_uid,
        series_number=uids.series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=instance_number(header),
        manufacturer=device(model).manufacturer,
        is_complete=True,
        is_final=False,  # a machine's preliminary output, never the definitive report
        is_verified=False,
        series_description=series_description("SR", model),
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        coding_schemes=coding_scheme_items(used),
    )
    return stamp(sr, model)


def _report_root(header: pydicom.Dataset, model: dict, findings: list[dict]) -> ContainerContentItem:
    """The TID 1500 root: title, language, observer, procedure and Image Library (what highdicom's
    MeasurementReport writes, which cannot build a report without measurement groups)."""
    root = ContainerContentItem(name=REPORT_TITLE if findings else NO_FINDINGS_TITLE, template_id="1500")
    if not findings:
        _declare_title_extension(root.ConceptNameCodeSequence[0])
    root.ContentSequence = [
        *LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE),
        *_observer(model),
        CodeContentItem(
            name=codes.DCM.ProcedureReported,
            value=PROCEDURE_REPORTED,
            relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD,
        ),
        *ImageLibrary([_library_entry(header)]),
    ]
    return root


def _declare_title_extension(title: pydicom.Dataset) -> None:
    """Mark the title as a code added to CID 7021 by this service (PS3.3 Table 8.8-1, enhanced encoding)."""
    title.ContextIdentifier = "7021"
    title.MappingResource = "DCMR"
    title.ContextGroupVersion = CID_7021_VERSION
    title.ContextGroupExtensionFlag = "Y"
    title.ContextGroupLocalVersion = CID_7021_LOCAL_VERSION
    title.ContextGroupExtensionCreatorUID = NAMESPACE_UID


def _observer(model: dict) -> ObservationContext:
    made_by = device(model)
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=made_by.uid,
                name=made_by.model_name,
                manufacturer_name=made_by.manufacturer,
                model_name=made_by.model_name,
                serial_number=made_by.serial_number,
            ),
        )
    )


def _library_entry(header: pydicom.Dataset) -> pydicom.Dataset:
    """What highdicom's Image Library reads from the source: its projection radiography descriptors
    (TID 1603) need a two-valued Patient Orientation and a pixel spacing, which a CR may lack (and
    has as PixelSpacing, not ImagerPixelSpacing); without them the entry keeps the general ones."""
    entry = pydicom.Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "FrameOfReferenceUID"):
        if keyword in header:
            setattr(entry, keyword, header[keyword].value)
    spacing = header.get("ImagerPixelSpacing") or header.get("PixelSpacing")
    orientation = header.get("PatientOrientation") or []
    modality = str(header.get("Modality", ""))
    if modality in _PROJECTION_MODALITIES and spacing and len(orientation) == 2 and all(orientation):
        entry.ImagerPixelSpacing = spacing
        entry.PatientOrientation = orientation
        entry.Modality = modality
    else:
        entry.Modality = ""  # no projection descriptors (the coded modality comes from the SOP class)
    return entry


def _algorithm(model: dict, parameters: list[str]) -> AlgorithmIdentification:
    made_by = device(model)
    return AlgorithmIdentification(
        name=made_by.model_name, version=made_by.software_versions[0], parameters=parameters or None
    )


def _imaging_measurements(header: pydicom.Dataset, model: dict, findings: list[dict]) -> ContainerContentItem:
    container = ContainerContentItem(
        name=codes.DCM.ImagingMeasurements, relationship_type=RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = [
        item for index, finding in enumerate(findings, 1) for item in _finding_group(header, model, finding, index)
    ]
    return container


def _finding_group(
    header: pydicom.Dataset, model: dict, finding: dict, index: int
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    label = str(finding["label"])
    region = ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=box_polygon(finding["box"]),
        source_image=SourceImageForRegion(header.SOPClassUID, header.SOPInstanceUID),
    )
    parameters = [f"detector_sha256={model['detector_sha256']}"] if model.get("detector_sha256") else []
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=tracking_uid(header, model, f"finding {index}"), identifier=f"{label} #{index}"
        ),
        referenced_region=region,
        finding_type=code_for(label),
        algorithm_id=_algorithm(model, parameters),
        measurements=[Measurement(name=score_code(label), value=float(finding["score"]), unit=SCORE_UNIT)],
    )


def _qualitative_evaluations(
    model: dict, findings: list[dict], diseases: list[dict], triage: dict | None
) -> ContainerContentItem:
    # SEPARATE: a text view (OHIF's included) then shows one "<concept>: <value>" line per item.
    container = ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS, is_content_continuous=False
    )
    container.ContentSequence = [
        *([_triage_evaluation(model, triage)] if triage else []),
        *(_disease_evaluation(model, d) for d in diseases),
        _comment(findings, diseases),
    ]
    return container


def _triage_evaluation(model: dict, triage: dict) -> CodeContentItem:
    """ "Triage priority = Routine/Expedite" with the abnormality probability it was decided from (the JSON's
    `triage`); the operating point is an algorithm parameter, as a disease's threshold is."""
    parameters = ["abnormality = 1 - P(No finding)"]
    if triage.get("threshold") is not None:
        parameters.append(f"operating point={float(triage['threshold']):.6g}")
    value = PRIORITY_VALUES[str(triage["priority"])]
    return _evaluation(model, TRIAGE_PRIORITY, value, ABNORMALITY_PROBABILITY, triage["abnormality"], parameters)


def _disease_evaluation(model: dict, disease: dict) -> CodeContentItem:
    """ "<disease> = Present/Absent" against the pack's threshold, with the probability it came from."""
    parameters = []
    if disease.get("threshold") is not None:
        parameters.append(f"decision threshold={float(disease['threshold']):.6g}")
    value = PRESENT if disease.get("positive") else ABSENT
    concept = code_for(str(disease["label"]))
    return _evaluation(model, concept, value, DISEASE_PROBABILITY, disease["probability"], parameters)


def _evaluation(
    model: dict, concept: Code, value: Code, probability_concept: Code, probability: float, parameters: list[str]
) -> CodeContentItem:
    """ "<concept> = <value>", with the probability it was decided from and the classifier as the algorithm."""
    item = CodeContentItem(name=concept, value=value, relationship_type=RelationshipTypeValues.CONTAINS)
    if model.get("classifier_sha256"):
        parameters = [*parameters, f"classifier_sha256={model['classifier_sha256']}"]
    item.ContentSequence = [
        NumContentItem(
            name=probability_concept,
            value=float(probability),
            unit=UNITLESS,
            relationship_type=RelationshipTypeValues.HAS_PROPERTIES,
        ),
        *_algorithm(model, parameters),
    ]
    return item


def _comment(findings: list[dict], diseases: list[dict]) -> TextContentItem:
    if findings:
        boxes = f"{len(findings)} localized finding(s) over the pack's reporting thresholds, drawn as regions."
    else:
        boxes = "No localized findings: the model reported no box over the pack's reporting thresholds."
    text = f"{DISCLAIMER}. Automated output of a research model, not reviewed by a physician. {boxes}"
    if diseases:
        text += f" {len(diseases)} image-level result(s) listed as Present/Absent with their probability."
    return TextContentItem(name=COMMENT, value=text, relationship_type=RelationshipTypeValues.CONTAINS)
