"""Data sets: ImageCLEF 2009 / IRMA, ImageFolder, MURA, DICOM and the embedded synthetic phantoms.

``open_dataset(root, split)`` detects the format and returns an :class:`XrayDataset`;
``load_image(path, input_size)`` preprocesses a single file exactly like the data sets do.
"""

from xraydeconv.data.dataset import XrayDataset, open_dataset
from xraydeconv.data.preprocess import load_image
from xraydeconv.data.record import Record

__all__ = ["open_dataset", "load_image", "XrayDataset", "Record"]
