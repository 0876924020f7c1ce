"""Occlusion sensitivity on tiny nets whose answer is known by construction."""

import numpy as np
import pytest
import torch
from torch import nn

from xraydeconv.explain import occlusion

S = 32


class LeftHalfNet(nn.Module):
    """Sees only the left half of the image; class 0's logit grows with the brightness there."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Linear(4, 2)
        with torch.no_grad():
            self.features[0].weight.fill_(1.0 / 9)
            self.features[0].bias.zero_()
            self.classifier.weight.copy_(torch.tensor([[4.0] * 4, [-4.0] * 4]))
            self.classifier.bias.zero_()
        mask = torch.zeros(1, 1, S, S)
        mask[..., : S // 2] = 1
        self.register_buffer("mask", mask)

    def forward(self, x):
        return self.classifier(self.features(x * self.mask).mean(dim=(2, 3)))


def _image():
    x = torch.zeros(1, 1, S, S)
    x[..., 4:12, 4:12] = 1.0  # seen
    x[..., 20:28, 20:28] = 1.0  # never seen
    left = np.zeros((S, S), bool)
    left[4:12, 4:12] = True
    right = np.zeros((S, S), bool)
    right[20:28, 20:28] = True
    return x, {"left": left, "right": right}


def test_landmark_occlusion_finds_what_the_net_sees():
    net = LeftHalfNet()
    x, masks = _image()
    res = occlusion.occlude_landmarks(net, x, [masks], [0], top_n=2, fill="zero")
    assert res.names == ["left", "right"]
    j_left, j_right = res.names.index("left"), res.names.index("right")
    assert res.prob_drop[0, j_right] == 0.0
    assert res.filter_drop[0, j_right] == 0.0
    assert res.prob_drop[0, j_left] > 0.2
    assert res.filter_drop[0, j_left] == pytest.approx(1.0)  # all of the left activation is gone
    assert res.area_share[0, j_left] == pytest.approx(64 / S**2)
    assert res.channels.shape == (1, 2)
    summ = res.summary()
    assert summ["left"]["n"] == 1 and summ["left"]["prob_drop"] > 0.2


def test_missing_landmarks_are_nan_and_batches_agree():
    net = LeftHalfNet()
    x, masks = _image()
    xs = x.repeat(3, 1, 1, 1)
    per_image = [masks, {"left": masks["left"]}, {}]
    a = occlusion.occlude_landmarks(net, xs, per_image, [0, 0, 1], batch_size=1)
    b = occlusion.occlude_landmarks(net, xs, per_image, [0, 0, 1], batch_size=7)
    np.testing.assert_allclose(a.prob_drop, b.prob_drop, atol=1e-6)
    assert np.isnan(a.prob_drop[1, 1]) and np.isnan(a.prob_drop[2]).all()
    assert a.prob_drop[0, 0] == pytest.approx(a.prob_drop[1, 0])


def test_sliding_map_is_zero_where_the_net_is_blind():
    net = LeftHalfNet()
    x, _ = _image()
    m = occlusion.occlusion_map(net, x, [0], patch=8, stride=4, fill="zero")
    assert m.ys == m.xs == list(range(0, S - 8 + 1, 4))
    right_cols = [c for c, x0 in enumerate(m.xs) if x0 >= S // 2]
    assert torch.all(m.prob_drop[0][:, right_cols] == 0)
    assert torch.all(m.filter_drop[0][:, right_cols] == 0)
    a, c = np.unravel_index(int(m.prob_drop[0].argmax()), m.prob_drop[0].shape)
    assert (m.ys[a], m.xs[c]) == (4, 4)  # the patch that hides the whole seen square
    img = m.to_image()
    assert img.shape == (1, S, S)
    assert img[0, 8, 8] > 0 and torch.all(img[0, :, S // 2 + 8 :] == 0)


def test_edge_positions_are_covered_and_fills():
    net = LeftHalfNet()
    x, _ = _image()
    m = occlusion.occlusion_map(net, x, [0], patch=10, stride=8, layer=False)
    assert m.xs[-1] == S - 10 and m.filter_drop is None
    assert occlusion._fill_values(x, "mean").item() == pytest.approx(x.mean().item())
    assert occlusion._fill_values(x, "background").item() == 0.0
    assert occlusion._fill_values(x, 0.5).item() == 0.5
    with pytest.raises(ValueError, match="fill"):
        occlusion._fill_values(x, "grey")


def test_model_without_features_and_bad_input():
    net = nn.Sequential(nn.Flatten(), nn.Linear(S * S, 3))
    x = torch.rand(2, 1, S, S)
    mask = np.zeros((S, S), bool)
    mask[:4] = True
    res = occlusion.occlude_landmarks(net, x, [{"a": mask}, {"a": mask}], [0, 2])
    assert np.isnan(res.filter_drop).all() and not np.isnan(res.prob_drop).any()
    with pytest.raises(ValueError, match="does not match"):
        occlusion.occlude_landmarks(net, x, [{"a": mask[:8]}, {}], [0, 1])
    with pytest.raises(ValueError, match="masks"):
        occlusion.occlude_landmarks(net, x, [{}], [0, 1])
    with pytest.raises(ValueError, match="patch"):
        occlusion.occlusion_map(net, x, [0, 1], patch=S + 1)


def test_eval_mode_is_used_and_restored():
    net = LeftHalfNet()
    net.features.append(nn.Dropout(0.9))
    net.train()
    x, masks = _image()
    a = occlusion.occlude_landmarks(net, x, [masks], [0])
    b = occlusion.occlude_landmarks(net, x, [masks], [0])
    np.testing.assert_array_equal(a.prob_drop, b.prob_drop)  # no dropout noise
    assert net.training


class _Residual(nn.Module):
    """No ``features``: a conv, a residual block and a global-average-pool head."""

    def __init__(self, functional_top: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.relu = nn.ReLU()
        self.functional_top = functional_top
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.block(x)
        x = torch.relu(x) if self.functional_top else self.relu(x)
        return self.fc(x.mean((2, 3)))


def test_default_layer():
    net = LeftHalfNet()
    assert occlusion.default_layer(net) is net.features[1]
    with pytest.raises(ValueError, match="Linear has no Conv2d layer"):
        occlusion.default_layer(nn.Linear(2, 2))
    # any other model: the module giving the last feature map before global pooling
    res = _Residual().eval()
    assert occlusion.default_layer(res) is res.relu
    with pytest.raises(ValueError, match="default layer 'relu' is not a module"):
        occlusion.default_layer(_Residual(functional_top=True))


def test_filter_drop_of_a_model_without_features_reads_its_default_layer():
    torch.manual_seed(0)
    net = _Residual().eval()
    x, masks = _image()
    res = occlusion.occlude_landmarks(net, x, [masks], [0], top_n=2, fill="zero")
    store = {}
    hook = net.relu.register_forward_hook(lambda m, i, o: store.__setitem__("a", o.detach().amax((2, 3))))
    occluded = x.clone()
    occluded[0, :, torch.from_numpy(masks["left"])] = 0.0
    with torch.no_grad():
        net(x)
        clean = store["a"]
        net(occluded)
        hidden = store["a"]
    hook.remove()
    chans = clean.topk(2, dim=1).indices
    assert np.array_equal(res.channels, chans.numpy())
    c, o = clean.gather(1, chans), hidden.gather(1, chans)
    expected = ((c - o) / c).mean().item()
    j = res.names.index("left")
    assert res.filter_drop[0, j] == pytest.approx(expected, rel=1e-5)
