"""Training of the anatomy classifiers: a config dataclass and one plain, readable loop.

The loop is written for exact resume. Everything random is a pure function of the seed or is checkpointed:

* the data order of an epoch is a pure function of (seed, epoch) (``distributed.epoch_batches``);
* augmentation draws from its own ``torch.Generator``, whose state is saved;
* dropout draws from the global torch RNG, whose state is saved (with the numpy and python ones);
* ``last.pt`` is written at the end of every epoch and ``resume.pt`` every ``checkpoint_every`` steps inside
  an epoch, both atomically, so a run killed at any moment (SIGKILL included) loses at most those steps.

``train(cfg, out_dir, resume=True)`` continues from whichever of the two is further along and, with the same
seed and a deterministic setup, ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from xraydeconv.errors import UserError
from xraydeconv.training import distributed
from xraydeconv.training.augment import AugmentConfig, augment_batch
from xraydeconv.training.checkpoint import (
    atomic_write_bytes,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from xraydeconv.training.models import AUGMENTED, MODEL_NAMES, build, count_parameters

LAST, BEST, RESUME, METRICS = "last.pt", "best.pt", "resume.pt", "metrics.json"
CURVES, CONFUSION = "curves.png", "confusion.png"
# how a run is executed, not what it computes: may change when a run is resumed
RUNTIME_FIELDS = ("device", "threads", "num_workers", "pool_backend", "channels_last")


@dataclass
class TrainConfig:
    """Everything that defines a training run. Stored in every checkpoint and in ``metrics.json``.

    Attributes:
        model: one of ``MODEL_NAMES``.
        epochs: number of passes over the training split.
        batch_size: global batch size (split evenly across ranks under ``torchrun``).
        lr: peak learning rate of the one-cycle schedule (AdamW).
        weight_decay: AdamW weight decay.
        seed: seeds weights, data order, dropout and augmentation.
        input_size: side of the square (letterboxed) input images.
        augment: train with ``xraydeconv.training.augment``; None means "if the model is deeper-aug".
        data: data set folder for ``xraydeconv.data.open_dataset``; None trains on the synthetic phantoms.
        class_map: optional class-map file passed to ``open_dataset``.
        phantoms_per_class: training images per class when generating phantoms.
        phantom_seed: seed of the phantom generator.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        threads: CPU threads for torch; None uses all cores (divided among local ranks).
        checkpoint_every: optimizer steps between mid-epoch ``resume.pt`` snapshots (0: epoch ends only).
        num_workers: DataLoader worker processes (0 is right when the decoded images are cached in memory).
        channels_last: run the convolutions in channels-last memory format (faster for oneDNN on CPU).
        deterministic: ``torch.use_deterministic_algorithms(True)``; needed for bit-exact resume on GPU.
        pool_backend: ``SwitchMaxPool2d`` backend (``"auto"``, ``"kernel"``, ``"native"``).
    """

    model: str = "deeper"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    input_size: int = 256
    augment: bool | None = None
    data: str | None = None
    class_map: str | None = None
    phantoms_per_class: int = 100
    phantom_seed: int = 0
    device: str = "auto"
    threads: int | None = None
    checkpoint_every: int = 50
    num_workers: int = 0
    channels_last: bool = True
    deterministic: bool = False
    pool_backend: str = "auto"

    @classmethod
    def demo(cls, model: str, **overrides) -> TrainConfig:
        """The preset of ``xraydeconv demo``: all three nets train in about 15 minutes on a 2-core CPU."""
        epochs = {"shallow": 20, "deeper": 12, "deeper-aug": 14}.get(model, 12)
        base = dict(model=model, epochs=epochs, batch_size=32, lr=3e-3, input_size=128, phantoms_per_class=40)
        return cls(**{**base, **overrides})

    @classmethod
    def full(cls, model: str, **overrides) -> TrainConfig:
        """The preset for real data sets at the design's 256x256 input (GPU recommended)."""
        epochs = {"shallow": 30, "deeper": 40, "deeper-aug": 60}.get(model, 40)
        base = dict(model=model, epochs=epochs, batch_size=64, lr=2e-3, input_size=256, phantoms_per_class=200)
        return cls(**{**base, **overrides})

    @property
    def augmented(self) -> bool:
        return self.model in AUGMENTED if self.augment is None else self.augment

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def validate(self) -> None:
        """Raise ``UserError`` for values no run can use."""
        if self.model not in MODEL_NAMES:
            raise UserError(f"--model {self.model!r}: unknown, choose one of {', '.join(MODEL_NAMES)}")
        if self.epochs < 1:
            raise UserError(f"--epochs {self.epochs}: must be at least 1")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size}: must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr {self.lr}: must be a positive number")
        if self.input_size < 16:
            raise UserError(f"--input-size {self.input_size}: must be at least 16")
        if self.checkpoint_every < 0:
            raise UserError(f"--checkpoint-every {self.checkpoint_every}: must be >= 0")
        if self.data is not None and not Path(self.data).is_dir():
            raise UserError(f"{self.data}: data directory does not exist")
        if self.class_map is not None and not Path(self.class_map).is_file():
            raise UserError(f"{self.class_map}: class-map file does not exist")


