"""``xraydeconv project``: deconvnet projections of a trained net's top-n filters, one folder per image."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from xraydeconv.errors import UserError


def _layer_arg(value: str) -> int | str:
    try:
        return int(value)
    except ValueError:
        return value


class _Inputs:
    """The images to project: (name, tensor, true label or None, source path) in batches."""

    def __init__(self, images, data, split, limit, input_size):
        from xraydeconv.data import load_image, open_dataset

        self.class_names: list[str] | None = None
        if images:
            self.paths = [Path(p) for p in images]
            for p in self.paths:
                if not p.exists():
                    raise UserError(f"{p}: no such file")
            # decode everything before any output is made: a bad file fails the run up front
            self.tensors = [load_image(p, input_size) for p in self.paths]
            self.labels: list[int | None] = [None] * len(self.paths)
            self.dataset = None
        else:
            ds = open_dataset(data, split=split, input_size=input_size, cache=False)
            if len(ds) == 0:
                raise UserError(f"{data}: no images in the {split} split")
            self.dataset = ds
            self.class_names = list(ds.class_names)
            n = len(ds) if limit is None else min(limit, len(ds))
            self.paths = [ds.records[i].path for i in range(n)]
            self.labels = [int(ds.records[i].label) for i in range(n)]
            self.tensors = None

    def __len__(self) -> int:
        return len(self.paths)

    def batches(self, batch_size: int):
        import torch

        for b0 in range(0, len(self), batch_size):
            idx = range(b0, min(len(self), b0 + batch_size))
            if self.tensors is not None:
                x = torch.stack([self.tensors[i] for i in idx])
            else:
                x = torch.stack([self.dataset[i][0] for i in idx])
            yield list(idx), x


@click.command(context_settings={"max_content_width": 100})
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A checkpoint written by `xraydeconv train` (last.pt or best.pt).")
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
@click.option("--layer", default="-1", show_default=True,
              help="Start layer: conv-layer index (-1 = last conv) or a module name such as features.21.")
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
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--cmap", default="jet", show_default=True, help="Matplotlib colormap of the heat maps.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (created; must be empty or absent unless --overwrite).")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out (only once all is written).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def project(checkpoint, images, more_images, data, split, limit, top_n, layer, mode, rank, method, precision,
            batch_size, device, cmap, out, overwrite, quiet) -> None:
    """Project the top-n filters of a trained net back into its input images.

    \b
    For every image, the --top-n most activated filters of the chosen conv layer (the last
    one by default) are projected back into pixel space with a Zeiler & Fergus deconvnet:
    unpool with the max-pool switches, rectify, transposed conv with the net's own weights.
    The heat map of a filter is the magnitude of its projection; the combined map is the
    mean of the normalised per-filter maps.

    \b
    Writes into --out, one folder per image (named after the image file):
      overlay.png    the image | the combined heat map over it
      focus.png      the image | top-5 focus | top-n focus
      grid.png       each filter's heat map, captioned with channel and activation
      thumb.png      a thumbnail for the gallery
      maps.npy       float16 (top_n, H, W) per-filter heat maps, each scaled to [0, 1]
      manifest.json  checkpoint sha256, model, layer, filters and activations, predicted
                     and true class with probability, versions, settings
    and index.html, a gallery over all images (sortable, misclassified ones flagged).
    Everything is built in a temporary folder beside --out and moved into place at the end:
    an interrupted or failed run leaves --out untouched.

    \b
    Examples:
      xraydeconv project --checkpoint runs/deeper/best.pt --images hand.png --out proj/
      xraydeconv project --checkpoint runs/deeper/best.pt --data ~/phantoms --limit 50 --out proj/
    """
    images = tuple(images) + tuple(more_images)
    if bool(images) == (data is not None):
        raise UserError("give either --images FILE... or --data DIR (one of the two)")
    for name, value in (("--top-n", top_n), ("--limit", limit), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{name} {value}: must be at least 1")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: exists and is not empty (use --overwrite to replace it)")
    if not out.parent.exists():
        raise UserError(f"{out.parent}: no such folder for --out")

    import torch
    from tqdm import tqdm

    import xraydeconv
    from xraydeconv.explain.deconvnet import DeconvNet
    from xraydeconv.reports.evaluate import pick_device
    from xraydeconv.reports.gallery import write_gallery
    from xraydeconv.reports.pipeline import building_folder, save_projection
    from xraydeconv.training.checkpoint import load_checkpoint

    dev = pick_device(device)
    ckpt = load_checkpoint(checkpoint, map_location=dev)
    dn = DeconvNet(ckpt.model)
    try:
        li = dn.resolve_layer(_layer_arg(layer))
    except ValueError as exc:
        raise UserError(f"--layer {exc}") from None
    n_ch = dn.layer_channels(li)
    if top_n > n_ch:
        raise UserError(f"--top-n {top_n}: conv layer {li} has only {n_ch} filters")
    try:
        import matplotlib

        matplotlib.colormaps[cmap]
    except KeyError:
        raise UserError(f"--cmap {cmap}: not a matplotlib colormap") from None

    inputs = _Inputs(images, data, split, limit, ckpt.input_size)
    class_names = ckpt.class_names
    true_names = inputs.class_names or class_names
    layer_name = dn.steps[dn.conv_steps[li]].name

    base = {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": ckpt.sha256,
        "model": ckpt.model_name,
        "epoch": ckpt.epoch,
        "layer": li,
        "layer_module": layer_name,
        "top_n": top_n,
        "mode": mode,
        "rank": rank,
        "method": method,
        "precision": precision,
        "input_size": ckpt.input_size,
        "xraydeconv_version": xraydeconv.__version__,
        "torch_version": torch.__version__,
    }

    rows, taken = [], set()
    with building_folder(out, overwrite) as tmp:
        with tqdm(total=len(inputs), desc="projecting", unit="img", file=sys.stderr, disable=quiet) as bar:
            for idx, x in inputs.batches(batch_size):
                p = dn.project(x.to(dev), top_n=top_n, layer=li, mode=mode, rank=rank, method=method,
                               precision=precision)
                probs = p.probs
                for j, i in enumerate(idx):
                    path = inputs.paths[i]
                    m = dict(base)
                    m["input_file"] = str(path)
                    m["input_name"] = path.name
                    if probs is not None:
                        k = int(probs[j].argmax())
                        m["predicted_class"] = class_names[k]
                        m["predicted_probability"] = float(probs[j, k])
                        m["top_classes"] = [
                            {"class": class_names[int(c)], "probability": float(v)}
                            for v, c in zip(*probs[j].topk(min(3, probs.shape[1])))
                        ]
                    label = inputs.labels[i]
                    m["true_class"] = None if label is None else true_names[label]
                    if label is not None and probs is not None:
                        m["true_probability"] = (
                            float(probs[j, class_names.index(m["true_class"])])
                            if m["true_class"] in class_names else None
                        )
                    rows.append(save_projection(tmp, path.stem, taken, x[j], p, j, m, cmap=cmap))
                bar.update(len(idx))
        info = {"model": ckpt.model_name, "checkpoint": Path(checkpoint).name, "layer": layer_name,
                "top-n": top_n, "method": method, "mode": mode}
        write_gallery(tmp, rows, title=f"xraydeconv projections: {ckpt.model_name}", info=info)
    if not quiet:
        click.echo(f"{len(rows)} images projected into {out} (open {out / 'index.html'})", err=True)
