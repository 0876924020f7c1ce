"""The pipelined loader of project: batches in order, equal to loading them in place, the next one decoded on
another thread while the current one is worked on."""

import threading

import pytest
import torch

from xraydeconv.reports.pipeline import ImageSource, prefetched_batches


def _source(n: int, seen: list) -> ImageSource:
    def load(i: int) -> torch.Tensor:
        seen.append((i, threading.current_thread().name))
        return torch.full((1, 4, 4), float(i))

    return ImageSource([f"f{i}.png" for i in range(n)], [f"f{i}" for i in range(n)], [f"f{i}" for i in range(n)],
                       [None] * n, None, load)


def test_batches_in_order_loaded_ahead_on_another_thread():
    seen: list = []
    source = _source(7, seen)
    got = []
    for idx, x in source.batches(3):
        got.append((idx, x[:, 0, 0, 0].tolist()))
        if idx == [0, 1, 2]:
            # the consumer holds the first batch: the second is being (or has been) loaded meanwhile
            for _ in range(200):
                if any(i == 3 for i, _ in seen):
                    break
                threading.Event().wait(0.01)
            assert any(i == 3 for i, _ in seen)
    assert got == [([0, 1, 2], [0.0, 1.0, 2.0]), ([3, 4, 5], [3.0, 4.0, 5.0]), ([6], [6.0])]
    assert {name for _, name in seen} != {threading.current_thread().name}
    assert list(prefetched_batches(source, [])) == []


def test_an_error_in_a_load_reaches_the_consumer():
    def load(i: int) -> torch.Tensor:
        if i == 4:
            raise ValueError("f4.png: broken")
        return torch.zeros(1, 2, 2)

    source = ImageSource([f"f{i}.png" for i in range(6)], [f"f{i}" for i in range(6)], [f"f{i}" for i in range(6)],
                         [None] * 6, None, load)
    done = []
    with pytest.raises(ValueError, match="f4.png: broken"):
        for idx, _ in source.batches(2):
            done.append(idx)
    assert done == [[0, 1], [2, 3]]
