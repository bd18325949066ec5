"""HTML reports with PNG plots, for analysers and extractions: something a person would rather look at.

    report = Report("MoE-fication of all-MiniLM-L6-v2", "16 experts, top-4, k-means partition")
    report.section("Quality vs experts")
    report.table(["experts", "cosine"], [[4, 0.70], [8, 0.84]], caption="…")
    fig, ax = report.figure_axes()
    ax.plot(...)
    report.figure(fig, "quality", caption="…")
    report.write(directory)         # report.html + the PNGs, next to each other

Plots are made with matplotlib's Agg backend (no screen needed).
"""

from __future__ import annotations

import datetime as _dt
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from posthoc.provenance import __version__

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:980px;margin:2rem auto;padding:0 1rem;
color:#1d1d1f;line-height:1.45}
h1{font-size:1.7rem;margin-bottom:.2rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.subtitle{color:#555;margin-top:0}table{border-collapse:collapse;margin:.8rem 0;font-size:.92rem}
th,td{border:1px solid #ddd;padding:.3rem .6rem;text-align:right}th{background:#f4f4f6}td:first-child,th:first-child{text-align:left}
caption{caption-side:bottom;color:#555;font-size:.85rem;padding-top:.3rem;text-align:left}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.85rem}
.kv{display:grid;grid-template-columns:max-content auto;gap:.2rem 1rem;font-size:.92rem}.kv div:nth-child(odd){color:#555}
.note{background:#fff8e6;border-left:4px solid #f0b400;padding:.5rem .8rem}
footer{margin-top:3rem;color:#888;font-size:.8rem}
"""


def _cell(value: Any, floatfmt: str) -> str:
    if isinstance(value, float):
        return html.escape(format(value, floatfmt))
    return html.escape(str(value))


class Report:
    """An HTML page built section by section; `write` puts it and its PNG figures in a directory."""

    def __init__(self, title: str, subtitle: str = ""):
        self.title = title
        self.subtitle = subtitle
        self._parts: list[str] = []
        self._figures: list[tuple[str, Any]] = []

    def section(self, heading: str, text: str | None = None) -> None:
        self._parts.append(f"<h2>{html.escape(heading)}</h2>")
        if text:
            self.paragraph(text)

    def paragraph(self, text: str) -> None:
        self._parts.append(f"<p>{html.escape(text)}</p>")

    def note(self, text: str) -> None:
        self._parts.append(f'<p class="note">{html.escape(text)}</p>')

    def key_values(self, items: dict[str, Any], floatfmt: str = ".4g") -> None:
        cells = "".join(f"<div>{html.escape(str(k))}</div><div>{_cell(v, floatfmt)}</div>" for k, v in items.items())
        self._parts.append(f'<div class="kv">{cells}</div>')

    def table(
        self, headers: Sequence[str], rows: Sequence[Sequence[Any]], *, caption: str = "", floatfmt: str = ".3f"
    ) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{_cell(v, floatfmt)}</td>" for v in row) + "</tr>" for row in rows)
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self._parts.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    @staticmethod
    def figure_axes(width: float = 7.0, height: float = 3.6, ncols: int = 1):
        """A matplotlib figure (Agg backend) and its axes, sized for the page."""
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, ncols, figsize=(width, height), constrained_layout=True)
        return fig, axes

    def figure(self, fig: Any, name: str, caption: str = "") -> None:
        """Add a matplotlib figure; it is saved as `<name>.png` when the report is written."""
        file_name = f"{name}.png"
        if any(existing == file_name for existing, _ in self._figures):
            raise ValueError(f"two figures are named {name!r}")
        self._figures.append((file_name, fig))
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self._parts.append(f'<figure><img src="{file_name}" alt="{html.escape(name)}">{cap}</figure>')

    def write(self, directory: str | Path, file_name: str = "report.html") -> Path:
        """Write the page and its PNGs into `directory` (typically an output's staging directory)."""
        import matplotlib.pyplot as plt

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for png, fig in self._figures:
            fig.savefig(directory / png, dpi=110)
            plt.close(fig)
        stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")

        page = (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>"
            + (f'<p class="subtitle">{html.escape(self.subtitle)}</p>' if self.subtitle else "")
            + "\n".join(self._parts)
            + f"<footer>posthoc {__version__} · {stamp}</footer></body></html>\n"
        )
        path = directory / file_name
        path.write_text(page)
        return path
