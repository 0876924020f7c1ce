"""``xraydeconv demo``: phantoms, the three nets of Table 1, projections, landmark agreement, gallery."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(context_settings={"max_content_width": 100})
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              show_default=True, help="Output folder. Running again with the same settings reuses what is done.")
@click.option("--full", "preset", flag_value="full",
              help="The full-size run: 256 px, 200 training images per class, longer training (GPU recommended).")
@click.option("--quick", "preset", flag_value="quick",
              help="A tiny run through every step (32 px, one epoch), for testing an install.")
@click.option("--top-n", type=int, default=None, help="Filters projected per image [default: 25; 8 with --quick].")
@click.option("--sample", "sample_per_class", type=int, default=1, show_default=True,
              help="Test images per class in the projection gallery.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the weights and the data order.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out, preset, top_n, sample_per_class, seed, quiet) -> None:
    """The whole story in one command: phantoms, three nets, Table 1, projections, gallery.

    \b
    1. generates the synthetic radiographs (24 classes, landmark masks beside every image;
       cached in $XRAYDECONV_CACHE or ~/.cache/xraydeconv, reused by later runs);
    2. trains the shallow, deeper and deeper-aug nets and prints Table 1 (the default
       preset, 128 px, is sized for a 2-core CPU; docs/evaluation.md has its time);
    3. evaluates each net on the test split: accuracy, confusion matrix, the misclassified
       images with their projections, and landmark agreement of the top-n filters'
       deconvnet heat maps (pointing game, relevance mass, relevance rank);
    4. projects the top-n filters of each net for a sample of test images;
    5. prints the landmark-agreement table of the three nets and where to open the gallery.

    \b
    Writes into --out:
      table1.md / table1.json      test accuracy of the three nets beside the poster's
      landmarks.md / landmarks.json  landmark agreement of the three nets
      index.html                   the page to open: tables and links to everything below
      <model>/                     training run (best.pt, last.pt, metrics.json, curves.png)
      eval/<model>/                `xraydeconv evaluate` report of each net
      gallery/<model>/             projections of the test sample, with index.html

    \b
    An interrupted demo continues where it stopped when run again with the same options. As
    train does, it keeps freed memory for reuse (glibc on Linux).

    \b
    Examples:
      xraydeconv demo                      # the default preset, 128 px
      xraydeconv demo --quick --out /tmp/demo-quick
      xraydeconv demo --full --out runs/demo-full
    """
    from xraydeconv.errors import UserError
    from xraydeconv.reports.demo import DemoSettings, run_demo

    if top_n is None:
        top_n = 8 if preset == "quick" else 25
    for name, value in (("--top-n", top_n), ("--sample", sample_per_class)):
        if value < 1:
            raise UserError(f"{name} {value}: must be at least 1")
    settings = DemoSettings(preset=preset or "demo", top_n=top_n, sample_per_class=sample_per_class, seed=seed)
    from xraydeconv.training.allocator import keep_freed_memory

    keep_freed_memory()  # as train does: the steps reuse freed memory instead of faulting it in again
    run_demo(out, settings, progress=not quiet, echo=click.echo)
