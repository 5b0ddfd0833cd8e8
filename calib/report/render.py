"""What every section of ``calib report``'s page is drawn with: a matplotlib figure on an explicit Agg canvas (nothing
touches pyplot's global state), its PNG, an ``<img>`` holding the PNG as base64 (the page stays self-contained) and a
table whose chosen row is marked."""

from __future__ import annotations

import base64
import html
import io


def figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def table(headers, rows, chosen_index=None, left=()) -> str:
    """An HTML table; floats to 4 significant digits, None as a dash, row ``chosen_index`` marked ``chosen``."""
    out = ["<table><tr>" + "".join(f'<th class="{"l" if i in left else ""}">{html.escape(str(h))}</th>'
                                   for i, h in enumerate(headers)) + "</tr>"]
    for j, r in enumerate(rows):
        cls = ' class="chosen"' if j == chosen_index else ""
        cells = []
        for i, v in enumerate(r):
            text = (f"{v:.4g}" if isinstance(v, float) else "—" if v is None else str(v))
            cells.append(f'<td class="{"l" if i in left else ""}">{html.escape(text)}</td>')
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"
