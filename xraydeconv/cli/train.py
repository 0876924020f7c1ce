"""``xraydeconv train``: train one anatomy classifier, or all three and Table 1."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from xraydeconv.errors import UserError
from xraydeconv.io import check_output_folder

if TYPE_CHECKING:
    from xraydeconv.training.loop import TrainConfig

# option name -> TrainConfig field, for the options that a resumed run must not contradict
_CONFIG_OPTIONS = {
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "weight_decay": "weight_decay",
    "seed": "seed",
    "input_size": "input_size",
    "data": "data",
    "class_map": "class_map",
    "per_class": "phantoms_per_class",
    "augment": "augment",
    "checkpoint_every": "checkpoint_every",
    "deterministic": "deterministic",
}


@click.command(context_settings={"max_content_width": 100})
@click.option("--model", "model", metavar="NAME",
              help="shallow, deeper, deeper-aug (the three nets of Table 1) or resnet18.")
@click.option("--all", "all_models", is_flag=True,
              help="Train all three nets into OUT/<model>/ and write OUT/table1.md and OUT/table1.json.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (created; its parent must exist; locked while the run writes).")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Data set folder (phantoms, ImageFolder, MURA, ImageCLEF 2009, DICOM). Default: synthetic phantoms.")
@click.option("--class-map", type=click.Path(path_type=Path), default=None, help="Class-map file for the data set.")
@click.option("--preset", type=click.Choice(["demo", "full"]), default="demo", show_default=True,
              help="Defaults for the options below: demo = CPU-sized (128 px); full = 256 px, longer.")
@click.option("--epochs", type=int, default=None, help="Passes over the training split.")
@click.option("--batch-size", type=int, default=None, help="Global batch size (split across torchrun processes).")
@click.option("--lr", type=float, default=None, help="Peak learning rate (AdamW, one-cycle schedule).")
@click.option("--weight-decay", type=float, default=None, help="AdamW weight decay.")
@click.option("--seed", type=int, default=None, help="Seed of weights, data order, dropout and augmentation.")
@click.option("--input-size", type=int, default=None, help="Side of the square, letterboxed input images.")
@click.option("--per-class", type=int, default=None, help="Phantom training images per class (without --data).")
@click.option("--augment/--no-augment", default=None, help="Force augmentation on/off (default: deeper-aug only).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--threads", type=int, default=None, help="CPU threads (default: all cores, shared among processes).")
@click.option("--workers", type=int, default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--max-pixels", type=int, default=None,
              help="Refuse images with more pixels (a decompression-bomb guard). [default: Pillow's limit, 89478485]")
@click.option("--checkpoint-every", type=int, default=None,
              help="Steps between mid-epoch resume.pt snapshots (0: only at epoch ends). [default: 50]")
@click.option("--channels-last/--no-channels-last", default=None,
              help="Channels-last memory format for the convolutions. [default: on]")
@click.option("--deterministic", is_flag=True, default=False, help="Deterministic algorithms (exact resume on GPU).")
@click.option("--pool-backend", type=click.Choice(["auto", "kernel", "native"]), default=None,
              help="Max-pool implementation: our switch kernels or PyTorch's own ops. [default: auto]")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest snapshot.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--return-memory", is_flag=True,
              help="Leave glibc's malloc as it is. By default freed memory is kept for reuse (no mmap for large "
                   "blocks, no heap trimming), so that steps do not page-fault their feature maps in again.")
def train(
    model, all_models, out, data, class_map, preset, device, threads, workers, max_pixels, resume, quiet,
    return_memory, **overrides
) -> None:
    """Train an anatomy classifier on X-rays.

    \b
    Trains one of the three nets of the poster's Table 1:
      shallow      3 conv layers, no BatchNorm
      deeper       VGG-like, 8 conv layers with BatchNorm (16-32-64-128 channels)
      deeper-aug   the deeper net trained with random affine + intensity augmentation
    on --data, or on the embedded synthetic phantoms when --data is not given (generated once
    and cached under $XRAYDECONV_CACHE or ~/.cache/xraydeconv).

    \b
    Writes into --out:
      last.pt        the latest weights + full training state, every epoch (atomic)
      resume.pt      a mid-epoch snapshot every --checkpoint-every steps (removed at epoch end)
      best.pt        the weights with the best validation accuracy
      metrics.json   per-epoch history, best val accuracy, test accuracy, per-class accuracy, timings
      curves.png     loss and accuracy per epoch (train and val)
      confusion.png  confusion matrix on the test split (with the best.pt weights)

    A run killed at any point (even with SIGKILL) continues with --resume and ends with the
    same weights as an uninterrupted run (single process, same machine; add --deterministic on GPU).
    With --all the three nets are trained into OUT/<model>/ and Table 1 is written to
    OUT/table1.md and OUT/table1.json.

    \b
    Multi-process (DistributedDataParallel; gloo on CPU, NCCL on GPU), each rank reads its shard:
      torchrun --nproc-per-node 2 -m xraydeconv.cli.main train --model deeper --out runs/ddp

    \b
    Examples:
      xraydeconv train --model deeper-aug --out runs/deeper-aug
      xraydeconv train --model deeper --data ~/ImageCLEF2009 --preset full --device cuda --out runs/clef
      xraydeconv train --all --out runs/table1
      xraydeconv train --model deeper --out runs/deeper --resume
    """
    if all_models == bool(model):
        raise UserError("--model / --all: give exactly one of them (--model NAME, or --all for the three nets)")
    inputs = [(flag, path) for flag, path in (("--data", data), ("--class-map", class_map)) if path is not None]
    check_output_folder(out, overwrite=True, inputs=inputs)  # a run in --out is refused later unless --resume
    given = _given_options(overrides, data, class_map)
    if resume:
        _check_resume_consistency(out, model, _explicit_options(), given, all_models)
    runtime = {"device": device, "threads": threads, "num_workers": workers}
    if max_pixels is not None:
        runtime["max_pixels"] = max_pixels
    make_config = _config_factory(preset, given, runtime)
    _keep_memory(return_memory)
    if all_models:
        from xraydeconv.training.table1 import TABLE_MD, train_all

        train_all(out, make_config, resume=resume, progress=not quiet)
        click.echo(f"wrote {out / TABLE_MD}")
        click.echo((out / TABLE_MD).read_text() if (out / TABLE_MD).exists() else "", nl=False)
    else:
        from xraydeconv.training.loop import train as run

        run(make_config(model), out, resume=resume, progress=not quiet)


def _keep_memory(return_memory: bool) -> None:
    """Unless --return-memory: glibc's malloc keeps freed memory for reuse, so steps do not fault it in again."""
    if not return_memory:
        from xraydeconv.training.allocator import keep_freed_memory

        keep_freed_memory()


