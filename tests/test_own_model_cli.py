"""`xraydeconv project` and `xraydeconv evaluate` with a user's own model: ``--model-factory`` + ``--weights``.

The factories below are imported by name (``test_own_model_cli:resnetish``), as a user's own module would be.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from xraydeconv.cli.main import main
from xraydeconv.data.classes import CLASS_NAMES
from xraydeconv.training import checkpoint, models

HERE = Path(__file__).parent
SIZE = 32
FACTORY = "test_own_model_cli:resnetish"


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN with the input added back, then the same ReLU again (a module called twice)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class ResNetish(nn.Module):
    """stem (conv, BN, ReLU, 2x2 max-pool), a residual block, a stride-2 conv, a residual block, pool, linear."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.block1 = Block(8)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.block2 = Block(16)
        self.fc = nn.Linear(16, classes)
        self.input_size = SIZE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.down(self.block1(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnetish() -> nn.Module:
    return ResNetish(len(CLASS_NAMES))


def deeper() -> nn.Module:
    return models.build("deeper", num_classes=len(CLASS_NAMES), input_size=64)


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
            m.running_mean.uniform_(-0.1, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("own")
    torch.manual_seed(0)
    torch.save(_randomise(resnetish(), 1).state_dict(), root / "resnetish.pt")
    torch.manual_seed(2)
    net = _randomise(deeper(), 3)
    torch.save(net.state_dict(), root / "deeper-state.pt")
    checkpoint.save_checkpoint(root / "deeper.pt", net, model_name="deeper", class_names=list(CLASS_NAMES),
                               input_size=64, config={}, epoch=1)
    rng = np.random.default_rng(0)
    for name, shape in (("hand.png", (40, 30)), ("knee.png", (32, 32))):
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8), mode="L").save(root / name)
    (root / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    return root


@pytest.fixture(autouse=True)
def importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def run(monkeypatch, capsys, command: str, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["xraydeconv", command, "--quiet", *args])
    with pytest.raises(SystemExit) as exc:
        main()
        sys.exit(0)
    return exc.value.code, capsys.readouterr().err


def _expected_maps(model: nn.Module, image: Path, size: int, top_n: int, layer=None) -> np.ndarray:
    """maps.npy recomputed: |sum over input channels| of each filter's projection, divided by its maximum."""
    from xraydeconv.data import load_image
    from xraydeconv.explain.deconvnet import DeconvNet

    x = load_image(image, size)[None]
    p = DeconvNet(model.eval()).project(x, top_n=top_n, layer=layer)
    raw = p.maps[0].float().sum(1).abs()
    return (raw / raw.flatten(1).amax(1)[:, None, None]).to(torch.float16).numpy()


def test_project_user_model(work, tmp_path, monkeypatch, capsys):
    out = tmp_path / "proj"
    code, err = run(monkeypatch, capsys, "project", "--model-factory", FACTORY, "--weights",
                    str(work / "resnetish.pt"), "--classes", str(work / "classes.txt"), "--top-n", "5",
                    "--images", str(work / "hand.png"), str(work / "knee.png"), "--out", str(out))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["gallery.json", "hand", "index.html", "knee"]
    man = json.loads((out / "hand" / "manifest.json").read_text())
    # the same files as for our own checkpoints
    assert sorted(p.name for p in (out / "hand").iterdir()) == sorted(man["files"])
    assert set(man["files"]) == {"overlay.png", "focus.png", "grid.png", "thumb.jpg", "filters", "index.html",
                                 "maps.npy", "manifest.json"}
    assert (man["model"], man["factory"], man["checkpoint"]) == (FACTORY, FACTORY, str(work / "resnetish.pt"))
    # the default layer of a non-Sequential model: the last feature map before global pooling
    assert (man["layer"], man["layer_module"], man["input_size"]) == ("block2", "block2", SIZE)
    assert man["display"]["stride"] == 4  # 32 px in, 8 x 8 out of block2
    model = resnetish()
    model.load_state_dict(torch.load(work / "resnetish.pt"))
    maps = np.load(out / "hand" / "maps.npy")
    np.testing.assert_allclose(maps.astype(np.float32), _expected_maps(model, work / "hand.png", SIZE, 5), atol=1e-3)


@pytest.mark.parametrize("layer, name, stride", [
    ("block1.relu@1", "block1.relu@1", 2),  # a module's second call, by name
    ("add_1", "add_1", 4),  # a graph node that is no module: block2's residual sum
    ("1", "block1_relu", 2),  # a number counts conv layers: conv 1 starts at its ReLU's first call
])
def test_project_user_model_layer(work, tmp_path, monkeypatch, capsys, layer, name, stride):
    out = tmp_path / "proj"
    code, err = run(monkeypatch, capsys, "project", "--model-factory", FACTORY, "--weights",
                    str(work / "resnetish.pt"), "--layer", layer, "--top-n", "3",
                    "--images", str(work / "knee.png"), "--out", str(out))
    assert code == 0, err
    man = json.loads((out / "knee" / "manifest.json").read_text())
    assert (man["layer"], man["layer_module"], man["display"]["stride"]) == (name, name, stride)
    model = resnetish()
    model.load_state_dict(torch.load(work / "resnetish.pt"))
    expected = _expected_maps(model, work / "knee.png", SIZE, 3, layer=name)
    np.testing.assert_allclose(np.load(out / "knee" / "maps.npy").astype(np.float32), expected, atol=1e-3)


def test_factory_gives_the_checkpoints_maps(work, tmp_path, monkeypatch, capsys):
    """Our own deeper net through a factory and its state dict projects exactly as through its checkpoint."""
    a, b = tmp_path / "ckpt", tmp_path / "factory"
    common = ("--top-n", "4", "--layer", "features.5", "--images", str(work / "hand.png"))
    code, err = run(monkeypatch, capsys, "project", "--checkpoint", str(work / "deeper.pt"), *common, "--out", str(a))
    assert code == 0, err
    code, err = run(monkeypatch, capsys, "project", "--model-factory", "test_own_model_cli:deeper", "--weights",
                    str(work / "deeper-state.pt"), *common, "--out", str(b))
    assert code == 0, err
    np.testing.assert_array_equal(np.load(a / "hand" / "maps.npy"), np.load(b / "hand" / "maps.npy"))
    ma, mb = (json.loads((d / "hand" / "manifest.json").read_text()) for d in (a, b))
    for key in ("layer", "layer_module", "channels", "activations", "map_scale", "predicted_class", "display"):
        assert ma[key] == mb[key], key
    assert ma["layer_module"] == "features.3" and ma["layer"] == 1  # the ReLU of conv 1 starts it
    assert "factory" not in ma and mb["factory"] == "test_own_model_cli:deeper"


def test_evaluate_user_model(work, tmp_path, monkeypatch, capsys):
    from xraydeconv.data import open_dataset
    from xraydeconv.data.phantoms import generate

    data = generate(tmp_path / "ph", per_class=1, size=SIZE, seed=5, splits=("test",), test_per_class=1,
                    progress=False)
    out = tmp_path / "ev"
    code, err = run(monkeypatch, capsys, "evaluate", "--model-factory", FACTORY, "--weights",
                    str(work / "resnetish.pt"), "--data", str(data), "--top-n", "4", "--max-misclassified", "2",
                    "--out", str(out))
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["checkpoint"]["model"] == FACTORY and report["checkpoint"]["factory"] == FACTORY
    assert report["checkpoint"]["path"] == str(work / "resnetish.pt")
    model = resnetish()
    model.load_state_dict(torch.load(work / "resnetish.pt"))
    ds = open_dataset(data, split="test", input_size=SIZE)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = [int(r.label) for r in ds.records]
    with torch.no_grad():
        pred = model.eval()(x).argmax(1).tolist()
    confusion = np.zeros((len(CLASS_NAMES),) * 2, dtype=np.int64)
    for t, p in zip(y, pred):
        confusion[t, p] += 1
    assert report["confusion"] == confusion.tolist()
    assert report["accuracy"] == pytest.approx(float(np.trace(confusion)) / len(y))
    assert report["landmarks"]["overall"]["n"] == len(y)  # every phantom has masks: all projected
    shown = sorted((out / "misclassified").glob("*/manifest.json"))
    assert len(shown) == min(2, report["misclassified_count"])
    assert json.loads(shown[0].read_text())["layer_module"] == "block2"


def test_evaluate_user_model_needs_data(work, tmp_path, monkeypatch, capsys):
    code, err = run(monkeypatch, capsys, "evaluate", "--model-factory", FACTORY, "--weights",
                    str(work / "resnetish.pt"), "--out", str(tmp_path / "ev"))
    assert code == 2
    assert err == f"error: --model-factory {FACTORY}: give --data DIR (the data the model was trained on are not " \
                  "known)\n"
    assert not (tmp_path / "ev").exists()


def _missing_key(work: Path) -> Path:
    state = torch.load(work / "resnetish.pt")
    del state["block2.conv1.weight"]
    torch.save(state, work / "missing.pt")
    return work / "missing.pt"


@pytest.mark.parametrize("command", ["project", "evaluate"])
@pytest.mark.parametrize("case, args, message", [
    ("neither", [], "--checkpoint / --model-factory: give exactly one of the two"),
    ("both", ["--checkpoint", "{work}/deeper.pt", "--model-factory", FACTORY, "--weights", "{work}/resnetish.pt"],
     "--checkpoint / --model-factory: give exactly one of the two"),
    ("no weights", ["--model-factory", FACTORY], f"--model-factory {FACTORY}: --weights FILE is required"),
    ("weights alone", ["--checkpoint", "{work}/deeper.pt", "--weights", "{work}/resnetish.pt"],
     "--weights {work}/resnetish.pt: only with --model-factory"),
    ("bad module", ["--model-factory", "no_such_module_xd:make", "--weights", "{work}/resnetish.pt"],
     "--model-factory no_such_module_xd:make: cannot import no_such_module_xd"),
    ("bad function", ["--model-factory", "user_models_fixture:nope", "--weights", "{work}/resnetish.pt"],
     "--model-factory user_models_fixture:nope: user_models_fixture has no attribute 'nope'"),
    ("no file", ["--model-factory", FACTORY, "--weights", "{work}/absent.pt"],
     "--weights {work}/absent.pt: no such file"),
    ("missing key", ["--model-factory", FACTORY, "--weights", "{missing}"],
     "--weights {missing}: missing keys block2.conv1.weight"),
    ("wrong model", ["--model-factory", "user_models_fixture:tiny", "--weights", "{work}/resnetish.pt"],
     "--weights {work}/resnetish.pt: missing keys conv.weight"),
    ("no classes", ["--model-factory", FACTORY, "--weights", "{work}/resnetish.pt", "--classes", "{work}/no.txt"],
     "--classes {work}/no.txt: no such file"),
])
def test_model_option_errors(work, tmp_path, monkeypatch, capsys, command, case, args, message):
    fill = {"work": work, "missing": _missing_key(work) if case == "missing key" else ""}
    out = tmp_path / "out"
    code, err = run(monkeypatch, capsys, command, *[a.format(**fill) for a in args],
                    *(["--images", str(work / "hand.png")] if command == "project" else ["--data", str(work)]),
                    "--out", str(out))
    assert code == 2, err
    assert err.startswith("error: " + message.format(**fill)), err
    assert err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("command", ["project", "evaluate"])
def test_out_apart_from_the_weights(work, tmp_path, monkeypatch, capsys, command):
    """The weights file is an input: --out may not contain it (click itself refuses an --out that is a file)."""
    weights = tmp_path / "w" / "resnetish.pt"
    weights.parent.mkdir()
    weights.write_bytes((work / "resnetish.pt").read_bytes())
    more = ["--images", str(work / "hand.png")] if command == "project" else ["--data", str(work)]
    for out in (weights.parent, tmp_path):
        code, err = run(monkeypatch, capsys, command, "--model-factory", FACTORY, "--weights", str(weights), *more,
                        "--overwrite", "--out", str(out))
        assert code == 2, err
        assert err == f"error: --out {out}: overlaps the input --weights {weights}; choose an output folder apart " \
                      "from it\n"
    assert sorted(p.name for p in weights.parent.iterdir()) == ["resnetish.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]
