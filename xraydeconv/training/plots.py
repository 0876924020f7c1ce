"""Pictures of a training run: loss/accuracy curves per epoch and the test confusion matrix (matplotlib Agg)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from xraydeconv.io import write_atomically  # noqa: E402


def _save(fig: plt.Figure, path: str | os.PathLike) -> None:
    try:
        write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)


def plot_curves(history: Sequence[dict], path: str | os.PathLike, title: str = "") -> None:
    """Train/val loss and accuracy per epoch, side by side, written atomically as a PNG."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "s-", label="val")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_acc.plot(epochs, [100 * h["train_acc"] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [100 * h["val_acc"] for h in history], "s-", label="val")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_ylim(0, 100)
    ax_acc.legend(loc="lower right")
    ax_acc.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], path: str | os.PathLike, title: str = "") -> None:
    """Row-normalised confusion matrix (rows: true class, columns: predicted), counts written in the cells."""
    confusion = np.asarray(confusion, dtype=np.int64)
    k = len(class_names)
    rows = confusion.sum(axis=1, keepdims=True)
    frac = np.divide(confusion, rows, out=np.zeros(confusion.shape, dtype=float), where=rows > 0)
    side = max(6.0, 0.38 * k + 2.5)
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(k), class_names, rotation=90, fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    for i in range(k):
        for j in range(k):
            if confusion[i, j]:
                ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if frac[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)
