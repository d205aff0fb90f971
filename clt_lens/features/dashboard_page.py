"""Turn SAE-Dashboard's HTML into a page that opens anywhere, offline.

sae-dashboard 0.8.0 writes an HTML fragment (no doctype, no character set) that loads d3 v6
and plotly from CDNs: opened offline it is a blank box, and a browser reading it as
windows-1252 garbles every non-ASCII character (plotly's minus signs show as "â^"). This module
wraps the fragment in a UTF-8 document, inlines the pinned copies of those two scripts (from
``clt_lens.vendor_js``), so one file is the whole page, and refuses to write a page that would
still load anything from the network.

Two small additions to the page's own script: hover cards quote a token as text, not markup
(sae-dashboard pastes token strings into ``innerHTML``, so a token "<b>" would turn the card
bold), and ``layer_3.html#feature=17`` opens the page at feature 17 (the dropdown keeps the
address in step, so a link can be copied).
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from clt_lens.errors import CLTLensError
from clt_lens.vendor_js import DASHBOARD_SCRIPTS, SCRIPTS, find_js_dir, install_hint, read_script

# Script file name in sae-dashboard's page -> our pinned copy.
CDN_TO_LOCAL = {"d3.v6.min.js": "d3.v6.min.js", "plotly-latest.min.js": "plotly-basic.min.js"}
_CDN_SCRIPT = re.compile(r"""<script\s+src=["']((?:https?:)?//[^"']+)["']\s*>\s*</script>""")
_REMOTE_REF = re.compile(
    r"""<(?:script|link|img|iframe|source)\b[^>]*\b(?:src|href)\s*=\s*["']?((?:https?:)?//[^"'\s>]+)""",
    re.IGNORECASE,
)
# (what sae-dashboard's tokenScript.js writes into innerHTML, the escaped form)
_TOOLTIP_PATCHES = [
    ("<code>${tok}</code>", "<code>${cltLensEscape(tok)}</code>"),
    ("`|${tok}|<br>", "`|${cltLensEscape(tok)}|<br>"),
]

_HELPERS_JS = """
function cltLensEscape(s) {
    return String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}
"""

# After sae-dashboard's own DOMContentLoaded handler (registered first) has built the dropdown.
_FEATURE_LINK_JS = """
document.addEventListener("DOMContentLoaded", function () {
    var select = document.getElementById('select-0');
    if (!select) return;
    function showHashFeature() {
        var m = /^#(?:feature=)?(\\d+)$/.exec(decodeURIComponent(location.hash));
        if (!m || select.value === m[1]) return;
        if (!Array.from(select.options).some(function (o) { return o.value === m[1]; })) return;
        select.value = m[1];
        select.dispatchEvent(new Event('change'));
    }
    select.addEventListener('change', function () {
        try { history.replaceState(null, '', '#feature=' + select.value); } catch (e) {}
    });
    window.addEventListener('hashchange', showHashFeature);
    showHashFeature();
});
"""


class OfflinePageError(CLTLensError, ValueError):
    """The page would need the network (an unknown remote script), or a script is missing."""


def dashboard_scripts(js_dir: str | Path | None = None) -> dict[str, str]:
    """The pinned d3 v6 and plotly texts for inlining, checked against their sha256.

    Raises OfflinePageError, saying how to install them, when they are not installed: a
    dashboard written without them would be a blank page offline.
    """
    d = find_js_dir(DASHBOARD_SCRIPTS, js_dir)
    if d is None:
        raise OfflinePageError(
            "SAE-Dashboard pages need d3 v6 and plotly, which are inlined so the pages work "
            f"offline, and they are not installed: {install_hint(DASHBOARD_SCRIPTS)}"
        )
    return {name: read_script(name, d) for name in DASHBOARD_SCRIPTS}


def offline_page(fragment: str, scripts: dict[str, str], *, title: str,
                 header_html: str = "") -> str:
    """A complete UTF-8 HTML document from sae-dashboard's ``fragment`` with its CDN scripts
    replaced by the inlined ``scripts`` (from ``dashboard_scripts``)."""

    def inline(m: re.Match[str]) -> str:
        base = m.group(1).rsplit("/", 1)[-1]
        local = CDN_TO_LOCAL.get(base)
        if local is None:
            raise OfflinePageError(f"the SAE-Dashboard page loads {m.group(1)}, which clt_lens "
                                   "has no pinned copy of; it would not render offline")
        code = scripts[local]
        if "</script" in code.lower():
            raise OfflinePageError(f"{local} cannot be inlined: it contains '</script'")
        return f"<script>/* {SCRIPTS[local][0]} ({local}), inlined */\n{code}\n</script>"

    body = _CDN_SCRIPT.sub(inline, fragment)
    remote = _REMOTE_REF.findall(body)
    if remote:
        raise OfflinePageError(f"the SAE-Dashboard page still loads {remote[:3]} from the network")
    for old, new in _TOOLTIP_PATCHES:
        body = body.replace(old, new)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n"
        "<style>body{margin:0 10px;font-family:system-ui,sans-serif}"
        ".clt-lens-header{margin:12px 10px 0;color:#333;font-size:14px}</style>\n"
        f"<script>{_HELPERS_JS}</script>\n</head>\n<body>\n"
        f"<div class=\"clt-lens-header\">{header_html}</div>\n{body}\n"
        f"<script>{_FEATURE_LINK_JS}</script>\n</body>\n</html>\n"
    )
