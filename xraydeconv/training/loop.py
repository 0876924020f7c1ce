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

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from xraydeconv.data.preprocess import DEFAULT_MAX_PIXELS, check_max_pixels
from xraydeconv.device import available_cores, check_threads, resolve_device
from xraydeconv.errors import UserError
from xraydeconv.io import output_lock, write_json
from xraydeconv.prefetch import prefetched
from xraydeconv.training import distributed
from xraydeconv.training.augment import AugmentConfig, augment_batch
from xraydeconv.training.checkpoint import (
    non_finite_weights,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from xraydeconv.training.models import ARCHITECTURES, AUGMENTED, build, count_parameters

LAST, BEST, RESUME, METRICS = "last.pt", "best.pt", "resume.pt", "metrics.json"
CURVES, CONFUSION = "curves.png", "confusion.png"
# how a run is executed, not what it computes: may change when a run is resumed
RUNTIME_FIELDS = ("device", "threads", "num_workers", "pool_backend", "channels_last", "max_pixels")


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
        max_pixels: images with more pixels are refused when read (a decompression-bomb guard).
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
    max_pixels: int = DEFAULT_MAX_PIXELS

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
        if self.model not in ARCHITECTURES:
            raise UserError(f"--model {self.model!r}: unknown, choose one of {', '.join(ARCHITECTURES)}")
        if self.epochs < 1:
            raise UserError(f"--epochs {self.epochs}: must be at least 1")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size}: must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr {self.lr}: must be a positive number")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise UserError(f"--weight-decay {self.weight_decay}: must be a number >= 0")
        if self.num_workers < 0:
            raise UserError(f"--workers {self.num_workers}: must be >= 0")
        if self.threads is not None:
            check_threads(self.threads)
        check_max_pixels(self.max_pixels)
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


def open_splits(cfg: TrainConfig, log: Callable[[str], None] = print, preload: bool = False) -> Splits:
    """Open train / val / test of ``cfg.data`` (or of the synthetic phantoms when it is None).

    ``preload`` decodes every image up front (on threads) and logs how many films were rescaled.
    """
    from xraydeconv.data import open_dataset

    if cfg.data is None:
        from xraydeconv.data.phantoms import ensure_phantoms

        root = ensure_phantoms(per_class=cfg.phantoms_per_class, size=cfg.input_size, seed=cfg.phantom_seed)
    else:
        root = Path(cfg.data)
    kw = dict(input_size=cfg.input_size, class_map=cfg.class_map, cache=True, max_pixels=cfg.max_pixels)
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
    for ds in (train_ds, val_ds, test_ds):
        if preload and ds is not None:
            ds.preload(progress=False)
            if ds.rescaled:
                log(f"note: {ds.rescaled} of the {len(ds)} {ds.split} films use fewer bits than their files store "
                    "and were scaled by the depth they use")
    if len(train_ds.class_names) == 1:
        log(f"warning: {root} holds a single class ({train_ds.class_names[0]}): every prediction is right by "
            "construction, so accuracy means nothing")
    return Splits(train_ds, val_ds, test_ds, list(train_ds.class_names), str(root))


def batch_loader(ds, batches: list[list[int]], cfg: TrainConfig, device: torch.device) -> torch.utils.data.DataLoader:
    """The ``(x (b, C, S, S), y (b,))`` batches of ``ds`` with the given index lists, on the host."""
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
    for x, y in batch_loader(ds, batches, cfg, device):
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
    """Temp files of snapshots a killed run was writing (see ``xraydeconv.io.write_atomically``)."""
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
    created = not out.exists()
    if info.is_main:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
    # a second run into the same folder stops here instead of interleaving its snapshots with ours
    with output_lock(out) if info.is_main else contextlib.nullcontext():
        try:
            return _train_locked(cfg, out, resume, info, log, progress)
        except BaseException:
            if created and info.is_main and out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # a run that failed before writing anything leaves no empty folder behind
            raise


