"""`xraydeconv project` end to end: outputs, manifest, gallery, and every bad input of the issue."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xraydeconv.cli.main import main
from xraydeconv.data.classes import CLASS_NAMES
from xraydeconv.errors import UserError
from xraydeconv.training import checkpoint, models

SIZE = 64


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    torch.manual_seed(0)
    model = models.build("deeper", num_classes=len(CLASS_NAMES), input_size=SIZE)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
    model.eval()
    checkpoint.save_checkpoint(root / "net.pt", model, model_name="deeper", class_names=list(CLASS_NAMES),
                               input_size=SIZE, config={}, epoch=1)
    rng = np.random.default_rng(0)
    for name, shape in (("hand.png", (80, 60)), ("knee.png", (64, 64)), ("sub/hand.png", (70, 90))):
        (root / name).parent.mkdir(exist_ok=True)
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8), mode="L").save(root / name)
    (root / "notes.png").write_text("not an image")
    Image.fromarray(np.zeros((3, 4), np.uint8), mode="L").save(root / "tiny.png")
    (root / "empty").mkdir()
    data = root / "data" / "test"
    for cls in ("hand", "knee"):
        (data / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray((rng.random((SIZE, SIZE)) * 255).astype(np.uint8), mode="L").save(data / cls / f"{i}.png")
    return root


def run(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["xraydeconv", "project", "--quiet", *args])
    with pytest.raises(SystemExit) as exc:
        main()
        sys.exit(0)
    return exc.value.code, capsys.readouterr().err


def test_project_images(work, tmp_path, monkeypatch, capsys):
    out = tmp_path / "proj"
    code, err = run(monkeypatch, capsys, "--checkpoint", str(work / "net.pt"), "--images", str(work / "hand.png"),
                    "--images", str(work / "knee.png"), str(work / "sub/hand.png"), "--top-n", "6", "--out", str(out))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["gallery.json", "hand", "hand-2", "index.html", "knee"]
    man = json.loads((out / "hand" / "manifest.json").read_text())
    ck = checkpoint.load_checkpoint(work / "net.pt")
    assert man["checkpoint_sha256"] == ck.sha256 and man["model"] == "deeper"
    assert man["layer"] == 7 and man["top_n"] == 6 and len(man["channels"]) == 6
    assert man["torch_version"] == torch.__version__ and man["true_class"] is None
    assert man["input_file"] == str(work / "hand.png")
    assert np.load(out / "hand" / "maps.npy").shape == (6, SIZE, SIZE)
    # the saved channels and prediction are the ones the library gives
    from xraydeconv.data import load_image
    from xraydeconv.explain.deconvnet import DeconvNet

    p = DeconvNet(ck.model).project(load_image(work / "hand.png", SIZE)[None], top_n=6)
    assert man["channels"] == p.channels[0].tolist()
    probs = p.probs[0]
    assert man["predicted_class"] == CLASS_NAMES[int(probs.argmax())]
    assert man["predicted_probability"] == pytest.approx(float(probs.max()))
    # no temporary build left beside --out (only the lock file, which stays by design)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".proj.lock"]


def test_project_data_set_with_truth(work, tmp_path, monkeypatch, capsys):
    out = tmp_path / "proj"
    code, err = run(monkeypatch, capsys, "--checkpoint", str(work / "net.pt"), "--data", str(work / "data"),
                    "--limit", "3", "--top-n", "5", "--layer", "3", "--batch-size", "2", "--out", str(out))
    assert code == 0, err
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == 3
    mans = [json.loads((f / "manifest.json").read_text()) for f in folders]
    assert all(m["true_class"] in ("hand", "knee") and m["layer"] == 3 for m in mans)
    page = (out / "index.html").read_text()
    assert page.count('<div class="card') == 3
    n_mis = sum(m["true_class"] != m["predicted_class"] for m in mans)
    assert f'data-misclassified-count="{n_mis}"' in page


def _bad(work, tmp_path, monkeypatch, capsys, *args, match: str):
    out = tmp_path / "proj"
    code, err = run(monkeypatch, capsys, "--out", str(out), *args)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    # nothing half-written, no temp folder left (the lock file may stay)
    assert [p.name for p in tmp_path.iterdir() if p.name != ".proj.lock"] == []
    return lines[0]


def test_bad_checkpoints(work, tmp_path, monkeypatch, capsys):
    torch.save({"weights": torch.zeros(3)}, tmp_path.parent / "other.pt")
    data = (work / "net.pt").read_bytes()
    (tmp_path.parent / "cut.pt").write_bytes(data[: len(data) // 2])
    img = str(work / "hand.png")
    _bad(work, tmp_path, monkeypatch, capsys, "--checkpoint", str(tmp_path.parent / "other.pt"), img,
         match="other.pt")
    _bad(work, tmp_path, monkeypatch, capsys, "--checkpoint", str(tmp_path.parent / "cut.pt"), img, match="cut.pt")


@pytest.mark.parametrize(
    "args,match",
    [
        (["--top-n", "129"], "--top-n 129"),
        (["--top-n", "0"], "--top-n 0"),
        (["--layer", "8"], "out of range"),
        (["--layer", "features.6"], "not a conv layer"),  # the first max pool
        (["--layer", "nope"], "no such module"),
        (["--cmap", "nope"], "--cmap"),
    ],
)
def test_bad_arguments(work, tmp_path, monkeypatch, capsys, args, match):
    _bad(work, tmp_path, monkeypatch, capsys, "--checkpoint", str(work / "net.pt"), str(work / "hand.png"), *args,
         match=match)


@pytest.mark.parametrize(
    "inputs,match",
    [
        (["hand.png", "notes.png"], "notes.png"),  # a non-image file among the inputs
        (["tiny.png"], "tiny.png"),  # far smaller than the model's input
        (["missing.png"], "missing.png"),
        (["--data", "empty"], "empty"),  # an empty folder
    ],
)
def test_bad_inputs(work, tmp_path, monkeypatch, capsys, inputs, match):
    args = [a if a.startswith("--") else str(work / a) for a in inputs]
    _bad(work, tmp_path, monkeypatch, capsys, "--checkpoint", str(work / "net.pt"), *args, match=match)


def test_out_not_empty_is_kept(work, tmp_path, monkeypatch, capsys):
    out = tmp_path / "proj"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run(monkeypatch, capsys, "--checkpoint", str(work / "net.pt"), str(work / "hand.png"),
                    "--out", str(out))
    assert code == 2 and "not empty" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, err = run(monkeypatch, capsys, "--checkpoint", str(work / "net.pt"), str(work / "hand.png"),
                    "--top-n", "2", "--out", str(out), "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["gallery.json", "hand", "index.html"]


def test_help_reads_like_a_manual(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["xraydeconv", "project", "--help"])
    main()  # click returns after printing the help (no error, nothing to exit with)
    text = capsys.readouterr().out
    for word in ("--checkpoint", "--top-n", "manifest.json", "index.html", "Examples"):
        assert word in text


@pytest.mark.parametrize("value, expected", [("-1", -1), ("3", 3), ("layer4", "layer4"),
                                             ("layer1.0.relu@1", "layer1.0.relu@1"), ("features.21", "features.21"),
                                             (None, None)])
def test_layer_arg(value, expected):
    """Numbers are conv indices; any other --layer is a module name, passed on unchanged."""
    from xraydeconv.cli.project import layer_arg

    assert layer_arg(value) == expected and type(layer_arg(value)) is type(expected)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_after_an_interrupted_run_equals_an_uninterrupted_one(work, tmp_path, monkeypatch, capsys):
    from xraydeconv.reports import shard

    args = ["--checkpoint", str(work / "net.pt"), "--data", str(work / "data"), "--top-n", "3", "--batch-size", "1",
            "--chunk", "1"]
    code, err = run(monkeypatch, capsys, *args, "--out", str(tmp_path / "whole"))
    assert code == 0, err
    real, calls = shard.run_chunk, []

    def interrupted(run_, tmp, c, films, bar):
        calls.append(c)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C, or SIGTERM through the CLI's handler
        real(run_, tmp, c, films, bar)

    monkeypatch.setattr(shard, "run_chunk", interrupted)
    out = tmp_path / "proj"
    code, err = run(monkeypatch, capsys, *args, "--out", str(out))
    assert code == 130 and not out.exists()
    partial = tmp_path / ".proj.partial"
    assert sorted(p.name for p in (partial / ".chunks").iterdir()) == ["0.json", "1.json"]
    monkeypatch.setattr(shard, "run_chunk", real)
    code, err = run(monkeypatch, capsys, *args, "--out", str(out))  # without --resume: refused, nothing touched
    assert code == 2 and err.strip() == (f"error: {out}: an interrupted run left its finished films in {partial}; "
                                         "pass --resume to continue it, or --overwrite to start afresh")
    code, err = run(monkeypatch, capsys, *args, "--top-n", "2", "--resume", "--out", str(out))
    assert code == 2 and err.strip() == (f"error: --resume: the interrupted run in {partial} had other model, "
                                         "settings; give the same checkpoint, images and options, or --overwrite "
                                         "to start afresh")
    half = partial / json.loads((tmp_path / "whole" / "gallery.json").read_text())[2]["folder"]
    half.mkdir()  # what a kill in the middle of film 2 leaves: the resumed run starts its folder afresh
    (half / "overlay.png.tmp-1").write_bytes(b"half-written")
    done = []
    monkeypatch.setattr(shard, "run_chunk", lambda r, t, c, f, b: (done.append(c), real(r, t, c, f, b)))
    code, err = run(monkeypatch, capsys, *args, "--resume", "--out", str(out))
    assert code == 0, err
    assert done == [2, 3], "the finished chunks are not projected again"
    assert _tree(out) == _tree(tmp_path / "whole")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".proj.lock", ".whole.lock"]


def test_map_store_and_a_sample_of_pictures(work, tmp_path, monkeypatch, capsys):
    from xraydeconv.reports.mapstore import MapStore, read_maps

    args = ["--checkpoint", str(work / "net.pt"), "--data", str(work / "data"), "--top-n", "3", "--batch-size", "1",
            "--chunk", "3"]
    code, err = run(monkeypatch, capsys, *args, "--out", str(tmp_path / "whole"))
    assert code == 0, err
    out = tmp_path / "store"
    code, err = run(monkeypatch, capsys, *args, "--maps", "store", "--pictures", "2", "--out", str(out))
    assert code == 0, err
    whole = json.loads((tmp_path / "whole" / "gallery.json").read_text())
    rows = json.loads((out / "gallery.json").read_text())
    assert [r["folder"] for r in rows] == [whole[0]["folder"], None, whole[2]["folder"], None]  # films 0 and 4 // 2
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["index.json", "part-00000.npy", "part-00001.npy"]
    store = MapStore(out)
    assert len(store) == 4 and store.part(0).shape == (3, 3, SIZE, SIZE) and store.part(1).shape == (1, 3, SIZE, SIZE)
    assert isinstance(store.part(0), np.memmap)
    for k, r in enumerate(whole):
        want = np.load(tmp_path / "whole" / r["folder"] / "maps.npy")
        assert np.array_equal(store[k], want)
        assert np.array_equal(read_maps(out, r["manifest"]["input_name"]), want)
        assert np.array_equal(read_maps(tmp_path / "whole", k), want)
        m = rows[k]["manifest"]
        assert m["maps"]["part"] == f"maps/part-0000{k // 3}.npy" and m["maps"]["row"] == k % 3
        assert {key: v for key, v in m.items() if key not in ("maps", "files", "filter_pictures", "overlay_film_box",
                                                              "film")} == \
            {key: v for key, v in r["manifest"].items() if key not in ("maps", "files", "filter_pictures",
                                                                       "overlay_film_box", "film")}
    assert not (out / whole[0]["folder"] / "maps.npy").exists() and (out / whole[0]["folder"] / "grid.png").is_file()
    page = (out / "index.html").read_text()
    assert page.count('<div class="card') == 4 and page.count('thumb.jpg') == 2
    code, err = run(monkeypatch, capsys, *args, "--maps", "none", "--pictures", "none", "--out", str(tmp_path / "r"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["gallery.json", "index.html"]
    with pytest.raises(UserError, match="kept no maps"):
        read_maps(tmp_path / "r", 0)


@pytest.mark.parametrize("args,match", [(["--pictures", "some"], "--pictures some: use all, none or a number"),
                                        (["--pictures", "0"], "--pictures 0"), (["--chunk", "0"], "--chunk 0"),
                                        (["--threads", "0"], "--threads 0")])
def test_bad_archive_options(work, tmp_path, monkeypatch, capsys, args, match):
    _bad(work, tmp_path, monkeypatch, capsys, "--checkpoint", str(work / "net.pt"), str(work / "hand.png"), *args,
         match=match)


@pytest.mark.parametrize("n,batch,chunk,sizes", [(10, 4, 6, [8, 2]), (8, 2, 2, [2, 2, 2, 2]), (3, 4, 64, [3])])
def test_chunks_are_whole_batches(n, batch, chunk, sizes):
    from xraydeconv.reports.pipeline import batch_ranges
    from xraydeconv.reports.shard import chunk_ranges, picture_films

    chunks = chunk_ranges(n, batch, chunk)
    assert batch_ranges(range(3, 10), 3) == [range(3, 6), range(6, 9), range(9, 10)] and batch_ranges(range(0), 2) == []
    assert [len(c) for c in chunks] == sizes and [i for c in chunks for i in c] == list(range(n))
    assert picture_films(10, "3") == {0, 3, 6} and picture_films(2, "5") == {0, 1} and picture_films(4, "none") == set()


def test_gallery_pages(work, tmp_path, monkeypatch, capsys):
    out = tmp_path / "paged"
    code, err = run(monkeypatch, capsys, "--checkpoint", str(work / "net.pt"), "--data", str(work / "data"),
                    "--top-n", "2", "--pictures", "1", "--page-size", "3", "--out", str(out))
    assert code == 0, err
    rows = json.loads((out / "gallery.json").read_text())
    first, second = (out / "index.html").read_text(), (out / "page-2.html").read_text()
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["gallery.json", "index.html", "page-2.html"]
    assert first.count('<div class="card') == 3 and second.count('<div class="card') == 1
    assert 'href="page-2.html"' in first and 'href="index.html"' in second and "page-3" not in second
    assert "page 1 of 2 (images 1–3 of 4" in first and "page 2 of 2 (images 4–4 of 4" in second
    name = rows[3]["manifest"]["input_name"]
    assert name in second and name not in first


def test_films_without_pictures_get_text_cards_even_with_a_folder(work, tmp_path, monkeypatch, capsys):
    """--maps folders keeps a folder (maps.npy, manifest) for every film, but only the pictured ones have pages:
    the others must not link to pictures that do not exist."""
    out = tmp_path / "o"
    code, err = run(monkeypatch, capsys, "--checkpoint", str(work / "net.pt"), "--data", str(work / "data"),
                    "--top-n", "3", "--pictures", "1", "--out", str(out))
    assert code == 0, err
    page = (out / "index.html").read_text()
    assert page.count('<div class="card') == 4 and page.count("thumb.jpg") == 1
    for link in re.findall(r"""(?:href|src)=["']([^"'#]+)["']""", page):
        assert (out / link).exists(), link


def test_folder_names_never_take_a_gallery_page_or_the_map_store():
    from xraydeconv.reports.pipeline import unique_folder

    taken: set[str] = set()
    assert [unique_folder(s, taken) for s in ("maps", "page-2.html", "index.html", "page-2", "Maps")] == \
        ["maps-2", "page-2.html-2", "index.html-2", "page-2", "Maps-3"]
