"""Table 1 of the poster, reproduced: train the three nets one after another and tabulate their test accuracy."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from xraydeconv.errors import UserError
from xraydeconv.io import write_atomically, write_json
from xraydeconv.training.distributed import from_env
from xraydeconv.training.loop import METRICS, RESUME, TrainConfig, train
from xraydeconv.training.models import MODEL_NAMES, POSTER_ACCURACY

TABLE_MD, TABLE_JSON = "table1.md", "table1.json"


def table_rows(results: dict[str, dict]) -> list[dict]:
    """One row per model from its ``metrics.json`` content."""
    rows = []
    for name, m in results.items():
        t = m["timings"]
        rows.append({
            "model": name,
            "test_acc": m["test_acc"],
            "poster_acc": POSTER_ACCURACY[name] / 100.0,
            "best_val_acc": m["best_val_acc"],
            "params": m["params"],
            "epochs": len(m["history"]),
            "input_size": m["config"]["input_size"],
            "augmented": TrainConfig.from_dict(m["config"]).augmented,
            "train_seconds": t["train_seconds"],
            "seconds_per_epoch": t["seconds_per_epoch"],
            "test_split": m.get("test_split", "test"),
            "num_test_images": (m.get("num_images") or {}).get(m.get("test_split", "test")),
        })
    return rows


def render_markdown(rows: list[dict], data: str) -> str:
    """Table 1 as Markdown, our accuracy beside the poster's."""
    lines = [
        "| Model | Test accuracy (ours) | Poster (ImageCLEF 2009) | Params | Epochs | Input | Train time |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {"shallow": "Shallow CNN", "deeper": "Deeper CNN", "deeper-aug": "Deeper CNN + data augmentation"}
    for r in rows:
        lines.append(
            f"| {labels.get(r['model'], r['model'])} (`{r['model']}`) | {100 * r['test_acc']:.2f} % "
            f"| {100 * r['poster_acc']:.2f} % | {r['params']:,} | {r['epochs']} | {r['input_size']} "
            f"| {r['train_seconds']:.0f} s ({r['seconds_per_epoch']:.1f} s/epoch) |"
        )
    n = rows[0]["num_test_images"] if rows else None
    lines += ["", f"Data: `{data}`, {rows[0]['test_split'] if rows else 'test'} split"
              + (f" ({n} images)" if n else "") + ". The poster's numbers are on ImageCLEF 2009 (1,733 test images)."]
    return "\n".join(lines) + "\n"


def _finished_metrics(path: Path) -> dict | None:
    """The ``metrics.json`` of a finished run, or None when the run still has epochs to go; UserError for a file
    this package did not write."""
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
        done = len(m.get("history", [])) >= m["config"]["epochs"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{path}: not a metrics.json written by xraydeconv train") from None
    return m if done else None


def train_all(
    out_dir: str | os.PathLike,
    make_config: Callable[[str], TrainConfig],
    resume: bool = False,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train ``shallow``, ``deeper`` and ``deeper-aug`` into ``OUT/<model>/`` and write ``OUT/table1.{md,json}``.

    Args:
        out_dir: the output folder.
        make_config: the ``TrainConfig`` of each model name.
        resume: continue each model's run (finished ones are only re-scored).
    Returns:
        The table rows (also written to ``table1.json``).
    """
    out = Path(out_dir)
    results = {}
    data = ""
    for name in MODEL_NAMES:
        cfg = make_config(name)
        run_dir = out / name
        if resume and (run_dir / METRICS).is_file() and not (run_dir / RESUME).exists():
            m = _finished_metrics(run_dir / METRICS)
            if m is not None:
                results[name] = m
                data = m.get("data", data)
                continue
        results[name] = train(cfg, run_dir, resume=resume, log=log, progress=progress)
        data = results[name]["data"]
    rows = table_rows(results)
    if from_env().is_main:
        write_json({"data": data, "rows": rows}, out / TABLE_JSON)
        write_atomically(out / TABLE_MD, lambda f: f.write(render_markdown(rows, data)), mode="w", encoding="utf-8")
    return rows
