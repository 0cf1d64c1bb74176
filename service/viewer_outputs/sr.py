"""JSON result -> DICOM Comprehensive SR, TID 1500 Measurement Report (built with highdicom).

Content tree:
  Imaging Measurement Report (TID 1500), observer = the model pack as a device
  ├─ Imaging Measurements
  │  ├─ one Planar ROI group (TID 1410) per box: tracking id + UID, Finding = label code,
  │  │  algorithm (pack name/version), closed 5-point POLYLINE on the source image, Probability
  │  ├─ one image-level group (TID 1501) per disease: Finding = disease code, Probability,
  │  │  "<disease> = Present/Absent" against the pack's threshold (threshold as an algorithm
  │  │  parameter), source image
  │  └─ (nothing reported at all) one group whose Finding is "None", so the report stays valid
  └─ Qualitative Evaluations: a Comment saying this is research output, not for diagnostic use.
The document also carries ContentQualification RESEARCH and that disclaimer as Series Description.
"""

from __future__ import annotations

import highdicom as hd
import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    ComprehensiveSR,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from service.viewer_outputs import (
    DISCLAIMER,
    MANUFACTURER,
    box_polygon,
    instance_number,
    reference_header,
    series_description,
)
from service.viewer_outputs.codes import ABSENT, NONE_DETECTED, PRESENT, code_for, coding_scheme_items
from service.viewer_outputs.uids import device_uid, result_uids, tracking_uid

PROBABILITY = codes.DCM.Probability  # (122157, DCM, "Probability")
UNITLESS = codes.UCUM.NoUnits  # (1, UCUM, "no units"): a probability is a pure number
PROCEDURE = codes.SCT.ChestImaging  # (413815006, SCT, "Chest imaging (procedure)")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 row 12
COMMENT = Code("121106", "DCM", "Comment")


def build_sr(source: pydicom.Dataset, result: dict) -> pydicom.Dataset:
    """A Comprehensive SR measurement report of `result` that references the `source` image.

    Its UIDs derive from the source and the pack (uids.py): the same image and pack give the same SR."""
    header = reference_header(source)
    model = result.get("model") or {}
    uids = result_uids(header, model, "sr")
    pack, version = str(model.get("pack") or "unknown"), str(model.get("version") or "unknown")
    findings, diseases = result.get("findings") or [], result.get("diseases") or []

    groups: list = [_finding_group(header, f, i, pack, version, model) for i, f in enumerate(findings, 1)]
    groups += [_disease_group(header, d, pack, version, model) for d in diseases]
    if not groups:
        groups.append(_nothing_reported_group(header, pack, version, model))

    report = MeasurementReport(
        observation_context=_observer(pack, version, model),
        procedure_reported=PROCEDURE,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    report[0].ContentSequence.append(_disclaimer_container(len(findings), len(diseases)))

    used = [code_for(str(f["label"])) for f in findings] + [code_for(str(d["label"])) for d in diseases]
    return ComprehensiveSR(
        evidence=[header],
        content=report[0],
        series_instance_uid=uids.series_instance_uid,
        series_number=uids.series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=instance_number(header),
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # a machine's preliminary output, never the definitive report
        is_verified=False,
        series_description=series_description("SR", model),
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        coding_schemes=coding_scheme_items(used),
    )


def _observer(pack: str, version: str, model: dict) -> ObservationContext:
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=device_uid(model),
                name=pack[:64],
                manufacturer_name=MANUFACTURER,
                model_name=pack[:64],
            ),
        )
    )


def _algorithm(pack: str, version: str, parameters: list[str]) -> AlgorithmIdentification:
    return AlgorithmIdentification(name=pack, version=version, parameters=parameters or None)


def _probability(value: float) -> Measurement:
    return Measurement(name=PROBABILITY, value=float(value), unit=UNITLESS)


def _finding_group(
    header: pydicom.Dataset, finding: dict, index: int, pack: str, version: str, model: dict
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
        algorithm_id=_algorithm(pack, version, parameters),
        measurements=[_probability(finding["score"])],
    )


def _disease_group(
    header: pydicom.Dataset, disease: dict, pack: str, version: str, model: dict
) -> MeasurementsAndQualitativeEvaluations:
    label = str(disease["label"])
    concept = code_for(label)
    parameters = []
    if disease.get("threshold") is not None:
        parameters.append(f"decision threshold={float(disease['threshold']):.6g}")
    if model.get("classifier_sha256"):
        parameters.append(f"classifier_sha256={model['classifier_sha256']}")
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=tracking_uid(header, model, f"disease {label}"), identifier=f"{label} (image level)"
        ),
        finding_type=concept,
        algorithm_id=_algorithm(pack, version, parameters),
        measurements=[_probability(disease["probability"])],
        qualitative_evaluations=[QualitativeEvaluation(concept, PRESENT if disease.get("positive") else ABSENT)],
        source_images=[SourceImageForMeasurementGroup(header.SOPClassUID, header.SOPInstanceUID)],
    )


def _nothing_reported_group(
    header: pydicom.Dataset, pack: str, version: str, model: dict
) -> MeasurementsAndQualitativeEvaluations:
    # TID 1500 needs at least one measurement group; "Finding: None" says the model ran on this
    # image and reported nothing, which an empty report could not distinguish from no analysis.
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=tracking_uid(header, model, "nothing"), identifier="No AI findings"),
        finding_type=NONE_DETECTED,
        algorithm_id=_algorithm(pack, version, []),
        source_images=[SourceImageForMeasurementGroup(header.SOPClassUID, header.SOPInstanceUID)],
    )


def _disclaimer_container(n_findings: int, n_diseases: int) -> ContainerContentItem:
    container = ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS)
    text = (
        f"{DISCLAIMER}. Automated output of a research model: {n_findings} localized finding(s), "
        f"{n_diseases} image-level probability(ies). Not reviewed by a physician."
    )
    container.ContentSequence = [
        TextContentItem(name=COMMENT, value=text, relationship_type=RelationshipTypeValues.CONTAINS)
    ]
    return container
