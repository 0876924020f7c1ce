"""``xraydeconv evaluate``: accuracy, confusion matrix, misclassified projections and landmark agreement."""

from __future__ import annotations

from pathlib import Path

import click

from xraydeconv.cli.model_options import model_options, model_source


@click.command(context_settings={"max_content_width": 100})
@model_options("A checkpoint written by `xraydeconv train` (best.pt or last.pt).")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Data set folder (phantoms, ImageFolder, MURA, ImageCLEF 2009). Default: the data the "
                   "checkpoint was trained on (the synthetic phantoms, regenerated if needed); required with "
                   "--model-factory.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]),
              help="Which split to evaluate.")
@click.option("--top-n", type=int, default=25, show_default=True,
              help="Filters of the last conv layer projected per image.")
@click.option("--occlusion", is_flag=True,
              help="Also occlude each landmark (and their union) and measure what the net loses.")
@click.option("--methods", default="deconvnet", show_default=True, metavar="LIST",
              help="Attribution methods scored on the same films and landmarks, comma-separated, or all: "
                   "deconvnet, deconvnet-max, guided, gradient, saliency, gradient-x-input, gradcam, occlusion. "
                   "The film itself as the map (film) is always a row.")
@click.option("--sanity", is_flag=True,
              help="Also run the model-parameter randomisation test of those methods (cascading and "
                   "independent) and draw sanity.png and sanity_curves.png.")
@click.option("--sanity-images", type=int, default=4, show_default=True,
              help="Films of the randomisation test (the first ones with landmarks).")
@click.option("--tolerance", type=int, default=0, show_default=True,
              help="Pointing-game tolerance: grow the landmark masks by this many pixels.")
@click.option("--max-misclassified", type=int, default=24, show_default=True,
              help="Misclassified images whose projections are written (0: none).")
@click.option("--no-landmarks", is_flag=True, help="Skip landmark agreement (accuracy and misclassified only).")
@click.option("--limit", type=int, default=None, help="Only the first K images of the split.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Images per forward pass.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="Precision of the deconvnet's downward pass (bf16: faster on AVX-512 BF16 CPUs, ~3 digits).")
@click.option("--max-pixels", type=int, default=None,
              help="Refuse images with more pixels (a decompression-bomb guard). [default: Pillow's limit, 89478485]")
@click.option("--class-map", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="How the data's classes map to the checkpoint's: for ImageCLEF 2009 the prefix,class grouping "
                   "(as train takes it); for other data a CSV of data class,checkpoint class renames.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--threads", type=int, default=None,
              help="CPU threads per process [default: torch's; under torchrun the cores divided among the "
                   "machine's processes].")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (created; must be empty or absent unless --overwrite).")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out (only once all is written).")
