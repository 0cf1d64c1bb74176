"""Our results in a real viewer: OHIF 3.13.2 (prebuilt, from npm) over Orthanc's DICOMweb, in headless Chromium.

The service (demo pack) answers for two phantoms: one where it finds boxes (JSON, SR, burned-in image)
and one where it finds none (SR). Orthanc (Debian, temp storage, loopback) stores the images and those
answers; OHIF is served from the same origin with /dicom-web proxied to Orthanc; Chromium opens each
study and the tests read what OHIF drew from its annotation state, its SVG layer and the screenshot's
pixels. Screenshots are kept in test-artifacts/ohif/ (CXR_TEST_ARTIFACTS overrides the folder).

The phantoms are written without a window: OHIF 3.13.2 renders any image carrying VOI LUT Function
(0028,1056) black (its issue #6239), which is about OHIF and the source image, not our objects.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from service.settings import Settings
from service.viewer_outputs.codes import score_code
from service.viewer_outputs.uids import SERIES_NUMBERS
from tests.browser import chromium_browser, loopback_only, require_chromium
from tests.ohif import SKIP_TOUR, Viewer, ohif_dist, serving_ohif
from tests.orthanc import running_orthanc
from training.synthetic import dicom_bytes, synthesize_instance

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
DEMO_PACK = REPO / "models" / "demo-synthetic"
ARTIFACTS = Path(os.environ.get("CXR_TEST_ARTIFACTS", REPO / "test-artifacts")) / "ohif"
VIEWPORT = {"width": 1600, "height": 1000}
SIZE = (768, 640)  # rows, columns: small phantoms keep decoding and rendering quick
TOLERANCE_PX = 0.51  # OHIF's outline, back-projected to image pixels, against the JSON box


def _post(client: TestClient, data: bytes, output: str) -> httpx.Response:
    response = client.post(f"/v1/predict?format={output}", content=data, headers={"Content-Type": "application/dicom"})
    assert response.status_code == 200, response.text
    return response


@pytest.fixture(scope="module")
def answers() -> dict:
    """The service's answers (demo pack): a phantom with boxes (JSON, SR, SC) and one without any (JSON, SR)."""
    require_chromium()  # nothing to do without a browser
    settings = Settings(models=DEMO_PACK, providers=["CPUExecutionProvider"], max_queue_delay_ms=1)
    with TestClient(create_app(settings)) as client:
        ds, _ = synthesize_instance(
            5, *SIZE, difficulty="easy", findings=["Consolidation", "Cardiomegaly"], windowed=False
        )
        boxes = dicom_bytes(ds)
        prediction = _post(client, boxes, "json").json()
        assert prediction["findings"], "the demo pack found nothing on the phantom with planted findings"
        sr, sc = _post(client, boxes, "sr").content, _post(client, boxes, "sc").content
        for seed in range(1, 6):  # a clean phantom the pack reports nothing for
            ds, _ = synthesize_instance(seed, *SIZE, difficulty="easy", findings=[], windowed=False)
            clean = dicom_bytes(ds)
            if not _post(client, clean, "json").json()["findings"]:
                break
        else:
            pytest.fail("the demo pack reports boxes on every clean phantom tried (seeds 1-5)")
        clean_sr = _post(client, clean, "sr").content
    return {
        "boxes": {"image": boxes, "prediction": prediction, "sr": sr, "sc": sc},
        "clean": {"image": clean, "sr": clean_sr},
    }


@pytest.fixture(scope="module")
def viewer(answers, tmp_path_factory):
    """OHIF in Chromium, on an Orthanc holding both studies; one page, reloaded by every test."""
    dist = ohif_dist()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with chromium_browser() as browser, running_orthanc(tmp_path_factory.mktemp("orthanc")) as orthanc:
        for case in answers.values():
            for key in ("image", "sr", "sc"):
                if key in case:
                    stored = httpx.post(f"{orthanc.http_url}/instances", content=case[key], timeout=30)
                    assert stored.status_code == 200, stored.text
        with serving_ohif(dist, orthanc.http_url) as base:
            context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
            context.add_init_script(SKIP_TOUR)
            blocked = loopback_only(context)
            try:
                yield Viewer(context.new_page(), base)
            finally:
                context.close()
            assert blocked == [], f"the viewer tried to reach beyond loopback: {blocked[:3]}"


def _study(data: bytes) -> str:
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).StudyInstanceUID