def _given_options(overrides: dict, data: Path | None, class_map: Path | None) -> dict:
    """The configuration options given (by name of their ``TrainConfig`` field), without the unset ones."""
    fields = {_CONFIG_OPTIONS.get(k, k): v for k, v in overrides.items()}
    # absolute paths: a resumed run must find its data from any working directory
    fields["data"] = str(data.resolve()) if data is not None else None
    fields["class_map"] = str(class_map.resolve()) if class_map is not None else None
    return {k: v for k, v in fields.items() if v is not None}


def _explicit_options() -> set[str]:
    """The ``TrainConfig`` fields whose options were typed on the command line (not defaults)."""
    ctx = click.get_current_context()
    typed = click.core.ParameterSource.COMMANDLINE
    return {f for k, f in _CONFIG_OPTIONS.items() if ctx.get_parameter_source(k) == typed}


def _config_factory(preset: str, given: dict, runtime: dict) -> Callable[[str], TrainConfig]:
    """The validated ``TrainConfig`` of each model name under ``preset`` with the options given."""
    from xraydeconv.training.loop import TrainConfig

    def make_config(name: str) -> TrainConfig:
        preset_fn = TrainConfig.demo if preset == "demo" else TrainConfig.full
        cfg = preset_fn(name, **given, **runtime)
        cfg.validate()
        return cfg

    return make_config


def _check_resume_consistency(out: Path, model: str | None, explicit: set[str], given: dict, train_all: bool) -> None:
    """A resumed run keeps its stored configuration: options that contradict it are an error, not ignored."""
    from xraydeconv.training.loop import LAST, RESUME, TrainConfig, latest_resume_state
    from xraydeconv.training.models import MODEL_NAMES

    dirs = [out / m for m in MODEL_NAMES] if train_all else [out]
    option_of = {f: o.replace("_", "-") for o, f in _CONFIG_OPTIONS.items()}
    for d in dirs:
        if not ((d / LAST).exists() or (d / RESUME).exists()):
            continue
        raw = latest_resume_state(d)
        stored = TrainConfig.from_dict(raw["config"]).to_dict()
        if model and raw["model_name"] != model:
            raise UserError(f"{d}: the run to resume trains {raw['model_name']!r}, not {model!r}")
        for field in sorted(explicit):
            if field in stored and given.get(field, False) != stored[field]:
                raise UserError(
                    f"{d}: the run to resume has {field}={stored[field]!r}; "
                    f"--{option_of[field]} {given.get(field)!r} contradicts it (leave it out to resume)"
                )
