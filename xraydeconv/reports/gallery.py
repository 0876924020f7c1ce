"""The ``index.html`` gallery over a folder of projected images, and the page of each image.

Self-contained pages (no network, relative links only). The gallery opens on a card per image with its heat
overlay, true and predicted class with probability and the strongest filters, misclassified images flagged in
red. A sort control (name, confidence, true class, predicted class, misclassified first) and a "misclassified
only" filter work client-side; both can be preset in the URL (``index.html#sort=confidence&misclassified``) so a
view can be shared. Each card opens the image's own page (``<folder>/index.html``): the overlay, the focus areas,
the landmark view and every filter; a click enlarges a filter (``#filter=3`` in the URL opens the third), the
arrow keys step through the filters while one is enlarged and through the images otherwise. When a page has
loaded, ``<body>`` carries ``data-images-loaded`` and ``data-images-broken`` counts, which the browser tests read.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from pathlib import Path

from xraydeconv.io import strict_json, write_atomically

__all__ = ["write_gallery", "has_page", "page_file", "utf8_text", "gallery_html", "image_page_html", "card_html",
           "STYLE", "SORT_KEYS"]

SORT_KEYS = ("name", "confidence", "true", "predicted", "misclassified")

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222}
header{display:flex;gap:1.5em;align-items:center;flex-wrap:wrap;margin-bottom:1em}
h1{font-size:1.3em;margin:0}
#cards{display:flex;flex-wrap:wrap;gap:12px}
.card{border:2px solid #ccc;border-radius:6px;padding:6px;width:296px;font-size:13px;background:#fff}
.card.misclassified{border-color:#c00;background:#fff3f3}
.card img{width:280px;height:280px;object-fit:contain;display:block;margin:auto;background:#000}
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


def card_html(row: dict, prefix: str = "") -> str:
    """The card of one image (``row`` as in :func:`gallery_html`); ``prefix``: the folder holding the image
    folders, relative to the page. A film without a page (``project --pictures``) gets a text card: its name and
    prediction, nothing to show or link."""
    m = row["manifest"]
    linked = has_page(row)  # else no folder, or one with maps and manifest only
    folder = prefix + row["folder"] if linked else ""
    name = m.get("input_name") or folder
    true = m.get("true_class")
    pred = m.get("predicted_class")
    conf = m.get("predicted_probability")
    mis = _misclassified(m)
    cls = ("card misclassified" if mis else "card") + ("" if linked else " text")
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
    if linked:
        lines.append(f'<a href="{href}/index.html"><img src="{href}/thumb.jpg" alt="{esc(name, quote=True)}"></a>')
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
    if linked:
        lines.append(
            f'<div class="files"><a href="{href}/index.html">every filter</a><a href="{href}/grid.png">grid</a>'
            f'<a href="{href}/focus.png">focus</a><a href="{href}/manifest.json">manifest</a></div>'
        )
    lines.append("</div>")
    return "\n".join(lines)


def gallery_html(rows: Sequence[dict], title: str = "xraydeconv projections", info: dict | None = None,
                 nav: str = "") -> str:
    """The page for ``rows`` (each ``{"folder": <relative folder>, "manifest": <its manifest dict>}``); ``nav``: the
    links between the pages of a paged gallery (HTML), shown above and below the cards."""
    n_mis = sum(_misclassified(r["manifest"]) for r in rows)
    info_s = ""
    if info:
        info_s = "<div class='meta'>" + html.escape(" · ".join(f"{k}: {v}" for k, v in info.items())) + "</div>"
    options = "".join(
        f'<option value="{k}">{k.replace("true", "true class").replace("predicted", "predicted class")}</option>'
        for k in SORT_KEYS
    )
    cards = "\n".join(card_html(r) for r in rows)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{STYLE}</style></head>
<body data-misclassified-count="{n_mis}">
<header><h1>{html.escape(title)}</h1>
<label>sort by <select id="sort">{options}</select></label>
<label><input type="checkbox" id="only-mis"> misclassified only ({n_mis})</label>
<span id="count">{len(rows)} images</span></header>
{info_s}{nav}
<div id="cards">
{cards}
</div>{nav}
<script>{_SCRIPT}</script>
</body></html>
"""


