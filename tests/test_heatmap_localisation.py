"""The committed demo pack's heatmaps point at the planted findings (issue 17's acceptance check)."""

from __future__ import annotations

import json
from pathlib import Path

from service.inference.modelpack import ModelPack
from training import evaluate

DEMO_PACK = Path(__file__).resolve().parent.parent / "models" / "demo-synthetic"
# Fresh phantoms the pack never saw: a seed no recipe step uses, the recipe's difficulty and image size.
SEED, IMAGES = 917, 60


def test_demo_pack_heatmap_peaks_fall_in_the_findings_boxes(tmp_path):
    """For most positive test images the disease's heatmap peak (as the API returns it) is inside its finding's box."""
    from training.synthetic import generate_dataset

    pack = ModelPack.load(DEMO_PACK)
    assert pack.has_heatmaps, "the demo pack's classifier has no heatmaps output"
    generate_dataset(tmp_path / "data", n_train=0, n_test=IMAGES, seed=SEED, size=(640, 560))
    data, out = str(tmp_path / "data"), str(tmp_path)
    args = evaluate.get_args_parser().parse_args(
        ["--data", data, "--split", "test", "--pack", str(DEMO_PACK), "--out", out, "--no-baseline"]
    )
    section = evaluate.main(args)["heatmaps"]
    print("heatmap peak in a finding's box:", json.dumps(section["per_label"]), section["fraction"])
    assert section["images"] >= 20  # enough positive images with a box to call it a majority
    assert section["fraction"] > 0.5
    assert "## Heatmaps" in (tmp_path / "evaluation_test.md").read_text()
