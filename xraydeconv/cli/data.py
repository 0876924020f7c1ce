"""``xraydeconv data``: make and inspect data sets (synthetic phantoms, contact sheets)."""

from __future__ import annotations

import time
from pathlib import Path

import click


@click.group("data", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def data() -> None:
    """Make and inspect data sets.

    \b
    COMMANDS
      phantoms        write synthetic radiographs of all 24 classes with landmark masks
      contact-sheet   one PNG with a few images of every class and their landmark outlines

    Run `xraydeconv data COMMAND --help` for the manual of each.
    """


def _splits(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    from xraydeconv.data.phantoms import SPLITS

    names = tuple(s.strip() for s in value.split(",") if s.strip())
    bad = [s for s in names if s not in SPLITS]
    if not names or bad:
        raise click.BadParameter(f"expected a comma-separated subset of {','.join(SPLITS)}, got {value!r}")
    return names


@data.command("phantoms")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to create (must not exist or be empty, unless --force).")
@click.option("--per-class", default=200, show_default=True, type=click.IntRange(min=1),
              help="Training images per class.")
@click.option("--val-per-class", type=click.IntRange(min=0), default=None,
              help="Validation images per class  [default: max(2, per-class // 5)]")
@click.option("--test-per-class", type=click.IntRange(min=0), default=None,
              help="Test images per class  [default: max(2, per-class // 5)]")
@click.option("--size", default=256, show_default=True, type=click.IntRange(32, 2048),
              help="Image side in pixels (square films).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed; the same arguments give byte-identical files.")
@click.option("--bias", type=click.Choice(["none", "marker"]), default="none", show_default=True,
              help="Plant a class-specific lead marker in the train and val splits (the test split stays clean).")
@click.option("--splits", default="train,val,test", show_default=True, callback=_splits,
              help="Comma-separated splits to write.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes to render with  [default: number of CPUs, at most 8]")
@click.option("--force", is_flag=True, help="Replace --out if it exists and is not empty.")
def phantoms(out: Path, per_class: int, val_per_class: int | None, test_per_class: int | None, size: int, seed: int,
             bias: str, splits: tuple[str, ...], workers: int | None, force: bool) -> None:
    """Write synthetic radiographs of the 24 anatomy classes, with landmark masks.

    Each film is a projection of simple 3-D shapes of bone and soft tissue (ellipsoids, capsules,
    bent tubes): the path length through each shape is computed analytically per pixel and the
    film is 1 - exp(-k·Σ μ·t), so bone is bright over soft tissue. Pose, scale, rotation,
    laterality (mirroring), body size, foreign bodies (electrodes, wires), exposure, blur, noise
    and collimation vary from film to film; the class is told by its anatomy only.

    \b
    OUTPUT (an ImageFolder tree the loaders read like real data)
      OUT/dataset.json                         classes, landmark names, size, seed, counts, bias
      OUT/<split>/<class>/<id>.png             8-bit grayscale film, id = 000000, 000001, ...
      OUT/<split>/<class>/<id>.landmarks/<landmark>.png
                                               binary 0/255 mask of each visible landmark

    The tree is built in a temporary folder beside OUT and renamed into place when complete.

    \b
    BIAS
      --bias marker puts a small lead letter on every train and val film, like a technologist's
      initials marker: the letter (A for the first class ... X for the 24th) and its place
      belong to the class. Its mask is written as <id>.landmarks/marker.png; test films stay
      clean (identical to the unbiased tree's). A net that takes the shortcut loses accuracy on
      the test split and its projections sit on the marker. "marker" is not listed among the
      anatomical landmarks of dataset.json.

    \b
    EXAMPLES
      xraydeconv data phantoms --out data/phantoms --per-class 200
      xraydeconv data phantoms --out data/biased --per-class 200 --bias marker
    """
    from xraydeconv.data.phantoms import generate

    started = time.perf_counter()
    path = generate(out, per_class=per_class, size=size, seed=seed, bias=None if bias == "none" else bias,
                    splits=splits, val_per_class=val_per_class, test_per_class=test_per_class, workers=workers,
                    force=force)
    elapsed = time.perf_counter() - started
    n = sum(1 for _ in path.glob("*/*/*.png"))
    click.echo(f"wrote {n} films of 24 classes to {path} in {elapsed:.1f} s ({n / max(elapsed, 1e-9):.0f} images/s)")


@data.command("contact-sheet")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Data set folder (a phantom tree or any ImageFolder tree).")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="PNG file to write.")
@click.option("--per-class", default=2, show_default=True, type=click.IntRange(min=1), help="Images per class.")
@click.option("--split", default=None, help="Split folder to read  [default: the first of train, val, test]")
@click.option("--tile", default=128, show_default=True, type=int, help="Tile side in pixels (32 to 1024).")
@click.option("--columns", default=6, show_default=True, type=click.IntRange(min=1), help="Classes per row.")
@click.option("--max-pixels", type=int, default=None,
              help="Refuse images with more pixels (a decompression-bomb guard). [default: Pillow's limit, 89478485]")
def contact_sheet(data_dir: Path, out: Path, per_class: int, split: str | None, tile: int, columns: int,
                  max_pixels: int | None) -> None:
    """One PNG with a few images of every class and their landmark outlines in colour.

    Reads DATA/<split>/<class>/<image> (or DATA/<class>/<image> when there are no split folders);
    landmark masks are read from <stem>.landmarks/<landmark>.png beside each image, so the sheet
    works for real data sets with masks as well as for phantoms. Classes come in the order of
    DATA/dataset.json when there is one. Each landmark name gets one colour, listed under its class.

    \b
    EXAMPLE
      xraydeconv data contact-sheet --data data/phantoms --out docs/images/contact_sheet.png
    """
    from xraydeconv.data.contact_sheet import contact_sheet as make_sheet
    from xraydeconv.data.preprocess import DEFAULT_MAX_PIXELS

    path = make_sheet(data_dir, out, per_class=per_class, split=split, tile=tile, columns=columns,
                      max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)
    click.echo(f"wrote {path}")
