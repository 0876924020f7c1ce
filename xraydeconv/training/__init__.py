"""Training the anatomy classifiers: models, augmentation, the loop (single process or DDP), checkpoints, Table 1."""

from xraydeconv.training.checkpoint import load_checkpoint

__all__ = ["load_checkpoint"]