def _train_locked(cfg: TrainConfig, out: Path, resume: bool, info: distributed.DistInfo,
                  log: Callable[[str], None], progress: bool) -> dict:
    cfg, raw = _starting_point(cfg, out, resume, info, log)
    cfg.validate()
    device = resolve_device(cfg.device, info.local_rank, info.world_size)
    _configure_torch(cfg, device)
    distributed.init(info, device)
    try:
        return _run(cfg, out, raw, info, device, log, progress and info.is_main)
    finally:
        distributed.shutdown(info)


def _starting_point(
    cfg: TrainConfig, out: Path, resume: bool, info: distributed.DistInfo, log: Callable[[str], None]
) -> tuple[TrainConfig, dict | None]:
    """The configuration to run and the snapshot to continue from (None: start afresh)."""
    if not resume:
        if (out / LAST).exists() or (out / RESUME).exists():
            raise UserError(
                f"{out}: already holds a training run; pass --resume to continue it or choose another --out"
            )
        return cfg, None
    if info.is_main:
        _remove_stale_temp_files(out)
    raw = latest_resume_state(out)
    if raw is None:
        log(f"note: {out} holds no snapshot yet; starting from the beginning")
        return cfg, None
    stored = TrainConfig.from_dict(raw["config"])
    runtime = {k: getattr(cfg, k) for k in RUNTIME_FIELDS}
    return TrainConfig(**{**stored.to_dict(), **runtime}), raw


