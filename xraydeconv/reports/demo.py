"""The whole story in one command (``xraydeconv demo``): phantoms, the three nets of Table 1, their projections,
landmark agreement and a gallery to open in a browser.

Steps, each reusing what an earlier run in the same folder already finished:

1. generate the synthetic phantoms (or reuse them from the cache);
2. train ``shallow``, ``deeper`` and ``deeper-aug`` (``xraydeconv.training.table1``) and print Table 1;
3. evaluate every net on the test split (``xraydeconv.reports.evaluate``): accuracy, landmark agreement, misclassified
   images with their projections, the attribution methods compared on the same films beside the film itself, and
   the randomisation sanity test;
4. project the top-n filters of every net for a sample of test images (one per class) into a gallery;
5. a planted shortcut (``xraydeconv.reports.shortcut``): ``deeper`` trained on phantoms with a class-specific marker,
   and how much of each method's heat lies on the marker, beside the film's;
6. write the comparison of the three nets (``landmarks.md``, ``methods.md``) and an ``index.html`` over everything.

Sizes: the default preset (``TrainConfig.demo``) is sized for a 2-core CPU (its run time is in
docs/evaluation.md); ``full`` is the 256-pixel run (GPU recommended); ``quick`` is a tiny run for tests.
"""

from __future__ import annotations

import html
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from xraydeconv.errors import UserError
from xraydeconv.io import check_output_folder, write_atomically, write_json
from xraydeconv.reports.numbers import fixed, pct, pp, ratio

__all__ = ["DemoSettings", "PRESETS", "run_demo", "landmark_table_markdown"]

SETTINGS_FILE = "demo.json"
LANDMARKS_MD, LANDMARKS_JSON, INDEX = "landmarks.md", "landmarks.json", "index.html"
METHODS_MD, SHORTCUT_MD = "methods.md", "shortcut.md"
# the methods every net is evaluated with; the film itself is always added as the baseline
DEMO_METHODS = ("deconvnet", "guided", "gradient", "gradcam", "occlusion")


@dataclass(frozen=True)
class DemoSettings:
    """What one demo run is: the preset, its data and its projection settings (stored in ``demo.json``)."""

    preset: str = "demo"  # "demo" | "full" | "quick"
    top_n: int = 25
    sample_per_class: int = 1
    phantom_seed: int = 0
    seed: int = 0


# preset -> (TrainConfig factory name, overrides of the training configuration)
PRESETS: dict[str, tuple[str, dict]] = {
    "demo": ("demo", {}),
    "full": ("full", {}),
    # a tiny run that exercises every step: 32 px phantoms, 2 training images per class, one epoch
    "quick": ("demo", {"epochs": 1, "input_size": 32, "phantoms_per_class": 2, "batch_size": 16,
                       "checkpoint_every": 0}),
}


def _train_config(settings: DemoSettings, model: str, data: Path):
    from xraydeconv.training.loop import TrainConfig

    factory, overrides = PRESETS[settings.preset]
    make = TrainConfig.demo if factory == "demo" else TrainConfig.full
    return make(model, **{**overrides, "seed": settings.seed, "phantom_seed": settings.phantom_seed,
                          "data": str(data)})


def _check_settings(out: Path, settings: DemoSettings) -> None:
    """A demo folder holds one kind of run: refuse to mix presets (training would silently resume the other)."""
    f = out / SETTINGS_FILE
    if f.is_file():
        try:
            old = json.loads(f.read_text())
        except (OSError, ValueError):
            raise UserError(f"{f}: unreadable; remove it or choose another --out") from None
        if old != asdict(settings):
            diff = ", ".join(f"{k}={old.get(k)!r}" for k in asdict(settings) if old.get(k) != asdict(settings)[k])
            raise UserError(f"{out}: holds a demo run with other settings ({diff}); choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists, is not empty and holds no demo run; choose another --out")


def _write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda f: f.write(text), mode="w", encoding="utf-8")


def _sample(ds, per_class: int) -> list[int]:
    """The first ``per_class`` images of every class, in class order."""
    picked: dict[int, list[int]] = {}
    for i, r in enumerate(ds.records):
        lst = picked.setdefault(int(r.label), [])
        if len(lst) < per_class:
            lst.append(i)
    return [i for c in sorted(picked) for i in picked[c]]


