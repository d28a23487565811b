"""One small inline SVG per metric: every utterance a dot, one colour per configuration, bounds dashed.

Plain SVG written here, so the page needs no plotting library and opens in any browser from disk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

WIDTH, HEIGHT = 760, 190  # px: one plot per row of the page
_LEFT, _RIGHT, _TOP, _BOTTOM = 58, 12, 22, 18  # px margins: y tick labels on the left, title on top
COLOURS = ("#1f77b4", "#ff7f0e")  # side A, side B
_BOUND = "#d62728"


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def metric_svg(
    title: str, labels: Sequence[str], series: Mapping[str, Sequence[float | None]], bounds: Sequence[float] = ()
) -> str:
    """An SVG of `series` (side name -> one value per label, None for not measured) with `bounds` as dashed lines."""
    values = [v for vs in series.values() for v in vs if v is not None]
    head = f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" class="plot">'
    head += f'<text x="{_LEFT}" y="14" font-size="13" font-weight="bold">{escape(title)}</text>'
    if not values:
        return head + f'<text x="{_LEFT}" y="{HEIGHT // 2}" font-size="12">not measured</text></svg>'
    lo, hi = min([*values, *bounds]), max([*values, *bounds])
    if hi == lo:
        lo, hi = lo - 1, hi + 1
    pad = (hi - lo) * 0.05
    lo, hi = lo - pad, hi + pad
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    n = max(len(labels), 1)

    def x(i: int, side: int) -> float:
        return _LEFT + (i + 0.5 + (side - (len(series) - 1) / 2) * 0.25) * plot_w / n

    def y(v: float) -> float:
        return _TOP + (hi - v) / (hi - lo) * plot_h

    parts = [head, f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#ccc"/>']
    for tick in (lo + pad, (lo + hi) / 2, hi - pad):
        parts.append(
            f'<text x="{_LEFT - 4}" y="{y(tick) + 4:.1f}" font-size="11" text-anchor="end">{_fmt(tick)}</text>'
            f'<line x1="{_LEFT}" x2="{WIDTH - _RIGHT}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#eee"/>'
        )
    for bound in bounds:
        parts.append(
            f'<line x1="{_LEFT}" x2="{WIDTH - _RIGHT}" y1="{y(bound):.1f}" y2="{y(bound):.1f}" '
            f'stroke="{_BOUND}" stroke-dasharray="5,4"><title>bound {_fmt(bound)}</title></line>'
        )
    for s, (name, vs) in enumerate(series.items()):
        colour = COLOURS[s % len(COLOURS)]
        for i, (label, v) in enumerate(zip(labels, vs, strict=True)):
            if v is not None:
                parts.append(
                    f'<circle cx="{x(i, s):.1f}" cy="{y(v):.1f}" r="3.5" fill="{colour}">'
                    f"<title>{escape(name)} {escape(label)}: {_fmt(v)}</title></circle>"
                )
        parts.append(
            f'<text x="{WIDTH - _RIGHT - 60 * (len(series) - s)}" y="14" font-size="12" fill="{colour}">'
            f"&#9679; {escape(name)}</text>"
        )
    parts.append(
        f'<text x="{_LEFT}" y="{HEIGHT - 4}" font-size="11" fill="#666">{n} utterances, in table order</text></svg>'
    )
    return "".join(parts)
