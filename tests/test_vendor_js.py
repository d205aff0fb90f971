"""The pinned page scripts (clt_lens.vendor_js): install from `npm pack` tarballs with sha256
checks, against a stand-in `npm` (no network), and read back only when unaltered."""

from __future__ import annotations

import io
import stat
import sys
import tarfile
from pathlib import Path

import pytest

from clt_lens.vendor_js import (
    DASHBOARD_SCRIPTS,
    SCRIPTS,
    ScriptsError,
    find_js_dir,
    install_js,
    read_script,
)


def _fake_npm(tmp_path: Path, contents: dict[str, bytes]) -> str:
    """An `npm` whose `pack SPEC` writes a tarball holding contents[SPEC] at the pinned path."""
    store = tmp_path / "store"
    store.mkdir()
    for spec, data in contents.items():
        member = next(m for s, m, _ in SCRIPTS.values() if s == spec)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name, payload in ((member, data), ("package/LICENSE", b"licence text")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        (store / spec.replace("/", "_")).write_bytes(buf.getvalue())
    npm = tmp_path / "npm"
    npm.write_text(
        f"#!{sys.executable}\n"
        "import shutil, sys\n"
        "spec = sys.argv[2]\n"
        f"src = {str(store)!r} + '/' + spec.replace('/', '_')\n"
        "shutil.copy(src, 'pkg.tgz')\n"
        "print('pkg.tgz')\n"
    )
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    return str(npm)


def test_install_checks_sha256_and_keeps_pinned_files(tmp_path):
    d3_spec = SCRIPTS["d3.v6.min.js"][0]
    npm = _fake_npm(tmp_path, {d3_spec: b"not d3"})
    dest = tmp_path / "js"
    with pytest.raises(ScriptsError, match="expected sha256"):
        install_js(dest, npm=npm, names=["d3.v6.min.js"])
    assert not (dest / "d3.v6.min.js").exists()
    with pytest.raises(ScriptsError, match="unknown scripts"):
        install_js(dest, npm=npm, names=["jquery.js"])
    with pytest.raises(ScriptsError, match="not found"):
        install_js(dest, npm=str(tmp_path / "no-npm"), names=["d3.v6.min.js"])


def test_install_and_read_the_real_files(tmp_path, monkeypatch):
    cache = find_js_dir(DASHBOARD_SCRIPTS)
    if cache is None:
        pytest.skip("the pinned scripts are not installed: run 'clt-lens serve --install-js'")
    real = {SCRIPTS[n][0]: (cache / n).read_bytes() for n in DASHBOARD_SCRIPTS}
    npm = _fake_npm(tmp_path, real)
    dest = tmp_path / "js"
    assert install_js(dest, npm=npm, names=DASHBOARD_SCRIPTS) == dest.resolve()
    for name in DASHBOARD_SCRIPTS:
        assert (dest / name).read_bytes() == (cache / name).read_bytes()
        assert (dest / f"LICENSE-{SCRIPTS[name][0]}").read_bytes() == b"licence text"
        assert read_script(name, dest)
    # present and pinned: nothing is fetched again (npm is not even looked up)
    assert install_js(dest, npm=str(tmp_path / "no-npm"), names=DASHBOARD_SCRIPTS)
    # found through $CLT_LENS_VIEWER_JS; an altered copy is refused when read
    monkeypatch.setenv("CLT_LENS_VIEWER_JS", str(dest))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    assert find_js_dir(DASHBOARD_SCRIPTS) == dest.resolve()
    with open(dest / "d3.v6.min.js", "ab") as f:
        f.write(b"\n;window.evil = 1;")
    with pytest.raises(ScriptsError, match="sha256"):
        read_script("d3.v6.min.js", dest)