def project_sample(ckpt_path: Path, data: Path, out: Path, top_n: int, per_class: int, progress: bool = True,
                   split: str = "test") -> int:
    """Project the top-n filters of a checkpoint for a per-class sample of a split into ``out`` (a gallery).

    The folder is built beside ``out`` and moved into place at the end. Returns the number of images.
    """
    from xraydeconv.data import open_dataset
    from xraydeconv.explain.deconvnet import DeconvNet
    from xraydeconv.reports.pipeline import ImageSource, Net, ProjectSettings, manifest_base, project_into
    from xraydeconv.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    ds = open_dataset(data, split=split, input_size=ckpt.input_size)
    dn = DeconvNet(ckpt.model)
    settings = ProjectSettings(top_n=min(top_n, dn.layer_channels(-1)), batch_size=8)
    source = ImageSource.from_dataset(ds, _sample(ds, per_class))
    net = Net.make(dn, manifest_base(ckpt_path, ckpt, dn, dn.resolve_layer(-1), settings), ckpt.class_names)
    out.parent.mkdir(parents=True, exist_ok=True)
    project_into(out, source, net, settings, torch.device("cpu"), title=f"xraydeconv projections: {ckpt.model_name}",
                 info={"model": ckpt.model_name, "top-n": settings.top_n, "split": split}, progress=progress,
                 desc=f"projecting {ckpt.model_name}")
    return len(source)


