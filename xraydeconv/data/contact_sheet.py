"""One picture of a data set: a few films of every class with their landmark outlines in colour.

Works on any ImageFolder tree (``<class>/<image>``, optionally under ``train/ val/ test/``) whose
landmark masks, if any, sit beside the images as ``<stem>.landmarks/<name>.png``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from xraydeconv.data.formats.imagefolder import read_meta
from xraydeconv.data.landmarks import MASK_FOLDER_SUFFIX, mask_files
from xraydeconv.data.preprocess import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    Letterbox,
    check_max_pixels,
    decode_image,
    open_image,
)
from xraydeconv.errors import UserError
from xraydeconv.io import write_atomically

SPLITS = ("train", "val", "test")
MAX_TILE = 1024
MAX_SHEET_PIXELS = 2**28  # about 800 MB as RGB

Example = tuple[Path, dict[str, Path]]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def find_examples(root: str | os.PathLike, per_class: int = 2,
                  split: str | None = None) -> tuple[Path, list[tuple[str, list[Example]]]]:
    """The first ``per_class`` images of each class and their landmark masks.

    ``split`` picks ``root/<split>``; by default the first of train, val, test that exists, else
    ``root`` itself. Classes come in the order of ``dataset.json`` when there is one, else sorted.
    Returns the folder read and ``[(class, [(image, {landmark: mask}), ...]), ...]``.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a folder")
    if split is not None:
        folder = root / split
        if not folder.is_dir():
            raise UserError(f"{folder}: no such split folder")
    else:
        folder = next((root / s for s in SPLITS if (root / s).is_dir()), root)
    order = read_meta(root).get("classes") or []
    present = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.endswith(MASK_FOLDER_SUFFIX))
    classes = [c for c in order if c in present] + [c for c in present if c not in order]
    result = []
    for name in classes:
        images = _images(folder / name)[:per_class]
        if images:
            result.append((name, [(p, mask_files(p)) for p in images]))
    if not result:
        raise UserError(f"{folder}: no class folders with images (expected <class>/<image>.png)")
    return folder, result


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _letterbox(path: Path, tile: int, resample: int, max_pixels: int, film: bool = True) -> Image.Image:
    """Fit the image in a tile×tile square keeping its aspect, centred on black.

    A film is decoded like the data sets decode it (bit depth, orientation); a mask is read as it is.
    """
    if film:
        img = Image.fromarray(np.rint(decode_image(path, max_pixels) * 255.0).astype(np.uint8), mode="L")
    else:
        try:
            with open_image(path, max_pixels) as im:
                im.load()
                img = im.convert("L")
        except OSError as exc:
            raise UserError(f"{path}: not a readable image ({exc})") from None
    box = Letterbox.fit(img.height, img.width, tile)
    canvas = Image.new("L", (tile, tile), 0)
    canvas.paste(img.resize((box.width, box.height), resample), (box.left, box.top))
    return canvas


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _colours(n: int) -> list[tuple[int, int, int]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [tuple(int(255 * c) for c in cmap(i % 10)[:3]) for i in range(n)]


def contact_sheet(root: str | os.PathLike, out: str | os.PathLike, per_class: int = 2, split: str | None = None,
                  tile: int = 128, columns: int = 6, max_pixels: int = DEFAULT_MAX_PIXELS) -> Path:
    """Write a PNG grid of ``per_class`` images per class with landmark outlines and a legend.

    Each class is a block titled with its name; each landmark gets its own colour, listed under the
    block. ``columns`` blocks per row. The file is written to a temporary name beside ``out`` and
    renamed, so it is never half-written. Films over ``max_pixels`` pixels are refused before decoding.
    """
    if per_class < 1:
        raise UserError(f"per-class: must be >= 1, got {per_class}")
    if not 32 <= tile <= MAX_TILE:
        raise UserError(f"--tile {tile}: must be between 32 and {MAX_TILE} pixels")
    max_pixels = check_max_pixels(max_pixels)
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"{out}: the contact sheet is a PNG; give a file name ending in .png")
    _, examples = find_examples(root, per_class, split)
    palette = _colours(10)
    most = max((len({lm for _, lms in ex for lm in lms}) for _, ex in examples), default=0)
    title_font, text_font = _font(14), _font(11)
    gap, pad, title_h, line_h = 3, 10, 20, 13
    block_w = per_class * tile + (per_class - 1) * gap
    names = {lm for _, ex in examples for _, lms in ex for lm in lms}
    # two legend columns when every name fits in half a block, else one
    legend_cols = 2 if all(text_font.getlength(n) <= block_w // 2 - 4 for n in names) else 1
    block_h = title_h + tile + 4 + line_h * (-(-most // legend_cols))
    columns = max(1, min(columns, len(examples)))
    rows = -(-len(examples) // columns)
    width, height = pad + columns * (block_w + pad), pad + rows * (block_h + pad)
    if width * height > MAX_SHEET_PIXELS:
        raise UserError(f"--tile {tile}: the sheet would be {width}x{height} pixels, over {MAX_SHEET_PIXELS:,}; "
                        "lower --tile, --per-class or --columns")
    sheet = Image.new("RGB", (width, height), (18, 18, 18))
    draw = ImageDraw.Draw(sheet)
    for b, (name, ex) in enumerate(examples):
        bx = pad + (b % columns) * (block_w + pad)
        by = pad + (b // columns) * (block_h + pad)
        draw.text((bx, by + 2), name, fill=(240, 240, 240), font=title_font)
        seen: list[str] = []  # colours are per class, in the order its landmarks first appear
        for i, (path, lms) in enumerate(ex):
            gray = _letterbox(path, tile, Image.BILINEAR, max_pixels)
            rgb = np.repeat(np.asarray(gray)[:, :, None], 3, axis=2)
            for lm, mpath in lms.items():
                if lm not in seen:
                    seen.append(lm)
                m = _letterbox(mpath, tile, Image.NEAREST, max_pixels, film=False)
                rgb[_outline(np.asarray(m) > 127)] = palette[seen.index(lm) % len(palette)]
            sheet.paste(Image.fromarray(rgb), (bx + i * (tile + gap), by + title_h))
        half = block_w // 2
        for j, lm in enumerate(seen):
            xy = (bx + (j % legend_cols) * half, by + title_h + tile + 3 + line_h * (j // legend_cols))
            draw.text(xy, lm, fill=palette[j % len(palette)], font=text_font)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, lambda f: sheet.save(f, format="PNG", optimize=True))
    return out
