"""One self-contained HTML page a reviewer reads in MLflow's artifact viewer: a verdict banner with
the exact next command, then sections of text, figures and tables. All data text is escaped
(Jinja autoescape); images are inline PNG data URIs. The layout fits the viewer's frame: columns
wrap, images scale to the width, long tables are collapsed, cells are formatted (never reprs).

    render_page(path, title, verdict, summary, [Section("gates", "Gates", table=frame, table_class="gates")])
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jinja2 import Environment, select_autoescape
from markupsafe import Markup

from audit.examples import ExampleTable
from audit.verdict import Verdict

# Tables longer than this are collapsed behind a <details> toggle, so the page stays short.
COLLAPSE_ROWS = 12
# Cells with more characters than this may wrap inside words (CSS class `long`).
LONG_TEXT = 24
# An example's text is cut to this many characters in a cell (with an ellipsis).
SNIPPET_CHARS = 200

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0.8em; max-width: 100%; box-sizing: border-box;
       overflow-wrap: anywhere; font-size: 14px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.4em; }
table { border-collapse: collapse; margin: 0.4em 0 1em; width: 100%; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.4em; text-align: left; vertical-align: top;
         overflow-wrap: break-word; }
th { background: #f3f3f3; }
/* Long text may break anywhere, so a table never widens the page; numbers, labels and ids keep
   their width (ids still break at their hyphens). */
.long { overflow-wrap: anywhere; display: block; min-width: 6em; }
img { max-width: 100%; height: auto; }
img.thumb { width: 40px; height: 40px; image-rendering: pixelated; border: 1px solid #999; }
figure.thumb { display: inline-block; margin: 0 0.3em 0.2em 0; text-align: center; font-size: 0.75em; }
figure.thumb figcaption { max-width: 6em; }
figure.snippet { display: inline-block; margin: 0 0.3em 0.2em 0; font-size: 0.85em; max-width: 16em;
                 vertical-align: top; }
figure.snippet blockquote { margin: 0; padding: 0.2em 0.4em; border-left: 3px solid #999; background: #fafafa;
                            overflow-wrap: anywhere; }
figure.snippet figcaption { font-size: 0.85em; color: #555; }
.verdict { padding: 0.7em 1em; border: 2px solid; border-radius: 6px; margin: 0.5em 0 1em; }
.verdict.passed { background: #e8f5e9; border-color: #2e7d32; }
.verdict.failed { background: #ffebee; border-color: #c62828; }
.verdict p { margin: 0.2em 0 0.5em; font-weight: 600; }
code.next-command { display: block; background: #263238; color: #fff; padding: 0.5em; white-space: pre-wrap;
                    word-break: break-all; }
.yes { color: #2e7d32; } .no { color: #c62828; font-weight: 600; }
details summary { cursor: pointer; color: #1565c0; }
"""

_TEMPLATE = """<!doctype html>
<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>model-audit: {{ title }}</title><style>{{ style }}</style></head><body>
<h1>{{ title }}</h1>
<div id="verdict" class="verdict {{ 'passed' if verdict.passed else 'failed' }}">
<p>{{ verdict.headline }}</p>
{% if verdict.detail %}<div>{{ verdict.detail }}</div>{% endif %}
<div>Next:</div><code class="next-command">{{ verdict.next_command }}</code>
</div>
<p>{{ summary }}</p>
{% for s in sections %}
<section id="{{ s.id }}">
<h2>{{ s.heading }}</h2>
{% if s.text %}<p>{{ s.text }}</p>{% endif %}
{% if s.image %}<img alt="{{ s.heading }}" src="data:image/png;base64,{{ s.image }}">{% endif %}
{% if s.table is not none %}
{% if s.table | length == 0 %}<p><em>{{ s.empty_text }}</em></p>
{% else %}
{% set collapse = s.table | length > collapse_rows %}
{% if collapse %}<details><summary>Show all {{ s.table | length }} rows</summary>{% endif %}
<table class="{{ s.table_class }}"><thead><tr>
{%- for c in s.table.columns %}<th>{{ c | replace("_", " ") }}</th>{% endfor %}</tr></thead>
<tbody>{% for row in s.table.itertuples(index=False) %}<tr>
{%- for v in row %}<td>{{ v | cell }}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>
{% if collapse %}</details>{% endif %}
{% endif %}
{% endif %}
</section>
{% endfor %}
<p><small>Sign convention: a positive influence score means up-weighting that training example is predicted
to <em>lower</em> the flagged example's loss at the reviewer's label (helpful); a negative score pushes toward
the wrong prediction (harmful). Harmful examples whose label equals the wrong prediction are the usual
suspects for label noise.</small></p>
</body></html>
"""


@dataclass(frozen=True)
class Thumb:
    """An example's picture for a table cell: base64 PNG and a caption (shown under it)."""

    png: str
    caption: str = ""


@dataclass(frozen=True)
class Snippet:
    """An example's text for a table cell (cut to SNIPPET_CHARS) and a caption (shown under it)."""

    text: str
    caption: str = ""


