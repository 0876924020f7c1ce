"""`xraydeconv evaluate` under torchrun (2 CPU processes, gloo): the report and the folders of one process; bad input
found by the second process is one `error:` line from the first, and no output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xraydeconv.data.classes import CLASS_NAMES
from xraydeconv.reports.evaluate import Picks
from xraydeconv.training import checkpoint, models

SIZE = 32
# 30 test films in 6 batches of 5, dealt out to 2 processes: rank 0 draws the first 5 misclassified films, rank 1
# the next 2 and the one correct example (film 26); the randomisation test takes films 0 and 1
ARGS = ["evaluate", "--split", "test", "--limit", "30", "--batch-size", "5", "--top-n", "4", "--max-misclassified", "7",
        "--methods", "deconvnet,guided,gradcam", "--sanity", "--sanity-images", "2", "--occlusion", "--device", "cpu",
        "--threads", "1", "--quiet"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="passive")
    return env


def _one(args: list[str], out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xraydeconv.cli.main", *args, "--out", str(out)], env=_env(),
                          capture_output=True, text=True, timeout=120)


def _torchrun(args: list[str], out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "xraydeconv.cli.main", *args, "--out", str(out)], env=_env(), capture_output=True,
                          text=True, timeout=180)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _numbers(report: dict) -> dict:
    """The report without what measures time (the timing field, the methods' seconds per image, the randomisation
    test's seconds)."""
    report = {k: v for k, v in report.items() if k != "timing"}
    for row in report["methods"]["rows"].values():
        del row["seconds_per_image"]
    del report["sanity"]["seconds"]
    return report


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[list[str], Path, Path]:
    """The arguments of a small run, its data, and its one-process output."""
    from xraydeconv.data.phantoms import generate

    root = tmp_path_factory.mktemp("ed")
    data = generate(root / "ph", per_class=1, size=SIZE, seed=3, bias="marker", splits=("val", "test"),
                    progress=False)
    torch.manual_seed(0)
    model = models.build("shallow", num_classes=len(CLASS_NAMES), input_size=SIZE).eval()
    checkpoint.save_checkpoint(root / "net.pt", model, model_name="shallow", class_names=list(CLASS_NAMES),
                               input_size=SIZE, config={"input_size": SIZE}, epoch=1)
    args = [*ARGS, "--checkpoint", str(root / "net.pt"), "--data", str(data)]
    r = _one(args, root / "one")
    assert r.returncode == 0, r.stderr[-3000:]
    return args, data, root / "one"


def test_two_processes_write_the_report_and_folders_of_one_process(run, tmp_path):
    args, _, one = run
    r = _torchrun(args, tmp_path / "ddp")
    assert r.returncode == 0, r.stderr[-3000:]
    want = json.loads((one / "report.json").read_text())
    got = json.loads((tmp_path / "ddp" / "report.json").read_text())
    # the run draws films of both processes: misclassified ones of ranks 0 and 1, an example of rank 1
    assert [m["folder"] for m in want["misclassified"]][4:] == ["misclassified/breast-as-lower-leg-000000",
                                                                 "misclassified/breast-as-lower-leg-000001",
                                                                 "misclassified/cervical-spine-as-lower-leg-000000"]
    assert (one / "examples" / "lower-leg-000000" / "maps.npy").is_file() and want["sanity"]["images"] == 2
    assert want["landmarks"]["overall"]["n"] == 30 and want["occlusion"] and want["methods"]["rows"]["gradcam"]
    assert _numbers(got) == _numbers(want)
    w, g = _files(one), _files(tmp_path / "ddp")
    assert sorted(g) == sorted(w)
    timed = {"report.json", "report.md"}  # they hold the seconds
    assert [k for k in w if k not in timed and g[k] != w[k]] == []  # maps.npy, pictures, galleries, index.html
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ddp.lock", "ddp"]


def test_bad_input_found_by_the_second_process_is_one_line_from_the_first(run, tmp_path):
    """A landmark mask of the wrong size on film 7 (batch 1: the second process's) stops both processes; the first
    prints the one-process message and nothing is written."""
    args, data, _ = run
    bad = tmp_path / "ph"
    subprocess.run(["cp", "-r", str(data), str(bad)], check=True)
    film = sorted((bad / "test" / "cervical-spine").glob("*.png"))[1]
    mask = next(Path(f"{film.with_suffix('')}.landmarks").glob("*.png"))
    Image.fromarray(np.zeros((SIZE + 3, SIZE), np.uint8)).save(mask)
    args = [a if a != str(data) else str(bad) for a in args]
    one, ddp = _one(args, tmp_path / "one"), _torchrun(args, tmp_path / "ddp")
    assert one.returncode == 2 and ddp.returncode != 0
    line = [ln for ln in one.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and mask.name in line[0]
    assert [ln for ln in ddp.stderr.splitlines() if ln.startswith("error:")] == line
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ddp.lock", ".one.lock", "ph"]


def test_picks_follow_the_run_order():
    classes = ["a", "b", "c"]
    picks = Picks(classes, max_misclassified=2, examples=2, sanity_images=2)
    films = [  # film, true, predicted, has landmarks, stem
        (0, 0, 1, False, "x"), (1, 0, 1, True, "x"), (2, 1, 1, False, "y"), (3, 1, 1, True, "y"),
        (4, 1, 1, True, "z"), (5, 2, 0, True, "x"), (6, 2, 2, True, "x"), (7, 0, 0, True, "w"),
    ]
    for f in films:
        picks.add(*f)
    # the first two misclassified films, the repeated name suffixed; film 5 is past the cap
    assert picks.misclassified == {0: "a-as-b-x", 1: "a-as-b-x-2"}
    # correct films with landmarks, a class once (film 4 repeats b), at most two (film 7 is past the cap)
    assert picks.example == {3: "b-y", 6: "c-x"}
    assert picks.sanity == [1, 3]
