"""The ``index.html`` of an evaluation: pictures first (what the net looked at, misclassified films flagged),
then the numbers. Self-contained, relative links only, no network."""

from __future__ import annotations

import html
import os
from collections.abc import Sequence

from xraydeconv.io import write_atomically
from xraydeconv.reports.gallery import STYLE, card_html
from xraydeconv.reports.numbers import DASH, fixed, pct, pp, ratio

__all__ = ["write_index", "evaluate_index_html", "landmark_rows_html", "methods_html"]


def landmark_rows_html(lm: dict | None, top_n: int) -> str:
    """The landmark agreement of a report as an HTML table (combined map, single filter, baseline, marker)."""
    if not lm or "overall" not in lm:
        return "<p>No landmark masks: nothing to score.</p>"
    head = ("<tr><th></th><th>Pointing game</th><th>± tol.</th><th>Relevance mass</th><th>Area share</th>"
            "<th>Relevance rank</th><th>Images</th></tr>")
    rows = [(f"combined top-{top_n} map", lm["overall"]), ("the film itself as heat map", lm.get("baseline_image")),
            ("marker (planted shortcut)", lm.get("marker"))]
    body = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{pct(s['pointing_game'])}</td>"
        f"<td>{pct(s.get('pointing_game_tolerant'))}</td><td>{pct(s['relevance_mass'])}</td>"
        f"<td>{pct(s['area_share'])}</td><td>{pct(s['relevance_rank'])}</td><td>{s['n']}</td></tr>"
        for label, s in rows if s)
    return f"<table>{head}{body}</table>"


def methods_html(table: dict | None, sanity: dict | None) -> str:
    """The method comparison (pointing game per landmark set and its gain over the film, mass / area, marker,
    similarity after randomisation) as an HTML table, with the sanity figures when the test ran."""
    if not table:
        return ""
    sets = table["sets"]
    head = "".join(f"<th>Pointing game, {html.escape(n)}</th><th>vs film</th>" for n in sets)
    marked = any(r.get("marker") for r in table["rows"].values())
    head = (f"<tr><th>Method</th>{head}<th>Mass / area</th><th>vs film</th>{'<th>Marker</th>' if marked else ''}"
            "<th>Randomised</th></tr>")
    body = []
    for method in table["methods"]:
        r = table["rows"][method]
        cells = "".join(f"<td>{pct(r[n]['pointing_game'])}</td><td>{pp(r[n].get('pointing_game_gain'))}</td>"
                        if r.get(n) else f"<td>{DASH}</td><td>{DASH}</td>" for n in sets)
        a, m, rnd = r.get("all"), r.get("marker"), r.get("randomised")
        cells += (f"<td>{ratio(a['mass_over_area']) if a else DASH}</td>"
                  f"<td>{ratio(a.get('mass_gain')) if a else DASH}</td>"
                  + (f"<td>{pct(m['pointing_game']) if m else DASH}</td>" if marked else "")
                  + f"<td>{fixed((rnd or {}).get('spearman'))}</td>")
        name = f"<b>{html.escape(method)}</b>" if method == table["baseline"] else html.escape(method)
        body.append(f"<tr><td>{name}</td>{cells}</tr>")
    out = (f"<h2>Methods compared</h2><p>Each method's map against the landmarks, beside the film itself used as "
           f"the map (<b>{html.escape(table['baseline'])}</b>); <i>Randomised</i>: Spearman correlation with the "
           "map of the net with every layer re-initialised (near 1: the map hardly depends on the weights).</p>"
           f"<table>{head}{''.join(body)}</table>")
    if sanity:
        out += ("<h2>Sanity check: model-parameter randomisation</h2>"
                f"<p>{sanity['images']} films, layers re-initialised from the output down.</p>"
                '<img src="sanity.png" alt="maps as the layers are randomised" style="max-width:100%">'
                '<img src="sanity_curves.png" alt="similarity per randomised layer" style="max-width:100%">')
    return out


def evaluate_index_html(report: dict, misclassified: Sequence[dict], examples: Sequence[dict]) -> str:
    """The evaluation's front page: misclassified films and correct examples with their heat, then the tables."""
    ck, d = report["checkpoint"], report["data"]
    top_n = report["options"]["top_n"]
    esc = html.escape
    cards = "\n".join([card_html(r, "misclassified/") for r in misclassified[:8]]
                      + [card_html(r, "examples/") for r in examples])
    if not cards:
        cards = "<p>No projections were drawn (no landmark masks and nothing misclassified).</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation of {esc(ck['model'])}</title>
<style>{STYLE}
table{{border-collapse:collapse;margin:.5em 0 1.5em}}td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:right}}
td:first-child{{text-align:left}}</style></head>
<body>
<header><h1>{esc(ck['model'])} on {esc(d['split'])}: accuracy {pct(report['accuracy'])}</h1>
<span>{report['misclassified_count']} of {d['images']} misclassified ·
<a href="misclassified/index.html">all misclassified</a> · <a href="examples/index.html">correct examples</a> ·
<a href="report.md">report.md</a> · <a href="report.json">report.json</a></span></header>
<h2>What the net looked at (top-{top_n} filters; misclassified first)</h2>
<div id="cards">
{cards}
</div>
<h2>Landmark agreement</h2>
{landmark_rows_html(report.get('landmarks'), top_n)}
{methods_html(report.get('methods'), report.get('sanity'))}
<h2>Confusion matrix</h2>
<img src="confusion.png" alt="confusion matrix" style="max-width:100%">
</body></html>
"""


def write_index(path: str | os.PathLike, report: dict, misclassified: Sequence[dict],
                examples: Sequence[dict]) -> None:
    """Write :func:`evaluate_index_html` to ``path`` atomically."""
    page = evaluate_index_html(report, misclassified, examples)
    write_atomically(path, lambda f: f.write(page), mode="w", encoding="utf-8")
