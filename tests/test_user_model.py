"""Users' own models: load_user_model builds a factory's module, loads its weights and names its classes."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from xraydeconv.data.classes import CLASS_NAMES
from xraydeconv.errors import UserError
from xraydeconv.training.checkpoint import Checkpoint
from xraydeconv.training.user_model import load_user_model

TESTS = Path(__file__).parent
F = "user_models_fixture"


@pytest.fixture(autouse=True)
def fixture_module_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


@pytest.fixture
def fx():
    import user_models_fixture

    return user_models_fixture


def _trained(fx, factory: str = "tiny", seed: int = 0):
    """A model from the fixture factory with weights and BatchNorm statistics that are not the defaults."""
    torch.manual_seed(seed)
    model = getattr(fx, factory)()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def test_loads_the_weights_and_describes_the_model_like_a_checkpoint(tmp_path, fx):
    model = _trained(fx)
    weights = _save(model.state_dict(), tmp_path / "w.pt")
    (tmp_path / "classes.txt").write_text("hand\n foot \n\nknee\nskull\nchest\n")
    ckpt = load_user_model(f"{F}:tiny", weights, tmp_path / "classes.txt")
    assert isinstance(ckpt, Checkpoint)
    assert ckpt.class_names == ["hand", "foot", "knee", "skull", "chest"]
    assert ckpt.model_name == f"{F}:tiny" and ckpt.input_size == 256 and ckpt.epoch == 0 and ckpt.path == weights
    assert ckpt.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert ckpt.config == {"factory": f"{F}:tiny", "weights": str(weights), "classes": str(tmp_path / "classes.txt")}
    assert not ckpt.model.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ckpt.model.state_dict()[k], v, rtol=0, atol=0)
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(x), model(x), rtol=0, atol=0)


def test_the_model_projects_like_our_checkpoints(tmp_path, fx):
    import xraydeconv

    ckpt = load_user_model(f"{F}:tiny", _save(_trained(fx).state_dict(), tmp_path / "w.pt"), input_size=32)
    p = xraydeconv.DeconvNet(ckpt.model).project(torch.rand(2, 1, 32, 32), top_n=2)
    assert p.maps.shape == (2, 2, 1, 32, 32) and p.probs.shape == (2, len(ckpt.class_names))


def test_class_names_from_a_json_list_or_by_default(tmp_path, fx):
    weights = _save(_trained(fx).state_dict(), tmp_path / "w.pt")
    (tmp_path / "c.json").write_text(json.dumps(["a", "b", "c", "d", "e"]))
    assert load_user_model(f"{F}:tiny", weights, tmp_path / "c.json").class_names == ["a", "b", "c", "d", "e"]
    assert load_user_model(f"{F}:tiny", weights).class_names == [f"class-{i}" for i in range(5)]
    w24 = _save(_trained(fx, "tiny24").state_dict(), tmp_path / "w24.pt")
    assert load_user_model(f"{F}:tiny24", w24).class_names == list(CLASS_NAMES)


def test_input_size_given_then_the_models_own_then_256(tmp_path, fx):
    weights = _save(_trained(fx).state_dict(), tmp_path / "w.pt")
    assert load_user_model(f"{F}:sized", weights).input_size == 48
    assert load_user_model(f"{F}:sized", weights, input_size=64).input_size == 64
    assert load_user_model(f"{F}:tiny", weights).input_size == 256


def test_a_wrapped_state_dict_and_a_static_method_factory(tmp_path, fx):
    model = _trained(fx, "tiny")
    wrapped = _save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    assert load_user_model(f"{F}:tiny", wrapped).sha256 == hashlib.sha256(wrapped.read_bytes()).hexdigest()
    three = fx.Holder.make()
    ckpt = load_user_model(f"{F}:Holder.make", _save(three.state_dict(), tmp_path / "h.pt"))
    assert ckpt.class_names == ["class-0", "class-1", "class-2"]


def test_the_current_folder_is_searched_and_sys_path_is_left_alone(tmp_path, fx, monkeypatch):
    (tmp_path / "my_local_nets.py").write_text("from user_models_fixture import TinyNet\n\n"
                                               "def make():\n    return TinyNet()\n")
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    ckpt = load_user_model("my_local_nets:make", _save(_trained(fx).state_dict(), tmp_path / "w.pt"))
    assert len(ckpt.class_names) == 5
    assert sys.path == before


# --- every error: one line naming the factory or the file ---------------------------------------------------------


@pytest.mark.parametrize("factory, message", [
    ("tiny", "--model-factory 'tiny': expected package.module:function"),
    (f"{F}:", f"--model-factory '{F}:': expected package.module:function"),
    (":tiny", "--model-factory ':tiny': expected package.module:function"),
    (f"{F}:tiny:x", f"--model-factory '{F}:tiny:x': expected package.module:function"),
    ("no_such_module_4711:make",
     "--model-factory no_such_module_4711:make: cannot import no_such_module_4711 "
     "(ModuleNotFoundError: No module named 'no_such_module_4711')"),
    (f"{F}:missing", f"--model-factory {F}:missing: {F} has no attribute 'missing'"),
    (f"{F}:NOT_CALLABLE", f"--model-factory {F}:NOT_CALLABLE: NOT_CALLABLE is a int, not a function"),
    (f"{F}:broken", f"--model-factory {F}:broken: calling broken() failed (RuntimeError: no GPU here)"),
    (f"{F}:not_a_module", f"--model-factory {F}:not_a_module: not_a_module() returned a dict, not a torch.nn.Module"),
])
def test_factory_errors(tmp_path, fx, factory, message):
    weights = _save(_trained(fx).state_dict(), tmp_path / "w.pt")
    with pytest.raises(UserError) as err:
        load_user_model(factory, weights)
    assert str(err.value) == message


def test_a_module_that_fails_while_importing(tmp_path, fx, monkeypatch):
    (tmp_path / "bad_nets_4711.py").write_text("import torch\nraise ImportError('needs timm')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError) as err:
        load_user_model("bad_nets_4711:make", _save(_trained(fx).state_dict(), tmp_path / "w.pt"))
    assert str(err.value) == "--model-factory bad_nets_4711:make: cannot import bad_nets_4711 (ImportError: needs timm)"


def test_models_that_are_no_classifier_cnn(tmp_path, fx):
    cases = {
        "no_conv": "--model-factory {f}: the model has no Conv2d layer; only CNNs can be projected",
        "feature_maps": "--model-factory {f}: the model returns 1x2x256x256 for one image, expected 1 x classes logits",
        "fails_forward": "--model-factory {f}: the model fails on a 1x1x256x256 input (ValueError: expects 3 channels)",
    }
    for name, message in cases.items():
        weights = _save(getattr(fx, name)().state_dict(), tmp_path / f"{name}.pt")
        with pytest.raises(UserError) as err:
            load_user_model(f"{F}:{name}", weights)
        assert str(err.value) == message.format(f=f"{F}:{name}")


def test_weights_file_errors(tmp_path, fx):
    good = _trained(fx).state_dict()
    (tmp_path / "notes.txt").write_text("not torch")
    (tmp_path / "folder").mkdir()
    nan = {k: v.clone() for k, v in good.items()}
    nan["fc.weight"][0, 0] = float("nan")
    cases = {
        tmp_path / "absent.pt": "no such file",
        tmp_path / "folder": "is a folder, not a weights file",
        tmp_path / "notes.txt": "not a state dict saved with torch.save(model.state_dict()) (",
        _save(_trained(fx), tmp_path / "whole.pt"): "not a state dict saved with torch.save(model.state_dict()) (",
        _save({"a": 1}, tmp_path / "numbers.pt"): "expected a state dict (parameter name -> tensor), got dict",
        _save([torch.zeros(1)], tmp_path / "list.pt"): "expected a state dict (parameter name -> tensor), got list",
        _save({}, tmp_path / "empty.pt"): "expected a state dict (parameter name -> tensor), got dict",
        _save(nan, tmp_path / "nan.pt"): "1 tensors hold NaN or infinity (fc.weight)",
    }
    for path, why in cases.items():
        with pytest.raises(UserError) as err:
            load_user_model(f"{F}:tiny", path)
        assert str(err.value).startswith(f"--weights {path}: {why}"), str(err.value)


def test_missing_unexpected_and_misshapen_keys_are_listed(tmp_path, fx):
    good = _trained(fx).state_dict()
    keys = list(good)  # conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, ...
    missing = _save({k: v for k, v in good.items() if not k.startswith("bn.")}, tmp_path / "m.pt")
    with pytest.raises(UserError) as err:
        load_user_model(f"{F}:tiny", missing)
    assert str(err.value) == (f"--weights {missing}: missing keys bn.weight, bn.bias, bn.running_mean, … (2 more)")
    assert sum(k.startswith("bn.") for k in keys) == 5
    extra = _save({**good, "head.weight": torch.zeros(2), "module.x": torch.zeros(1)}, tmp_path / "u.pt")
    with pytest.raises(UserError) as err:
        load_user_model(f"{F}:tiny", extra)
    assert str(err.value) == f"--weights {extra}: unexpected keys head.weight, module.x"
    both = _save({**{k: v for k, v in good.items() if k != "fc.bias"}, "fc.b": torch.zeros(5)}, tmp_path / "b.pt")
    with pytest.raises(UserError) as err:
        load_user_model(f"{F}:tiny", both)
    assert str(err.value) == f"--weights {both}: missing keys fc.bias; unexpected keys fc.b"
    other = _save(fx.TinyNet(7, in_channels=3).state_dict(), tmp_path / "o.pt")
    with pytest.raises(UserError) as err:
        load_user_model(f"{F}:tiny", other)
    assert str(err.value) == (f"--weights {other}: conv.weight is 4x3x3x3 in the file but 4x1x3x3 in the model "
                              "(and 2 more)")


def test_class_file_errors(tmp_path, fx):
    weights = _save(_trained(fx).state_dict(), tmp_path / "w.pt")
    files = {
        "absent.txt": (None, "no such file"),
        "empty.txt": ("\n \n", "no class names"),
        "twice.txt": ("a\nb\na\nc\nb\n", "class name(s) listed twice: a, b"),
        "bad.json": ('["a", 3]', "the JSON list must hold non-empty class names"),
        "broken.json": ('["a", ', "not valid JSON ("),
        "four.txt": ("a\nb\nc\nd\n", "4 class names for a model with 5 outputs"),
        "binary.txt": (b"\xff\xfe\x00", "not a readable text file (UnicodeDecodeError"),
    }
    for name, (content, why) in files.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        with pytest.raises(UserError) as err:
            load_user_model(f"{F}:tiny", weights, path)
        assert str(err.value).startswith(f"--classes {path}: {why}"), str(err.value)


@pytest.mark.parametrize("size", [8, 15, True, "64", 64.0])
def test_bad_input_size(tmp_path, fx, size):
    with pytest.raises(UserError) as err:
        load_user_model(f"{F}:tiny", _save(_trained(fx).state_dict(), tmp_path / "w.pt"), input_size=size)
    assert str(err.value) == f"--input-size {size!r}: must be an integer of at least 16"
