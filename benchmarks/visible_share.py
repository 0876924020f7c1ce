"""Share of each overlay that carries visible colour, per projection gallery.

Usage: `python benchmarks/visible_share.py GALLERY...`.

Reads every `<film>/overlay.png` and its manifest's `overlay_film_box` (the film part of the picture, without caption
and colour bar) and prints the range and median of `xraydeconv.reports.display.visible_share` (RGB spread > 48/255).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from xraydeconv.reports.display import visible_share

for gallery in sys.argv[1:]:
    shares = []
    for man_path in sorted(Path(gallery).glob("*/manifest.json")):
        man = json.loads(man_path.read_text())
        top, left, h, w = man["overlay_film_box"]
        rgb = np.asarray(Image.open(man_path.parent / "overlay.png").convert("RGB"))[top:top + h, left:left + w]
        shares.append(visible_share(rgb))
    s = np.array(shares) * 100
    print(f"{gallery}: {len(s)} films, {s.min():.1f}-{s.max():.1f} % coloured, median {np.median(s):.1f} %")
