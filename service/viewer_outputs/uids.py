"""UIDs of the result objects (SR, GSPS, burned-in image), derived instead of drawn at random.

Posting the same image to the same model pack twice must give the same objects, so a PACS that
receives them again recognises them (same SOP Instance UID: deduplicated or replaced, per its own
policy) instead of filing another copy. So every result UID is a function of:

  - the source: its SOP Instance UID (for an instance) or its Study Instance UID (for a series);
  - the pack: name, version and the SHA-256 of both ONNX models, so a new pack version, or a pack
    re-exported with other weights under the same version, gives new objects in a new series;
  - the kind of object ("sr", "gsps", "sc", "seg"), so they never share a UID.

Deployment options that change what is reported without changing the pack (a score floor, fp16)
do NOT change the UIDs: a re-run replaces "this pack's analysis of this image".

One series per (study, pack, kind): every SR the pack writes for the images of a study lands in one
series, numbered by kind (``SERIES_NUMBERS``: 9901 SR, 9902 GSPS, 9903 burned-in image, 9904 heatmap
Segmentation). Another pack
version writes a series with the same number and another UID; its Series Description names the pack
and version, which is how a reader tells them apart.

The UIDs are name-based UUIDs (version 5, SHA-1) under the ``2.25`` arc (ISO/IEC 9834-8, PS3.5
B.2): no registered organisation root is needed and the source UIDs cannot be read back from them.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import UID

# Namespace of this service's derived UIDs (a fixed random UUID; changing it changes every UID).
NAMESPACE = uuid.UUID("6f0c3c52-94a4-4d0e-9f3e-3b0d1c6a7e21")
NAMESPACE_UID = UID(f"2.25.{NAMESPACE.int}")  # the service as an organisation (e.g. who extended a context group)

SERIES_NUMBERS = {"sr": 9901, "gsps": 9902, "sc": 9903, "seg": 9904}


@dataclass(frozen=True)
class ResultUIDs:
    series_instance_uid: UID
    sop_instance_uid: UID
    series_number: int


def derived_uid(*parts: str) -> UID:
    """A UID that is a pure function of `parts` (JSON-joined, so ("ab", "c") != ("a", "bc"))."""
    name = json.dumps([str(part) for part in parts], ensure_ascii=False)
    return UID(f"2.25.{uuid.uuid5(NAMESPACE, name).int}")


def pack_identity(model: dict) -> tuple[str, ...]:
    """What identifies a model pack's analysis: name, version and both models' SHA-256."""
    keys = ("pack", "version", "detector_sha256", "classifier_sha256")
    return tuple(str(model.get(key) or "unknown") for key in keys)


def result_uids(source: Dataset, model: dict, kind: str) -> ResultUIDs:
    """Series and SOP Instance UIDs of the `kind` object a pack (`model`, the JSON result's "model")
    writes for the `source` image; the same arguments always give the same UIDs."""
    if kind not in SERIES_NUMBERS:
        raise ValueError(f"unknown result kind {kind!r}; expected one of {sorted(SERIES_NUMBERS)}")
    pack = pack_identity(model)
    return ResultUIDs(
        series_instance_uid=derived_uid("series", kind, str(source.StudyInstanceUID), *pack),
        sop_instance_uid=derived_uid("instance", kind, str(source.SOPInstanceUID), *pack),
        series_number=SERIES_NUMBERS[kind],
    )


def tracking_uid(source: Dataset, model: dict, what: str) -> UID:
    """Tracking UID of one finding or result inside an SR (stable across re-runs like the SR itself)."""
    return derived_uid("tracking", str(source.SOPInstanceUID), *pack_identity(model), what)


def device_uid(model: dict) -> UID:
    """Device Observer UID of a pack build (name, version, weights), so its reports can be grouped."""
    return derived_uid("device", *pack_identity(model))
