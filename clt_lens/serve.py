"""``clt-lens serve DIR``: circuit-tracer's attribution-graph viewer on our graphs, offline.

A small HTTP server (bound to 127.0.0.1 by default) that serves, read-only:

- the viewer bundled with circuit-tracer (``circuit_tracer.frontend.local_server``'s
  ``DEFAULT_FRONTEND_DIR``, straight from site-packages);
- ``/data/graph-metadata.json`` and ``/graph_data/{slug}.json`` from DIR (what
  ``clt-lens attribute --out DIR`` writes);
- the feature pages written by ``clt_lens.circuits.viewer_data`` under
  ``DIR/features/{scan}/``, as ``/feature_data/{scan}/{feature}.json``.

The viewer fetches a feature page from a remote host unless the graph's ``scan`` starts with
``./`` (``loadFeature`` in ``feature_examples/init-feature-examples.js``). When DIR holds pages
for a graph's scan, the graph JSON is served with ``metadata.scan`` set to
``./feature_data/{scan}``; files on disk keep the real scan (Neuronpedia uploads need it).

The viewer page loads d3 v7, a d3-jetpack build, dagre and pako from CDNs. Offline, d3, dagre and
pako come from a local folder (``--js-dir``, ``$CLT_LENS_VIEWER_JS``, or the user cache that
``clt-lens serve --install-js`` fills from the npm registry), jetpack's helpers from
``clt_lens.circuits.viewer_compat``, and the served ``index.html`` points at ``/vendor/...``.
The frontend's "Save" button (POST ``/save_graph/{slug}``) stores the view state in the graph
JSON, as circuit-tracer's own server does (pinned nodes, supernodes, labels; ``workbench.js``
restores them on load, which the bundled frontend does not do for supernodes).

The workbench (``clt_lens/assets/viewer/workbench.js``, added to the page): select feature
nodes or a supernode, ablate / scale / clamp them, and see the next-token probabilities, the
graph's output logits and a greedy continuation before and after; or steer another prompt with
them. The page posts to ``/api/intervene``, which ``clt_lens.circuits.workbench`` answers with
``clt_lens.circuits.intervene`` (``--read-only`` turns it off). Feature nodes link to
``/feature.html`` (explanation and scores, examples, decoder norms per target layer, "steer with
this feature"); ``/help.html`` holds the instructions. A missing feature page is a 404 whose JSON
``error`` the viewer shows.
"""

from __future__ import annotations

import http.server
import json
import re
import threading
import urllib.parse
from pathlib import Path
from typing import Any

from clt_lens.circuits.errors import CircuitsError
from clt_lens.circuits.viewer_data import FEATURES_SUBDIR, INDEX_FILE, scan_dirname
from clt_lens.circuits.workbench import LIMITS, Workbench, WorkbenchError
from clt_lens.fsutil import atomic_write_text, is_safe_name
from clt_lens.vendor_js import (
    SCRIPTS,
    VIEWER_SCRIPTS,
    ScriptsError,
    find_js_dir,
    install_js,
)

DEFAULT_PORT = 8032
DEFAULT_HOST = "127.0.0.1"
LOCAL_SCAN_PREFIX = "./feature_data/"
MAX_POST_BYTES = 16 * 1024 * 1024
ASSETS_DIR = Path(__file__).resolve().parent / "assets" / "viewer"
# Our pages and scripts (clt_lens/assets/viewer): URL path -> (file, content type)
_ASSETS = {
    "/workbench/workbench.js": ("workbench.js", "text/javascript; charset=utf-8"),
    "/workbench/workbench.css": ("workbench.css", "text/css; charset=utf-8"),
    "/feature.html": ("feature.html", "text/html; charset=utf-8"),
    "/help.html": ("help.html", "text/html; charset=utf-8"),
}
_WORKBENCH_TAGS = ("<link rel='stylesheet' href='./workbench/workbench.css'>\n"
                   "<script src='./workbench/workbench.js'></script>\n")
_INLINE_INIT = re.compile(r"<script>\s*window\.init\s*=")

