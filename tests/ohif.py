"""OHIF Viewer for tests: the pinned prebuilt @ohif/app from npm, served with Orthanc's DICOMweb on one origin.

    dist = ohif_dist()                                   # npm pack once into .cache/ohif/, integrity checked
    with serving_ohif(dist, orthanc.http_url) as base:   # http://127.0.0.1:<free port>
        page.goto(f"{base}/viewer?StudyInstanceUIDs=...")

The package is fetched by npm (`npm pack`, the registry's own client) at test time into a git-ignored
cache folder and checked against the integrity hash pinned here; only the prebuilt viewer (`dist/`) is
extracted, without the source maps, the segmentation model runtime (`ort/`) and the microscopy viewer,
none of which the tests load (about 49 MB instead of 204). No OHIF code is in this repository.

The server is a stdlib ThreadingHTTPServer: `dist/` with the single-page-app fallback, our own
`app-config.js` (one DICOMweb data source at the same origin), and `/dicom-web/*` proxied to Orthanc
with the browser's Host header kept, because Orthanc's DICOMweb plugin builds the BulkDataURIs it
returns from that header and they must point back at this origin.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import http.server
import mimetypes
import os
import posixpath
import shutil
import subprocess
import tarfile
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from tests.browser import missing

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
# From the npm registry's metadata of @ohif/app@3.13.2 (dist.integrity); npm pack checks it too.
OHIF_INTEGRITY = "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
CACHE = Path(os.environ.get("CXR_OHIF_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "ohif"))
SKIPPED_PATHS = ("package/dist/ort/", "package/dist/dicom-microscopy-viewer/")

mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("application/javascript", ".js")

# window.location.origin keeps the data source on whatever free port the server got. No study list
# tour, no investigational-use dialog, at most two decode workers (CI has two cores).
APP_CONFIG = r"""
window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: false,
  investigationalUseDialog: { option: 'never' },
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (test)',
        name: 'orthanc',
        wadoUriRoot: window.location.origin + '/dicom-web',
        qidoRoot: window.location.origin + '/dicom-web',
        wadoRoot: window.location.origin + '/dicom-web',
        qidoSupportsIncludeField: false,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
