"""Which images a run or a pack has seen, so that a test split can be shown to be independent of them.

A run records the image ids it trained and validated on (`splits.json` in the run folder); a pack
ships the ids its models were trained on and its calibrators and operating points were tuned on
(`data_splits.json` beside the manifest, and a summary in the manifest). Evaluation and calibration
refuse data whose ids overlap what the run or pack was fitted on, and a pack version is accepted on a
test split once: re-tuning it retires that split (README, "Evaluation you can trust").

An image-id list is summarised by `image_ids_sha256`: the sha256 of its sorted, de-duplicated ids
joined by newlines, so a manifest can name a split exactly without listing it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

RUN_SPLITS_FILE = "splits.json"
PACK_SPLITS_FILE = "data_splits.json"
# The roles an image can have had before a test: what the models learned from, and what their
# calibration and operating points were chosen on.
FITTED_ROLES = ("train", "validation", "calibration")


def image_ids_sha256(image_ids: Iterable[str]) -> str:
    """sha256 of the sorted, de-duplicated ids joined by newlines (the order a split is read in does not matter)."""
    return hashlib.sha256("\n".join(sorted(set(image_ids))).encode()).hexdigest()


def split_record(image_ids: Iterable[str], **details) -> dict:
    """How a manifest or report names a list of images: count, hash of the id list, and any details given."""
    ids = sorted(set(image_ids))
    return {"images": len(ids), "image_ids_sha256": image_ids_sha256(ids)} | details


def write_run_splits(run: Path, train_ids: Iterable[str], validation_ids: Iterable[str]) -> Path:
    """splits.json in a run folder: the image ids the run trained and validated on."""
    path = Path(run) / RUN_SPLITS_FILE
    path.write_text(json.dumps({"train": sorted(train_ids), "validation": sorted(validation_ids)}, indent=1) + "\n")
    return path


def write_pack_splits(pack_dir: Path, manifest: dict, splits: dict[str, list[str]]) -> None:
    """data_splits.json beside the manifest, and the manifest's summary of it (counts, id hashes, file sha256)."""
    path = Path(pack_dir) / PACK_SPLITS_FILE
    path.write_text(json.dumps({role: sorted(ids) for role, ids in splits.items()}, indent=1) + "\n")
    manifest["data_splits"] = {"file": PACK_SPLITS_FILE, "sha256": _sha256(path)} | {
        role: split_record(ids) for role, ids in splits.items()
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_splits(path: Path) -> dict[str, list[str]]:
    """{role: image ids} from a run's splits.json or a pack's data_splits.json; {} when the file is absent."""
    path = Path(path)
    if not path.is_file():
        return {}
    return {role: list(ids) for role, ids in json.loads(path.read_text()).items() if isinstance(ids, list)}


def fitted_ids(splits: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    """The roles of FITTED_ROLES present in `splits`, as sets."""
    return {role: set(splits[role]) for role in FITTED_ROLES if role in splits}


def overlap(image_ids: Iterable[str], splits: Mapping[str, Iterable[str]]) -> dict[str, int]:
    """{role: how many of `image_ids` the run or pack was fitted on in that role}, roles without overlap left out."""
    wanted = set(image_ids)
    counts = {role: len(wanted & ids) for role, ids in fitted_ids(splits).items()}
    return {role: count for role, count in counts.items() if count}


def refuse_overlap(image_ids: Iterable[str], splits: Mapping[str, Iterable[str]], what: str, source: str) -> None:
    """SystemExit naming the roles when `image_ids` (a split about to be used as `what`) overlap `splits`."""
    shared = overlap(image_ids, splits)
    if shared:
        roles = ", ".join(f"{count} of its {role} images" for role, count in shared.items())
        raise SystemExit(
            f"error: this {what} split shares images with what {source} was fitted on ({roles}); "
            "use data the models and their calibration have never seen (a fresh --seed for phantoms)"
        )


def dataset_provenance(root: Path, split: str) -> dict:
    """What is known about one split of a dataset folder: the generator's dataset.json (phantoms) when present.

    {"data": folder, "split": name} plus, for a generated dataset, "generator", "seed", "difficulty" and the
    split's count and id-list hash as the generator wrote them.
    """
    root = Path(root)
    record: dict = {"data": str(root), "split": split}
    path = root / "dataset.json"
    if path.is_file():
        provenance = json.loads(path.read_text())
        record |= {key: provenance.get(key) for key in ("generator", "seed", "difficulty")}
        written = (provenance.get("splits") or {}).get(split)
        if written:
            record["generated"] = written
    return record