def _screenshot(viewer: Viewer, name: str) -> np.ndarray:
    path = ARTIFACTS / f"{name}.png"
    viewer.page.screenshot(path=path)
    return np.asarray(Image.open(path).convert("RGB"))


def _corners(box: dict) -> list[tuple[float, float]]:
    return [
        (box["x_min"], box["y_min"]),
        (box["x_max"], box["y_min"]),
        (box["x_max"], box["y_max"]),
        (box["x_min"], box["y_max"]),
    ]


def _overlay(pixels: np.ndarray) -> np.ndarray:
    """OHIF's SR outlines: yellow (255, 255, 0), the active one green (0, 255, 0). On a greyscale image
    (R = G = B) "green high, blue low" can only be the overlay."""
    pixels = pixels.astype(int)
    return (pixels[..., 1] >= 160) & (pixels[..., 2] <= 110)


def _saturated(pixels: np.ndarray) -> np.ndarray:
    """Any strongly coloured pixel: the burned-in boxes are saturated colours on grey."""
    return np.ptp(pixels.astype(int), axis=-1) > 80


def _edge_coverage(rgb: np.ndarray, a, b, hit, halo: int = 2) -> float:
    """Fraction of points along the segment a-b (page pixels) with a `hit` pixel within +-halo px; the
    corners are skipped (a label's leader line may start there)."""
    n = max(int(np.hypot(b[0] - a[0], b[1] - a[1])), 2)
    hits = 0
    for t in np.linspace(0.05, 0.95, n):
        x, y = round(a[0] + t * (b[0] - a[0])) - halo, round(a[1] + t * (b[1] - a[1])) - halo
        hits += bool(hit(rgb[max(y, 0) : y + 2 * halo + 1, max(x, 0) : x + 2 * halo + 1]).any())
    return hits / n


def _edges(rgb: np.ndarray, page_corners, hit) -> list[float]:
    return [_edge_coverage(rgb, page_corners[i], page_corners[(i + 1) % 4], hit) for i in range(4)]


def _outline_in_svg(page_outline, svg_polylines, tolerance: float = 1.0) -> bool:
    want = np.array(page_outline)
    return any(len(p) == len(want) and np.abs(np.array(p) - want).max() <= tolerance for p in svg_polylines)


def _match(finding: dict, annotations: list[dict], used: set[str]) -> dict | None:
    """The annotation drawn for a finding: its outline is the box (image pixels); among coinciding
    boxes, the one labelled with this finding's score concept."""
    want = np.array(_corners(finding["box"]))
    same_box = [
        a
        for a in annotations
        if a["uid"] not in used
        and len(a["image"]) >= 4
        and np.abs(np.array(a["image"])[:4, :2] - want).max() < TOLERANCE_PX
    ]
    concept = score_code(finding["label"]).meaning
    named = [a for a in same_box if any(label["label"] == concept for label in a["labels"])]
    return (named or same_box or [None])[0]


def _check_drawn(viewer: Viewer, findings: list[dict]) -> tuple[list[str], np.ndarray]:
    """What is wrong with the drawing of `findings` now (empty when every box is right), and the screenshot."""
    annotations, polylines = viewer.sr_annotations()
    rgb = _screenshot(viewer, "sr-boxes")
    problems, used = [], set()
    if len(annotations) != len(findings):
        problems.append(f"{len(annotations)} SR annotations for {len(findings)} findings")
    for finding in findings:
        name = f"{finding['label']} {finding['score']:.2f}"
        drawn = _match(finding, annotations, used)
        if drawn is None:
            problems.append(f"{name}: no annotation with the box's outline")
            continue
        used.add(drawn["uid"])
        concept = score_code(finding["label"]).meaning
        labels = [(label["label"], label["value"]) for label in drawn["labels"]]
        if (concept, f"{finding['score']:.2f} {{score}}") not in labels:
            problems.append(f"{name}: labelled {labels}")
        if not drawn["onViewport"] or not _outline_in_svg(drawn["page"], polylines):
            problems.append(f"{name}: outline not in the SVG layer")
        if not drawn["svgText"] or concept not in drawn["svgText"]:
            problems.append(f"{name}: SVG label is {drawn['svgText']!r}")
        coverage = _edges(rgb, drawn["page"] or [[0, 0]] * 4, _overlay) if drawn["page"] else [0.0] * 4
        if min(coverage) < 0.3:
            problems.append(f"{name}: overlay pixels along the edges {np.round(coverage, 2).tolist()}")
    return problems, rgb


