"""Third-party browser scripts, pinned on the npm registry, so that every page works offline.

circuit-tracer's viewer loads d3 v7, dagre and pako from CDNs; SAE-Dashboard's pages load d3 v6
and plotly. ``clt-lens serve --install-js`` fetches all of them once with ``npm pack`` into a
folder (``$CLT_LENS_VIEWER_JS``, else ``~/.cache/clt_lens/viewer-js``) and checks each file's
sha256. The viewer serves them from that folder (``clt_lens.serve``); dashboards inline them into
each page (``clt_lens.features.dashboard_page``), so a copied page still renders.

Versions: the viewer's are the ones its ``index.html`` names. SAE-Dashboard 0.8.0 asks for
``d3.v6`` and ``plotly-latest``, which the CDN froze at plotly 1.58.5; its pages draw only bar
charts, so plotly's "basic" bundle (bar, scatter, pie) of that release is enough.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

from clt_lens.errors import CLTLensError
from clt_lens.fsutil import atomic_write_bytes

# Local file name -> (npm package@version, file inside the package tarball, sha256 of that file).
SCRIPTS: dict[str, tuple[str, str, str]] = {
    "d3.min.js": ("d3@7.9.2", "package/dist/d3.min.js",
                  "912111098ea99503a6f4967361d2bbdc9dbf58cf9c678c8e27e5b02d1a07f0c1"),
    "dagre.min.js": ("dagre@0.8.5", "package/dist/dagre.min.js",
                     "62eb9787ccfdbdf4148d4d99d31dbf9ee4770eafee81e637d759b52aac22cd51"),
    "pako.min.js": ("pako@2.1.0", "package/dist/pako.min.js",
                    "ede2693a4a6a5126b9d35669062b358ecab6ae7b9b86a1cf302feb45a8514907"),
    "d3.v6.min.js": ("d3@6.7.0", "package/dist/d3.min.js",
                     "fbb8da602a76f4ed49bac3561da62d8149fa121b8fd15685bacc21355d3a3322"),
    "plotly-basic.min.js": ("plotly.js-basic-dist-min@1.58.5", "package/plotly-basic.min.js",
                            "75e92469b4c54da6c7ed5286841d69ffe47bbfb4ded1624d2e1e2afa0596362d"),
}
VIEWER_SCRIPTS = ("d3.min.js", "dagre.min.js", "pako.min.js")
DASHBOARD_SCRIPTS = ("d3.v6.min.js", "plotly-basic.min.js")
ENV_VAR = "CLT_LENS_VIEWER_JS"
INSTALL_COMMAND = "clt-lens serve --install-js"


class ScriptsError(CLTLensError, ValueError):
    """A pinned script is missing, altered, or could not be fetched; the message says what to do."""


def install_hint(names: Iterable[str] = tuple(SCRIPTS)) -> str:
    return (f"run '{INSTALL_COMMAND}' once (needs npm and access to the npm registry; it fills "
            f"{default_js_dir()}), or set ${ENV_VAR} to a folder holding {', '.join(names)}")


def default_js_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "clt_lens" / "viewer-js"


def find_js_dir(names: Iterable[str], js_dir: str | Path | None = None) -> Path | None:
    """The first folder holding every file in ``names``: ``js_dir``, then ``$CLT_LENS_VIEWER_JS``,
    then the user cache; None if none does. An explicit ``js_dir`` must be complete."""
    names = list(names)
    if js_dir is not None:
        d = Path(js_dir).expanduser()
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
            raise ScriptsError(f"{str(d)!r} lacks {missing}; fill it with "
                               f"'{INSTALL_COMMAND} --js-dir {d}'")
        return d.resolve()
    for cand in (os.environ.get(ENV_VAR), default_js_dir()):
        if cand and all((Path(cand) / n).is_file() for n in names):
            return Path(cand).resolve()
    return None


def read_script(name: str, js_dir: Path) -> str:
    """The text of pinned script ``name`` from ``js_dir``, after checking its sha256 (the file
    goes into pages people share, so an altered copy must not slip in)."""
    data = (Path(js_dir) / name).read_bytes()
    if hashlib.sha256(data).hexdigest() != SCRIPTS[name][2]:
        raise ScriptsError(f"{Path(js_dir) / name} is not {SCRIPTS[name][0]}'s file (sha256 "
                           f"differs); reinstall it: {install_hint([name])}")
    return data.decode("utf-8")


def install_js(dest: str | Path | None = None, *, npm: str = "npm",
               names: Iterable[str] | None = None) -> Path:
    """Fetch the pinned scripts (all by default) from the npm registry into ``dest``.

    Files already there with the right sha256 are kept; only the pinned file and the package's
    LICENSE are extracted from each tarball, and a file is renamed into place only after its
    sha256 matched.
    """
    dest = Path(dest).expanduser() if dest is not None else default_js_dir()
    wanted = list(SCRIPTS) if names is None else list(names)
    unknown = [n for n in wanted if n not in SCRIPTS]
    if unknown:
        raise ScriptsError(f"unknown scripts {unknown}; known: {list(SCRIPTS)}")
    todo = [n for n in wanted if not _has_pinned(dest / n)]
    if not todo:
        return dest.resolve()
    exe = shutil.which(npm)
    if exe is None:
        raise ScriptsError(f"{npm!r} not found: install Node.js/npm, or put {todo} in a folder "
                           f"and point ${ENV_VAR} (or --js-dir) at it")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="clt-lens-js-") as tmp:
        for name in todo:
            spec, member, sha = SCRIPTS[name]
            proc = subprocess.run([exe, "pack", spec, "--silent"], cwd=tmp, capture_output=True,
                                  text=True, timeout=600)
            if proc.returncode != 0:
                raise ScriptsError(f"npm pack {spec} failed: {proc.stderr.strip()[-500:]}")
            tarball = Path(tmp) / proc.stdout.strip().splitlines()[-1]
            with tarfile.open(tarball) as tar:
                data = _read_member(tar, member)
                licence = _read_member(tar, "package/LICENSE", required=False)
            if hashlib.sha256(data).hexdigest() != sha:
                raise ScriptsError(f"{spec}:{member} does not have the expected sha256")
            _write_bytes(dest / name, data)
            if licence is not None:
                _write_bytes(dest / f"LICENSE-{spec}", licence)
    return dest.resolve()


def _has_pinned(path: Path) -> bool:
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == \
        SCRIPTS[path.name][2]


def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)


def _read_member(tar: tarfile.TarFile, member: str, required: bool = True) -> bytes | None:
    try:
        f = tar.extractfile(member)
    except KeyError:
        f = None
    if f is None:
        if required:
            raise ScriptsError(f"{member} not found in the npm package")
        return None
    return f.read()
