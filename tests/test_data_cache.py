"""Decode-once caching: in shared memory (also across DataLoader workers) and in a memory-mapped .npy."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import xraydeconv.data.preprocess as pre
from xraydeconv.data import open_dataset


@pytest.fixture
def tree(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for c in ("hand", "knee", "skull"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (24, 18), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.fixture
def decodes(monkeypatch):
    """Counts calls of the image decoder (in this process)."""
    calls = []
    real = pre.decode_film

    def counting(path, *args):
        calls.append(path)
        return real(path, *args)

    monkeypatch.setattr(pre, "decode_film", counting)
    return calls


def _epoch(ds):
    return torch.stack([ds[i][0] for i in range(len(ds))])


def _open(root, **kw):
    return open_dataset(root, "train", input_size=32, val_fraction=0.0, test_fraction=0.0, **kw)


def test_second_epoch_does_not_decode(tree, decodes):
    ds = _open(tree)
    first = _epoch(ds)
    assert len(decodes) == len(ds) == 12 and ds.cached == 12
    second = _epoch(ds)
    assert len(decodes) == 12  # nothing decoded again
    assert torch.equal(first, second)


def test_without_cache_every_epoch_decodes(tree, decodes):
    ds = _open(tree, cache=False)
    a, b = _epoch(ds), _epoch(ds)
    assert len(decodes) == 24 and torch.equal(a, b) and ds.cached == 0


def test_dataloader_workers_fill_the_shared_cache(tree, decodes):
    ds = _open(tree)
    loader = DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context="fork")
    via_workers = torch.cat([x for x, _ in loader])
    assert len(decodes) == 0  # decoded in the worker processes ...
    assert ds.cached == 12  # ... into pages this process sees
    again = _epoch(ds)
    assert len(decodes) == 0 and torch.equal(via_workers, again)


def test_disk_cache_is_reused_by_a_later_run(tree, tmp_path, decodes):
    cache_dir = tmp_path / "cache"
    ds = _open(tree, cache_dir=cache_dir)
    first = _epoch(ds)
    assert len(decodes) == 12
    files = sorted(p.name for p in cache_dir.iterdir())
    flags = ds.cache_file.with_suffix(".flags").name  # which rows were noted (rescaled films) stays beside it
    assert files == sorted([ds.cache_file.name, flags]) and "partial" not in ds.cache_file.name
    later = _open(tree, cache_dir=cache_dir)  # a new process would see the same file
    assert later.cached == 12
    assert torch.equal(_epoch(later), first) and len(decodes) == 12
    assert np.load(later.cache_file, mmap_mode="r").shape == (12, 32, 32)


def test_disk_cache_key_follows_files_and_size(tree, tmp_path, decodes):
    cache_dir = tmp_path / "cache"
    _epoch(_open(tree, cache_dir=cache_dir))
    img = tree / "hand" / "0.png"
    Image.fromarray(np.full((24, 18), 7, dtype=np.uint8)).save(img)
    st = os.stat(img)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a changed file gets a new key
    changed = _open(tree, cache_dir=cache_dir)
    assert changed.cached == 0
    i = [r.path for r in changed.records].index(img)
    assert float(changed[i][0].max()) == pytest.approx(7 / 255)
    bigger = open_dataset(tree, "train", input_size=48, val_fraction=0.0, test_fraction=0.0, cache_dir=cache_dir)
    assert bigger.cached == 0 and bigger[0][0].shape == (1, 48, 48)


def test_interrupted_disk_cache_resumes(tree, tmp_path, decodes):
    cache_dir = tmp_path / "cache"
    ds = _open(tree, cache_dir=cache_dir)
    for i in range(5):
        ds[i]
    assert not ds.cache_file.exists()  # never published half-filled
    resumed = _open(tree, cache_dir=cache_dir)
    assert resumed.cached == 5
    _epoch(resumed)
    assert len(decodes) == 12 and resumed.cache_file.exists()
    assert not any("partial" in p.name for p in cache_dir.iterdir())


def test_dataset_pickles_for_spawned_workers(tree, tmp_path):
    for kw in ({}, {"cache_dir": tmp_path / "cache"}, {"cache": False}):
        ds = _open(tree, **kw)
        expect = _epoch(ds)
        clone = pickle.loads(pickle.dumps(ds))
        assert torch.equal(_epoch(clone), expect)


def test_two_readers_share_one_disk_store(tree, tmp_path, decodes):
    # e.g. two training ranks on one machine: neither truncates the file the other maps
    cache_dir = tmp_path / "cache"
    a, b = _open(tree, cache_dir=cache_dir), _open(tree, cache_dir=cache_dir)
    expect = _epoch(_open(tree, cache=False))
    decodes.clear()
    for i in range(len(a)):
        (a if i % 2 else b)[i]
    assert len(decodes) == 12 and a.cached == b.cached == 12
    assert torch.equal(_epoch(a), expect) and torch.equal(_epoch(b), expect) and len(decodes) == 12
    names = sorted(p.name for p in cache_dir.iterdir())
    assert a.cache_file.exists() and names == sorted([a.cache_file.name, a.cache_file.with_suffix(".flags").name])


def test_preload_decodes_everything_once_on_threads(tree, tmp_path, decodes, capsys):
    ds = _open(tree)
    ds[3]
    assert ds.preload(workers=2) == 11 and ds.cached == 12
    assert "decoding imagefolder train" in capsys.readouterr().err  # the progress bar
    assert ds.preload() == 0 and len(decodes) == 12
    _epoch(ds)
    assert len(decodes) == 12
    disk = _open(tree, cache_dir=tmp_path / "cache")
    assert disk.preload(workers=2, progress=False) == 12 and disk.cache_file.exists()
    assert _open(tree, cache=False).preload() == 0  # nothing to keep without a cache


def test_no_room_for_the_memory_cache_falls_back_to_decoding(tree, monkeypatch, decodes, caplog):
    import xraydeconv.data.cache as cache_mod

    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(cache_mod.mmap, "mmap", refuse)
    ds = _open(tree)
    assert "no room for an in-memory cache of 12 images" in caplog.text
    a, b = _epoch(ds), _epoch(ds)
    assert torch.equal(a, b) and len(decodes) == 24 and ds.cached == 0
