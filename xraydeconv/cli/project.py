"""``xraydeconv project``: deconvnet projections of a trained net's top-n filters, one folder per image."""

from __future__ import annotations

from pathlib import Path

import click

from xraydeconv.cli.model_options import model_options, model_source
from xraydeconv.errors import UserError


def layer_arg(value: str | None) -> int | str | None:
    """``--layer``: an integer is a conv-layer index, anything else a module name, passed on unchanged."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return value


@click.command(context_settings={"max_content_width": 100})
@model_options("A checkpoint written by `xraydeconv train` (last.pt or best.pt).")
@click.option("--images", multiple=True, type=click.Path(path_type=Path), metavar="FILE",
              help="An image to project (PNG, JPEG, DICOM); repeat the option for several.")
@click.argument("more_images", nargs=-1, type=click.Path(path_type=Path), metavar="[FILE]...")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Project a data set folder instead (phantoms, ImageFolder, MURA, ImageCLEF 2009).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]),
              help="Which split of --data.")
@click.option("--limit", type=int, default=None, help="Only the first K images of --data.")
@click.option("--top-n", type=int, default=25, show_default=True,
              help="Filters projected per image (at most the layer's channel count).")
@click.option("--layer", default=None,
              help="Start layer: conv-layer index (-1 = last conv) or a module name such as features.21, layer4 or "
                   "layer1.0.relu@1 (a module's second call) [default: the last conv of our nets, the last feature "
                   "map before global pooling of other models].")
@click.option("--mode", type=click.Choice(["map", "max"]), default="map", show_default=True,
              help="map: the filter's whole activation map; max: only its strongest activation.")
@click.option("--rank", type=click.Choice(["max", "mean"]), default="max", show_default=True,
              help="Rank filters by the max or the mean of their activation maps.")
@click.option("--method", type=click.Choice(["deconvnet", "guided", "gradient"]), default="deconvnet",
              show_default=True, help="Rule at each ReLU on the way down.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: the downward pass in bfloat16 (faster on AVX-512 BF16 CPUs and GPUs, ~3 digits).")
@click.option("--batch-size", type=int, default=4, show_default=True,
              help="Images per forward pass.")
@click.option("--max-pixels", type=int, default=None,
              help="Refuse images with more pixels (a decompression-bomb guard). [default: Pillow's limit, 89478485]")
@click.option("--class-map", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --data: how its classes map to the checkpoint's (data class,checkpoint class rows; the "
                   "prefix,class grouping for ImageCLEF 2009).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--cmap", default="plasma", show_default=True,
              help="Matplotlib colormap of the heat (plasma: perceptually uniform, no grey at any level).")
@click.option("--max-side", type=int, default=1024, show_default=True,
              help="Pictures show the film at its own resolution, its longest side at most this many pixels.")
@click.option("--compare", multiple=True, type=click.Path(dir_okay=False, path_type=Path), metavar="CKPT",
              help="Another checkpoint to draw beside --checkpoint on the same films (compare.png); repeatable.")
@click.option("--pictures", default="all", show_default=True, metavar="all|none|N",
              help="Which films get pictures and a page: all, none, or N films spread evenly over the run.")
@click.option("--maps", "maps_kept", type=click.Choice(["folders", "store", "none"]), default="folders",
              show_default=True,
              help="Where the raw maps go: maps.npy in each film's folder, one memory-mappable store for the "
                   "run (maps/part-*.npy + maps/index.json), or nowhere.")
@click.option("--chunk", type=int, default=64, show_default=True,
              help="Films per unit of work (rounded up to whole batches): what --resume redoes at most per "
                   "process, and the films of one part of the map store.")
@click.option("--page-size", type=int, default=1000, show_default=True,
              help="Gallery cards per page (index.html, page-2.html ...).")
@click.option("--resume", is_flag=True,
              help="Continue the interrupted run into --out (same checkpoint, images and options), skipping the "
                   "chunks it finished.")
@click.option("--threads", type=int, default=None,
              help="CPU threads per process [default: torch's; under torchrun the cores divided among the "
                   "machine's processes].")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (created; must be empty or absent unless --overwrite).")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out (only once all is written).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def project(**params) -> None:
    """Project the top-n filters of a trained net back into its input images.

    \b
    For every image, the --top-n most activated filters of the chosen conv layer (the last
    one by default) are projected back into pixel space with a Zeiler & Fergus deconvnet:
    unpool with the max-pool switches, rectify, transposed conv with the net's own weights.
    The heat map of a filter is the magnitude of its projection; the combined map is the
    mean of the normalised per-filter maps.
    Instead of --checkpoint, --model-factory package.module:function with --weights FILE
    projects your own CNN (docs/own-models.md), by default from its last feature map
    before global pooling.

    \b
    Writes into --out, one folder per image (named after the image file); every picture is
    drawn on the film as it was given (its own resolution, longest side capped by --max-side)
    with a display transform (docs/pictures.md) that leaves the raw maps untouched:
      overlay.png    the combined heat over the film, colour bar, method, layer and top-n
      focus.png      the focus areas of the top-5 filters, outlined on the film
      grid.png       every filter's heat and focus area, with its channel and activation
      landmarks.png  film | landmark outlines | heat (when the data have landmark masks)
      filters/       one picture per filter; thumb.jpg, a small overlay for the gallery
      index.html     the image's page: every filter (click to enlarge), arrow keys step
      maps.npy       float16 (top_n, H, W) raw per-filter heat maps at network resolution,
                     each scaled to [0, 1]
      manifest.json  checkpoint sha256, model, layer, filters and activations, predicted
                     and true class with probability, versions, settings
    and index.html, a gallery over all images (sortable, misclassified ones flagged).
    With --compare CKPT (repeatable) each folder also gets compare.png: the heat of every
    checkpoint on the same film, side by side.
    Everything is built in .OUT.partial beside --out and moved into place at the end: an
    interrupted or failed run leaves --out untouched and keeps its finished chunks there for
    --resume. For large archives, --pictures N or none and --maps store keep the output small.
    Under torchrun every process projects its share of the films into the one output (gloo
    on CPU, NCCL on GPU, one process per GPU); the result equals a one-process run
    (docs/large-archives.md).

    \b
    Examples:
      xraydeconv project --checkpoint runs/deeper/best.pt --images hand.png --out proj/
      xraydeconv project --checkpoint runs/deeper/best.pt --data ~/phantoms --limit 50 --out proj/
      xraydeconv project --model-factory mynets.chest:make_net --weights chest.pt --classes classes.txt \\
          --layer layer4 --images film.png --out proj/
      xraydeconv project --checkpoint runs/demo/deeper-aug/best.pt --compare runs/demo/shallow/best.pt \\
          --data ~/phantoms --limit 24 --out compare/
      torchrun --nproc-per-node 4 -m xraydeconv.cli.main project --checkpoint best.pt \\
          --data ~/mura --pictures 200 --maps store --out archive/
    """
    from xraydeconv.training.distributed import from_env

    rows = _run(**params)
    if not params["quiet"] and from_env().is_main:
        out = params["out"]
        click.echo(f"{len(rows)} images projected into {out} (open {out / 'index.html'})", err=True)


def _run(checkpoint, model_factory, weights, classes, input_size, images, more_images, data, split, limit, top_n,
         layer, mode, rank, method, precision, batch_size, max_pixels, class_map, device, cmap, max_side, compare,
         pictures, maps_kept, chunk, page_size, resume, threads, out, overwrite, quiet) -> list[dict]:
    """Check the options and run the projection; the gallery rows."""
    from xraydeconv.reports.display import DisplaySettings
    from xraydeconv.reports.pipeline import ProjectSettings, project_checkpoint
    from xraydeconv.reports.shard import ArchiveOptions

    images = tuple(images) + tuple(more_images)
    if bool(images) == (data is not None):
        raise UserError("give either --images FILE... or --data DIR (one of the two)")
    if class_map is not None and data is None:
        raise UserError(f"--class-map {class_map}: only with --data (it renames the data set's classes)")
    for name, value in (("--top-n", top_n), ("--limit", limit), ("--batch-size", batch_size), ("--max-side", max_side)):
        if value is not None and value < 1:
            raise UserError(f"{name} {value}: must be at least 1")
    archive = ArchiveOptions(pictures=pictures, maps=maps_kept, chunk=chunk, resume=resume, page=page_size).check()
    settings = ProjectSettings(top_n=top_n, layer=layer_arg(layer), mode=mode, rank=rank, method=method,
                               precision=precision, batch_size=batch_size,
                               display=DisplaySettings(cmap=cmap, max_side=max_side, min_side=min(512, max_side)))
    model = model_source(checkpoint, model_factory, weights, classes, input_size, device)
    return project_checkpoint(model, out, images=images, data=data, split=split, limit=limit,
                              settings=settings, device=device, overwrite=overwrite, progress=not quiet,
                              compare=compare, max_pixels=max_pixels, class_map=class_map, archive=archive,
                              threads=threads)