"""
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
}


def integrity_of(path: Path) -> str:
    """The npm/SRI integrity string (sha512, base64) of a file."""
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def ohif_dist(cache: Path = CACHE) -> Path:
    """The prebuilt viewer's dist/ folder, fetched and extracted on first use; skip/fail if npm cannot."""
    dist = cache / f"app-{OHIF_VERSION}" / "package" / "dist"
    if (dist / "index.html").is_file():
        return dist
    tarball = cache / f"ohif-app-{OHIF_VERSION}.tgz"
    if not tarball.is_file():
        if shutil.which("npm") is None:
            missing("npm is not installed (Debian: apt-get install npm), needed once to fetch @ohif/app")
        cache.mkdir(parents=True, exist_ok=True)
        run = subprocess.run(
            ["npm", "pack", f"{OHIF_PACKAGE}@{OHIF_VERSION}", "--pack-destination", str(cache), "--silent"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if run.returncode != 0 or not tarball.is_file():
            missing(f"npm pack {OHIF_PACKAGE}@{OHIF_VERSION} failed: {(run.stderr or run.stdout)[-500:]}")
    if integrity_of(tarball) != OHIF_INTEGRITY:
        tarball.unlink()
        raise AssertionError(f"{tarball.name} does not match the pinned integrity; removed it, run again")
    _extract_dist(tarball, dist.parent.parent)
    return dist


def _extract_dist(tarball: Path, into: Path) -> None:
    """Extract package/dist/ without source maps and the parts the tests never load, atomically."""
    partial = into.with_name(into.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(tarball) as archive:
        members = [
            m
            for m in archive.getmembers()
            if m.name.startswith("package/dist/")
            and not m.name.startswith(SKIPPED_PATHS)
            and not m.name.endswith(".map")
        ]
        archive.extractall(partial, members=members, filter="data")
    shutil.rmtree(into, ignore_errors=True)
    partial.rename(into)


def _handler(dist: Path, orthanc_host: str, orthanc_port: int) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # the browser fetches hundreds of files
            pass

        def do_GET(self):
            self._dispatch()

        def do_HEAD(self):
            self._dispatch()

        def do_POST(self):
            self._dispatch()

        def _dispatch(self):
            path = urllib.parse.urlsplit(self.path).path
            if path == "/dicom-web" or path.startswith("/dicom-web/"):
                self._proxy()
            elif self.command == "POST":
                self.send_error(405)
            else:
                self._static(path)

        def _proxy(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            connection = http.client.HTTPConnection(orthanc_host, orthanc_port, timeout=60)
            try:
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
            finally:
                connection.close()
            self.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _static(self, path: str):
            if path == "/app-config.js":
                return self._send(APP_CONFIG.encode(), "application/javascript")
            relative = posixpath.normpath(urllib.parse.unquote(path)).lstrip("/")
            file = dist / relative
            if relative.startswith("..") or not file.is_file():
                file = dist / "index.html"  # the app's own routes (/viewer, /) load the app
            self._send(file.read_bytes(), mimetypes.guess_type(file.name)[0] or "application/octet-stream")

        def _send(self, data: bytes, content_type: str):
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            # Cross-origin isolation lets OHIF use SharedArrayBuffer for decoding, as its docs recommend.
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    return Handler


@contextlib.contextmanager
def serving_ohif(dist: Path, orthanc_url: str) -> Iterator[str]:
    """Serve OHIF and proxy /dicom-web to Orthanc on a free loopback port; yields the base URL."""
    orthanc = urllib.parse.urlsplit(orthanc_url)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(dist, orthanc.hostname, orthanc.port))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# --- Driving the viewer in a Playwright page -------------------------------------------------------
# OHIF 3.13 exposes cornerstone (core), cornerstoneTools and its services on window.

# The onboarding tour covers the viewport on a first visit: mark it as seen.
SKIP_TOUR = "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))"

JS_VIEWPORTS = """() => {
  const engine = cornerstone.getRenderingEngines()[0];
  if (!engine) return [];
  return engine.getViewports().map(vp => {
    const r = vp.canvas.getBoundingClientRect();
    return {imageId: vp.getCurrentImageId ? vp.getCurrentImageId() : null, actors: vp.getActors().length,
            rect: [r.left, r.top, r.width, r.height]};
  });
}"""

# Every annotation the SR display tool made: labels, the outline in image pixels (back-projected from
# world coordinates) and in page pixels (where the viewport draws it), whether that outline is in the
# SVG layer as a polyline, and the text of its SVG label.
JS_SR_ANNOTATIONS = """() => {
  const engine = cornerstone.getRenderingEngines()[0];
  const viewports = engine ? engine.getViewports() : [];
  const svgPolylines = Array.from(document.querySelectorAll('svg.svg-layer polyline')).map(pl => {
    const r = pl.ownerSVGElement.getBoundingClientRect();
    const v = (pl.getAttribute('points').match(/-?[0-9.]+(?:e-?[0-9]+)?/g) || []).map(Number);
    const pts = [];
    for (let k = 0; k + 1 < v.length; k += 2) pts.push([v[k] + r.left, v[k + 1] + r.top]);
    return pts;
  });
  const annotations = cornerstoneTools.annotation.state.getAllAnnotations()
    .filter(a => a.metadata.toolName === 'DICOMSRDisplay')
    .map(a => {
      const imageId = a.metadata.referencedImageId;
      const vp = viewports.find(v => v.getCurrentImageId && v.getCurrentImageId() === imageId);
      const outline = (a.data.renderableData.POLYLINE || [])[0] || [];
      const image = outline.map(p => Array.from(cornerstone.utilities.worldToImageCoords(imageId, p)));
      let page = null;
      if (vp) {
        const r = vp.canvas.getBoundingClientRect();
        page = outline.map(p => { const c = vp.worldToCanvas(p); return [c[0] + r.left, c[1] + r.top]; });
      }
      const label = document.querySelector(`svg.svg-layer [data-annotation-uid="${a.annotationUID}"]`);
      return {uid: a.annotationUID, labels: a.data.labels, onViewport: !!vp, image, page,
              svgText: label ? label.textContent : null};
    });
  return {annotations, svgPolylines};
}"""

# Image pixel (column, row) -> page pixel, through the first viewport's current image.
JS_IMAGE_TO_PAGE = """(points) => {
  const vp = cornerstone.getRenderingEngines()[0].getViewports()[0];
  const imageId = vp.getCurrentImageId();
  const r = vp.canvas.getBoundingClientRect();
  return points.map(p => {
    const c = vp.worldToCanvas(cornerstone.utilities.imageToWorldCoords(imageId, p));
    return [c[0] + r.left, c[1] + r.top];
  });
}"""
JS_RENDER = "() => { const engine = cornerstone.getRenderingEngines()[0]; if (engine) engine.render(); }"
TRACKING_PROMPT = "Do you want to continue tracking measurements"


class Viewer:
    """One Playwright page on the OHIF server, with the console kept to find OHIF's swallowed errors."""

    def __init__(self, page, base_url: str):
        self.page, self.base_url = page, base_url
        self.console: list[str] = []
        self.page_errors: list[str] = []
        page.on("console", lambda message: self.console.append(f"[{message.type}] {message.text}"))
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))

    def open_study(self, study_uid: str, timeout_ms: int = 90_000) -> None:
        """Open the viewer on a study and wait until its first image is on screen."""
        self.console.clear()
        self.page.goto(f"{self.base_url}/viewer?StudyInstanceUIDs={study_uid}")
        self.page.wait_for_selector('[data-cy="study-browser-thumbnail"]', timeout=timeout_ms)
        self.page.wait_for_function(
            f"(() => {{ const v = ({JS_VIEWPORTS})(); return v.length > 0 && v[0].actors > 0; }})()",
            timeout=timeout_ms,
        )

    def load_series(self, series_number: int) -> None:
        """Double-click a series in the study browser: OHIF loads it into the active viewport."""
        self.page.dblclick(f'[data-cy="studyBrowser-panel"] [data-series="{series_number}"]')

    def dismiss_tracking_prompt(self, timeout_ms: int = 5000) -> bool:
        """Answer "No" to OHIF's tracking prompt, which keeps the SR read-only (and uncovers the viewport)."""
        prompt = self.page.get_by_text(TRACKING_PROMPT)
        try:
            prompt.wait_for(timeout=timeout_ms)
        except Exception:  # Playwright's TimeoutError: no prompt this time
            return False
        self.page.get_by_role("button", name="No", exact=True).click()
        prompt.wait_for(state="hidden", timeout=timeout_ms)
        return True

    def sr_annotations(self) -> tuple[list[dict], list[list[list[float]]]]:
        state = self.page.evaluate(JS_SR_ANNOTATIONS)
        return state["annotations"], state["svgPolylines"]

    def viewports(self) -> list[dict]:
        return self.page.evaluate(JS_VIEWPORTS)

    def image_to_page(self, points: list[tuple[float, float]]) -> list[list[float]]:
        return self.page.evaluate(JS_IMAGE_TO_PAGE, [list(p) for p in points])

    def render(self) -> None:
        self.page.evaluate(JS_RENDER)

    def route_errors(self) -> list[str]:
        """OHIF catches render errors in an error boundary; they appear only on the console, as
        "Route viewer Error Boundary ...", or as a "Something went wrong" message."""
        lines = [*self.console, *self.page_errors]
        return [line[:300] for line in lines if "Error Boundary" in line or "Something went wrong" in line]
