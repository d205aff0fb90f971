"""The demo's ``index.html``: one page that leads to everything ``clt-lens demo`` wrote.

A static UTF-8 page with no third-party scripts (it opens from disk, offline, and keeps working
when the folder is copied: every link is relative): headline numbers, the training curves, the
evaluation as HTML tables, links to each layer's SAE-Dashboard page, the Neuronpedia export,
the feature records, the circuit-tracer set and the attribution graph, how to open the graph
viewer, and a small feature browser. The browser lists the features that have dashboards, with
their explanation (when autointerp ran), top-activating tokens and top logits; a search box
filters them and each row opens the feature's dashboard (``layer_L.html#feature=I``).
"""

from __future__ import annotations

import html
import os
from collections import Counter
from pathlib import Path
from typing import Any

from clt_lens.features.token_text import visible
from clt_lens.fsutil import atomic_write_text

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:1.5em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ddd}
nav a{margin-right:1em} img{max-width:100%;border:1px solid #eee;margin:.4em 0}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{padding:.25em .6em;border-bottom:1px solid #e4e4e4;text-align:left;vertical-align:top}
th{background:#f5f5f5} td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#666;font-size:.9em} code,.tok{font-family:ui-monospace,Menlo,Consolas,monospace}
.tok{white-space:pre;background:#fff3e0;border:1px solid #f0d9b5;border-radius:3px;
padding:0 .25em;margin-right:.25em;font-size:.9em}
.headline{font-size:1.05em;background:#f7f9fc;border:1px solid #e3e8f0;padding:.6em .9em}
#feature-search{width:100%;max-width:520px;padding:.45em;font-size:1em;margin:.4em 0}
pre.cmd{background:#f6f6f6;padding:.5em .8em;overflow:auto}
"""

_SEARCH_JS = """
(function () {
    var box = document.getElementById('feature-search');
    if (!box) return;
    var rows = Array.from(document.querySelectorAll('#feature-table tbody tr'));
    var count = document.getElementById('feature-count');
    function filter() {
        var q = box.value.trim().toLowerCase(), shown = 0;
        rows.forEach(function (r) {
            var hit = !q || r.dataset.search.indexOf(q) >= 0;
            r.hidden = !hit;
            if (hit) shown++;
        });
        count.textContent = shown + ' of ' + rows.length + ' features';
    }
    box.addEventListener('input', filter);
    box.addEventListener('keydown', function (e) {
        if (e.key !== 'Enter') return;
        var first = rows.find(function (r) { return !r.hidden && r.querySelector('a'); });
        if (first) location.href = first.querySelector('a').getAttribute('href');
    });
    filter();
})();
"""


def _rel(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path, out)).as_posix()


def _link(path: Path, out: Path, text: str) -> str:
    return f'<a href="{html.escape(_rel(path, out))}">{html.escape(text)}</a>'


def _tokens_html(tokens: list[str]) -> str:
    return "".join(f'<span class="tok">{html.escape(visible(t))}</span>' for t in tokens)


def feature_rows(features_dir: Path, chosen: dict[int, list[dict[str, Any]]],
                 dashboards: dict[int, Path]) -> list[dict[str, Any]]:
    """One entry per chosen feature record: where its dashboard is, its explanation (if any),
    top tokens (the token at the peak of each top example, most frequent first), top logits."""
    from clt_lens.autointerp import load_explanations

    explanations = load_explanations(features_dir)
    rows = []
    for layer, records in sorted(chosen.items()):
        for rec in sorted(records, key=lambda r: r["index"]):
            peaks = Counter(ex["tokens"][ex["max_pos"]] for ex in rec.get("top_examples", []))
            expl = explanations.get((layer, rec["index"]))
            rows.append({
                "layer": layer, "index": rec["index"],
                "explanation": expl["explanation"] if expl else None,
                "top_tokens": [t for t, _ in peaks.most_common(5)],
                "top_logits": [t for t, _ in rec.get("top_logits", [])[:5]],
                "frac_nonzero": rec["frac_nonzero"], "max_act": rec["max_act"],
                "dashboard": dashboards.get(layer),
            })
    return rows


def _feature_browser(out: Path, rows: list[dict[str, Any]], autointerp_ran: bool) -> str:
    if not rows:
        return "<p>No features were chosen (no feature fired on the held-out tokens).</p>"
    parts = []
    what = "explanation, top token or L2/F17" if autointerp_ran else "top token or L2/F17"
    parts.append(f'<input id="feature-search" type="search" placeholder="search by {what}" '
                 'autocomplete="off"> <span id="feature-count" class="note"></span>')
    if not autointerp_ran:
        parts.append('<p class="note">Autointerp did not run, so there are no explanations: '
                     "set OPENAI_API_KEY (or OPENAI_BASE_URL for a local OpenAI-compatible "
                     "server) and CLT_LENS_AUTOINTERP_MODEL, then rerun the demo.</p>")
    head = ["feature", *(["explanation"] if autointerp_ran else []), "top-activating tokens",
            "top logits"]
    body = []
    for r in rows:
        name = f"L{r['layer']}/F{r['index']}"
        cell = html.escape(name)
        if r["dashboard"] is not None:
            href = f"{_rel(r['dashboard'], out)}#feature={r['index']}"
            cell = f'<a href="{html.escape(href)}">{cell}</a>'
        search = " ".join([name, r["explanation"] or "", *r["top_tokens"], *r["top_logits"]])
        cells = [f"<td>{cell}</td>"]
        if autointerp_ran:
            cells.append(f"<td>{html.escape(r['explanation'] or '–')}</td>")
        cells += [f"<td>{_tokens_html(r['top_tokens'])}</td>",
                  f"<td>{_tokens_html(r['top_logits'])}</td>",
                  f'<td class="num">{r["frac_nonzero"]:.2%}</td>',
                  f'<td class="num">{r["max_act"]:.3g}</td>']
        body.append(f'<tr data-search="{html.escape(search.lower())}">{"".join(cells)}</tr>')
    th = "".join(f"<th>{h}</th>" for h in head)
    parts.append(f'<table id="feature-table"><thead><tr>{th}<th class="num">density</th>'
                 f'<th class="num">max act</th></tr></thead><tbody>{"".join(body)}</tbody>'
                 "</table>")
    return "\n".join(parts)


def _autointerp_html(summary: dict[str, Any] | None) -> str:
    if not summary:
        return ""
    scores = []
    for name, s in (summary.get("scores") or {}).items():
        val = next((v for k, v in s.items() if k.startswith("mean_")), None)
        if val is not None:
            scores.append(f"{html.escape(name)} {val:.3f}")
    feats = summary.get("features", {})
    return (f"<p>Autointerp: {feats.get('explained_total', 0)} features explained by "
            f"<code>{html.escape(str(summary.get('model')))}</code>"
            + (f"; mean scores: {', '.join(scores)}" if scores else "") + ".</p>")


def write_index(
    out: Path, *, result: dict[str, Any], graph: Any, dashboards: dict[int, Path],
    dashboard_note: str | None, features_dir: Path, chosen: dict[int, list[dict[str, Any]]],
    np_export: Path, ct_dir: Path, checkpoint: Path, autointerp: dict[str, Any] | None,
    times: dict[str, float],
) -> Path:
    """Write ``out/index.html`` (see the module docstring) and return its path."""
    from clt_lens.evals.report import html_tables

    out = Path(out)
    r, mean = result["replacement"], result["mean"]
    rows = feature_rows(features_dir, chosen, dashboards)
    images = [(out / "train" / "training_curves.png", "training curves")]
    eval_images = [(out / "eval" / n, a) for n, a in (("eval_layers.png", "per-layer metrics"),
                                                      ("density.png", "feature density"))]

    def imgs(items: list[tuple[Path, str]]) -> str:
        return "".join(f'<img src="{html.escape(_rel(p, out))}" alt="{html.escape(a)}">'
                       for p, a in items if p.is_file())

    dash_items = "".join(
        f"<li>{_link(p, out, f'layer {layer}')} ({len(chosen.get(layer, []))} features)</li>"
        for layer, p in sorted(dashboards.items())
    ) or f"<li>No dashboards: {html.escape(dashboard_note or 'no feature fired')}</li>"
    targets = ", ".join(f"<span class=\"tok\">{html.escape(visible(t))}</span> {p:.0%}"
                        for t, p in (graph.logit_targets or [])[:5])
    times_rows = "".join(f'<tr><td>{html.escape(k)}</td><td class="num">{v:.0f} s</td></tr>'
                         for k, v in times.items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>clt_lens demo: a CLT on the embedded model</title><style>{_CSS}</style></head><body>
<h1>clt_lens demo: a cross-layer transcoder on the embedded model</h1>
<nav><a href="#training">training</a><a href="#evaluation">evaluation</a>
<a href="#features">features</a><a href="#graph">attribution graph</a>
<a href="#files">files</a></nav>
<p class="headline">CE recovered <b>{r['ce_recovered']:.1%}</b>, KL {r['kl']:.4f}, top-1
agreement {r['top1_agreement']:.1%}; mean explained variance
{mean['explained_variance']:.3f} at mean L0 {mean['l0']:.1f} (over
{result.get('n_tokens_reconstruction') or 0:,} held-out tokens).</p>

<h2 id="training">Training</h2>{imgs(images)}

<h2 id="evaluation">Evaluation</h2>
{html_tables(result)}
{imgs(eval_images)}

<h2 id="features">Features</h2>
<p>SAE-Dashboard pages (feature tables, activation histogram, top and quantile examples, logit
tables), one per source layer:</p><ul>{dash_items}</ul>
{_autointerp_html(autointerp)}
{_feature_browser(out, rows, autointerp is not None)}
<p>All feature records: {_link(features_dir, out, _rel(features_dir, out) + "/")}
(<code>layer_LL.jsonl</code>, described in <code>clt_lens/features/format.py</code>);
Neuronpedia export: {_link(np_export, out, _rel(np_export, out) + "/")}.</p>

<h2 id="graph">Attribution graph</h2>
<p>Prompt <code>{html.escape(graph.prompt)}</code>: {graph.n_nodes} nodes and {graph.n_edges}
edges after pruning; replacement score {graph.replacement_score:.3f}, completeness
{graph.completeness_score:.3f}. Top predictions: {targets or "–"}.
Graph file: {_link(graph.json_path, out, _rel(graph.json_path, out))}.</p>
<p>To explore it in circuit-tracer's viewer, run from this folder</p>
<pre class="cmd">clt-lens serve {html.escape(_rel(graph.out_dir, out))}</pre>
<p>and open <a href="http://127.0.0.1:8032/">http://127.0.0.1:8032/</a>. The viewer works
offline once its scripts are installed (<code>clt-lens serve --install-js</code>, one time,
from the npm registry). {_link(out / "viewer_help.html", out, "How to use the viewer")}:
reading the graph, supernodes, and testing it with interventions and steering.</p>

<h2 id="files">Files</h2>
<ul><li>checkpoint (SAELens folder): {_link(checkpoint, out, _rel(checkpoint, out) + "/")}</li>
<li>evaluation: {_link(out / "eval" / "eval.json", out, "eval/eval.json")}</li>
<li>circuit-tracer transcoder set: {_link(ct_dir, out, _rel(ct_dir, out) + "/")}</li></ul>
<table><thead><tr><th>stage</th><th class="num">time</th></tr></thead>
<tbody>{times_rows}</tbody></table>
<script>{_SEARCH_JS}</script>
</body></html>
"""
    path = out / "index.html"
    atomic_write_text(path, page)
    return path

