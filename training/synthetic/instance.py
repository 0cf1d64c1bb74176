"""One phantom as a DICOM instance: the header of a DX or CR image plus the encoded pixels, and its ground truth."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from training.synthetic.difficulty import Difficulty, resolve_difficulty
from training.synthetic.encoding import PixelEncoding, choose_encoding, encode_dataset, encode_pixels
from training.synthetic.phantom import PhantomCase, render_case

DISCLAIMER = "SYNTHETIC PHANTOM - NOT CLINICAL DATA"

DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage

# Invented vendors, named as phantoms so no header passes for a real device: (Manufacturer,
# ManufacturerModelName, share within the modality). Hospitals run a few systems per modality, so
# subgroup reports by vendor have something to split.
VENDORS = {
    "DX": (("PCXR Phantom Imaging A", "Phantom DR 1", 0.6), ("PCXR Phantom Imaging B", "Phantom DR 2", 0.4)),
    "CR": (("PCXR Phantom Imaging C", "Phantom CR 1", 0.7), ("PCXR Phantom Imaging D", "Phantom CR 2", 0.3)),
}
# Infants are mostly imaged supine (AP); older children stand for a PA view. P(AP) by age in months.
AP_SHARE_BY_AGE = ((12, 0.6), (60, 0.3), (None, 0.1))


def ap_share(age_months: int) -> float:
    """Probability that a phantom of this age is an AP view (AP_SHARE_BY_AGE)."""
    return next(share for limit, share in AP_SHARE_BY_AGE if limit is None or age_months < limit)


def _age_string(months: int) -> str:
    return f"{months:03d}M" if months < 24 else f"{months // 12:03d}Y"


def synthesize_instance(
    seed: int,
    rows: int = 1643,
    cols: int = 1349,
    *,
    difficulty: str | Difficulty = "default",
    findings: Sequence[str] | None = None,
    transfer_syntax: str | None = None,
    photometric: str | None = None,
    bits_stored: int | None = None,
    signed: bool | None = None,
    windowed: bool | None = None,
) -> tuple[Dataset, PhantomCase]:
    """One phantom as a DICOM dataset (with file meta) plus its ground truth."""
    difficulty = resolve_difficulty(difficulty)
    img_ss, enc_ss, meta_ss = np.random.SeedSequence(seed).spawn(3)
    case = render_case(np.random.default_rng(img_ss), rows, cols, difficulty, findings)
    enc_rng = np.random.default_rng(enc_ss)
    enc = choose_encoding(enc_rng, transfer_syntax, photometric, bits_stored, signed, windowed)
    arr, center, width = encode_pixels(case.density, enc, enc_rng)

    # The UIDs derive from everything that shapes the image, so the same call always gives the same instance.
    key = [
        "vindr-pcxr-phantom",
        str(seed),
        f"{rows}x{cols}",
        repr(difficulty),
        repr(None if findings is None else list(findings)),
        repr(enc),
    ]
    ds = _header(np.random.default_rng(meta_ss), key, case)
    _set_pixels(ds, arr, enc, center, width)
    encode_dataset(ds, enc.transfer_syntax)
    return ds, case


def _header(rng: np.random.Generator, key: list[str], case: PhantomCase) -> Dataset:
    """File meta and every attribute but the pixels: a DX (60%) or CR chest image of a de-identified phantom."""
    study_uid = generate_uid(entropy_srcs=[*key, "study"])
    series_uid = generate_uid(entropy_srcs=[*key, "series"])
    sop_uid = generate_uid(entropy_srcs=[*key, "instance"])
    is_dx = bool(rng.random() < 0.6)
    sop_class = DX_SOP_CLASS if is_dx else CR_SOP_CLASS
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_uid)

    day = np.datetime64("2020-01-01") + int(rng.integers(0, 731))
    date = str(day).replace("-", "")
    clock = "".join(f"{int(v):02d}" for v in (rng.integers(7, 19), *rng.integers(0, 60, 2)))
    spacing = round(float(rng.uniform(0.1, 0.2)), 3)
    number = int(rng.integers(0, 10000))

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = clock
    ds.AccessionNumber = ""
    ds.Modality = "DX" if is_dx else "CR"
    if is_dx:
        ds.PresentationIntentType = "FOR PRESENTATION"
    view = "AP" if rng.random() < ap_share(case.age_months) else "PA"
    vendors = VENDORS[ds.Modality]
    vendor = vendors[int(rng.choice(len(vendors), p=[share for _, _, share in vendors]))]
    ds.Manufacturer, ds.ManufacturerModelName = vendor[0], vendor[1]
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"CHEST {view} (phantom)"
    ds.SeriesDescription = DISCLAIMER
    _set_patient(ds, case, number)
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.BurnedInAnnotation = "NO"
    ds.ImageComments = DISCLAIMER
    ds.PixelSpacing = [spacing, spacing]
    if is_dx:
        ds.ImagerPixelSpacing = [spacing, spacing]
    ds.LossyImageCompression = "00"
    return ds


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _set_patient(ds: Dataset, case: PhantomCase, number: int) -> None:
    """A phantom patient: numbered name and id, the phantom's sex and age, size and weight for that age."""
    years = case.age_months / 12.0
    ds.PatientName = f"PHANTOM^{number:04d}"
    ds.PatientID = f"PHANTOM-{number:04d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = case.sex
    ds.PatientAge = _age_string(case.age_months)
    ds.PatientSize = f"{(50.0 + 25.0 * years**0.6) / 100.0:.2f}"
    ds.PatientWeight = f"{3.5 + 2.3 * years**0.9:.1f}"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Synthetic phantom: no patient data"  # required when PatientIdentityRemoved is YES


def _set_pixels(ds: Dataset, arr: np.ndarray, enc: PixelEncoding, center: float, width: float) -> None:
    """The stored values (uncompressed, little endian) and the attributes that say how to display them."""
    ds.set_pixel_data(arr, enc.photometric, enc.bits_stored, generate_instance_uid=False)
    ds.SmallestImagePixelValue = int(arr.min())
    ds.LargestImagePixelValue = int(arr.max())
    ds.RescaleIntercept = f"{enc.intercept:g}"
    ds.RescaleSlope = f"{enc.slope:g}"
    ds.RescaleType = "US"
    if enc.windowed:
        ds.WindowCenter = f"{center:.2f}"
        ds.WindowWidth = f"{width:.2f}"
        ds.VOILUTFunction = "LINEAR"


def image_id_for(sop_instance_uid: str) -> str:
    """The VinDr image_id: md5 hex digest of the SOP Instance UID."""
    return hashlib.md5(str(sop_instance_uid).encode()).hexdigest()
