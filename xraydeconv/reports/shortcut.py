"""The demo's planted shortcut: a net trained on phantoms that carry a class-specific lead marker
(``--bias marker``), evaluated on biased validation films and clean test films.

It is the positive control of the method comparison: a method that explains the net must put more of its heat on
the marker that the net reads than the film itself (the baseline) does. The marker is bright lead, so the film's own
hottest pixel often lies on it: the share of heat on the marker over its area, not the pointing game, tells the
methods from the film.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from pathlib import Path

from xraydeconv.reports.numbers import pct, ratio

__all__ = ["SHORTCUT_DIR", "SHORTCUT_MODEL", "run_shortcut", "shortcut_markdown", "shortcut_html"]

SHORTCUT_DIR = "shortcut"
SHORTCUT_MODEL = "deeper"  # the net of Table 1 that learns the task without augmentation


def run_shortcut(out: Path, make_config: Callable[[str, Path], object], phantoms: dict, top_n: int,
                 methods: Sequence[str], progress: bool = True) -> dict:
    """Generate (or reuse) the biased phantoms, train ``deeper`` on them into ``out/shortcut/deeper`` (resuming
    a finished run only re-scores it), and evaluate it on the biased val split with ``methods`` and on the clean
    test split. ``phantoms``: ``ensure_phantoms``' per_class, size and seed. Returns ``{"val": report, "test":
    report}``."""
    from xraydeconv.data.phantoms import ensure_phantoms
    from xraydeconv.reports.evaluate import EvalOptions, evaluate
    from xraydeconv.training.loop import train

    data = ensure_phantoms(**phantoms, bias="marker", progress=progress)
    root = out / SHORTCUT_DIR
    root.mkdir(parents=True, exist_ok=True)
    train(make_config(SHORTCUT_MODEL, data), root / SHORTCUT_MODEL, resume=True, progress=progress)
    ckpt = root / SHORTCUT_MODEL / "best.pt"
    val = evaluate(ckpt, root / "eval-val", data, EvalOptions(split="val", top_n=top_n, methods=tuple(methods),
                                                              max_misclassified=0, examples=4),
                   overwrite=True, progress=progress)
    test = evaluate(ckpt, root / "eval-test", data, EvalOptions(split="test", top_n=top_n, max_misclassified=0,
                                                                examples=0), overwrite=True, progress=progress)
    return {"val": val, "test": test}


def _rows(result: dict) -> list[tuple[str, str, str, str]]:
    """Per method: pointing game on the marker, marker mass over its area, pointing game on the landmarks."""
    table = result["val"].get("methods") or {"methods": [], "rows": {}}
    rows = []
    for method in table["methods"]:
        r = table["rows"][method]
        m, a = r.get("marker") or {}, r.get("all") or {}
        rows.append((method, pct(m.get("pointing_game")), ratio(m.get("mass_over_area")), pct(a.get("pointing_game"))))
    return rows


def _accuracy_line(result: dict) -> str:
    return (f"`{SHORTCUT_MODEL}` trained on films with a class-specific lead marker: accuracy "
            f"{pct(result['val']['accuracy'])} on biased validation films, {pct(result['test']['accuracy'])} "
            "on clean test films.")


def shortcut_markdown(result: dict) -> str:
    """The shortcut table: does each method put its heat on the marker of the biased validation films?"""
    lines = [_accuracy_line(result), "",
             "| Method | Pointing game on the marker | Marker mass / its area | Pointing game on the landmarks |",
             "|---|---:|---:|---:|"]
    lines += [f"| {m} | {pg} | {mass} | {lm} |" for m, pg, mass, lm in _rows(result)]
    return "\n".join(lines) + "\n"


def shortcut_html(result: dict, out: Path) -> str:
    """The shortcut section of the demo's page: the table and the landmark views of a few biased films (the
    marker in its box), linking to their pages."""
    esc = html.escape
    head = ("<tr><th>Method</th><th>Pointing game on the marker</th><th>Marker mass / its area</th>"
            "<th>Pointing game on the landmarks</th></tr>")
    body = "".join(f"<tr><td>{esc(m)}</td><td>{pg}</td><td>{mass}</td><td>{lm}</td></tr>"
                   for m, pg, mass, lm in _rows(result))
    figs = []
    for folder in sorted(p for p in (out / SHORTCUT_DIR / "eval-val" / "examples").glob("*") if p.is_dir()):
        rel = f"{SHORTCUT_DIR}/eval-val/examples/{folder.name}"
        if (folder / "landmarks.png").is_file():
            figs.append(f'<figure class="wide"><a href="{esc(rel)}/index.html"><img src="{esc(rel)}/landmarks.png" '
                        f'alt="{esc(folder.name)}"></a><figcaption>{esc(folder.name)}</figcaption></figure>')
    return (f"<p>{esc(_accuracy_line(result).replace('`', ''))} A method that follows the net puts more of its "
            "heat on the marker (mass over the marker's area) than the film itself does (the last row); the marker "
            "is bright lead, so the film's own hottest pixel often lies on it too.</p>"
            f"<table>{head}{body}</table>{''.join(figs)}"
            f'<p><a href="{SHORTCUT_DIR}/eval-val/index.html">the biased validation evaluation</a> · '
            f'<a href="{SHORTCUT_DIR}/eval-test/index.html">the clean test evaluation</a></p>')