# The viewer's third-party scripts (file name -> npm package, file inside it, sha256), a subset of
# the pinned scripts in clt_lens.vendor_js.
VIEWER_JS = {name: SCRIPTS[name] for name in VIEWER_SCRIPTS}
JETPACK_COMPAT = "jetpack-compat.js"  # ours, from clt_lens.circuits.viewer_compat
# CDN script (by file name) -> local replacement; None drops it (hotserver is a dev live-reload
# client, npy is only used for .npy data we never write).
_CDN_SCRIPTS: dict[str, str | None] = {
    "d3.js": "d3.min.js",
    "jetpack": JETPACK_COMPAT,
    "hotserver-client-ws.js": None,
    "npy_v0.js": None,
    "dagre.min.js": "dagre.min.js",
    "pako.min.js": "pako.min.js",
}
_SCRIPT_TAG = re.compile(r"""<script\s+src=['"](https?://[^'"]+)['"]\s*>\s*</script>\s*\n?""")


def frontend_dir() -> Path:
    """circuit-tracer's bundled viewer (read-only)."""
    from circuit_tracer.frontend.local_server import DEFAULT_FRONTEND_DIR

    return Path(str(DEFAULT_FRONTEND_DIR))


def find_viewer_js(js_dir: str | Path | None = None) -> Path | None:
    """The first folder holding every file of ``VIEWER_JS``: ``js_dir``, then
    ``$CLT_LENS_VIEWER_JS``, then the user cache. An explicit ``js_dir`` must be complete."""
    try:
        return find_js_dir(VIEWER_SCRIPTS, js_dir)
    except ScriptsError as e:
        raise CircuitsError(f"--js-dir: {e}") from None


def install_viewer_js(dest: str | Path | None = None, *, npm: str = "npm") -> Path:
    """Fetch every pinned page script (the viewer's and the dashboards') from the npm registry
    into ``dest`` (default: the user cache); see ``clt_lens.vendor_js.install_js``."""
    try:
        return install_js(dest, npm=npm)
    except ScriptsError as e:
        raise CircuitsError(str(e)) from None


def workbench_index_html(html: str) -> str:
    """``index.html`` with the workbench's stylesheet and script before the page's init."""
    m = _INLINE_INIT.search(html)
    if m is None:
        return html + _WORKBENCH_TAGS
    return html[: m.start()] + _WORKBENCH_TAGS + html[m.start():]


def local_index_html(html: str) -> str:
    """``index.html`` with its CDN scripts pointed at ``/vendor/`` (or dropped)."""

    def repl(m: re.Match[str]) -> str:
        url = m.group(1)
        base = url.rsplit("/", 1)[-1]
        for key, local in _CDN_SCRIPTS.items():
            if base == key or (key == "jetpack" and base.startswith("jetpack")):
                return "" if local is None else f"<script src='./vendor/{local}'></script>\n"
        return m.group(0)

    return _SCRIPT_TAG.sub(repl, html)


