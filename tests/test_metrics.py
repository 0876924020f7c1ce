"""Landmark metrics against hand-computed cases and a per-image reference written from the definitions."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from xraydeconv import metrics


def _ref(a: np.ndarray, s: np.ndarray) -> tuple[float, float, float]:
    """One image, straight from the Quantus-style definitions."""
    if not s.any():
        return np.nan, np.nan, np.nan
    top = a.max()
    pg = float(a.max() != a.min() and bool(s[a == top].any()))
    pos = np.clip(a, 0, None)
    rm = pos[s].sum() / pos.sum() if pos.sum() > 0 else np.nan
    k = int(s.sum())
    order = np.argsort(-a.ravel(), kind="stable")[:k]
    rr = s.ravel()[order].mean()
    return pg, rm, rr


def test_hand_made_cases():
    a = np.zeros((3, 4, 4), np.float32)
    s = np.zeros((3, 4, 4), bool)
    s[:, :2, :2] = True  # a quarter of the image
    a[0, 0, 0] = 1.0  # peak inside, all mass inside
    a[1, 3, 3] = 1.0  # peak outside, no mass inside
    a[1, 0, 0] = 0.5
    a[2] = 1.0  # constant: points nowhere
    pg = metrics.pointing_game(a, s)
    rm = metrics.relevance_mass(a, s)
    rr = metrics.relevance_rank(a, s)
    np.testing.assert_array_equal(pg, [1.0, 0.0, 0.0])
    np.testing.assert_allclose(rm, [1.0, 0.5 / 1.5, 0.25])
    # K = 4; ties among the zeros are taken in row-major order, so (0, 1) is ranked before (1, 0)
    np.testing.assert_allclose(rr, [0.5, 0.5, 0.5])
    a[0, :2, :2] = [[1.0, 0.9], [0.8, 0.7]]
    assert metrics.relevance_rank(a, s)[0] == 1.0
    np.testing.assert_allclose(metrics.area_share(s), [0.25] * 3)


def test_negative_relevance_is_ignored_by_mass():
    a = np.array([[[2.0, -5.0], [0.0, 0.0]]])
    s = np.array([[[True, False], [False, False]]])
    assert metrics.relevance_mass(a, s)[0] == pytest.approx(1.0)
    a_neg = -np.ones((1, 2, 2))
    assert np.isnan(metrics.relevance_mass(a_neg, s)[0])


def test_empty_mask_is_nan_and_skipped_by_summary():
    a = np.random.default_rng(0).random((2, 8, 8))
    s = np.zeros((2, 8, 8), bool)
    s[0, 2:4, 2:4] = True
    sc = metrics.score_landmarks(a, s)
    assert np.isnan(sc.pointing_game[1]) and np.isnan(sc.relevance_mass[1]) and np.isnan(sc.relevance_rank[1])
    summ = sc.summary()
    assert summ["n"] == 1
    assert summ["pointing_game"] == sc.pointing_game[0]
    assert summ["area_share"] == pytest.approx(4 / 64)


def test_tolerance_grows_the_mask():
    a = np.zeros((1, 32, 32))
    a[0, 10, 20] = 1.0
    s = np.zeros((1, 32, 32), bool)
    s[0, 10, 14] = True  # 6 px left of the peak
    assert metrics.pointing_game(a, s)[0] == 0.0
    assert metrics.pointing_game(a, s, tolerance=5)[0] == 0.0
    assert metrics.pointing_game(a, s, tolerance=6)[0] == 1.0


def test_per_filter_maps_broadcast_over_masks():
    rng = np.random.default_rng(1)
    a = rng.random((3, 5, 16, 16))
    s = rng.random((3, 16, 16)) > 0.7
    for fn in (metrics.pointing_game, metrics.relevance_mass, metrics.relevance_rank):
        out = fn(a, s)
        assert out.shape == (3, 5)
        for n in range(5):
            np.testing.assert_allclose(out[:, n], fn(a[:, n], s))


def test_torch_and_quantus_channel_axis_are_accepted():
    rng = np.random.default_rng(2)
    a = rng.random((2, 8, 8)).astype(np.float32)
    s = rng.random((2, 8, 8)) > 0.5
    ref = metrics.relevance_rank(a, s)
    np.testing.assert_allclose(metrics.relevance_rank(torch.from_numpy(a), torch.from_numpy(s)), ref)
    np.testing.assert_allclose(metrics.relevance_rank(a, s[:, None]), ref)


@pytest.mark.parametrize(
    "a_shape, s_shape",
    [((2, 8, 8), (2, 8, 9)), ((2, 8, 8), (3, 8, 8)), ((8, 8), (8, 8)), ((2, 8, 8), (2, 2, 8, 8))],
)
def test_shape_mismatch_is_a_clear_error(a_shape, s_shape):
    with pytest.raises(ValueError, match="s_batch|a_batch"):
        metrics.pointing_game(np.zeros(a_shape), np.zeros(s_shape, bool))


@settings(max_examples=60, deadline=None)
@given(
    a=arrays(np.float32, (3, 6, 7), elements=st.sampled_from([-1.0, 0.0, 0.25, 0.5, 1.0, 2.0])),
    s=arrays(np.bool_, (3, 6, 7)),
)
def test_matches_reference(a, s):
    pg = metrics.pointing_game(a, s)
    rm = metrics.relevance_mass(a, s)
    rr = metrics.relevance_rank(a, s)
    for i in range(3):
        ref = _ref(a[i], s[i])
        np.testing.assert_allclose([pg[i], rm[i], rr[i]], ref, rtol=1e-6)


def test_landmark_union_and_per_class():
    m = {"a": np.eye(4, dtype=bool), "b": np.fliplr(np.eye(4, dtype=bool)), "marker": np.ones((4, 4), bool)}
    u = metrics.landmark_union(m, (4, 4), exclude=("marker",))
    assert u.sum() == 8
    with pytest.raises(ValueError, match="'a'"):
        metrics.landmark_union({"a": np.zeros((3, 4), bool)}, (4, 4))
    out = metrics.per_class([1.0, 0.0, np.nan, 1.0], [0, 0, 1, 2], ["x", "y", "z", "w"])
    assert out["x"] == 0.5 and np.isnan(out["y"]) and out["z"] == 1.0 and "w" not in out
