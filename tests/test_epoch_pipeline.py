"""The training loop's batch pipeline: the next batch loaded and augmented on a background thread gives the same
batches, the same random streams, the same snapshots and the same weights as preparing each batch in turn."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xraydeconv.prefetch import prefetched
from xraydeconv.training.checkpoint import read_checkpoint
from xraydeconv.training.distributed import DistInfo
from xraydeconv.training.loop import TrainConfig, Trainer, open_splits, train

# 24 training images in batches of 4: 6 steps per epoch, a resume.pt after steps 2 and 4
TINY = dict(model="deeper-aug", input_size=32, epochs=2, batch_size=4, threads=1, checkpoint_every=2, seed=5)
SNAPSHOT = Trainer.snapshot


pytestmark = pytest.mark.usefixtures("keep_threads")


@pytest.mark.parametrize("n", [0, 1, 2, 7])
def test_prefetched_gives_the_same_items_and_random_draws_as_a_plain_loop(n: int) -> None:
    def run(background: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        gen = torch.Generator().manual_seed(11)
        items = (torch.full((3,), float(i)) for i in range(n))
        out = list(prefetched(items, lambda t: t + torch.rand(3, generator=gen), background))
        return out, gen.get_state()

    plain, plain_state = run(False)
    ahead, ahead_state = run(True)
    gen = torch.Generator().manual_seed(11)
    expected = [torch.full((3,), float(i)) + torch.rand(3, generator=gen) for i in range(n)]
    assert len(plain) == len(ahead) == n
    for e, p, a in zip(expected, plain, ahead):
        assert torch.equal(e, p) and torch.equal(e, a)
    assert torch.equal(plain_state, gen.get_state()) and torch.equal(ahead_state, gen.get_state())


def test_prefetched_raises_the_error_of_prepare_at_the_item_that_failed() -> None:
    def prepare(i: int) -> int:
        if i == 2:
            raise ValueError("bad item 2")
        return 10 * i

    got = []
    with pytest.raises(ValueError, match="bad item 2"):
        for v in prefetched(range(5), prepare, background=True):
            got.append(v)
    assert got == [0, 10]


def _trainer(tiny_data: Path, out: Path) -> Trainer:
    cfg = TrainConfig(data=str(tiny_data), **TINY)
    splits = open_splits(cfg, log=lambda s: None)
    return Trainer(cfg, out, splits, DistInfo(), torch.device("cpu"), log=lambda s: None, progress=False)


def test_background_batches_equal_the_batches_prepared_in_turn(tiny_data: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    plain, ahead = _trainer(tiny_data, tmp_path / "a"), _trainer(tiny_data, tmp_path / "b")
    for epoch, start in ((0, 0), (1, 3)):
        xs = list(plain.epoch_batches(epoch, start, background=False))
        ys = list(ahead.epoch_batches(epoch, start, background=True))
        assert len(xs) == len(ys) == 6 - start
        for (x0, y0, s0), (x1, y1, s1) in zip(xs, ys):
            assert torch.equal(x0, x1) and torch.equal(y0, y1) and torch.equal(s0, s1)
        # the state after the last batch is where the generator stands once the epoch is consumed
        assert torch.equal(xs[-1][2], plain.aug_gen.get_state())
        assert torch.equal(ys[-1][2], ahead.aug_gen.get_state())
    # augmentation happened: the images differ from the stored ones
    stored = torch.stack([plain.splits.train[i][0] for i in range(len(plain.splits.train))])
    assert not any(torch.equal(x[0], s) for x, _, _ in xs for s in stored)


def _run(tiny_data: Path, out: Path, background: bool, monkeypatch) -> tuple[dict, list]:
    """A 2-epoch run; returns its metrics and (file, step, augmentation state, RNG state) saved in each snapshot."""
    snapshots = []

    def spy(self, path, epoch, step_in, stats):
        SNAPSHOT(self, path, epoch, step_in, stats)
        mine = read_checkpoint(path)[0]["training"]["ranks"][0]
        snapshots.append((path.name, step_in, mine["augment"], mine["rng"]["torch"]))
        if not background:  # nothing ran ahead: the saved state is where the generator stands
            assert torch.equal(mine["augment"], self.aug_gen.get_state())

    monkeypatch.setattr(Trainer, "snapshot", spy)
    monkeypatch.setattr(Trainer, "background", background)
    metrics = train(TrainConfig(data=str(tiny_data), **TINY), out, log=lambda s: None, progress=False)
    return metrics, snapshots


def test_training_with_the_background_thread_gives_identical_weights_and_snapshots(
    tiny_data: Path, tmp_path: Path, monkeypatch
) -> None:
    m0, snaps0 = _run(tiny_data, tmp_path / "plain", False, monkeypatch)
    m1, snaps1 = _run(tiny_data, tmp_path / "ahead", True, monkeypatch)
    # mid-epoch resume.pt after steps 2 and 4 of each epoch, last.pt at each epoch end
    assert [(name, step) for name, step, _, _ in snaps0] == [
        ("resume.pt", 2), ("resume.pt", 4), ("last.pt", 0)] * 2
    assert [(name, step) for name, step, _, _ in snaps1] == [(name, step) for name, step, _, _ in snaps0]
    for (_, _, aug0, rng0), (_, _, aug1, rng1) in zip(snaps0, snaps1):
        assert torch.equal(aug0, aug1) and torch.equal(rng0, rng1)
    for name in ("last.pt", "best.pt"):
        raw0, _ = read_checkpoint(tmp_path / "plain" / name)
        raw1, _ = read_checkpoint(tmp_path / "ahead" / name)
        assert raw0["state_dict"].keys() == raw1["state_dict"].keys()
        assert all(torch.equal(v, raw1["state_dict"][k]) for k, v in raw0["state_dict"].items())
    st0, st1 = (read_checkpoint(tmp_path / d / "last.pt")[0]["training"] for d in ("plain", "ahead"))
    assert torch.equal(st0["ranks"][0]["augment"], st1["ranks"][0]["augment"])
    drop = ("seconds",)
    assert [{k: v for k, v in h.items() if k not in drop} for h in m0["history"]] == [
        {k: v for k, v in h.items() if k not in drop} for h in m1["history"]]
    assert (m0["test_acc"], m0["test_loss"], m0["confusion"]) == (m1["test_acc"], m1["test_loss"], m1["confusion"])
