"""Who made a result object and when: the header attributes IHE AI Results (AIR) asks for.

Every result object (SR, GSPS, burned-in image) names the model that produced it in its General
Equipment module, the way AIR identifies an AI algorithm in the header:

  Manufacturer             MANUFACTURER (this service)
  ManufacturerModelName    the pack's name
  SoftwareVersions         the pack's version, then "service <version of this service>"
  DeviceSerialNumber       16 hex digits of the SHA-256 of the pack identity (name, version and both
                           models' SHA-256): it names the exact model build, so two packs published
                           under one name and version with other weights differ. It is the same on
                           every installation: results do not depend on the machine, and a
                           per-installation number would identify the site in every object sent.

and dates the series, the content and the instance with one clock reading, in local time with its
TimezoneOffsetFromUTC (AIR asks for SeriesDate/SeriesTime so a reader can order results).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from importlib import metadata

from pydicom.dataset import Dataset

from service.viewer_outputs import MANUFACTURER
from service.viewer_outputs.uids import device_uid, pack_identity


@dataclass(frozen=True)
class Device:
    """The model pack as a device (General Equipment module and the SR's device observer)."""

    uid: str
    manufacturer: str
    model_name: str
    software_versions: tuple[str, ...]
    serial_number: str


@cache
def service_version() -> str:
    try:
        return metadata.version("pediatric-cxr")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def device(model: dict) -> Device:
    """The device identity of the pack described by a JSON result's "model"."""
    name, version, *_ = pack_identity(model)
    serial = hashlib.sha256("\n".join(pack_identity(model)).encode("utf-8")).hexdigest()[:16].upper()
    return Device(
        uid=device_uid(model),
        manufacturer=MANUFACTURER,
        model_name=name[:64],
        software_versions=(version[:64], f"service {service_version()}"[:64]),
        serial_number=serial,
    )


def stamp(dataset: Dataset, model: dict, now: datetime | None = None) -> Dataset:
    """Write the device identity and the creation dates into `dataset` (in place; returned)."""
    made_by = device(model)
    dataset.Manufacturer = made_by.manufacturer
    dataset.ManufacturerModelName = made_by.model_name
    dataset.SoftwareVersions = list(made_by.software_versions)
    dataset.DeviceSerialNumber = made_by.serial_number
    now = (now or datetime.now()).astimezone()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    # Series and instance creation exist in every IOD; content and presentation-state creation dates
    # only in some, so they are overwritten where the builder wrote them (one clock for all).
    for prefix in ("Series", "InstanceCreation", "Content", "PresentationCreation"):
        if prefix in ("Series", "InstanceCreation") or f"{prefix}Date" in dataset:
            setattr(dataset, f"{prefix}Date", date)
            setattr(dataset, f"{prefix}Time", time)
    dataset.TimezoneOffsetFromUTC = now.strftime("%z")
    return dataset
