"""The ``xraydeconv`` command group.

Subcommands live one per module in this package and are imported only when invoked, so
``xraydeconv --help`` stays fast and one broken optional dependency cannot take the others down.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

import click

# command name -> (module inside xraydeconv.cli, attribute, one-line summary)
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("train", "train", "Train an anatomy classifier (shallow, deeper, deeper-aug) or all three."),
    "project": ("project", "project", "Project the top-n filters of a trained net back into its input images."),
    "evaluate": ("evaluate", "evaluate", "Accuracy, confusion matrix and landmark agreement of a checkpoint."),
    "data": ("data", "data", "Make and inspect data sets (synthetic phantoms, contact sheets)."),
    "bench": ("bench", "bench", "Kernel vs native ratio report for the switch pooling ops."),
    "demo": ("demo", "demo", "The whole story in one command: phantoms, three nets, Table 1, projections, gallery."),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _COMMANDS:
            return None
        module, attr, summary = _COMMANDS[name]
        try:
            mod = importlib.import_module(f"xraydeconv.cli.{module}")
        except ModuleNotFoundError as exc:
            if exc.name == f"xraydeconv.cli.{module}":
                return click.Command(name, help=f"{summary} (not available in this build)", short_help=summary)
            raise
        return getattr(mod, attr)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="xraydeconv")
def cli() -> None:
    """xraydeconv: train CNNs to recognise the anatomy in X-rays and show what they look at.

    Each network's most activated last-layer filters are projected back into the image with a
    Zeiler & Fergus deconvnet and scored against radiological landmarks.
    Run `xraydeconv COMMAND --help` for the manual of each command.
    """


_MAIN_PID = os.getpid()


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM cleans up like Ctrl-C: temporary outputs are removed on the way out. Forked workers inherit the
    # handler; they just end, as they would without it, and leave the cleanup to the main process.
    if os.getpid() != _MAIN_PID:
        os._exit(128 + signum)
    raise KeyboardInterrupt


def main() -> None:
    """Console entry point: bad input ends with one ``error:`` line on stderr and exit 2, no traceback."""
    from xraydeconv.errors import UserError, error_message

    signal.signal(signal.SIGTERM, _terminate)
    try:
        cli.main(standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:  # option errors: one line, not click's usage block
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(2)
    except (UserError, OSError) as exc:  # OSError: the file system refused; the line names the path
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process meets the error; rank 0 says it
            click.echo(f"error: {error_message(exc)}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