def landmark_table_markdown(reports: dict[str, dict], top_n: int) -> str:
    """The three nets side by side: accuracy and landmark agreement of the combined top-n map (and per filter)."""
    lines = [
        f"| Model | Test accuracy | Pointing game (top-{top_n}) | Pointing game ± tol. | Relevance mass | Area share "
        "| Mass / area | Relevance rank | Pointing game (single filter) | Images |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rep in reports.items():
        lm = rep.get("landmarks") or {}
        o = lm.get("overall") or {}
        pf = lm.get("per_filter") or {}
        lines.append(
            f"| `{name}` | {pct(rep['accuracy'])} | {pct(o.get('pointing_game'))} "
            f"| {pct(o.get('pointing_game_tolerant'))} | {pct(o.get('relevance_mass'))} "
            f"| {pct(o.get('area_share'))} | {ratio(o.get('mass_over_area'))} "
            f"| {pct(o.get('relevance_rank'))} | {pct(pf.get('pointing_game'))} | {o.get('n', 0)} |"
        )
    base = next((r["landmarks"]["baseline_image"] for r in reports.values()
                 if (r.get("landmarks") or {}).get("baseline_image")), None)
    if base is not None:
        lines.append(
            f"| the image itself (no net) | | {pct(base['pointing_game'])} "
            f"| {pct(base.get('pointing_game_tolerant'))} | {pct(base['relevance_mass'])} "
            f"| {pct(base['area_share'])} | {ratio(base['mass_over_area'])} "
            f"| {pct(base['relevance_rank'])} | | {base['n']} |"
        )
    return "\n".join(lines) + "\n"


def methods_table_markdown(reports: dict[str, dict]) -> str:
    """The method comparison of the nets side by side: per net and method the pointing game on all and on the
    discriminative landmarks, their gain over the film, and the rank correlation after randomisation."""
    lines = ["| Model | Method | Pointing game (all) | vs film | Pointing game (discriminative) | vs film "
             "| Mass / area vs film | Rank corr. after randomisation |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, rep in reports.items():
        table = rep.get("methods") or {"methods": [], "rows": {}}
        for method in table["methods"]:
            r = table["rows"][method]
            a, d = r.get("all") or {}, r.get("discriminative") or {}
            lines.append(f"| `{name}` | {method} | {pct(a.get('pointing_game'))} | {pp(a.get('pointing_game_gain'))} "
                         f"| {pct(d.get('pointing_game'))} | {pp(d.get('pointing_game_gain'))} "
                         f"| {ratio(a.get('mass_gain'))} | {fixed((r.get('randomised') or {}).get('spearman'))} |")
    return "\n".join(lines) + "\n"


def _md_table(md: str, extra: dict[str, str] | None = None) -> str:
    """A Markdown table as HTML; ``extra`` adds a last column, keyed by the row's first cell."""
    rows = [r for r in md.strip().splitlines() if r.startswith("|") and not set(r) <= set("|-: ")]
    cells = [[c.strip().replace("`", "") for c in r.strip("|").split("|")] for r in rows]
    if not cells:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0]) + ("<th>one film</th>" if extra else "")
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r)
                   + (f"<td>{extra.get(r[0], '')}</td>" if extra else "") + "</tr>" for r in cells[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _rows(gallery: Path) -> list[dict]:
    f = gallery / "gallery.json"
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else []


def _figure(href: str, src: str, caption: str, cls: str = "") -> str:
    esc = html.escape
    return (f'<figure class="{cls}"><a href="{esc(href, quote=True)}"><img src="{esc(src, quote=True)}" '
            f'alt="{esc(caption, quote=True)}"></a><figcaption>{esc(caption)}</figcaption></figure>')


def _comparison(models: list[str], galleries: dict[str, list[dict]], films: int = 6) -> str:
    """Fig. 3 as a table: sample films (rows) and each net's heat on them (columns)."""
    first = galleries[models[0]]
    step = max(1, len(first) // films)
    picked = [r["folder"] for r in first[::step][:films]]
    head = "<tr><th>film</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in models) + "</tr>"
    body = []
    for folder in picked:
        cells = []
        for m in models:
            row = next((r for r in galleries[m] if r["folder"] == folder), None)
            if row is None:
                cells.append("<td></td>")
                continue
            man = row["manifest"]
            cap = f"{man.get('predicted_class')} {100 * man.get('predicted_probability', 0):.0f} %"
            cls = "wrong" if man.get("predicted_class") != man.get("true_class") else ""
            cells.append("<td>" + _figure(f"gallery/{m}/{folder}/index.html", f"gallery/{m}/{folder}/thumb.jpg",
                                          cap, cls) + "</td>")
        name = first[[r["folder"] for r in first].index(folder)]["manifest"].get("input_name", folder)
        body.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}</tr>")
    return f"<table class='pics'>{head}{''.join(body)}</table>"


def _misclassified(out: Path, models: list[str], per_model: int = 3) -> str:
    figs = []
    for m in models:
        for r in _rows(out / "eval" / m / "misclassified")[:per_model]:
            man, f = r["manifest"], f"eval/{m}/misclassified/{r['folder']}"
            cap = (f"{m}: {man.get('true_class')} taken for {man.get('predicted_class')} "
                   f"({100 * man.get('predicted_probability', 0):.0f} %)")
            figs.append(_figure(f"{f}/index.html", f"{f}/thumb.jpg", cap, "wrong"))
    return "".join(figs) or "<p>None.</p>"


_INDEX_STYLE = """body{font-family:system-ui,sans-serif;margin:1.2em;max-width:90em}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}
figure{margin:0;display:inline-block;font-size:12px;vertical-align:top}
figure img{width:220px;height:220px;object-fit:contain;background:#000;display:block}
table.pics td{padding:3px}figure.wrong figcaption{color:#c00}
td figure img{width:160px;height:160px}.thumb img{width:120px;height:120px}
td{white-space:nowrap}figure.wide img{width:600px;height:auto;object-fit:fill}"""


def _index_html(out: Path, tables: dict[str, str], models: list[str], settings: DemoSettings, shortcut: dict) -> str:
    """The demo's front page: the three nets on the same films first, then Table 1, the landmark table with
    one film's landmark view per net, the methods compared with the sanity test, the planted shortcut,
    misclassified films, and links to everything."""
    from xraydeconv.reports.shortcut import shortcut_html

    galleries = {m: _rows(out / "gallery" / m) for m in models}
    examples = {}
    for m in models:
        rows = [r for r in galleries[m] if "landmarks.png" in r["manifest"].get("files", [])]
        if rows:
            f = f"gallery/{m}/{rows[0]['folder']}"
            examples[m] = f'<a class="thumb" href="{f}/landmarks.png"><img src="{f}/landmarks.png" alt="{m}" ' \
                          'style="height:90px"></a>'
    links = "".join(
        f"<li><b>{html.escape(m)}</b>: <a href='gallery/{m}/index.html'>projections of a test sample</a> · "
        f"<a href='eval/{m}/index.html'>evaluation</a> · <a href='eval/{m}/report.md'>report.md</a> · "
        f"<a href='eval/{m}/misclassified/index.html'>misclassified images</a> · "
        f"<a href='eval/{m}/confusion.png'>confusion matrix</a> · <a href='{m}/curves.png'>training curves</a></li>"
        for m in models
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>xraydeconv demo</title>
<style>{_INDEX_STYLE}</style></head>
<body><h1>xraydeconv demo ({html.escape(settings.preset)} preset): where each net looks</h1>
<p>The combined heat of each net's top-{settings.top_n} last-layer filters (deconvnet) on the same test films;
click a picture for every filter of that film.</p>
{_comparison(models, galleries) if galleries.get(models[0]) else ""}
<h2>Table 1: test accuracy on the synthetic phantoms</h2>{_md_table(tables["table1"])}
<h2>Landmark agreement of the top-{settings.top_n} filters</h2>{_md_table(tables["landmarks"], examples)}
<h2>Is the heat about the network? Methods compared, beside the film itself</h2>
<p>Each method's map of the same test films against all landmarks and against the discriminative ones (what tells
a class apart from those it resembles), as the gain over the film used as the map; the last column: how similar
the map stays when every layer of the net is re-initialised (1: it does not depend on the weights).</p>
{_md_table(tables["methods"])}
<a href="eval/{models[-1]}/sanity.png"><img src="eval/{models[-1]}/sanity.png" alt="sanity check"
style="max-width:100%"></a>
<h2>A planted shortcut: does every method find it?</h2>{shortcut_html(shortcut, out)}
<h2>Misclassified films and what the nets looked at</h2>{_misclassified(out, models)}
<h2>Everything</h2><ul>{links}</ul>
</body></html>
"""


def _prepare(out: Path, settings: DemoSettings) -> None:
    """Refuse a bad preset or a folder that holds something else; record the settings in ``demo.json``."""
    if settings.preset not in PRESETS:
        raise UserError(f"preset {settings.preset!r}: choose one of {', '.join(PRESETS)}")
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    check_output_folder(out, overwrite=True)  # a demo folder is reused, not replaced: _check_settings decides
    _check_settings(out, settings)
    out.mkdir(exist_ok=True)
    _write_text(out / SETTINGS_FILE, json.dumps(asdict(settings), indent=2) + "\n")


def _phantom_args(settings: DemoSettings) -> dict:
    """``ensure_phantoms``' per_class, size and seed of the preset (the clean tree and the biased one alike)."""
    probe = _train_config(settings, "deeper", Path("."))
    return {"per_class": probe.phantoms_per_class, "size": probe.input_size, "seed": settings.phantom_seed}


def _phantoms(settings: DemoSettings, progress: bool, echo: Callable[[str], None]) -> Path:
    from xraydeconv.data.phantoms import ensure_phantoms

    phantoms = _phantom_args(settings)
    echo(f"[1/6] phantoms: {phantoms['per_class']} training images per class, {phantoms['size']} px")
    data = ensure_phantoms(**phantoms, progress=progress)
    echo(f"      {data}")
    return data


def _evaluate_all(out: Path, data: Path, settings: DemoSettings, progress: bool) -> dict[str, dict]:
    from xraydeconv.reports.evaluate import EvalOptions, evaluate
    from xraydeconv.training.models import MODEL_NAMES

    (out / "eval").mkdir(exist_ok=True)
    options = EvalOptions(top_n=settings.top_n, max_misclassified=4 if settings.preset == "quick" else 24,
                          methods=DEMO_METHODS, sanity=True)
    return {name: evaluate(out / name / "best.pt", out / "eval" / name, data=data, options=options, overwrite=True,
                           progress=progress)
            for name in MODEL_NAMES}


def _shortcut(out: Path, settings: DemoSettings, progress: bool) -> dict:
    from xraydeconv.reports.shortcut import run_shortcut

    return run_shortcut(out, lambda name, data: _train_config(settings, name, data), _phantom_args(settings),
                        settings.top_n, DEMO_METHODS, progress)


def _write_summary(out: Path, data: Path, settings: DemoSettings, reports: dict[str, dict],
                   timings: dict[str, float], shortcut: dict) -> str:
    """landmarks.md, methods.md, shortcut.md, landmarks.json and index.html; returns the tables to print."""
    from xraydeconv.reports.shortcut import shortcut_markdown
    from xraydeconv.training.models import MODEL_NAMES
    from xraydeconv.training.table1 import TABLE_MD

    table, methods = landmark_table_markdown(reports, settings.top_n), methods_table_markdown(reports)
    shortcut_md = shortcut_markdown(shortcut)
    _write_text(out / LANDMARKS_MD, table)
    _write_text(out / METHODS_MD, methods)
    _write_text(out / SHORTCUT_MD, shortcut_md)
    summary = {name: {"accuracy": r["accuracy"], "landmarks": r["landmarks"], "methods": r["methods"],
                      "sanity": r["sanity"]} for name, r in reports.items()}
    write_json({"data": str(data), "top_n": settings.top_n, "models": summary, "timings": timings,
                "shortcut": {k: {"accuracy": r["accuracy"], "methods": r["methods"]} for k, r in shortcut.items()},
                "threads": torch.get_num_threads()}, out / LANDMARKS_JSON)  # strict: NaN scores become null
    tables = {"table1": (out / TABLE_MD).read_text(encoding="utf-8"), "landmarks": table, "methods": methods}
    _write_text(out / INDEX, _index_html(out, tables, list(MODEL_NAMES), settings, shortcut))
    return f"{table}\n{methods}\n{shortcut_md}"


def run_demo(
    out: str | os.PathLike = "runs/demo",
    settings: DemoSettings | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict:
    """Run every step of the demo into ``out``; returns ``{"table1": rows, "landmarks": {model: report}}``.

    Finished steps of an earlier run with the same settings are reused (training resumes where it stopped).
    """
    from xraydeconv.training.models import MODEL_NAMES
    from xraydeconv.training.table1 import TABLE_MD, train_all

    settings = settings or DemoSettings()
    out = Path(out)
    _prepare(out, settings)
    t0 = time.perf_counter()
    data = _phantoms(settings, progress, echo)
    timings: dict[str, float] = {"phantoms": time.perf_counter() - t0}

    echo("[2/6] training shallow, deeper and deeper-aug")
    t = time.perf_counter()
    rows = train_all(out, lambda name: _train_config(settings, name, data), resume=True, progress=progress)
    timings["training"] = time.perf_counter() - t
    echo("")
    echo((out / TABLE_MD).read_text(encoding="utf-8"))

    echo("[3/6] evaluating every net on the test split (accuracy, landmarks, methods compared, sanity test)")
    t = time.perf_counter()
    reports = _evaluate_all(out, data, settings, progress)
    timings["evaluation"] = time.perf_counter() - t

    echo(f"[4/6] projecting the top-{settings.top_n} filters of a test sample ({settings.sample_per_class} per class)")
    t = time.perf_counter()
    for name in MODEL_NAMES:
        project_sample(out / name / "best.pt", data, out / "gallery" / name, settings.top_n,
                       settings.sample_per_class, progress)
    timings["projection"] = time.perf_counter() - t

    echo("[5/6] a planted shortcut: deeper trained on films with a class-specific marker")
    t = time.perf_counter()
    shortcut = _shortcut(out, settings, progress)
    timings["shortcut"] = time.perf_counter() - t

    echo("[6/6] landmark agreement of the three nets, the methods compared, the shortcut")
    timings["total"] = time.perf_counter() - t0
    table = _write_summary(out, data, settings, reports, timings, shortcut)
    echo(table)
    echo(f"done in {timings['total'] / 60:.1f} min. Open {(out / INDEX).absolute()}")
    return {"table1": rows, "landmarks": reports, "data": str(data), "timings": timings, "shortcut": shortcut}
