"""The ``index.html`` gallery over a folder of projected images.

One self-contained page (no network, relative links only): a card per image with its thumbnail, true and
predicted class with probability and the strongest filters, misclassified images flagged in red. A sort
control (name, confidence, true class, predicted class, misclassified first) and a "misclassified only"
filter work client-side; both can be preset in the URL (``index.html#sort=confidence&misclassified``) so a
view can be shared. When the page has loaded, ``<body>`` carries ``data-images-loaded`` and
``data-images-broken`` counts, which the browser test reads.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from pathlib import Path

from xraydeconv.io import write_atomically

__all__ = ["write_gallery", "gallery_html", "SORT_KEYS"]

SORT_KEYS = ("name", "confidence", "true", "predicted", "misclassified")

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222}
header{display:flex;gap:1.5em;align-items:center;flex-wrap:wrap;margin-bottom:1em}
h1{font-size:1.3em;margin:0}
#cards{display:flex;flex-wrap:wrap;gap:12px}
.card{border:2px solid #ccc;border-radius:6px;padding:6px;width:176px;font-size:12px;background:#fff}
.card.misclassified{border-color:#c00;background:#fff3f3}
.card img{width:160px;height:160px;object-fit:contain;display:block;margin:auto;background:#000}
.card .name{font-weight:600;word-break:break-all}
.flag{color:#c00;font-weight:700}
.card a{color:inherit;text-decoration:none}
.files a{color:#06c;margin-right:.4em}
.meta{color:#555}
"""

_SCRIPT = """
(function(){
  var cards = document.getElementById('cards');
  var sortSel = document.getElementById('sort');
  var onlyMis = document.getElementById('only-mis');
  function key(el, k){
    if(k==='confidence') return -parseFloat(el.dataset.confidence || '0');
    if(k==='misclassified') return (el.dataset.misclassified==='1' ? 0 : 1);
    if(k==='true') return el.dataset.true || '';
    if(k==='predicted') return el.dataset.predicted || '';
    return el.dataset.name;
  }
  function apply(){
    var k = sortSel.value;
    var items = Array.prototype.slice.call(cards.children);
    items.sort(function(a, b){
      var x = key(a, k), y = key(b, k);
      if(x < y) return -1; if(x > y) return 1;
      return a.dataset.name < b.dataset.name ? -1 : (a.dataset.name > b.dataset.name ? 1 : 0);
    });
    var shown = 0;
    items.forEach(function(el){
      cards.appendChild(el);
      var hide = onlyMis.checked && el.dataset.misclassified !== '1';
      el.style.display = hide ? 'none' : '';
      if(!hide) shown++;
    });
    document.getElementById('count').textContent = shown + ' of ' + items.length + ' images';
    document.body.dataset.sort = k;
  }
  var h = decodeURIComponent(location.hash.replace(/^#/, '')).split('&');
  h.forEach(function(p){
    var kv = p.split('=');
    if(kv[0]==='sort' && Array.prototype.some.call(sortSel.options, function(o){return o.value===kv[1];}))
      sortSel.value = kv[1];
    if(kv[0]==='misclassified') onlyMis.checked = true;
  });
  sortSel.addEventListener('change', apply);
  onlyMis.addEventListener('change', apply);
  apply();
  window.addEventListener('load', function(){
    var imgs = document.querySelectorAll('#cards img'), ok = 0, bad = 0;
    imgs.forEach(function(im){ if(im.complete && im.naturalWidth > 0) ok++; else bad++; });
    document.body.dataset.imagesLoaded = ok;
    document.body.dataset.imagesBroken = bad;
  });
})();
"""


def _misclassified(m: dict) -> bool:
    return m.get("true_class") is not None and m.get("predicted_class") is not None and (
        m["true_class"] != m["predicted_class"]
    )


def _card(row: dict) -> str:
    m = row["manifest"]
    folder = row["folder"]
    name = m.get("input_name") or folder
    true = m.get("true_class")
    pred = m.get("predicted_class")
    conf = m.get("predicted_probability")
    mis = _misclassified(m)
    cls = "card misclassified" if mis else "card"
    attrs = {
        "data-name": name,
        "data-folder": folder,
        "data-true": true or "",
        "data-predicted": pred or "",
        "data-confidence": "" if conf is None else f"{conf:.6f}",
        "data-misclassified": "1" if mis else "0",
    }
    attr_s = " ".join(f'{k}="{html.escape(str(v), quote=True)}"' for k, v in attrs.items())
    esc = html.escape
    href = esc(folder, quote=True)
    lines = [f'<div class="{cls}" {attr_s}>']
    lines.append(f'<a href="{href}/overlay.png"><img src="{href}/thumb.png" alt="{esc(name, quote=True)}"></a>')
    lines.append(f'<div class="name">{esc(name)}</div>')
    if pred is not None:
        p = "" if conf is None else f" ({100 * conf:.1f} %)"
        lines.append(f'<div>predicted: <b>{esc(pred)}</b>{p}</div>')
    if true is not None:
        lines.append(f"<div>true: {esc(true)}</div>")
    if mis:
        lines.append('<div class="flag">misclassified</div>')
    chans = m.get("channels", [])[:5]
    lines.append(f'<div class="meta">top filters: {esc(", ".join(str(c) for c in chans))}</div>')
    lines.append(
        f'<div class="files"><a href="{href}/grid.png">grid</a><a href="{href}/focus.png">focus</a>'
        f'<a href="{href}/manifest.json">manifest</a></div>'
    )
    lines.append("</div>")
    return "\n".join(lines)


def gallery_html(rows: Sequence[dict], title: str = "xraydeconv projections", info: dict | None = None) -> str:
    """The page for ``rows`` (each ``{"folder": <relative folder>, "manifest": <its manifest dict>}``)."""
    n_mis = sum(_misclassified(r["manifest"]) for r in rows)
    info_s = ""
    if info:
        info_s = "<div class='meta'>" + html.escape(" · ".join(f"{k}: {v}" for k, v in info.items())) + "</div>"
    options = "".join(
        f'<option value="{k}">{k.replace("true", "true class").replace("predicted", "predicted class")}</option>'
        for k in SORT_KEYS
    )
    cards = "\n".join(_card(r) for r in rows)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{_STYLE}</style></head>
<body data-misclassified-count="{n_mis}">
<header><h1>{html.escape(title)}</h1>
<label>sort by <select id="sort">{options}</select></label>
<label><input type="checkbox" id="only-mis"> misclassified only ({n_mis})</label>
<span id="count">{len(rows)} images</span></header>
{info_s}
<div id="cards">
{cards}
</div>
<script>{_SCRIPT}</script>
</body></html>
"""


def write_gallery(out_dir: str | os.PathLike, rows: Sequence[dict], title: str = "xraydeconv projections",
                  info: dict | None = None) -> Path:
    """Write ``out_dir/index.html`` atomically; ``rows`` as in :func:`gallery_html`."""
    out_dir = Path(out_dir)
    path = write_atomically(
        out_dir / "index.html", lambda f: f.write(gallery_html(rows, title, info)), mode="w", encoding="utf-8"
    )
    # the rows as data too, for scripts that post-process a run
    write_atomically(out_dir / "gallery.json", lambda f: json.dump(list(rows), f), mode="w", encoding="utf-8")
    return path