class ViewerHandler(http.server.SimpleHTTPRequestHandler):
    """Static viewer files from site-packages plus our graph, feature and script routes."""

    server: ViewerHTTPServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, directory=str(frontend_dir()), **kwargs)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if self.server.verbose:
            super().log_message(format, *args)

    # Read-only: no PUT/DELETE; POST only for the viewer's save_graph.
    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        if path in ("/", "/index.html"):
            return self._index()
        if path == "/favicon.ico":  # none bundled; answer so browsers log no error
            self.send_response(204)
            self.end_headers()
            return None
        if path in _ASSETS:
            name, ctype = _ASSETS[path]
            return self._send((ASSETS_DIR / name).read_bytes(), ctype)
        parts = [p for p in path.split("/") if p]
        if len(parts) == 2 and parts[0] in ("data", "graph_data"):
            return self._graph_file(parts[1])
        if len(parts) == 3 and parts[0] == "feature_data":
            return self._feature(parts[1], parts[2])
        if len(parts) == 2 and parts[0] == "vendor":
            return self._vendor(parts[1])
        if len(parts) == 3 and parts[:2] == ["api", "workbench"]:
            return self._api(lambda: self.server.workbench.status(parts[2]))
        return super().do_GET()

    def do_POST(self) -> None:  # noqa: N802
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        parts = [p for p in path.split("/") if p]
        if parts == ["api", "intervene"]:
            return self._api(lambda: self.server.workbench.handle(
                self._read_body(LIMITS["max_request_bytes"])))
        if len(parts) != 2 or parts[0] != "save_graph":
            return self.send_error(404)
        target = self._data_file(f"{parts[1]}.json")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if target is None or not target.is_file():
            return self.send_error(404, "unknown graph")
        if not self._is_json_request():
            return self.send_error(415, "expected Content-Type: application/json")
        if not 0 < length <= MAX_POST_BYTES:
            return self.send_error(413)
        try:
            q_params = json.loads(self.rfile.read(length))["qParams"]
        except (ValueError, KeyError, TypeError):
            return self.send_error(400, "expected JSON with qParams")
        if not isinstance(q_params, dict):
            return self.send_error(400, "qParams must be an object")
        with self.server.save_lock:  # one read-modify-write of a graph file at a time
            graph = json.loads(target.read_text())
            graph["qParams"] = q_params
            atomic_write_text(target, json.dumps(graph, indent=1))
        self._send(b"{}", "application/json")

    # -- the workbench API ----------------------------------------------------------------
    def _is_json_request(self) -> bool:
        # A cross-site page can POST text/plain without asking; application/json needs a CORS
        # preflight this server never grants, so requiring it keeps other sites out.
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        return ctype == "application/json"

    def _read_body(self, limit: int) -> bytes:
        if not self._is_json_request():
            raise WorkbenchError(415, "expected Content-Type: application/json")
        try:
            length = int(self.headers.get("Content-Length") or -1)
        except ValueError:
            length = -1
        if length < 0:
            raise WorkbenchError(411, "a Content-Length header is required")
        if length > limit:
            raise WorkbenchError(413, f"request is {length} bytes; the limit is {limit}")
        return self.rfile.read(length)

    def _api(self, answer: Any) -> None:
        try:
            body, status = answer(), 200
        except WorkbenchError as e:
            body, status = {"error": e.message}, e.status
        except Exception as e:  # noqa: BLE001 - the page shows the reason instead of hanging
            self.log_error("workbench request failed: %r", e)
            body, status = {"error": f"internal error: {type(e).__name__}: {e}"}, 500
        extra = {"Retry-After": "1"} if status == 429 else {}
        self._send(json.dumps(body).encode(), "application/json", status=status, headers=extra)

    # -- routes ---------------------------------------------------------------------------
    def _index(self) -> None:
        html = (frontend_dir() / "index.html").read_text(encoding="utf-8")
        if self.server.js_dir is not None:
            html = local_index_html(html)
        html = workbench_index_html(html)
        self._send(html.encode(), "text/html; charset=utf-8")

    def _data_file(self, name: str) -> Path | None:
        if not is_safe_name(name):
            return None
        return self.server.data_dir / name

    def _graph_file(self, name: str) -> None:
        path = self._data_file(name)
        if path is None or not path.is_file() or not name.endswith(".json"):
            return self.send_error(404)
        raw = path.read_bytes()
        if name != "graph-metadata.json":
            raw = self._served_graph(raw)
        # the viewer fetches graphs with cache "force-cache": a stored copy would hide a Save
        self._send(raw, "application/json", cache="no-store")

    def _served_graph(self, raw: bytes) -> bytes:
        """The graph JSON with its scan pointing at local feature pages (when there are any)
        and each feature node linking to ``feature.html``."""
        try:
            data = json.loads(raw)
            scan = data["metadata"]["scan"]
            slug = data["metadata"]["slug"]
        except (ValueError, KeyError, TypeError):
            return raw
        if isinstance(scan, str) and not scan.startswith("./"):
            folder = scan_dirname(scan)
            if (self.server.data_dir / FEATURES_SUBDIR / folder / INDEX_FILE).is_file():
                data["metadata"]["scan"] = LOCAL_SCAN_PREFIX + folder
        for node in data.get("nodes", []):
            parts = str(node.get("node_id")).split("_")
            if (node.get("feature_type") == "cross layer transcoder" and len(parts) == 3
                    and not node.get("vis_link")):
                query = urllib.parse.urlencode({"slug": slug, "layer": parts[0],
                                                "index": parts[1], "node": node["node_id"]})
                node["vis_link"] = f"./feature.html?{query}"
        return json.dumps(data).encode()

    def _feature(self, folder: str, name: str) -> None:
        if not (is_safe_name(folder) and is_safe_name(name) and name.endswith(".json")):
            return self.send_error(404)
        path = self.server.data_dir / FEATURES_SUBDIR / folder / name
        if path.is_file():
            return self._send(path.read_bytes(), "application/json")
        stem = name[: -len(".json")]
        what = f"feature {stem}"
        if stem.isdigit():
            from clt_lens.circuits.viewer_data import cantor_unpair

            layer, index = cantor_unpair(int(stem))
            what = f"layer {layer} feature {index}"
        folder_dir = path.parent
        why = (f"no feature page for {what} in {FEATURES_SUBDIR}/{folder}/: attribution writes "
               "pages for the graph's own features; write others with "
               "clt_lens.circuits.write_viewer_features(FEATURES_DIR, GRAPH_DIR, scan)"
               if folder_dir.is_dir() else
               f"no feature pages in {FEATURES_SUBDIR}/{folder}/: attribute with "
               "'--features DIR' to write them")
        # isDead (and empty lists) keep the viewer's renderers from throwing; workbench.js
        # shows ``error`` in place of the bundled "failed to load".
        body = {"index": int(stem) if stem.isdigit() else stem, "isDead": True, "error": why,
                "examples_quantiles": [], "top_logits": [], "bottom_logits": []}
        self._send(json.dumps(body).encode(), "application/json", status=404)

    def _vendor(self, name: str) -> None:
        js_dir = self.server.js_dir
        if name == JETPACK_COMPAT:
            from clt_lens.circuits.viewer_compat import JETPACK_COMPAT_JS

            return self._send(JETPACK_COMPAT_JS.encode(), "text/javascript; charset=utf-8")
        if js_dir is None or name not in VIEWER_JS:
            return self.send_error(404)
        self._send((js_dir / name).read_bytes(), "text/javascript; charset=utf-8")

    def _send(self, body: bytes, ctype: str, *, status: int = 200,
              headers: dict[str, str] | None = None, cache: str = "no-cache") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


class ViewerHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], data_dir: Path, js_dir: Path | None,
                 verbose: bool = False, workbench: Workbench | None = None) -> None:
        self.data_dir = data_dir
        self.js_dir = js_dir
        self.verbose = verbose
        self.save_lock = threading.Lock()
        self.workbench = workbench or Workbench(data_dir)
        super().__init__(address, ViewerHandler)


class ViewerServer:
    """A running viewer; ``stop()`` (or leaving a ``with`` block) shuts it down."""

    def __init__(self, httpd: ViewerHTTPServer, thread: threading.Thread | None) -> None:
        self.httpd = httpd
        self.thread = thread

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def __enter__(self) -> ViewerServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def check_data_dir(data_dir: str | Path) -> Path:
    d = Path(data_dir).expanduser().resolve()
    if not d.is_dir():
        raise CircuitsError(f"graph directory {str(d)!r} does not exist")
    meta = d / "graph-metadata.json"
    if not meta.is_file():
        raise CircuitsError(f"{str(d)!r} has no graph-metadata.json: write graphs into it with "
                            "'clt-lens attribute --out DIR' first")
    try:
        graphs = json.loads(meta.read_text()).get("graphs")
    except ValueError as e:
        raise CircuitsError(f"{meta} is not valid JSON: {e}") from e
    if not graphs:
        raise CircuitsError(f"{meta} lists no graphs")
    return d


def serve(
    data_dir: str | Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    js_dir: str | Path | None = None,
    background: bool = True,
    verbose: bool = False,
    read_only: bool = False,
    clt: str | Path | None = None,
    model: str | None = None,
    device: str = "cpu",
) -> ViewerServer:
    """Start the viewer on ``data_dir``. ``port=0`` picks a free port (see ``.url``).

    With ``background`` the server runs in a daemon thread and this returns at once; otherwise
    it serves in this thread until interrupted. Interventions load the transcoders and model
    each graph names (``clt`` / ``model`` override them) on ``device``; ``read_only`` turns
    them off.
    """
    d = check_data_dir(data_dir)
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise CircuitsError(f"port must be in 0..65535, got {port!r}")
    if clt is not None and not Path(clt).expanduser().exists():
        raise CircuitsError(f"--clt {str(clt)!r} does not exist")
    workbench = Workbench(d, read_only=read_only, transcoders=None if clt is None else str(clt),
                          model=model, device=device)
    httpd = ViewerHTTPServer((host, port), d, find_viewer_js(js_dir), verbose, workbench)
    if not background:
        server = ViewerServer(httpd, None)
        try:
            httpd.serve_forever()
        finally:
            httpd.server_close()
        return server
    thread = threading.Thread(target=httpd.serve_forever, daemon=True, name="clt-lens-viewer")
    thread.start()
    return ViewerServer(httpd, thread)


# -- CLI -----------------------------------------------------------------------------------------