@click.option("--quiet", is_flag=True, help="No progress bar, no summary.")
def evaluate(**params) -> None:
    """Accuracy, confusion matrix and landmark agreement of a checkpoint (or of your own model).

    \b
    Instead of --checkpoint, --model-factory package.module:function with --weights FILE
    evaluates your own CNN on --data (docs/own-models.md); its projections start from its
    last feature map before global pooling.

    \b
    Runs the net over a split and writes into --out:
      report.json     everything below as data
      report.md       the same as tables: accuracy, per-class accuracy, landmark agreement,
                      occlusion sensitivity, the misclassified images
      confusion.png   the confusion matrix
      index.html      the page to open: the misclassified films and a few correct ones with
                      their heat first, then the landmark agreement and the confusion matrix
      misclassified/  top-n deconvnet projections of each misclassified image (overlay.png,
                      focus.png, grid.png, landmarks.png, the image's page, maps.npy,
                      manifest.json) and an index.html gallery: what did the net look at when
                      it took a hand for a cranium?
      examples/       the same for up to four correctly classified films

    \b
    Landmark agreement: for every image with landmark masks (the phantoms have them; for real
    data see docs/evaluation.md), the heat map of the top-n filters is scored against the
    union of the image's landmarks, per class and per landmark (pointing game, relevance
    mass, relevance rank, area share), beside the film itself used as the map. --methods
    scores other attribution methods on the same films and every landmark set (the phantoms'
    "discriminative" set too), as the gain over the film; --sanity adds the randomisation
    test (sanity.png, sanity_curves.png): how far do the maps depend on the weights?
    A `marker` mask (the planted shortcut of `xraydeconv data phantoms --bias marker`) is
    reported on its own line and left out of the union.

    \b
    Everything is built in a temporary folder and moved into place at the end: bad input
    stops the run with one line and leaves --out untouched. Classes are matched by name
    (data may hold only some of them); --class-map renames the data's classes first.
    Under torchrun every process evaluates its share of the batches and rank 0 writes the
    report of a one-process run (gloo on CPU, NCCL on GPU: docs/large-archives.md).

    \b
    Examples:
      xraydeconv evaluate --checkpoint runs/demo/deeper/best.pt --out runs/eval-deeper
      xraydeconv evaluate --checkpoint best.pt --data ~/phantoms-bias --split val --out eval-val
      xraydeconv evaluate --checkpoint best.pt --data ~/mura --occlusion --out eval-mura
      xraydeconv evaluate --checkpoint best.pt --methods deconvnet,guided,gradient,gradcam,occlusion \\
          --sanity --out eval-methods
      xraydeconv evaluate --model-factory mynets.chest:make_net --weights chest.pt --classes classes.txt \\
          --data ~/chest --out eval-chest
    """
    from xraydeconv.training.distributed import from_env

    report = _run(**params)
    if not params["quiet"] and from_env().is_main:
        _print_summary(report, params["top_n"], params["out"])


def _run(checkpoint, model_factory, weights, classes, input_size, data, split, top_n, occlusion, methods, sanity,
         sanity_images, tolerance, max_misclassified, no_landmarks, limit, batch_size, precision, max_pixels,
         class_map, device, threads, out, overwrite, quiet) -> dict:
    """Check the options and run the evaluation; the report (``{}`` on ranks other than 0)."""
    from xraydeconv.reports.evaluate import EvalOptions
    from xraydeconv.reports.evaluate import evaluate as run

    opts = EvalOptions(split=split, top_n=top_n, occlusion=occlusion, batch_size=batch_size,
                       max_misclassified=max_misclassified, tolerance=tolerance, precision=precision,
                       device=device, landmarks=not no_landmarks, limit=limit, max_pixels=max_pixels,
                       class_map=None if class_map is None else str(class_map), methods=methods, sanity=sanity,
                       sanity_images=sanity_images)
    model = model_source(checkpoint, model_factory, weights, classes, input_size, device)
    return run(model, out, data=data, options=opts, overwrite=overwrite, progress=not quiet, threads=threads)


def _print_summary(report: dict, top_n: int, out: Path) -> None:
    from xraydeconv.reports.numbers import pct

    lm = report["landmarks"]
    click.echo(f"{report['checkpoint']['model']} on {report['data']['split']} ({report['data']['images']} images): "
               f"accuracy {100 * report['accuracy']:.2f} %, {report['misclassified_count']} misclassified")
    if lm and "overall" in lm:
        o = lm["overall"]
        click.echo(f"landmarks (combined top-{top_n} map): pointing game {pct(o['pointing_game'])}, "
                   f"relevance mass {pct(o['relevance_mass'])} (area share {pct(o['area_share'])}), "
                   f"relevance rank {pct(o['relevance_rank'])}")
    if lm and lm.get("marker"):
        m = lm["marker"]
        click.echo(f"marker: pointing game {pct(m['pointing_game'])}, relevance mass "
                   f"{pct(m['relevance_mass'])} (area share {pct(m['area_share'])})")
    click.echo(f"report: {out / 'report.md'}, pictures: {out / 'index.html'}  ({report['timing']['seconds']:.1f} s)")
