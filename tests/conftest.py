"""Shared test helpers: small data sets built on the fly (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def make_tiny_imagefolder(root: Path, per_split=(8, 3, 3), size: int = 32, seed: int = 0) -> Path:
    """Three learnable classes (a bright bar on the left, middle or right) as train/val/test PNG folders."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val", "test"), per_split):
        for k, c in enumerate(("left", "middle", "right")):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.uniform(0, 60, (size, size))
                x0 = 2 + k * (size // 3)
                img[size // 3 : 2 * size // 3, x0 : x0 + size // 4] += 150
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


def run_cli(args, capsys) -> tuple[int, str, str]:
    """``xraydeconv ARGS`` in this process through the console entry point: (exit code, stdout, stderr)."""
    import sys

    from xraydeconv.cli.main import main

    old = sys.argv
    sys.argv = ["xraydeconv", *map(str, args)]
    try:
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code
    finally:
        sys.argv = old
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture(scope="session")
def marker_phantoms(tmp_path_factory) -> Path:
    """One 64 px phantom per class in val and test, with the planted ``marker`` on the val films."""
    from xraydeconv.data.phantoms import generate

    return generate(tmp_path_factory.mktemp("ph") / "ph", per_class=1, size=64, seed=3, bias="marker",
                    splits=("val", "test"), progress=False)


@pytest.fixture(scope="session")
def tiny_imagefolder():
    """The :func:`make_tiny_imagefolder` builder, for tests that need their own small ImageFolder data set."""
    return make_tiny_imagefolder


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, tiny_imagefolder) -> Path:
    """One small ImageFolder data set (:func:`make_tiny_imagefolder`'s defaults) per test module, for reading only."""
    return tiny_imagefolder(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture
def keep_threads():
    """Restores torch's thread count after a test that trains (training sets it)."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


RAMP = np.arange(0, 4096, 64, dtype=np.uint16).reshape(8, 8)  # 12-bit values 0..4032


def write_dicom(path, pixels=None, photometric="MONOCHROME2", window=None, rescale=None, voi_lut=None):
    """A minimal uncompressed 12-bit single-frame DICOM file (skips the test when pydicom is missing)."""
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = RAMP if pixels is None else pixels
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if voi_lut is not None:
        item = Dataset()
        item.add_new(0x00283002, "US", [len(voi_lut), 0, 8])  # LUT Descriptor (ambiguous VR: say US)
        item.add_new(0x00283006, "US", [int(v) for v in voi_lut])  # LUT Data
        ds.VOILUTSequence = [item]
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def layer_gradient(net, module, x, c: int):
    """Autograd reference of the "gradient" projection: d/dx of sum(o_c * o_c.detach()) for ``module``'s output
    channel ``c``, for the single image ``x`` (1, C, H, W). Returns (C, H, W)."""
    import torch

    xi = x.clone().requires_grad_(True)
    store = {}
    h = module.register_forward_hook(lambda m, i, o: store.__setitem__("o", o))
    try:
        net(xi)
    finally:
        h.remove()
    o = store["o"][:, c]
    (g,) = torch.autograd.grad((o * o.detach()).sum(), xi)
    return g[0]
