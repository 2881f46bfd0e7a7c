"""The building blocks of the report pages: the shared style and script, tables, cells, numbers, images.

``page`` wraps a body into a self-contained HTML document (no external resources); ``table`` and ``Cell``
make sortable tables, ``number``/``fmt``/``duration`` the numbers in them, ``png_image`` an embedded
figure. The run report (``html``), the comparison page (``compare``) and the core view (``core``) share
them.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from html import escape
from typing import Any, Sequence

CSS = """
:root{--ink:#1d232b;--muted:#667085;--line:#d9dee5;--soft:#f5f7fa;--accent:#1f5fa8}
*{box-sizing:border-box}
body{margin:0;font:14px/1.5 -apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:var(--ink);background:#fff}
main{max-width:1180px;margin:0 auto;padding:28px 32px 64px}
h1{font-size:24px;margin:0 0 2px}
h2{font-size:17px;margin:34px 0 10px;padding-bottom:4px;border-bottom:1px solid var(--line)}
h3{font-size:14px;margin:18px 0 6px}
.sub{color:var(--muted);margin:0 0 18px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(330px,1fr));gap:8px 32px;align-items:start}
table{border-collapse:collapse;font-size:13px;margin:4px 0 8px}
th,td{padding:4px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:var(--soft);font-weight:600;white-space:nowrap}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.name{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12px;white-space:nowrap}
td.na{color:#98a2b3}
tr.ref td{color:#475467;background:#fbfcfd}
table.facts th{background:none;font-weight:500;color:var(--muted);width:1%}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th[data-order=asc]::after{content:" \\25B2";font-size:10px}
table.sortable th[data-order=desc]::after{content:" \\25BC";font-size:10px}
.scroll{max-height:460px;overflow:auto;border:1px solid var(--line);display:inline-block;max-width:100%}
.scroll table{margin:0}.scroll th{position:sticky;top:0;z-index:1}
pre{background:var(--soft);border:1px solid var(--line);padding:10px 12px;white-space:pre-wrap;
word-break:break-all;font-size:12.5px}
.figure{overflow:auto;border:1px solid var(--line);padding:6px;background:#fff}
.figure svg,.figure img{max-width:100%;height:auto;display:block}
.note{color:var(--muted);font-size:12.5px}
.yes{color:#1a7f37;font-weight:600}.no{color:#b42318}
details{margin:8px 0}summary{cursor:pointer;font-weight:600}
svg.focus .edge{opacity:.07}svg.focus .edge.on{opacity:1}
#settings td.name{white-space:normal;word-break:break-all}
"""

SCRIPT = """
(function(){
  function key(row, i){
    var cell = row.cells[i]; var v = cell.getAttribute('data-v');
    if (v === null) v = cell.textContent.trim();
    var n = parseFloat(v); return isNaN(n) || !/^[-+0-9.eE]+$/.test(v) ? {s: v.toLowerCase()} : {n: n};
  }
  function cmp(a, b){
    if ('n' in a && 'n' in b) return a.n - b.n;
    if ('n' in a) return -1; if ('n' in b) return 1;
    return a.s < b.s ? -1 : a.s > b.s ? 1 : 0;
  }
  document.querySelectorAll('table.sortable').forEach(function(table){
    table.querySelectorAll('thead th').forEach(function(th, i){
      th.title = 'click to sort';
      th.addEventListener('click', function(){
        var asc = th.getAttribute('data-order') !== 'asc';
        table.querySelectorAll('thead th').forEach(function(h){ h.removeAttribute('data-order'); });
        th.setAttribute('data-order', asc ? 'asc' : 'desc');
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function(a, b){ var c = cmp(key(a, i), key(b, i)); return asc ? c : -c; });
        rows.forEach(function(r){ body.appendChild(r); });
      });
    });
  });
  document.querySelectorAll('svg.hap-circuit').forEach(function(svg){
    var edges = svg.querySelectorAll('.edge');
    svg.querySelectorAll('.node, .kv').forEach(function(node){
      var name = node.getAttribute('data-node');
      node.addEventListener('mouseenter', function(){
        svg.classList.add('focus');
        edges.forEach(function(e){
          var on = e.getAttribute('data-source') === name || e.getAttribute('data-target') === name;
          e.classList.toggle('on', on);
        });
      });
      node.addEventListener('mouseleave', function(){ svg.classList.remove('focus'); });
    });
  });
  document.documentElement.setAttribute('data-ready', '1');
})();
"""


@dataclass(frozen=True)
class Cell:
    """A table cell: ``text`` (escaped unless ``raw``), a sort key ``value``, and a CSS class."""

    text: str
    value: float | str | None = None
    cls: str = ""
    raw: bool = False
    title: str = ""


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table: ``n/a`` for missing or non-finite, thousands separators for ints."""
    if value is None or isinstance(value, bool):
        return "n/a" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else "n/a"
    return str(value)


def number(value: Any, digits: int = 4) -> Cell:
    """A right-aligned numeric cell (greyed ``n/a`` when missing) that sorts by value."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return Cell(fmt(value, digits), value if ok else None, "num" if ok else "num na")


def duration(seconds: Any) -> str:
    """Seconds as ``12.3 s``, ``4 min 05 s`` or ``2 h 03 min``; ``n/a`` when missing."""
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "n/a"
    if seconds < 60:
        return f"{seconds:.3g} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def table(headers: Sequence[str | Cell], rows: Sequence[Sequence[str | Cell]], *, sortable: bool = False,
          table_id: str = "", row_classes: Sequence[str] | None = None, scroll: bool = False,
          cls: str = "") -> str:
    """An HTML table (no header row when ``headers`` is empty); with ``sortable`` a click on a header sorts
    by that column, by each cell's ``value`` where it has one."""
    classes = " ".join(c for c in (cls, "sortable" if sortable else "") if c)
    attrs = (f' id="{escape(table_id)}"' if table_id else "") + (f' class="{classes}"' if classes else "")

    def cell(item: str | Cell, tag: str) -> str:
        item = item if isinstance(item, Cell) else Cell(str(item))
        extra = f' class="{item.cls}"' if item.cls else ""
        extra += f' data-v="{escape(str(item.value))}"' if item.value is not None else ""
        extra += f' title="{escape(item.title)}"' if item.title else ""
        return f"<{tag}{extra}>{item.text if item.raw else escape(item.text)}</{tag}>"

    head = f"<thead><tr>{''.join(cell(h, 'th') for h in headers)}</tr></thead>" if headers else ""
    body = []
    for i, row in enumerate(rows):
        row_cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{row_cls}>" + "".join(cell(c, "td") for c in row) + "</tr>")
    html = f"<table{attrs}>{head}<tbody>{''.join(body)}</tbody></table>"
    return f'<div class="scroll">{html}</div>' if scroll else html


def png_image(data: bytes, alt: str) -> str:
    """An ``<img>`` with the PNG embedded as a base64 data URL."""
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def page(title: str, body: str, css: str = "", script: str = "") -> str:
    """A complete HTML document with the shared style and script (and ``css``/``script`` after them); no
    external resources."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{CSS}{css}</style></head>\n<body><main>\n{body}\n</main>"
            f"<script>{script}</script><script>{SCRIPT}</script></body></html>\n")
