"""report.html: one self-contained page a reviewer reads in the MLflow UI. All data text is
escaped (Jinja autoescape); images are inline PNG data URIs."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jinja2 import Environment, select_autoescape

_TEMPLATE = """<!doctype html>
<html><head><meta charset="utf-8"><title>model-audit: {{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; } .neg { color: #a00; } .pos { color: #060; }
</style></head><body>
<h1>{{ title }}</h1>
<p>{{ summary }}</p>
<p>Sign convention: a positive score means up-weighting that training example is predicted to
<em>lower</em> the flagged example's loss at the reviewer's label (helpful); a negative score
pushes toward the wrong prediction (harmful). Harmful examples whose label equals the wrong
prediction are the usual suspects for label noise.</p>
{% for section in sections %}
<h2>{{ section.heading }}</h2>
{% if section.text %}<p>{{ section.text }}</p>{% endif %}
{% if section.image %}<img alt="{{ section.heading }}" src="data:image/png;base64,{{ section.image }}">{% endif %}
{% if section.table is not none %}
<table><tr>{% for c in section.table.columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for row in section.table.itertuples(index=False) %}<tr>
{%- for v in row %}<td>{{ v | cell }}</td>{% endfor %}</tr>{% endfor %}
</table>{% endif %}
{% endfor %}
</body></html>
"""


def png_data(figure) -> str:
    """A matplotlib figure as base64 PNG (for inline <img>)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight", dpi=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def image_grid(images: torch.Tensor, captions: list[str], columns: int = 10):
    """Matplotlib figure of images [N, 1, H, W] (or [N, H, W]) with a caption under each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(images), 1)
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.1, rows * 1.35), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions, strict=False):
        ax.imshow(image.reshape(image.shape[-2], image.shape[-1]).numpy(), cmap="gray_r")
        ax.set_title(caption, fontsize=7)
    fig.tight_layout()
    return fig


def section(heading: str, text: str = "", table: pd.DataFrame | None = None, image: str | None = None) -> dict:
    """One report section: a heading, optional paragraph, table and inline PNG."""
    return {"heading": heading, "text": text, "table": table, "image": image}


def render_report(path: Path, title: str, summary: str, sections: list[dict]) -> Path:
    """Write the self-contained HTML report to `path`; returns it."""
    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
    env.filters["cell"] = _cell
    html = env.from_string(_TEMPLATE).render(title=title, summary=summary, sections=sections)
    path.write_text(html, encoding="utf-8")
    return path


def _cell(value: object) -> object:
    """Table cells: floats to 4 significant digits, NaN/None as an en dash."""
    if value is None or value is pd.NA:
        return "\u2013"
    if isinstance(value, (float, np.floating)):
        return "\u2013" if math.isnan(value) else f"{float(value):.4g}"
    return value