def test_ohif_draws_every_box_of_our_sr_with_its_finding_and_score(viewer, answers):
    """OHIF draws each box of the service's SR where the JSON box is, labelled "<finding> detection score: <score>"."""
    case = answers["boxes"]
    findings = case["prediction"]["findings"]
    started = time.monotonic()
    viewer.open_study(_study(case["image"]))
    opened = time.monotonic()
    # Negative control: before the SR is loaded, no overlay colour lies along the boxes' edges.
    before = _screenshot(viewer, "image-before-sr")
    for finding in findings:
        assert max(_edges(before, viewer.image_to_page(_corners(finding["box"])), _overlay)) < 0.3

    viewer.load_series(SERIES_NUMBERS["sr"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not viewer.route_errors():
        annotations, _ = viewer.sr_annotations()
        if len([a for a in annotations if a["onViewport"] and a["svgText"]]) >= len(findings):
            break
        time.sleep(0.2)
    viewer.dismiss_tracking_prompt()  # it covers the top of the viewport; the SVG is redrawn after it goes
    deadline = time.monotonic() + 20
    while True:
        viewer.render()
        time.sleep(0.4)
        problems, _ = _check_drawn(viewer, findings)
        if not problems or time.monotonic() > deadline:
            break
    print(
        f"\nOHIF: study open in {opened - started:.1f} s, SR drawn and checked {time.monotonic() - opened:.1f} s later"
    )
    assert viewer.route_errors() == []
    assert problems == [], problems


def test_ohif_opens_the_no_findings_sr_and_says_so(viewer, answers):
    """The SR of an image without boxes opens without error and shows "No localized findings"."""
    case = answers["clean"]
    viewer.open_study(_study(case["image"]))
    viewer.load_series(SERIES_NUMBERS["sr"])
    shown = viewer.page.get_by_text("No localized findings", exact=False)
    shown.first.wait_for(timeout=30_000)
    viewer.dismiss_tracking_prompt(timeout_ms=2000)
    time.sleep(0.5)  # an error boundary would report right after the viewport renders
    _screenshot(viewer, "sr-no-findings")
    assert viewer.route_errors() == []
    assert viewer.page.get_by_text("Chest CAD Report", exact=False).count() >= 1


def test_ohif_displays_the_burned_in_image(viewer, answers):
    """The format=sc image displays (not black): each box burned in at the JSON box, the banner on top."""
    case = answers["boxes"]
    sc_uid = pydicom.dcmread(io.BytesIO(case["sc"]), stop_before_pixels=True).SOPInstanceUID
    viewer.open_study(_study(case["image"]))
    viewer.load_series(SERIES_NUMBERS["sc"])
    shows_sc = f"""(() => {{ const vp = cornerstone.getRenderingEngines()[0].getViewports()[0];
        return (vp.getCurrentImageId() || '').includes('{sc_uid}') && vp.getActors().length > 0; }})()"""
    viewer.page.wait_for_function(shows_sc, timeout=60_000)
    deadline = time.monotonic() + 20
    while True:
        viewer.render()
        time.sleep(0.4)
        rgb = _screenshot(viewer, "sc-burned-in")
        coverage = [
            _edges(rgb, viewer.image_to_page(_corners(f["box"])), _saturated) for f in case["prediction"]["findings"]
        ]
        # A caption's dark backing may cover a box's top edge: three edges of four must show.
        if all(sorted(c)[1] >= 0.5 for c in coverage) or time.monotonic() > deadline:
            break
    left, top, width, height = (int(v) for v in viewer.viewports()[0]["rect"])
    shown = rgb[top : top + height, left : left + width].mean(axis=2)
    assert shown.mean() > 20, "the burned-in image is displayed black"
    assert all(sorted(c)[1] >= 0.5 for c in coverage), np.round(coverage, 2).tolist()
    banner = viewer.image_to_page([(0, 0), (SIZE[1], 12)])
    strip = rgb[int(banner[0][1]) + 1 : int(banner[1][1]), int(banner[0][0]) + 1 : int(banner[1][0])]
    assert (strip.max(axis=2) < 40).mean() > 0.3 and (strip.min(axis=2) > 200).mean() > 0.01, "no banner on top"
    assert viewer.route_errors() == []
