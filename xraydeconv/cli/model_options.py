"""Which model a command projects or evaluates: our checkpoint (``--checkpoint``) or a user's own model
(``--model-factory`` + ``--weights``, optionally ``--classes`` and ``--input-size``), shared by ``project`` and
``evaluate``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

from xraydeconv.errors import UserError

if TYPE_CHECKING:
    from xraydeconv.training.checkpoint import Checkpoint

F = TypeVar("F", bound=Callable)


def model_options(checkpoint_help: str) -> Callable[[F], F]:
    """Add ``--checkpoint``, ``--model-factory``, ``--weights``, ``--classes`` and ``--input-size`` to a command.

    The command receives them as ``checkpoint``, ``model_factory``, ``weights``, ``classes`` and ``input_size``;
    pass them to :func:`model_source`.
    """
    options = [
        click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help=checkpoint_help + " Or give --model-factory and --weights instead."),
        click.option("--model-factory", default=None, metavar="MODULE:FUNCTION",
                     help="Your own model: package.module:function, called with no arguments, returning the "
                          "torch.nn.Module (looked up on PYTHONPATH and in the current folder); see "
                          "docs/own-models.md."),
        click.option("--weights", type=click.Path(path_type=Path), default=None, metavar="FILE",
                     help="With --model-factory: the state dict to load (torch.save(model.state_dict(), FILE))."),
        click.option("--classes", type=click.Path(path_type=Path), default=None, metavar="FILE",
                     help="With --model-factory: class names, one a line (or a JSON list), in logit order "
                          "[default: the 24 anatomy classes for 24 logits, else class-0 ...]."),
        click.option("--input-size", type=int, default=None, metavar="N",
                     help="With --model-factory: the side images are letterboxed to [default: the model's "
                          "input_size attribute, else 256]."),
    ]

    def decorate(fn: F) -> F:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def model_source(checkpoint: Path | None, model_factory: str | None, weights: Path | None, classes: Path | None,
                 input_size: int | None, device: str) -> Path | Checkpoint:
    """What the command reads its model from: the ``--checkpoint`` file as given (loaded later, by the run), or a
    user's model built by ``--model-factory`` with ``--weights`` loaded, on ``device``.

    Raises:
        UserError: neither or both of --checkpoint and --model-factory, --weights missing (or given without
            --model-factory), a failing factory or weights file (``load_user_model``).
    """
    if (checkpoint is None) == (model_factory is None):
        raise UserError("--checkpoint / --model-factory: give exactly one of the two (--model-factory with --weights)")
    if model_factory is None:
        for name, value in (("--weights", weights), ("--classes", classes), ("--input-size", input_size)):
            if value is not None:
                raise UserError(f"{name} {value}: only with --model-factory (a checkpoint holds its own)")
        return checkpoint
    if weights is None:
        raise UserError(f"--model-factory {model_factory}: --weights FILE is required (the model's state dict)")
    from xraydeconv.device import resolve_device
    from xraydeconv.training.user_model import load_user_model

    return load_user_model(model_factory, weights, classes=classes, input_size=input_size,
                           map_location=resolve_device(device))