@dataclass
class Splits:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    test: torch.utils.data.Dataset | None
    class_names: list[str]
    root: str


def open_splits(cfg: TrainConfig, log: Callable[[str], None] = print) -> Splits:
    """Open train / val / test of ``cfg.data`` (or of the synthetic phantoms when it is None)."""
    from xraydeconv.data import open_dataset

    if cfg.data is None:
        from xraydeconv.data.phantoms import ensure_phantoms

        root = ensure_phantoms(per_class=cfg.phantoms_per_class, size=cfg.input_size, seed=cfg.phantom_seed)
    else:
        root = Path(cfg.data)
    kw = dict(input_size=cfg.input_size, class_map=cfg.class_map, cache=True)
    train_ds = open_dataset(root, split="train", **kw)
    val_ds = open_dataset(root, split="val", **kw)
    try:
        test_ds = open_dataset(root, split="test", **kw)
    except UserError as exc:
        log(f"note: no test split ({exc}); the final evaluation uses the validation split")
        test_ds = None
    for name, ds in (("val", val_ds), ("test", test_ds)):
        if ds is not None and list(ds.class_names) != list(train_ds.class_names):
            raise UserError(f"{root}: the {name} split has other classes than the train split")
    if len(train_ds) == 0:
        raise UserError(f"{root}: the train split has no images")
    return Splits(train_ds, val_ds, test_ds, list(train_ds.class_names), str(root))