def _configure_torch(cfg: TrainConfig, device: torch.device) -> None:
    """Threads and determinism: process-wide torch settings of the run."""
    threads = cfg.threads or max(1, available_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    if cfg.deterministic:
        if device.type == "cuda":  # cuBLAS needs a fixed workspace to be deterministic
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def _run(cfg: TrainConfig, out: Path, raw: dict | None, info: distributed.DistInfo, device: torch.device,
         log: Callable[[str], None], progress: bool) -> dict:
    t_start = time.perf_counter()
    # one rank generates the phantoms, the others wait and then reuse them
    generating = cfg.data is None and info.enabled
    if generating and not info.is_main:
        distributed.barrier(info)
    splits = open_splits(cfg, log, preload=info.is_main)
    if generating and info.is_main:
        distributed.barrier(info)
    if raw is not None:
        _check_resumable(raw, cfg, splits.class_names, out)
    if cfg.batch_size % info.world_size:
        raise UserError(f"--batch-size {cfg.batch_size}: must be a multiple of the {info.world_size} processes")
    trainer = Trainer(cfg, out, splits, info, device, log, progress)
    if raw is not None:
        trainer.restore(raw)
    trainer.start()
    while trainer.state.epoch < cfg.epochs:
        trainer.train_epoch()
        trainer.end_epoch()
    metrics = trainer.final_metrics(t_start)
    if info.is_main:
        trainer.write_outputs(metrics)
    distributed.barrier(info)
    return metrics


def _fresh_stats() -> dict:
    return {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}


@dataclass
class _State:
    """Where a run stands, besides weights, optimizer, schedule and RNGs; all of it goes into the snapshots."""

    epoch: int = 0
    step_in_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_acc: float = -1.0
    best_epoch: int = 0
    epoch_stats: dict = field(default_factory=_fresh_stats)
    prior_seconds: float = 0.0


class Trainer:
    """One training run: the model, its optimizer and schedule, and the steps of the loop.

    ``background`` (default True): load and augment the next batch on a thread while the current one trains;
    the batches, their order and every random draw are the same either way.
    """

    background: bool = True

    def __init__(self, cfg: TrainConfig, out: Path, splits: Splits, info: distributed.DistInfo,
                 device: torch.device, log: Callable[[str], None], progress: bool) -> None:
        self.cfg, self.out, self.splits, self.info, self.device, self.log = cfg, out, splits, info, device, log
        self.progress = progress
        self.num_classes = len(splits.class_names)
        # the order of these draws from the global RNG is part of the run: weights first, then nothing else
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        model = build(cfg.model, num_classes=self.num_classes, input_size=cfg.input_size,
                      pool_backend=cfg.pool_backend)
        model.to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = self.ddp_model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = len(distributed.epoch_batches(len(splits.train), cfg.batch_size, cfg.seed, 0, info))
        total = cfg.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=cfg.lr, total_steps=total, pct_start=warmup_fraction(total)
        )
        self.aug_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 17 + info.rank)
        self.aug_cfg = AugmentConfig()
        # the augmentation stream after the last batch trained on: the background thread draws ahead of it
        self.aug_state = self.aug_gen.get_state()
        self.state = _State()
        self.run_start = self.t_epoch = 0.0

    def restore(self, raw: dict) -> None:
        """Continue from a snapshot written by :meth:`snapshot`."""
        st = raw["training"]
        self.model.load_state_dict(raw["state_dict"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.state = _State(
            epoch=int(raw["epoch"]), step_in_epoch=int(st["step_in_epoch"]), history=list(st["history"]),
            best_acc=float(st["best_val_acc"]), best_epoch=int(st["best_epoch"]),
            epoch_stats=dict(st["epoch_stats"]), prior_seconds=float(st["seconds"]),
        )
        ranks = st["ranks"]
        if len(ranks) != self.info.world_size:
            self.log(f"note: resuming a {len(ranks)}-process run with {self.info.world_size}: "
                     "same weights, other RNG streams")
        mine = ranks[self.info.rank % len(ranks)]
        set_rng_state(mine["rng"])
        self.aug_gen.set_state(mine["augment"])
        self.aug_state = self.aug_gen.get_state()
        self.log(f"resuming {self.cfg.model} at epoch {self.state.epoch + 1}, step {self.state.step_in_epoch} "
                 f"of {self.steps_per_epoch}")

    def start(self) -> None:
        """Wrap the model for DDP, start the clock and make the output folder."""
        if self.info.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.run_start = time.perf_counter() - self.state.prior_seconds
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)

    def _save(self, path: Path, epoch: int, step: int, metrics: dict, training: dict | None = None) -> None:
        cfg = self.cfg
        save_checkpoint(path, self.model, model_name=cfg.model, class_names=self.splits.class_names,
                        input_size=cfg.input_size, config=cfg.to_dict(), epoch=epoch, step=step, metrics=metrics,
                        training=training)

    def snapshot(self, path: Path, epoch: int, step_in: int, stats: dict) -> None:
        """Everything an exact resume needs (all ranks take part; rank 0 writes). Never non-finite weights."""
        bad = non_finite_weights(self.model.state_dict())
        if bad:
            raise self._diverged(f"{len(bad)} weight tensors hold NaN or infinity (e.g. {bad[0]})")
        ranks = distributed.all_gather_objects({"rng": rng_state(), "augment": self.aug_state}, self.info)
        if not self.info.is_main:
            return
        st = self.state
        training = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step_in_epoch": step_in,
            "epoch_stats": stats,
            "history": st.history,
            "best_val_acc": st.best_acc,
            "best_epoch": st.best_epoch,
            "seconds": time.perf_counter() - self.run_start,
            "ranks": ranks,
            "world_size": self.info.world_size,
        }
        self._save(path, epoch, epoch * self.steps_per_epoch + step_in, {"history": st.history}, training)

    def _diverged(self, what: str) -> UserError:
        """The one-line error of a run whose numbers left the finite range; the snapshots on disk stay as they are."""
        st = self.state
        kept = [p.name for p in (self.out / RESUME, self.out / LAST, self.out / BEST) if p.is_file()]
        where = f"kept {', '.join(kept)} from before" if kept else "no snapshot had been written yet"
        return UserError(f"{self.out}: training diverged at epoch {st.epoch + 1}, step {st.step_in_epoch}: {what}; "
                         f"{where} (try a lower --lr)")

    def train_epoch(self) -> None:
        """The remaining steps of the current epoch, with mid-epoch snapshots."""
        cfg, st = self.cfg, self.state
        self.ddp_model.train()
        self.t_epoch = time.perf_counter() - st.epoch_stats["seconds"]
        bar = tqdm(total=self.steps_per_epoch, initial=st.step_in_epoch,
                   desc=f"{cfg.model} epoch {st.epoch + 1}/{cfg.epochs}", unit="batch", disable=not self.progress,
                   leave=False, dynamic_ncols=True)
        for x, y, aug_state in self.epoch_batches(st.epoch, st.step_in_epoch):
            self._count(*self.compute_step(x, y), len(y))
            self.aug_state = aug_state
            stats = st.epoch_stats
            bar.update(1)
            seen = stats["seen"]
            bar.set_postfix(loss=f"{stats['loss_sum'] / seen:.3f}", acc=f"{stats['correct'] / seen:.3f}")
            every = cfg.checkpoint_every
            if every and st.step_in_epoch % every == 0 and st.step_in_epoch < self.steps_per_epoch:
                stats["seconds"] = time.perf_counter() - self.t_epoch
                self.snapshot(self.out / RESUME, st.epoch, st.step_in_epoch, dict(stats))
        bar.close()

    def epoch_batches(self, epoch: int, start: int = 0, background: bool | None = None
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch`` from step ``start`` on, ready for :meth:`compute_step`, as
        :meth:`prepare_batch` gives them; the next one is prepared on a background thread while the caller
        trains on the current one (``background``, default ``self.background``). The augmentation generator
        runs ahead of the batches consumed: the state after each batch comes with it."""
        cfg = self.cfg
        batches = distributed.epoch_batches(len(self.splits.train), cfg.batch_size, cfg.seed, epoch, self.info)
        loader = batch_loader(self.splits.train, batches[start:], cfg, self.device)
        return prefetched(loader, self.prepare_batch, self.background if background is None else background)

    def prepare_batch(self, batch: tuple[torch.Tensor, torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A loaded batch ``(x (B, 1, S, S), y (B,))`` moved to the device (channels-last when configured) and
        augmented when the run augments; returns ``(x, y, augmentation generator state after it)``."""
        x, y = _to_device(*batch, self.cfg, self.device)
        if self.cfg.augmented:
            x = augment_batch(x, self.aug_gen, self.aug_cfg)
        return x, y, self.aug_gen.get_state()

    def compute_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer and schedule step on a ready batch (x: (B, 1, S, S) on the device, y: (B,)).

        Returns the batch's mean loss and its number of right predictions (0-dim tensors, not synchronised).
        """
        logits = self.ddp_model(x)
        loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach(), (logits.argmax(1) == y).sum()

    def _count(self, loss: torch.Tensor, correct: torch.Tensor, n: int) -> None:
        """Count a finished step into the epoch's statistics; stops a run whose loss is not finite."""
        st = self.state
        st.step_in_epoch += 1
        # one device sync per step for both numbers
        step_loss, step_correct = torch.stack([loss, correct.to(loss.dtype)]).tolist()
        if not math.isfinite(step_loss):
            raise self._diverged(f"the training loss is {step_loss}")
        st.epoch_stats["loss_sum"] += step_loss * n
        st.epoch_stats["correct"] += int(step_correct)
        st.epoch_stats["seen"] += n

    def end_epoch(self) -> None:
        """Validate, log the epoch's row, and write ``best.pt`` (when improved) and ``last.pt``."""
        st, info = self.state, self.info
        stats = st.epoch_stats
        totals = torch.tensor([stats["loss_sum"], stats["correct"], stats["seen"]], dtype=torch.float64,
                              device=self.device)
        distributed.all_reduce_sum(totals, info)
        val_loss, val_conf = evaluate(self.model, self.splits.val, self.num_classes, self.cfg, self.device, info)
        if not math.isfinite(val_loss):
            raise self._diverged(f"the validation loss is {val_loss}")
        val_acc = _accuracy(val_conf)
        seen = max(1.0, totals[2].item())
        row = {"epoch": st.epoch + 1, "train_loss": totals[0].item() / seen, "train_acc": totals[1].item() / seen,
               "val_loss": val_loss, "val_acc": val_acc, "lr": self.scheduler.get_last_lr()[0],
               "seconds": time.perf_counter() - self.t_epoch}
        st.history.append(row)
        st.epoch += 1
        st.step_in_epoch = 0
        st.epoch_stats = _fresh_stats()
        improved = val_acc > st.best_acc
        if improved:
            st.best_acc, st.best_epoch = val_acc, st.epoch
        self.log(f"{self.cfg.model} epoch {st.epoch}/{self.cfg.epochs}: train loss {row['train_loss']:.3f}"
                 f" acc {100 * row['train_acc']:.1f}% | val loss {val_loss:.3f} acc {100 * val_acc:.1f}%"
                 f"{' (best)' if improved else ''} | {row['seconds']:.1f} s")
        if improved and info.is_main:
            self._save(self.out / BEST, st.epoch, st.epoch * self.steps_per_epoch,
                       {"val_acc": val_acc, "val_loss": val_loss, "epoch": st.epoch})
        # last.pt after best.pt: a run killed in between redoes this epoch's end rather than missing best.pt
        self.snapshot(self.out / LAST, st.epoch, 0, dict(st.epoch_stats))
        if info.is_main:
            (self.out / RESUME).unlink(missing_ok=True)
        distributed.barrier(info)

    def final_metrics(self, t_start: float) -> dict:
        """Score the test split (val when there is none) with the weights that were best on validation."""
        cfg, splits, st = self.cfg, self.splits, self.state
        best_raw, _ = read_checkpoint(self.out / BEST, map_location="cpu")
        self.model.load_state_dict(best_raw["state_dict"])
        test_ds = splits.test if splits.test is not None else splits.val
        test_loss, test_conf = evaluate(self.model, test_ds, self.num_classes, cfg, self.device, self.info)
        per_class = {
            name: (float(test_conf[i, i] / test_conf[i].sum()) if test_conf[i].sum() else None)
            for i, name in enumerate(splits.class_names)
        }
        train_seconds = sum(h["seconds"] for h in st.history)
        return {
            "model": cfg.model,
            "config": cfg.to_dict(),
            "data": splits.root,
            "class_names": splits.class_names,
            "num_images": {"train": len(splits.train), "val": len(splits.val),
                           "test": len(splits.test) if splits.test is not None else None},
            "rescaled_films": {"train": splits.train.rescaled, "val": splits.val.rescaled,
                               "test": splits.test.rescaled if splits.test is not None else None},
            "params": count_parameters(self.model),
            "world_size": self.info.world_size,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "history": st.history,
            "best_val_acc": st.best_acc,
            "best_epoch": st.best_epoch,
            "test_split": "test" if splits.test is not None else "val",
            "test_acc": _accuracy(test_conf),
            "test_loss": test_loss,
            "per_class_acc": per_class,
            "confusion": test_conf.tolist(),
            "timings": {
                "train_seconds": train_seconds,
                "seconds_per_epoch": train_seconds / max(1, len(st.history)),
                "this_process_seconds": time.perf_counter() - t_start,
            },
        }

    def write_outputs(self, metrics: dict) -> None:
        """The pictures and ``metrics.json`` (rank 0)."""
        from xraydeconv.training.plots import plot_confusion, plot_curves

        cfg, out = self.cfg, self.out
        plot_curves(metrics["history"], out / CURVES, title=f"{cfg.model}: training curves")
        plot_confusion(np.asarray(metrics["confusion"]), self.splits.class_names, out / CONFUSION,
                       title=f"{cfg.model}: {metrics['test_split']} accuracy {100 * metrics['test_acc']:.1f}%")
        write_json(metrics, out / METRICS)
        self.log(f"{cfg.model}: best val acc {100 * self.state.best_acc:.1f}% (epoch {self.state.best_epoch}), "
                 f"{metrics['test_split']} acc {100 * metrics['test_acc']:.1f}%; wrote {out}")


def warmup_fraction(total_steps: int) -> float:
    """``pct_start`` of the one-cycle schedule: 20 % warm-up, but never a warm-up phase of zero length.

    ``OneCycleLR`` ends its warm-up at step ``pct_start * total_steps - 1`` and divides by that length, so
    ``0.2`` fails for a 5-step run; such a run warms up over 2 steps instead.
    """
    pct = 0.2
    if pct * total_steps - 1 == 0:
        pct = 2 / total_steps
    return pct
