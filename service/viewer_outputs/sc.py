"""JSON result -> a burned-in DICOM image: Secondary Capture with the boxes, captions and banner drawn in.

For viewers that show neither SR nor GSPS (OHIF 3.x has no presentation-state support, many PACS
viewers neither): the pixels are the PNG output's (png.annotated_image: the image as the model saw
it, boxes and "label score" captions in each label's colour, and a top banner "RESEARCH - NOT FOR
DIAGNOSTIC USE | <most probable diseases>"), stored as an RGB Secondary Capture Image (highdicom):

  - the same study as the source, its own series (uids.SERIES_NUMBERS["sc"] = 9903, derived UIDs);
  - the Patient, General Study and Patient Study attributes copied from the source;
  - ImageType DERIVED\\SECONDARY, BurnedInAnnotation YES, a Source Image Sequence pointing at the
    source and a Derivation Description;
  - the source's pixel spacing and patient orientation (the pixel grid is the source's, so the JSON
    boxes apply to it unchanged), and no window or VOI LUT Function: the pixels are already
    display values (OHIF 3.13 renders images with VOI LUT Function black, its issue #6239).
"""

from __future__ import annotations

import copy

import numpy as np
import pydicom
from highdicom.sc import SCImage
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from service.dicom.charsets import output_character_set
from service.viewer_outputs import instance_number, reference_header, series_description
from service.viewer_outputs.identity import device, stamp
from service.viewer_outputs.png import annotated_image
from service.viewer_outputs.uids import result_uids

# Attributes of the Patient, General Study and Patient Study modules (PS3.3 C.7.1.1, C.7.2.1,
# C.7.2.2) copied from the source when present, beyond the few highdicom copies itself.
PATIENT_AND_STUDY = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "EthnicGroup",
    "PatientComments",
    "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence",
    "PatientBreedDescription",
    "PatientBreedCodeSequence",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "ProcedureCodeSequence",
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "Occupation",
    "AdditionalPatientHistory",
    "PregnancyStatus",
)
SOURCE_PURPOSE = Code("121322", "DCM", "Source image for image processing operation")
DERIVATION = "AI findings (boxes, labels, scores) and research-use banner burned into the displayed image"


def build_sc(source: pydicom.Dataset, display: np.ndarray, result: dict) -> pydicom.Dataset:
    """An RGB Secondary Capture of `display` (the source's display image, float in [0, 1]) with `result`
    burned in, in the source's study; same source and pack, same UIDs (uids.py)."""
    header = reference_header(source)
    # pydicom holds the header's text decoded; the SC writes it in UTF-8 unless it is all ASCII
    # (service.dicom.charsets). The source's own term stays behind: highdicom copies it and rejects several
    # defined terms (the empty first value of "\\ISO 2022 IR 87" among them).
    charset = output_character_set(header)
    if "SpecificCharacterSet" in header:
        del header.SpecificCharacterSet  # a new dataset: the caller's stays untouched
    model = result.get("model") or {}
    uids = result_uids(header, model, "sc")
    pixels = np.asarray(annotated_image(display, result))
    spacing = header.get("PixelSpacing") or header.get("ImagerPixelSpacing")
    orientation = header.get("PatientOrientation") or []
    sc = SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uids.series_instance_uid,
        series_number=uids.series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=instance_number(header),
        manufacturer=device(model).manufacturer,
        pixel_spacing=tuple(float(v) for v in spacing) if spacing and len(spacing) == 2 else None,
        patient_orientation=tuple(orientation) if len(orientation) == 2 and all(orientation) else None,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    for keyword in PATIENT_AND_STUDY:
        if keyword in header:
            sc.add(copy.deepcopy(header[keyword]))  # a copy: the caller's dataset stays untouched
    if charset is not None:
        sc.SpecificCharacterSet = charset
    _mark_derived(sc, header)
    sc.SeriesDescription = series_description("SC", model)
    return stamp(sc, model)


def _mark_derived(sc: pydicom.Dataset, header: pydicom.Dataset) -> None:
    """Say what the image is: derived from the source, with annotations burned in."""
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"  # workstation: rendered by software from a digital image
    sc.DerivationDescription = DERIVATION
    reference = pydicom.Dataset()
    reference.ReferencedSOPClassUID = header.SOPClassUID
    reference.ReferencedSOPInstanceUID = header.SOPInstanceUID
    purpose = pydicom.Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = (
        SOURCE_PURPOSE.value,
        SOURCE_PURPOSE.scheme_designator,
        SOURCE_PURPOSE.meaning,
    )
    reference.PurposeOfReferenceCodeSequence = [purpose]
    sc.SourceImageSequence = [reference]
    if header.get("BodyPartExamined"):
        sc.BodyPartExamined = header.BodyPartExamined
    else:
        sc.Laterality = ""  # General Series Type 2C: unknown (PS3.3 C.7.3.1)