@dataclass(frozen=True)
class Section:
    """One report section. `id` is its HTML id (stable: tests and links use it); `table` cells
    may be numbers, strings, lists, `Thumb`s, `Snippet`s or tuples of them; `table_class` the table's CSS
    class; `image` a base64 PNG shown above the table; `empty_text` replaces an empty table."""

    id: str
    heading: str
    text: str = ""
    table: pd.DataFrame | None = None
    table_class: str = ""
    image: str | None = None
    empty_text: str = "None."


def png_data(figure) -> str:
    """A matplotlib figure as base64 PNG (for inline <img>)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight", dpi=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def image_pixels(image: torch.Tensor) -> np.ndarray | None:
    """An input tensor as a uint8 picture, min-max scaled: grayscale [H, W] for [H, W] or [1, H, W]
    (dark = high, as the digits are drawn), RGB [H, W, 3] for [3, H, W], the mean over channels
    (grayscale) for other [C, H, W]; None when it is not an image (e.g. token ids, features)."""
    x = image.detach().float().cpu()
    if x.dim() == 3 and x.shape[0] == 3:
        rgb = x.permute(1, 2, 0).numpy()
        low, high = float(rgb.min()), float(rgb.max())
        scaled = (rgb - low) / (high - low) if high > low else np.zeros_like(rgb)
        return (255 * scaled).round().astype(np.uint8)
    if x.dim() == 3:
        x = x.mean(0)
    if x.dim() != 2:
        return None
    gray = x.numpy()
    low, high = float(gray.min()), float(gray.max())
    scaled = (gray - low) / (high - low) if high > low else np.zeros_like(gray)
    return (255 * (1.0 - scaled)).round().astype(np.uint8)


def thumbnail(image: torch.Tensor, caption: str = "") -> Thumb | str:
    """A `Thumb` of one example's input; for inputs that are not images, the caption alone."""
    from PIL import Image

    pixels = image_pixels(image)
    if pixels is None:
        return caption
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return Thumb(base64.b64encode(buffer.getvalue()).decode("ascii"), caption)


def example_cell(table: ExampleTable, i: int, caption: str = "") -> Thumb | Snippet | str:
    """Row `i` of `table` as a reviewer sees it in a cell: its text (a `Snippet`) when the table has
    `display`, else a picture of its input (`Thumb`; the caption alone when it is not a picture)."""
    if table.display is not None:
        text = table.display[i]
        return Snippet(text if len(text) <= SNIPPET_CHARS else text[:SNIPPET_CHARS - 1] + "\u2026", caption)
    return thumbnail(table.inputs[i], caption)


def shows_pictures(table: ExampleTable) -> bool:
    """Whether `table`'s examples are shown as pictures (no `display` text, image-shaped inputs)."""
    return table.display is None and len(table) > 0 and image_pixels(table.inputs[0]) is not None


def image_grid(images: torch.Tensor, captions: list[str], columns: int = 10):
    """Matplotlib figure of images [N, C, H, W] (C = 1 or 3) or [N, H, W], drawn as `image_pixels`
    makes them, with a caption under each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(images), 1)
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.1, rows * 1.35), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions, strict=False):
        ax.imshow(image_pixels(image), cmap="gray", vmin=0, vmax=255)
        ax.set_title(caption, fontsize=7)
    fig.tight_layout()
    return fig


def render_page(path: Path, title: str, verdict: Verdict, summary: str, sections: Sequence[Section]) -> Path:
    """Write the self-contained HTML page to `path`; returns it."""
    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
    env.filters["cell"] = format_cell
    html = env.from_string(_TEMPLATE).render(title=title, verdict=verdict, summary=summary, sections=sections,
                                             style=Markup(_STYLE), collapse_rows=COLLAPSE_ROWS)
    path.write_text(html, encoding="utf-8")
    return path


def format_cell(value: object) -> Markup | str:
    """A table cell as a reviewer reads it (escaped): floats to 4 significant digits, missing
    values as an en dash, booleans as yes/no, sequences joined by commas, `Thumb`s as pictures,
    `Snippet`s as small quoted text blocks."""
    if isinstance(value, Snippet):
        caption = Markup("<figcaption>%s</figcaption>") % value.caption if value.caption else ""
        return Markup('<figure class="snippet"><blockquote>%s</blockquote>%s</figure>') % (value.text, caption)
    if isinstance(value, Thumb):
        caption = Markup("<figcaption>%s</figcaption>") % value.caption if value.caption else ""
        picture = Markup('<img class="thumb" alt="%s" src="data:image/png;base64,%s">') % (value.caption, value.png)
        return Markup('<figure class="thumb">%s%s</figure>') % (picture, caption)
    if isinstance(value, (list, tuple, np.ndarray)):
        parts = [format_cell(v) for v in value]
        if any(isinstance(v, (Thumb, Snippet)) for v in value):
            return Markup("").join(parts)
        return Markup(", ").join(parts) if parts else "\u2013"
    if isinstance(value, (bool, np.bool_)):
        return Markup('<span class="yes">yes</span>') if value else Markup('<span class="no">no</span>')
    if value is None or value is pd.NA:
        return "\u2013"
    if isinstance(value, (float, np.floating)):
        return "\u2013" if math.isnan(value) else f"{float(value):.4g}"
    if isinstance(value, np.integer):
        return str(int(value))
    text = str(value)
    return Markup('<span class="long">%s</span>') % text if len(text) > LONG_TEXT else text  # Jinja escapes it