def resolve_device(name: str, info: distributed.DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        if info.world_size > 1 and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > torch.cuda.device_count():
            raise UserError(f"--device {name}: {os.environ.get('LOCAL_WORLD_SIZE')} processes on this machine but "
                            f"{torch.cuda.device_count()} GPU(s); start one process per GPU or use --device cpu")
        if name == "cuda":
            return torch.device("cuda", info.local_rank)
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device (use auto, cpu, cuda or cuda:N)") from None


def _loader(ds, batches: list[list[int]], cfg: TrainConfig, device: torch.device):
    # an own generator: creating a DataLoader iterator otherwise draws a seed from the global RNG, which
    # would make a resumed epoch's dropout stream differ from the uninterrupted one
    return torch.utils.data.DataLoader(
        ds, batch_sampler=batches, num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0),
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, ds, num_classes: int, cfg: TrainConfig, device: torch.device, info: distributed.DistInfo
) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and the (true, predicted) confusion matrix of ``ds``, summed over all ranks."""
    model.eval()
    idx = distributed.eval_shard(len(ds), info)
    batches = [idx[i : i + 2 * cfg.batch_size] for i in range(0, len(idx), 2 * cfg.batch_size)]
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    for x, y in _loader(ds, batches, cfg, device):
        x, y = _to_device(x, y, cfg, device)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        pred = logits.argmax(1)
        confusion.index_put_((y, pred), torch.ones_like(y, dtype=torch.float64), accumulate=True)
    distributed.all_reduce_sum(confusion, info)
    distributed.all_reduce_sum(loss_sum, info)
    n = max(1.0, confusion.sum().item())
    return loss_sum.item() / n, confusion.cpu().numpy().round().astype(np.int64)


def _to_device(x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, device: torch.device):
    x = x.to(device, non_blocking=True)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def _accuracy(confusion: np.ndarray) -> float:
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total else 0.0


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def latest_resume_state(out: Path) -> dict | None:
    """The raw checkpoint in ``out`` furthest along (``resume.pt`` or ``last.pt``), or None."""
    best = None
    for name in (LAST, RESUME):  # on a tie last.pt wins: its epoch has been validated
        p = out / name
        if p.is_file():
            raw, _ = read_checkpoint(p)
            if raw.get("training") is None:
                raise UserError(f"{p}: holds no training state to resume from")
            if best is None or raw["step"] > best["step"]:
                best = raw
    return best


def _remove_stale_temp_files(out: Path) -> None:
    """Temp files of snapshots a killed run was writing (see ``atomic_write_bytes``)."""
    if out.is_dir():
        for name in (LAST, BEST, RESUME, METRICS, CURVES, CONFUSION):
            for p in out.glob(f".{name}.*.tmp"):
                p.unlink(missing_ok=True)


def _check_resumable(raw: dict, cfg: TrainConfig, class_names: list[str], out: Path) -> None:
    if raw["model_name"] != cfg.model:
        raise UserError(f"{out}: the run to resume trains {raw['model_name']!r}, not {cfg.model!r}")
    if list(raw["class_names"]) != list(class_names):
        raise UserError(f"{out}: the run to resume was trained on other classes than the data set given")


def train(
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    resume: bool = False,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
) -> dict:
    """Train ``cfg.model`` and write ``last.pt``, ``best.pt``, ``metrics.json``, ``curves.png`` and
    ``confusion.png`` into ``out_dir`` (only rank 0 writes under ``torchrun``).

    Args:
        cfg: the run's configuration; when resuming, only its ``RUNTIME_FIELDS`` are used and the rest
            comes from the snapshot.
        out_dir: output folder; must not hold a run already unless ``resume`` is set.
        resume: continue the run in ``out_dir`` from its latest snapshot (from scratch if it has none yet).
        log: one-line messages (default: ``tqdm.write`` to stderr).
        progress: show a tqdm bar per epoch on stderr.
    Returns:
        The content of ``metrics.json``.
    """
    info = distributed.from_env()
    if not info.is_main:
        log = lambda s: None  # noqa: E731  (one voice: rank 0 speaks for the job)
    log = log or (lambda s: tqdm.write(s, file=sys.stderr))
    out = Path(out_dir)
    raw = None
    if resume:
        if info.is_main:
            _remove_stale_temp_files(out)
        raw = latest_resume_state(out)
        if raw is not None:
            stored = TrainConfig.from_dict(raw["config"])
            runtime = {k: getattr(cfg, k) for k in RUNTIME_FIELDS}
            cfg = TrainConfig(**{**stored.to_dict(), **runtime})
        else:
            log(f"note: {out} holds no snapshot yet; starting from the beginning")
    elif (out / LAST).exists() or (out / RESUME).exists():
        raise UserError(f"{out}: already holds a training run; pass --resume to continue it or choose another --out")
    cfg.validate()

    device = resolve_device(cfg.device, info)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = cfg.threads or max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    if cfg.deterministic:
        if device.type == "cuda":  # cuBLAS needs a fixed workspace to be deterministic
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    distributed.init(info, device)
    try:
        return _run(cfg, out, raw, info, device, log, progress and info.is_main)
    finally:
        distributed.shutdown(info)


def _run(cfg, out: Path, raw: dict | None, info, device, log, progress: bool) -> dict:
    t_start = time.perf_counter()
    # one rank generates the phantoms, the others wait and then reuse them
    generating = cfg.data is None and info.enabled
    if generating and not info.is_main:
        distributed.barrier(info)
    splits = open_splits(cfg, log)
    if generating and info.is_main:
        distributed.barrier(info)
    num_classes = len(splits.class_names)
    if raw is not None:
        _check_resumable(raw, cfg, splits.class_names, out)
    if cfg.batch_size % info.world_size:
        raise UserError(f"--batch-size {cfg.batch_size}: must be a multiple of the {info.world_size} processes")

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    model = build(cfg.model, num_classes=num_classes, input_size=cfg.input_size, pool_backend=cfg.pool_backend)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(distributed.epoch_batches(len(splits.train), cfg.batch_size, cfg.seed, 0, info))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.2
    )
    aug_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 17 + info.rank)
    aug_cfg = AugmentConfig()

    epoch, step_in_epoch = 0, 0
    history: list[dict] = []
    best_acc, best_epoch, prior_seconds = -1.0, 0, 0.0
    epoch_stats = {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
    if raw is not None:
        st = raw["training"]
        model.load_state_dict(raw["state_dict"])
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        epoch, step_in_epoch = int(raw["epoch"]), int(st["step_in_epoch"])
        history, best_acc, best_epoch = list(st["history"]), float(st["best_val_acc"]), int(st["best_epoch"])
        epoch_stats, prior_seconds = dict(st["epoch_stats"]), float(st["seconds"])
        ranks = st["ranks"]
        if len(ranks) != info.world_size:
            log(f"note: resuming a {len(ranks)}-process run with {info.world_size}: same weights, other RNG streams")
        mine = ranks[info.rank % len(ranks)]
        set_rng_state(mine["rng"])
        aug_gen.set_state(mine["augment"])
        log(f"resuming {cfg.model} at epoch {epoch + 1}, step {step_in_epoch} of {steps_per_epoch}")

    ddp_model = model
    if info.enabled:
        device_ids = [device.index] if device.type == "cuda" else None
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    run_start = time.perf_counter() - prior_seconds
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)

    def snapshot(path: Path, ep: int, step_in: int, stats: dict) -> None:
        ranks = distributed.all_gather_objects({"rng": rng_state(), "augment": aug_gen.get_state()}, info)
        if not info.is_main:
            return
        training = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step_in_epoch": step_in,
            "epoch_stats": stats,
            "history": history,
            "best_val_acc": best_acc,
            "best_epoch": best_epoch,
            "seconds": time.perf_counter() - run_start,
            "ranks": ranks,
            "world_size": info.world_size,
        }
        save_checkpoint(path, model, model_name=cfg.model, class_names=splits.class_names,
                        input_size=cfg.input_size, config=cfg.to_dict(), epoch=ep,
                        step=ep * steps_per_epoch + step_in, metrics={"history": history}, training=training)

    while epoch < cfg.epochs:
        ddp_model.train()
        batches = distributed.epoch_batches(len(splits.train), cfg.batch_size, cfg.seed, epoch, info)
        t_epoch = time.perf_counter() - epoch_stats["seconds"]
        bar = tqdm(total=steps_per_epoch, initial=step_in_epoch, desc=f"{cfg.model} epoch {epoch + 1}/{cfg.epochs}",
                   unit="batch", disable=not progress, leave=False, dynamic_ncols=True)
        for x, y in _loader(splits.train, batches[step_in_epoch:], cfg, device):
            x, y = _to_device(x, y, cfg, device)
            if cfg.augmented:
                x = augment_batch(x, aug_gen, aug_cfg)
            logits = ddp_model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step_in_epoch += 1
            # one device sync per step for both numbers
            correct = (logits.argmax(1) == y).sum().to(loss.dtype)
            step_loss, step_correct = torch.stack([loss.detach(), correct]).tolist()
            epoch_stats["loss_sum"] += step_loss * len(y)
            epoch_stats["correct"] += int(step_correct)
            epoch_stats["seen"] += len(y)
            bar.update(1)
            bar.set_postfix(loss=f"{epoch_stats['loss_sum'] / epoch_stats['seen']:.3f}",
                            acc=f"{epoch_stats['correct'] / epoch_stats['seen']:.3f}")
            if cfg.checkpoint_every and step_in_epoch % cfg.checkpoint_every == 0 and step_in_epoch < steps_per_epoch:
                epoch_stats["seconds"] = time.perf_counter() - t_epoch
                snapshot(out / RESUME, epoch, step_in_epoch, dict(epoch_stats))
        bar.close()

        totals = torch.tensor([epoch_stats["loss_sum"], epoch_stats["correct"], epoch_stats["seen"]],
                              dtype=torch.float64, device=device)
        distributed.all_reduce_sum(totals, info)
        val_loss, val_conf = evaluate(model, splits.val, num_classes, cfg, device, info)
        val_acc = _accuracy(val_conf)
        seen = max(1.0, totals[2].item())
        row = {"epoch": epoch + 1, "train_loss": totals[0].item() / seen, "train_acc": totals[1].item() / seen,
               "val_loss": val_loss, "val_acc": val_acc, "lr": scheduler.get_last_lr()[0],
               "seconds": time.perf_counter() - t_epoch}
        history.append(row)
        epoch += 1
        step_in_epoch = 0
        epoch_stats = {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
        improved = val_acc > best_acc
        if improved:
            best_acc, best_epoch = val_acc, epoch
        log(f"{cfg.model} epoch {epoch}/{cfg.epochs}: train loss {row['train_loss']:.3f}"
            f" acc {100 * row['train_acc']:.1f}% | val loss {val_loss:.3f} acc {100 * val_acc:.1f}%"
            f"{' (best)' if improved else ''} | {row['seconds']:.1f} s")
        if improved and info.is_main:
            save_checkpoint(out / BEST, model, model_name=cfg.model, class_names=splits.class_names,
                            input_size=cfg.input_size, config=cfg.to_dict(), epoch=epoch, step=epoch * steps_per_epoch,
                            metrics={"val_acc": val_acc, "val_loss": val_loss, "epoch": epoch})
        # last.pt after best.pt: a run killed in between redoes this epoch's end rather than missing best.pt
        snapshot(out / LAST, epoch, 0, dict(epoch_stats))
        if info.is_main:
            (out / RESUME).unlink(missing_ok=True)
        distributed.barrier(info)

    # the test split is scored with the weights that were best on validation
    best_raw, _ = read_checkpoint(out / BEST, map_location="cpu")
    model.load_state_dict(best_raw["state_dict"])
    test_ds = splits.test if splits.test is not None else splits.val
    test_loss, test_conf = evaluate(model, test_ds, num_classes, cfg, device, info)
    per_class = {
        name: (float(test_conf[i, i] / test_conf[i].sum()) if test_conf[i].sum() else None)
        for i, name in enumerate(splits.class_names)
    }
    train_seconds = sum(h["seconds"] for h in history)
    metrics = {
        "model": cfg.model,
        "config": cfg.to_dict(),
        "data": splits.root,
        "class_names": splits.class_names,
        "num_images": {"train": len(splits.train), "val": len(splits.val),
                       "test": len(splits.test) if splits.test is not None else None},
        "params": count_parameters(model),
        "world_size": info.world_size,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "history": history,
        "best_val_acc": best_acc,
        "best_epoch": best_epoch,
        "test_split": "test" if splits.test is not None else "val",
        "test_acc": _accuracy(test_conf),
        "test_loss": test_loss,
        "per_class_acc": per_class,
        "confusion": test_conf.tolist(),
        "timings": {
            "train_seconds": train_seconds,
            "seconds_per_epoch": train_seconds / max(1, len(history)),
            "this_process_seconds": time.perf_counter() - t_start,
        },
    }
    if info.is_main:
        from xraydeconv.training.plots import plot_confusion, plot_curves

        plot_curves(history, out / CURVES, title=f"{cfg.model}: training curves")
        plot_confusion(test_conf, splits.class_names, out / CONFUSION,
                       title=f"{cfg.model}: {metrics['test_split']} accuracy {100 * metrics['test_acc']:.1f}%")
        _write_json(out / METRICS, metrics)
        log(f"{cfg.model}: best val acc {100 * best_acc:.1f}% (epoch {best_epoch}), "
            f"{metrics['test_split']} acc {100 * metrics['test_acc']:.1f}%; wrote {out}")
    distributed.barrier(info)
    return metrics