def utf8_text(text: str) -> str:
    """``text`` with the lone surrogates of a file name that is not UTF-8 (``os.fsdecode(b"\\xff.png")``) shown as
    U+FFFD, so that a page always encodes as UTF-8."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def page_file(k: int) -> str:
    """The file of page ``k`` (from 0) of a gallery: ``index.html``, then ``page-2.html`` ..."""
    return "index.html" if k == 0 else f"page-{k + 1}.html"


def _page_nav(k: int, pages: int, total: int, size: int) -> str:
    if pages <= 1:
        return ""
    prev = f'<a id="prev-page" href="{page_file(k - 1)}">&larr; previous page</a>' if k > 0 else ""
    nxt = f'<a id="next-page" href="{page_file(k + 1)}">next page &rarr;</a>' if k + 1 < pages else ""
    first, last = k * size + 1, min(total, (k + 1) * size)
    return (f'<nav class="pages" style="margin:.8em 0;display:flex;gap:1em">{prev}<span>page {k + 1} of {pages} '
            f"(images {first}–{last} of {total}; sorting and the filter act on this page)</span>{nxt}</nav>")


def write_gallery(out_dir: str | os.PathLike, rows: Sequence[dict], title: str = "xraydeconv projections",
                  info: dict | None = None, page_size: int | None = None) -> Path:
    """Write ``out_dir/index.html`` atomically; ``rows`` as in :func:`gallery_html`. With ``page_size``, a gallery
    of more rows is cut into pages of that many cards (``index.html``, ``page-2.html`` ...) linked in order."""
    out_dir = Path(out_dir)
    with_page = [r for r in rows if has_page(r)]
    for k, row in enumerate(with_page):
        prev = with_page[k - 1]["folder"] if k > 0 else None
        nxt = with_page[k + 1]["folder"] if k + 1 < len(with_page) else None
        page = utf8_text(image_page_html(row, prev, nxt, title))
        write_atomically(out_dir / row["folder"] / "index.html", lambda f, page=page: f.write(page), mode="w",
                         encoding="utf-8")
    pages = [rows[a:a + page_size] for a in range(0, len(rows), page_size)] if page_size and rows else [rows]
    for k, part in enumerate(pages):
        text = utf8_text(gallery_html(part, title, info, _page_nav(k, len(pages), len(rows), page_size or 0)))
        path = write_atomically(out_dir / page_file(k), lambda f, text=text: f.write(text), mode="w",
                                encoding="utf-8")
    # the rows as data too, for scripts that post-process a run
    write_atomically(out_dir / "gallery.json", lambda f: json.dump(strict_json(list(rows)), f, allow_nan=False),
                     mode="w", encoding="utf-8")
    return path


def has_page(row: dict) -> bool:
    """Whether the film of ``row`` gets its own page: it has a folder, and pictures when its files are listed."""
    files = row["manifest"].get("files")
    return row["folder"] is not None and (files is None or "index.html" in files)


_PAGE_STYLE = """
body{font-family:system-ui,sans-serif;margin:1em;color:#222}
nav{display:flex;gap:1em;align-items:center;margin-bottom:.6em}
nav a{color:#06c}
.views{display:flex;flex-wrap:wrap;gap:.5em;align-items:flex-start}
.views img{height:auto;border:1px solid #ccc;display:block}
.views a{flex:0 1 calc(50% - .5em)}.views img.main{max-height:78vh;max-width:100%}
#filters{display:flex;flex-wrap:wrap;gap:8px}
#filters figure{margin:0;width:200px;font-size:12px;cursor:zoom-in}
#filters img{width:200px;height:200px;object-fit:contain;background:#000;display:block}
#lightbox{display:none;position:fixed;inset:0;background:rgba(0,0,0,.85);align-items:center;
justify-content:center;flex-direction:column;color:#fff;cursor:zoom-out}
#lightbox.open{display:flex}
#lightbox img{max-width:92vw;max-height:86vh;image-rendering:auto}
.meta{color:#555}
"""

_PAGE_SCRIPT = r"""
(function(){
  var figs = Array.prototype.slice.call(document.querySelectorAll('#filters figure'));
  var box = document.getElementById('lightbox'), big = document.getElementById('big'),
      cap = document.getElementById('bigcap'), cur = -1;
  function show(k){
    cur = (k + figs.length) % figs.length;
    big.src = figs[cur].dataset.src; cap.textContent = figs[cur].dataset.caption;
    box.classList.add('open'); document.body.dataset.enlarged = cur + 1;
  }
  function hide(){ box.classList.remove('open'); cur = -1; document.body.dataset.enlarged = 0; }
  figs.forEach(function(f, k){ f.addEventListener('click', function(){ show(k); }); });
  box.addEventListener('click', hide);
  document.addEventListener('keydown', function(e){
    var open = box.classList.contains('open');
    if(e.key === 'Escape' && open){ hide(); return; }
    if(e.key !== 'ArrowLeft' && e.key !== 'ArrowRight') return;
    var step = e.key === 'ArrowRight' ? 1 : -1;
    if(open){ show(cur + step); return; }
    var link = document.getElementById(step > 0 ? 'next' : 'prev');
    if(link && link.getAttribute('href')) location.href = link.getAttribute('href');
  });
  var m = /filter=(\d+)/.exec(location.hash);
  if(m && figs.length) show(parseInt(m[1], 10) - 1);
  window.addEventListener('load', function(){
    var imgs = document.querySelectorAll('img'), ok = 0, bad = 0;
    imgs.forEach(function(im){ if(!im.getAttribute('src')) return;
      if(im.complete && im.naturalWidth > 0) ok++; else bad++; });
    document.body.dataset.imagesLoaded = ok;
    document.body.dataset.imagesBroken = bad;
  });
})();
"""


def _prediction_line(m: dict) -> str:
    esc = html.escape
    parts = []
    if m.get("predicted_class") is not None:
        parts.append(f"predicted <b>{esc(m['predicted_class'])}</b> {100 * m.get('predicted_probability', 0):.1f} %")
    if m.get("true_class") is not None:
        tp = m.get("true_probability")
        parts.append(f"true <b>{esc(m['true_class'])}</b>" + ("" if tp is None else f" {100 * tp:.1f} %"))
    line = " · ".join(parts)
    return f'<span class="flag">misclassified</span> · {line}' if _misclassified(m) else line


def _nav_link(rel: str, folder: str | None, text: str) -> str:
    if folder is None:
        return f'<a id="{rel}">{text}</a>'
    return f'<a id="{rel}" href="../{html.escape(folder, quote=True)}/index.html">{text}</a>'


def image_page_html(row: dict, prev: str | None, nxt: str | None, title: str = "xraydeconv projections") -> str:
    """The page of one image (``<folder>/index.html``): its views and every filter; ``prev``/``nxt`` are the
    neighbouring folders in the gallery's order (None at the ends)."""
    m, esc = row["manifest"], html.escape
    name = m.get("input_name") or row["folder"]
    views = ['<a href="overlay.png"><img class="main" src="overlay.png" alt="heat overlay"></a>']
    views += [f'<a href="{f}"><img class="main" src="{f}" alt="{f}"></a>' for f in ("focus.png", "landmarks.png")
              if f in m.get("files", [])]
    figs = []
    for f, pic in zip(m.get("filters", []), m.get("filter_pictures", [])):
        cap = f"#{f['rank']} ch {f['channel']} a={f['activation']:.3g}"
        figs.append(f'<figure data-src="{esc(pic, quote=True)}" data-caption="{esc(cap, quote=True)}">'
                    f'<img src="{esc(pic, quote=True)}" alt="{esc(cap, quote=True)}"><figcaption>{esc(cap)}'
                    "</figcaption></figure>")
    settings = " · ".join(f"{k}: {esc(str(m.get(k)))}" for k in ("model", "layer_module", "method", "mode", "top_n")
                          if m.get(k) is not None)
    maps_link = '<a href="maps.npy">maps.npy</a>' if "maps.npy" in m.get("files", ["maps.npy"]) else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(name)}: {esc(title)}</title>
<style>{STYLE}{_PAGE_STYLE}</style></head>
<body data-enlarged="0">
<nav>{_nav_link("prev", prev, "&larr; previous")}<a href="../index.html">all images</a>
{_nav_link("next", nxt, "next &rarr;")}
<span class="meta">arrow keys: previous / next image; click a filter to enlarge it</span></nav>
<h1>{esc(name)}</h1>
<div>{_prediction_line(m)}</div><div class="meta">{settings}</div>
<div class="views">{''.join(views)}</div>
<h2>Every filter ({len(figs)}), strongest first</h2>
<div id="filters">{''.join(figs)}</div>
<p class="files"><a href="grid.png">grid.png</a>{maps_link}
<a href="manifest.json">manifest.json</a></p>
<div id="lightbox"><img id="big" alt="enlarged filter"><div id="bigcap"></div></div>
<script>{_PAGE_SCRIPT}</script>
</body></html>
"""
