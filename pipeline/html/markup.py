"""HTML building blocks of the report: escaping, tables, sections, images as ``data:`` URIs, the CSS."""

from __future__ import annotations

import base64
import html
import io
import re
from typing import Any

THUMB_PX = 128  # longest side of a sample thumbnail

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c5cad6}main{padding:8px 28px 40px;max-width:1180px}
section{background:#fff;border:1px solid #dfe3ea;border-radius:8px;padding:14px 20px;margin:18px 0}
h2{font-size:18px;margin:4px 0 10px}h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0}td,th{border-bottom:1px solid #e6e9ef;padding:4px 10px;text-align:left;
vertical-align:top}th{background:#f0f2f6}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
img.plot{max-width:100%;display:block;margin:8px 0}.note{color:#5b6478}.warn{color:#a4330c}
.kpis{display:flex;gap:14px;flex-wrap:wrap}.kpi{background:#f0f2f6;border-radius:6px;padding:8px 14px}
.kpi b{display:block;font-size:20px}.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:12px}
.card{border:1px solid #dfe3ea;border-radius:6px;padding:8px;display:flex;gap:10px;font-size:12.5px}
.card img,.noimg{width:96px;height:96px;object-fit:contain;flex:none;background:#eef0f4;border-radius:4px}
.noimg{display:flex;align-items:center;justify-content:center;text-align:center;color:#8a92a3;font-size:11px}
.badge{display:inline-block;border-radius:4px;padding:0 6px;font-size:11.5px;background:#e4e7ee}
.badge.ok{background:#d7f0dc;color:#17622a}.badge.bad{background:#fbe0d6;color:#8c2a0a}
.card p{margin:2px 0}pre{background:#f3f4f7;padding:8px;overflow:auto;font-size:12px;max-height:420px}
ul.rw{margin:2px 0;padding-left:16px}
.grid.pair{grid-template-columns:repeat(2,minmax(260px,420px));margin-bottom:8px}
"""


def e(x: Any) -> str:
    """``x`` as escaped HTML text (None: empty)."""
    return html.escape("" if x is None else str(x))


def anchor(name: str) -> str:
    """A section id made from a name from the data (a stage or column name, a plug-in path)."""
    return re.sub(r"[^A-Za-z0-9-]+", "-", name.replace("_", "-")).strip("-").lower() or "x"


def png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def img(uri: str, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" alt="{e(alt)}" src="{uri}">'


def thumb(data: bytes) -> str | None:
    """A JPEG thumbnail of encoded image bytes as a ``data:`` URI (None: not an image)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
    except Exception:  # noqa: BLE001 - a broken image gets a card without a picture
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def table(headers: list[str], rows: list[list[Any]], numeric: set[int] = frozenset()) -> str:
    th = "".join(f"<th{' class=n' if i in numeric else ''}>{e(h)}</th>" for i, h in enumerate(headers))
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=n' if i in numeric else ''}>{e(c)}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{e(title)}</h2>{body}</section>'


def note(text: str, cls: str = "note") -> str:
    return f'<p class="{cls}">{e(text)}</p>'


def fmt_num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def share(n: int, total: int) -> str:
    return f"{n / total:.1%}" if total else "-"
